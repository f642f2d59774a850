"""`python -m selfflow_robot.policies.bench`: --help, unknown keys refused, documented commands valid."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from selfflow_robot.policies import bench

ROOT = Path(__file__).parent.parent


def _run(*args):
    return subprocess.run([sys.executable, "-m", "selfflow_robot.policies.bench", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_the_keys_and_defaults():
    """--help crashed: ValueError: dictionary update sequence element #0 has length 1; 2 is required."""
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for key in bench.KEYS:
        assert re.search(rf"^  {key} ", r.stdout, re.M), key
    assert re.search(r"^  iters +200 ", r.stdout, re.M) and re.search(r"^  random_model +null ", r.stdout, re.M)


def test_unknown_key_is_refused_with_a_suggestion():
    """ranom_model=tiny was ignored silently (exit code 0, no model timed)."""
    r = _run("ranom_model=tiny")
    assert r.returncode == 2 and "unknown key 'ranom_model' (did you mean 'random_model'?)" in r.stderr, r.stderr
    r = _run("iters")
    assert r.returncode == 2 and "expected key=value" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="did you mean 'random_model'"):  # bench policy +policy_bench.ranom_model=
        bench.main({"policy_bench": {"ranom_model": "tiny"}})


def test_documented_standalone_commands_use_known_keys():
    found = 0
    for doc in ("docs/serving.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for cmd in re.findall(r"`python -m selfflow_robot\.policies\.bench([^`]*)`", text):
            words = [w[1:-1] if re.fullmatch(r"\[\w+=[^\[\]]*\]", w) else w for w in shlex.split(cmd)]
            words = [w for w in words if "=" in w]
            assert words, cmd
            bench.parse_args(words)  # SystemExit(2) on an unknown key
            found += 1
    assert found >= 3
