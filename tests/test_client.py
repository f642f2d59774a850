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
from selfflow_robot.policies.client import WebsocketClientPolicy
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


@pytest.fixture()
def counting_server():
    calls = [0]

    def predict(obs):
        calls[0] += 1
        return np.array([[10.0 * (calls[0] - 1) + i, 0.0] for i in range(3)], np.float32)

    s = PolicyServer(Policy(predict, {"action_dim": 2}), port=0)
    s.start_in_thread()
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
