"""examples/robot_client.py against a live server: the control loop, asynchronous inference, the watchdog."""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from selfflow_robot.policies.policy import Policy
from selfflow_robot.policies.server import PolicyServer

EXAMPLE = Path(__file__).parent.parent / "examples" / "robot_client.py"


def _serve(delay_after: int = 10**9, delay: float = 0.0) -> PolicyServer:
    """A two-camera, state-taking fake policy; calls after the first `delay_after` take `delay` s."""
    calls = [0]

    def predict(obs):
        assert obs["state"].shape == (3,) and set(obs["images"]) == {"wrist"}
        calls[0] += 1
        if calls[0] > delay_after:
            time.sleep(delay)
        return np.full((4, 2), 0.1, np.float32)

    meta = {"action_dim": 2, "action_chunk": 4, "image_size": [16, 40], "state_dim": 3, "views": ["top", "wrist"]}
    server = PolicyServer(Policy(predict, meta), port=0)
    server.start_in_thread()
    return server


def _run(port: int, *args) -> dict:
    r = subprocess.run([sys.executable, str(EXAMPLE), "--url", f"ws://127.0.0.1:{port}", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


def test_robot_client_runs_the_loop():
    server = _serve()
    try:
        summary = _run(server.port, "--steps", "12", "--hz", "50", "--max-delta", "0.5")
    finally:
        server.stop()
    assert summary["steps"] == 12 and summary["holds"] == 0


def test_robot_client_watchdog_holds_the_robot_when_the_server_stalls():
    server = _serve(delay_after=1, delay=1.2)  # the second chunk takes 1.2 s
    try:
        summary = _run(server.port, "--steps", "8", "--hz", "50", "--deadline", "0.3")
    finally:
        server.stop()
    assert summary["holds"] >= 1 and summary["starved_steps"] >= 1


def test_robot_client_needs_no_torch():
    code = (f"import runpy, sys; runpy.run_path({str(EXAMPLE)!r}, run_name='not_main'); "
            "bad = [m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules]; assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_robot_client_holds_through_a_server_restart_and_gives_up_on_a_lost_one():
    """It died with a traceback and left the arm on its last command when the server went away."""
    server = _serve()
    port = server.port
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--url", f"ws://127.0.0.1:{port}", "--steps", "60",
                             "--hz", "20", "--reconnect-timeout", "20"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # start-up and some steps
        server.stop()
        time.sleep(1.0)
        server = PolicyServer(server.policy, port=port)
        server.start_in_thread()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    summary = ast.literal_eval(out.strip().splitlines()[-1])
    assert summary["steps"] == 60 and summary["outages"] == 1 and summary["holds"] >= 1
    assert "the robot holds while reconnecting" in out and "reconnected after" in out
    server = _serve()  # this time it does not come back
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--url", f"ws://127.0.0.1:{server.port}", "--steps",
                             "400", "--hz", "20", "--reconnect-timeout", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        server.stop()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "did not come back within 1 s; the robot holds" in err
    assert "Traceback" not in err
