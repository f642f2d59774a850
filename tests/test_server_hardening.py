"""What hostile or careless clients did to the policy server (loopback only): each case failed before its fix."""
import logging
import socket
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from selfflow_robot.policies import msgpack_numpy as mn
from selfflow_robot.policies.client import WebsocketClientPolicy
from selfflow_robot.policies.policy import MAX_WARNED_SIZES, Policy
from selfflow_robot.policies.server import PolicyServer

IMG = np.zeros((8, 10, 3), np.uint8)


def _zeros_policy(seen=None):
    def predict(obs):
        if seen is not None:
            seen.append(obs["instruction"])
        return np.zeros((2, 2), np.float32)
    return Policy(predict, {"action_dim": 2})


@pytest.fixture
def start():
    servers = []

    def _start(policy=None, **kw):
        s = PolicyServer(policy or _zeros_policy(), port=0, **kw)
        s.start_in_thread()
        servers.append(s)
        return s
    yield _start
    for s in servers:
        s.stop()


def _handshake(port: int, extra_headers: str) -> str:
    """The status line the server answers to a websocket upgrade with these raw header lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   + extra_headers + "\r\n").encode())
        return c.recv(200).split(b"\r\n")[0].decode()


def test_a_repeated_key_header_is_refused_quietly(start, caplog):
    s = start(api_key="k")
    with caplog.at_level(logging.INFO):
        for headers in ("x-api-key: k\r\nx-api-key: k\r\n", "Authorization: Api-Key k\r\nAuthorization: Api-Key k\r\n",
                        "x-api-key: k\r\nx-api-key: wrong\r\n"):
            assert _handshake(s.port, headers).startswith("HTTP/1.1 400"), headers
        assert _handshake(s.port, "x-api-key: wrong\r\n").startswith("HTTP/1.1 401")
        assert _handshake(s.port, "x-api-key: k\r\n").startswith("HTTP/1.1 101")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # was a traceback each
    assert "Traceback" not in caplog.text


def test_another_connections_reset_instruction_is_not_used(start):
    seen = []
    s = start(_zeros_policy(seen))
    a = connect(f"ws://127.0.0.1:{s.port}").__enter__()
    b = connect(f"ws://127.0.0.1:{s.port}").__enter__()
    for ws in (a, b):
        ws.recv(timeout=5)  # metadata
    a.send(mn.packb({"type": "reset", "instruction": "open drawer"}))
    assert mn.unpackb(a.recv(timeout=5)) == {"ok": True}
    b.send(mn.packb({"type": "infer", "obs": {"image": IMG}}))  # b never reset and sends no instruction
    assert "error" not in mn.unpackb(b.recv(timeout=5))
    a.send(mn.packb({"type": "infer", "obs": {"image": IMG}}))
    mn.unpackb(a.recv(timeout=5))
    a.close(), b.close()
    assert seen == ["", "open drawer"]


def test_the_aspect_warning_cache_is_bounded(caplog):
    p = Policy(lambda o: np.zeros((2, 2), np.float32), {"action_dim": 2, "image_size": [8, 10]})
    with caplog.at_level(logging.WARNING, logger="selfflow_robot.policies"):
        for h in range(1, 200):  # a client cycling through 199 stretched sizes
            p.infer({"image": np.zeros((h, 400, 3), np.uint8)})
    assert len(p._aspect_warned) <= MAX_WARNED_SIZES + 1
    assert caplog.text.count("another aspect ratio") == MAX_WARNED_SIZES + 1  # + the line saying the rest are not


def test_idle_connections_are_closed_and_clients_reconnect(start, caplog):
    s = start(idle_timeout_s=0.3)
    with caplog.at_level(logging.INFO, logger="selfflow_robot.serve"):
        ws = connect(f"ws://127.0.0.1:{s.port}").__enter__()
        ws.recv(timeout=5)
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
        assert e.value.rcvd.code == 1001
        with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}") as c:
            time.sleep(0.8)  # the server closes this one too
            assert c.infer({"image": IMG})["actions"].shape == (2, 2)  # reconnected without an error
    assert "no request for 0.3 s (idle_timeout_s)" in caplog.text
    _wait_for(lambda: s.connections == 0)


def _wait_for(condition, seconds=5.0):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    assert condition()


def test_connections_beyond_the_cap_are_refused(start, caplog):
    s = start(max_connections=2)
    open_ = [connect(f"ws://127.0.0.1:{s.port}").__enter__() for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="selfflow_robot.serve"):
        with pytest.raises(InvalidStatus) as e:
            connect(f"ws://127.0.0.1:{s.port}").__enter__()
    assert e.value.response.status_code == 503 and "2 connections are open (max_connections=2)" in caplog.text
    open_.pop().close()
    _wait_for(lambda: s.connections < 2)
    connect(f"ws://127.0.0.1:{s.port}").__enter__().close()  # room again
    open_[0].close()


def test_limits_are_checked():
    with pytest.raises(ValueError, match="idle_timeout_s"):
        PolicyServer(_zeros_policy(), idle_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        PolicyServer(_zeros_policy(), max_connections=0)


def test_replies_count_what_safety_did_per_connection(start):
    norm = {"mode": "q99", "action": {"q01": [-1, 0], "q99": [1, 1], "min": [-1, 0], "max": [1, 1],
                                      "mask": [True, False]}}
    s = start(Policy(lambda o: np.array([[0.0, -1e6], [0.0, 0.5]], np.float32), {"action_dim": 2}, norm))
    with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}") as c:
        for _ in range(2):
            r = c.infer({"image": IMG})
        assert r["actions"][0, 1] == pytest.approx(-0.1) and r["safety"]["clipped"]  # data range 0..1, margin 0.1
        assert r["safety"]["counts"] == {"chunks": 2, "held_chunks": 0, "clipped_chunks": 2, "delta_limited_chunks": 0}
        c.act({"image": IMG})
        assert c.safety_counts["clipped_chunks"] == 3 and c.safety_counts["steps"] == 1  # act asked for a chunk
        c.reset()
        assert c.safety_counts["chunks"] == 0 and c.infer({"image": IMG})["safety"]["counts"]["chunks"] == 1
