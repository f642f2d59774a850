"""Ctrl-C landing inside a weakref callback (garbage collection) still stops the command."""
import signal
import subprocess
import sys
import weakref

import pytest

from selfflow_robot.interrupts import deliver_swallowed_interrupts

# SIGINT arrives while a weakref callback runs (as when a finished run's objects are freed): Python
# raises KeyboardInterrupt inside the callback, where it can only be printed and ignored.
SCRIPT = """
import os, signal, time, weakref
from selfflow_robot import cli

class Run:
    pass

def freed(_):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10000):  # the handler runs at one of these bytecodes, inside the callback
        pass

with cli.reported_errors("the finished runs are kept"):
    run = Run()
    ref = weakref.ref(run, freed)
    del run
    WORK
print("ran on after Ctrl-C")
"""


# The command goes on (the Ctrl-C must end it at once) or ends right away (it must not exit 0).
@pytest.mark.parametrize("work", ["time.sleep(30); print('ran on')", "pass"], ids=["goes-on", "ends"])
def test_ctrl_c_inside_a_weakref_callback_still_stops_the_command(work):
    script = SCRIPT.replace("WORK", work)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.stdout, proc.stderr)
    assert "ran on" not in proc.stdout
    assert proc.stderr.strip() == "interrupted: the finished runs are kept"  # no "Exception ignored" traceback


def test_other_unraisable_exceptions_reach_the_previous_hook_and_both_hooks_are_restored(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))

    class Obj:
        pass

    def broken(_):
        raise ValueError("in a callback")

    with deliver_swallowed_interrupts():
        obj = Obj()
        ref = weakref.ref(obj, broken)  # noqa: F841 (the callback needs the ref alive)
        del obj
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert seen == [ValueError]
    assert sys.unraisablehook.__name__ == "<lambda>"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
