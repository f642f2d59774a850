"""Suite-wide reporting: how long the real-SIMPLER tests took (issue 17: CI says what that part costs)."""
from __future__ import annotations

_simpler_seconds: dict[str, float] = {}  # test outcome ("passed", "skipped", ...) or "setup/teardown" -> s


def pytest_runtest_logreport(report):
    if report.nodeid.split("::")[0].endswith("test_simpler_real.py"):
        key = report.outcome if report.when == "call" else "setup/teardown"
        _simpler_seconds[key] = _simpler_seconds.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if _simpler_seconds:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(_simpler_seconds.items()))
        terminalreporter.write_line(f"real SIMPLER tests (tests/test_simpler_real.py): "
                                    f"{sum(_simpler_seconds.values()):.0f} s ({parts})")
