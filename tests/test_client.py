"""Websocket client: torch-free import, numpy-1.24-safe source, client-side chunking/safety."""
import ast
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import selfflow_robot.policies as policies_pkg
from selfflow_robot.policies import ChunkConfig, SafetyConfig
from selfflow_robot.policies.client import PolicyServerError, WebsocketClientPolicy
from selfflow_robot.policies.policy import Policy
from selfflow_robot.policies.server import PolicyServer

PKG = Path(policies_pkg.__file__).parent
CLIENT_SIDE = ["client.py", "msgpack_numpy.py", "chunking.py", "safety.py", "__init__.py"]
IMG = np.zeros((16, 20, 3), np.uint8)


def test_client_import_pulls_no_torch():
    code = ("import sys\n"
            "from selfflow_robot.policies.client import WebsocketClientPolicy\n"
            "import selfflow_robot.policies as p; p.ChunkConfig; p.SafetyConfig\n"
            "bad = [m for m in ('torch', 'omegaconf', 'hydra', 'safetensors') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_client_side_modules_import_only_numpy_msgpack_websockets_stdlib():
    allowed = {"numpy", "msgpack", "websockets", "__future__"} | set(sys.stdlib_module_names)
    for name in CLIENT_SIDE:
        tree = ast.parse((PKG / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] in allowed, f"{name} imports {m}"


# numpy >= 2.0-only spellings that would break a robot's or SimplerEnv's numpy 1.24
NUMPY2_ONLY = r"np\.(bool|long|ulong|concat|permute_dims|unstack|isdtype|astype|vecdot|matrix_transpose|" \
              r"trapezoid|cumulative_sum|cumulative_prod|exceptions|dtypes|_core|char\.\w+)\b|copy=None"


def test_client_side_source_avoids_numpy2_only_api():
    for name in CLIENT_SIDE:
        hits = re.findall(NUMPY2_ONLY, (PKG / name).read_text())
        assert not hits, f"{name} uses numpy-2-only API: {hits}"


def _counting(horizon: int, step: float, delay: float = 0.0):
    """A server whose n-th chunk (n from 0) holds actions step * n + i, i < horizon, after `delay` s."""
    calls = [0]

    def predict(obs):
        if obs.get("instruction") == "fail":
            raise RuntimeError("model blew up")
        time.sleep(delay)
        calls[0] += 1
        return np.array([[step * (calls[0] - 1) + i, 0.0] for i in range(horizon)], np.float32)

    s = PolicyServer(Policy(predict, {"action_dim": 2}), port=0)
    s.start_in_thread()
    return s, calls


@pytest.fixture()
def counting_server():
    s, calls = _counting(horizon=3, step=10.0)
    yield s, calls
    s.stop()


def test_client_receding_horizon(counting_server):
    s, calls = counting_server
    with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", chunk=ChunkConfig(execute_steps=2)) as c:
        c.reset("x")
        got = [float(c.act({"image": IMG})[0]) for _ in range(5)]
    assert got == [0, 1, 10, 11, 20] and calls[0] == 3


def test_client_ensembling_and_step_safety(counting_server):
    s, calls = counting_server
    k = 0.3
    with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", chunk=ChunkConfig(ensemble=True, ensemble_k=k),
                               safety=SafetyConfig(max_delta=[4.0, 1.0])) as c:
        got = [float(c.act({"image": IMG})[0]) for _ in range(3)]
    e1, e2 = np.exp(-k), np.exp(-2 * k)
    ens = [0.0, (1 + 10 * e1) / (1 + e1), (2 + 11 * e1 + 20 * e2) / (1 + e1 + e2)]
    # per-step delta limit 4.0 on dim 0: step 1 at most 4.0, step 2 at most 8.0
    np.testing.assert_allclose(got, [ens[0], min(ens[1], 4.0), min(ens[2], 8.0)], rtol=1e-6)
    assert calls[0] == 3


def test_client_timeout_and_refused_connection():
    s = PolicyServer(Policy(lambda o: time.sleep(1.5) or np.zeros((1, 2), np.float32), {"action_dim": 2}), port=0)
    s.start_in_thread()
    try:
        c = WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", timeout=0.3)
        with pytest.raises(TimeoutError):
            c.infer({"image": IMG})
        c.timeout = 5.0  # the late reply must not be taken for this one: the client reconnected
        r = c.infer({"image": IMG})
        assert r["actions"].shape == (1, 2) and r["server_timing"]["roundtrip_ms"] > 1000
        c.close()
    finally:
        s.stop()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        WebsocketClientPolicy(f"ws://127.0.0.1:{port}", timeout=1)


def test_client_waits_for_a_late_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = PolicyServer(Policy(lambda o: np.zeros((1, 2), np.float32), {"action_dim": 2}), port=port)
    threading.Timer(0.7, s.start_in_thread).start()
    try:
        with WebsocketClientPolicy(f"ws://127.0.0.1:{port}", wait_for_server=10) as c:
            assert c.metadata["action_dim"] == 2
    finally:
        s.stop()


BLOCK_HEAVY = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'omegaconf', 'hydra', 'safetensors', 'einops'):\n"
               "            raise ImportError(f'{name} is blocked: the client must not need it')\n"
               "sys.meta_path.insert(0, Block())\n")


def test_client_round_trip_without_torch_installed(counting_server):
    """A robot computer has numpy, msgpack and websockets only: make the heavy packages unimportable."""
    s, _ = counting_server
    code = BLOCK_HEAVY + (
        "import numpy as np\n"
        "from selfflow_robot.policies.client import WebsocketClientPolicy\n"
        f"with WebsocketClientPolicy('ws://127.0.0.1:{s.port}') as c:\n"
        "    c.reset('pick coke can')\n"
        "    r = c.infer({'image': np.zeros((16, 20, 3), np.uint8)})\n"
        "print(r['actions'].shape, c.metadata['action_dim'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 2) 2"


@pytest.fixture()
def slow_server():
    """Chunks of 6 actions, action i of call n = 100 n + i, each after a 0.4 s 'model'."""
    s, calls = _counting(horizon=6, step=100.0, delay=0.4)
    yield s, calls
    s.stop()


def test_async_client_acts_while_the_next_chunk_is_computed(slow_server):
    s, calls = slow_server
    with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", refill_below=0.5) as c:
        c.reset("x")
        got, slow_steps = [], []
        for step in range(9):
            t0 = time.perf_counter()
            got.append(float(c.act({"image": IMG})[0]))
            if time.perf_counter() - t0 > 0.3:
                slow_steps.append(step)
            time.sleep(0.1)  # the robot's control period
    # step 3 sends its observation (3 of 6 actions left); the chunk is used from the step the robot
    # has reached, so steps 6.. execute actions 3.. of it, whenever it arrived
    assert got == [0, 1, 2, 3, 4, 5, 103, 104, 105], got
    assert slow_steps[0] == 0 and 3 not in slow_steps and 4 not in slow_steps  # only the first chunk is awaited
    assert calls[0] == 3  # step 6 sent the next observation; close() waited for it


def test_async_client_reset_drops_the_chunk_in_flight_and_errors_surface(slow_server):
    s, calls = slow_server
    with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", refill_below=0.9) as c:
        c.reset("x")
        assert float(c.act({"image": IMG})[0]) == 0
        c.act({"image": IMG})  # 4 of 6 left <= 0.9 x 6: the next chunk is requested
        c.reset("y")           # ... and waited for, then discarded
        assert calls[0] == 2 and float(c.act({"image": IMG})[0]) == 200  # a fresh chunk, from step 0
        c.reset("fail")
        with pytest.raises(PolicyServerError, match="model blew up"):
            c.act({"image": IMG})
    with pytest.raises(ValueError, match="refill_below"):
        WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}", refill_below=1.5)


def _free_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_connection_error_naming_the_url():
    """It was a bare `ConnectionRefusedError: [Errno 111]` without the URL."""
    url = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match=re.escape(url) + ": .*Connection refused") as e:
        WebsocketClientPolicy(url, timeout=1)
    assert isinstance(e.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ConnectionError, match=re.escape(url) + r" after trying for \d+\.\d s"):
        WebsocketClientPolicy(url, timeout=1, wait_for_server=0.3)


def test_wrong_key_is_a_permission_error_naming_the_url(monkeypatch):
    monkeypatch.delenv("SELFFLOW_API_KEY", raising=False)
    s = PolicyServer(Policy(lambda o: np.zeros((1, 2), np.float32), {"action_dim": 2}), port=0, api_key="k")
    s.start_in_thread()
    url = f"ws://127.0.0.1:{s.port}"
    try:
        for key in (None, "wrong"):
            with pytest.raises(PermissionError, match=re.escape(url) + r".*HTTP 401.*check api_key"):
                WebsocketClientPolicy(url, api_key=key)
    finally:
        s.stop()


@pytest.mark.parametrize("url, hint", [("http://127.0.0.1:8000", "ws://127.0.0.1:8000"),
                                       ("127.0.0.1:8000", "ws://127.0.0.1:8000"),
                                       ("https://gpu-box/policy", "wss://gpu-box/policy"),
                                       ("ws://host:port", "ws://HOST:PORT")])
def test_a_url_that_is_not_ws_says_how_to_write_it(url, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        WebsocketClientPolicy(url, timeout=1)


EXAMPLE = Path(__file__).parent.parent / "examples" / "robot_client.py"


@pytest.mark.parametrize("args, flag", [(["--hz", "0"], "--hz"), (["--refill-below", "1.5"], "--refill-below"),
                                        (["--url", "http://127.0.0.1:8000"], "--url"),
                                        (["--execute-steps", "0"], "--execute-steps")])
def test_robot_client_example_refuses_bad_arguments(args, flag):
    """--hz 0 was a ZeroDivisionError, --refill-below 1.5 a ValueError traceback (examples/robot_client.py)."""
    r = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"error: argument {flag}: " in r.stderr and "Traceback" not in r.stderr, r.stderr

