"""Websocket policy server on an ephemeral loopback port with fake policies."""
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from selfflow_robot.policies import msgpack_numpy as mn
from selfflow_robot.policies.client import PolicyServerError, WebsocketClientPolicy
from selfflow_robot.policies.policy import Policy
from selfflow_robot.policies.server import PolicyServer

IMG = np.zeros((256, 320, 3), np.uint8)
LIMIT = 512 * 1024  # small max message so the oversized cases stay fast


def _policy(delay=0.0, h=4):
    def predict(obs):
        if obs.get("instruction") == "crash":
            raise RuntimeError("model blew up")
        time.sleep(delay)
        return np.full((h, 2), 0.25, np.float32)
    return Policy(predict, {"action_dim": 2, "action_chunk": h})


@pytest.fixture(scope="module")
def server():
    s = PolicyServer(_policy(), port=0, max_message_bytes=LIMIT)
    s.start_in_thread()
    yield s
    s.stop()


def _raw(port, **kw):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, **kw).__enter__()
    meta = mn.unpackb(ws.recv(timeout=5))
    return ws, meta


def _ask(ws, payload: bytes | str) -> dict:
    ws.send(payload)
    return mn.unpackb(ws.recv(timeout=5))


GOOD = mn.packb({"type": "infer", "obs": {"image": IMG, "instruction": "pick"}})


def _assert_good(ws):
    r = _ask(ws, GOOD)
    assert "error" not in r, r
    np.testing.assert_allclose(r["actions"], 0.25)


def test_binds_loopback_by_default(server):
    assert server.host == "127.0.0.1" and server.port > 0
    assert server._server.sockets[0].getsockname()[0] == "127.0.0.1"


def test_metadata_roundtrip_and_timing(server):
    with WebsocketClientPolicy(f"ws://127.0.0.1:{server.port}") as c:
        assert c.metadata["action_dim"] == 2 and c.metadata["protocol"] == "selfflow-robot/1"
        assert c.metadata["max_message_bytes"] == LIMIT
        c.reset("pick coke can")
        r = c.infer({"image": IMG, "state": np.zeros(3, np.float32)})
        assert r["actions"].shape == (4, 2) and r["actions"].dtype == np.float32
        t = r["server_timing"]
        assert {"infer_ms", "total_ms", "roundtrip_ms"} <= set(t) and t["total_ms"] >= t["infer_ms"]
        assert "prev_total_ms" in c.infer({"image": IMG})["server_timing"]
        assert [c.act({"image": IMG}).shape for _ in range(5)] == [(2,)] * 5


def test_healthz(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def _fuzz_cases():
    rng = np.random.default_rng(0)
    arr = lambda data, dtype, shape: {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}  # noqa: E731
    obs = lambda **kw: msgpack.packb({"type": "infer", "obs": {"image": IMG, **kw}}, default=mn.pack_array)  # noqa: E731
    img_raw = lambda a: msgpack.packb({"type": "infer", "obs": {"image": a}})  # noqa: E731
    cases = [(f"random{i}", rng.bytes(int(rng.integers(1, 3000)))) for i in range(8)]
    cases += [
        ("truncated", GOOD[: len(GOOD) // 2]),
        ("truncated_header", GOOD[:3]),
        ("text_frame", "hello"),
        ("empty", b""),
        ("not_a_map", msgpack.packb([1, 2, 3])),
        ("type_not_str", msgpack.packb({"type": 5})),
        ("unknown_type", msgpack.packb({"type": "shutdown"})),
        ("no_obs", msgpack.packb({"type": "infer"})),
        ("obs_not_map", msgpack.packb({"type": "infer", "obs": [1]})),
        ("no_image", msgpack.packb({"type": "infer", "obs": {"instruction": "x"}})),
        ("image_float", img_raw(arr(b"\0" * 48, "<f4", [2, 2, 3]))),
        ("image_2d", img_raw(arr(b"\0" * 4, "|u1", [2, 2]))),
        ("image_4ch", img_raw(arr(b"\0" * 16, "|u1", [2, 2, 4]))),
        ("image_bytes_mismatch", img_raw(arr(b"\0" * 5, "|u1", [2, 2, 3]))),
        ("image_object_dtype", img_raw(arr(b"\0" * 8, "|O", [1]))),
        ("image_complex", img_raw(arr(b"\0" * 8, "<c8", [1]))),
        ("image_huge_shape", img_raw(arr(b"", "|u1", [2**40, 2**40, 0]))),
        ("image_as_list", msgpack.packb({"type": "infer", "obs": {"image": [[1, 2, 3]]}})),
        ("instruction_int", obs(instruction=7)),
        ("state_2d", obs(state=np.zeros((2, 2), np.float32))),
        ("state_nan", obs(state=np.array([np.nan], np.float32))),
        ("reset_bad_instruction", msgpack.packb({"type": "reset", "instruction": [1]})),
        ("ext_type", msgpack.packb({"type": msgpack.ExtType(5, b"xx")})),
        ("deep_nesting", b"\x91" * 200_000 + b"\xc0"),
        ("predictor_raises", msgpack.packb({"type": "infer", "obs": {"image": IMG, "instruction": "crash"}},
                                           default=mn.pack_array)),
        ("oversized_soft", msgpack.packb({"type": "infer", "blob": b"\0" * (LIMIT + 10)})),
    ]
    return cases


@pytest.mark.parametrize("name, payload", _fuzz_cases(), ids=[c[0] for c in _fuzz_cases()])
def test_fuzz_error_reply_then_keeps_serving(server, name, payload):
    ws, _ = _raw(server.port)
    try:
        r = _ask(ws, payload)
        assert set(r) == {"error"} and isinstance(r["error"]["type"], str) and r["error"]["message"], r
        _assert_good(ws)  # same connection still works
    finally:
        ws.close()


def test_error_types(server):
    ws, _ = _raw(server.port)
    try:
        kinds = {n: _ask(ws, p)["error"]["type"] for n, p in _fuzz_cases()
                 if n in ("truncated", "image_float", "unknown_type", "predictor_raises", "oversized_soft")}
    finally:
        ws.close()
    assert kinds == {"truncated": "bad_request", "image_float": "invalid_observation",
                     "unknown_type": "unknown_type", "predictor_raises": "inference_error",
                     "oversized_soft": "too_large"}


def test_oversized_hard_closes_only_that_connection(server):
    other, _ = _raw(server.port)
    ws, _ = _raw(server.port)
    with pytest.raises(ConnectionClosed) as e:
        ws.send(b"\0" * (2 * LIMIT + 1))
        ws.recv(timeout=5)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009  # "message too big"
    _assert_good(other)
    other.close()
    fresh, _ = _raw(server.port)
    _assert_good(fresh)
    fresh.close()


def test_client_raises_server_errors(server):
    with WebsocketClientPolicy(f"ws://127.0.0.1:{server.port}") as c:
        with pytest.raises(PolicyServerError, match="invalid_observation"):
            c.infer({"image": IMG[..., :2]})
        with pytest.raises(PolicyServerError) as e:
            c.infer({"image": IMG, "instruction": "crash"})
        assert e.value.kind == "inference_error" and "model blew up" in e.value.message
        assert c.infer({"image": IMG})["actions"].shape == (4, 2)


def test_reset_instruction_is_per_connection():
    seen = []
    p = Policy(lambda o: seen.append(o["instruction"]) or np.zeros((2, 2), np.float32), {"action_dim": 2})
    s = PolicyServer(p, port=0)
    s.start_in_thread()
    try:
        with WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}") as a, \
                WebsocketClientPolicy(f"ws://127.0.0.1:{s.port}") as b:
            a.reset("open drawer")
            b.reset("close drawer")
            a.infer({"image": IMG})
            b.infer({"image": IMG})
            a.infer({"image": IMG, "instruction": "explicit"})
    finally:
        s.stop()
    assert seen == ["open drawer", "close drawer", "explicit"]


def test_event_loop_stays_responsive_and_one_model_call_at_a_time():
    active, peak, lock = [0], [0], threading.Lock()

    def predict(obs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.6)
        with lock:
            active[0] -= 1
        return np.zeros((2, 2), np.float32)

    s = PolicyServer(Policy(predict, {"action_dim": 2}), port=0)
    s.start_in_thread()
    url = f"ws://127.0.0.1:{s.port}"
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            WebsocketClientPolicy(url).infer({"image": IMG})["actions"].shape)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # both requests are in; one is running
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200
        ws, meta = _raw(s.port)  # new connections get metadata while the model is busy
        ws.close()
        assert time.perf_counter() - t0 < 0.3 and meta["action_dim"] == 2
        for t in threads:
            t.join(10)
        assert results == [(2, 2), (2, 2)] and peak[0] == 1
    finally:
        s.stop()


def test_api_key(monkeypatch):
    s = PolicyServer(_policy(), port=0, api_key="s3cret")
    s.start_in_thread()
    url = f"ws://127.0.0.1:{s.port}"
    try:
        for headers in (None, {"Authorization": "Api-Key wrong"}, {"x-api-key": "s3cre"},
                        {"Authorization": "Bearer s3cret"}):
            with pytest.raises(InvalidStatus) as e:
                connect(url, additional_headers=headers).__enter__()
            assert e.value.response.status_code == 401
        with pytest.raises(PermissionError, match="401"):
            WebsocketClientPolicy(url, api_key="nope")
        for headers in ({"Authorization": "Api-Key s3cret"}, {"x-api-key": "s3cret"}):
            ws = connect(url, additional_headers=headers).__enter__()
            assert mn.unpackb(ws.recv(timeout=5))["action_dim"] == 2
            _assert_good(ws)
            ws.close()
        with WebsocketClientPolicy(url, api_key="s3cret") as c:
            assert c.infer({"image": IMG})["actions"].shape == (4, 2)
        monkeypatch.setenv("SELFFLOW_API_KEY", "s3cret")  # read by the client too, as by `serve`
        with WebsocketClientPolicy(url) as c:
            assert c.infer({"image": IMG})["actions"].shape == (4, 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200  # health checks carry no secrets and need no key
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{s.port}/", timeout=5)
        assert e.value.code == 401
        e.value.close()
    finally:
        s.stop()


def test_client_vanishing_is_logged_in_one_line(server, caplog):
    import logging

    caplog.set_level(logging.INFO)
    ws, _ = _raw(server.port)
    _assert_good(ws)
    ws.socket.close()  # the robot process dies: no closing handshake
    deadline = time.time() + 5
    while time.time() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert any(r.levelno == logging.INFO and "disconnected" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    other, _ = _raw(server.port)
    _assert_good(other)  # still serving
    other.close()


def test_openpi_client_protocol(server):
    """What openpi-client's WebsocketClientPolicy does: metadata on connect, then the observation
    map itself (openpi key names); a bytes reply is the result, a text reply an error."""
    ws, meta = _raw(server.port)
    try:
        assert meta["action_dim"] == 2
        ws.send(mn.packb({"observation/image": IMG, "observation/state": np.zeros(3, np.float32), "prompt": "pick"}))
        r = mn.unpackb(ws.recv(timeout=5))
        np.testing.assert_allclose(r["actions"], 0.25)
        assert r["server_timing"]["infer_ms"] >= 0
        ws.send(mn.packb({"observation/image": IMG, "prompt": "crash"}))  # "prompt" is the instruction
        reply = ws.recv(timeout=5)
        assert isinstance(reply, str) and reply.startswith("inference_error: RuntimeError: model blew up")
        ws.send(msgpack.packb({"prompt": "no image", "observation/wrist_image": 1}))
        reply = ws.recv(timeout=5)
        assert isinstance(reply, str) and reply.startswith("invalid_observation: obs lacks 'image'")
        assert "'observation/image': 'image'" in reply and "map to nothing: ['observation/wrist_image']" in reply
        ws.send(msgpack.packb({b"observation/image": b"raw"}, use_bin_type=True))  # bytes keys
        assert ws.recv(timeout=5).startswith("bad_request: observation keys must be strings")
        _assert_good(ws)  # the same connection keeps serving, in either protocol
    finally:
        ws.close()


def test_openpi_keys_are_configurable():
    seen = []
    policy = Policy(lambda o: seen.append(o) or np.zeros((2, 2), np.float32), {"action_dim": 2, "views": ["top", "wrist"]})
    s = PolicyServer(policy, port=0, openpi_keys={"image": "observation/exterior_image_1_left", "instruction": "task",
                                                  "images": {"wrist": "observation/wrist_image_left"}})
    s.start_in_thread()
    try:
        ws, _ = _raw(s.port)
        ws.send(mn.packb({"observation/exterior_image_1_left": IMG, "observation/wrist_image_left": IMG[:8],
                          "task": "pick"}))
        assert mn.unpackb(ws.recv(timeout=5))["actions"].shape == (2, 2)
        assert seen[-1]["instruction"] == "pick" and seen[-1]["images"]["wrist"].shape == (8, 320, 3)
        ws.close()
    finally:
        s.stop()


@pytest.mark.parametrize("payload, words", [
    (b"\x91" * 2000 + b"\xc0", "nested deeper than msgpack's limit"),  # [[[...]]] 2000 levels
    (b"\xc1", "not msgpack data"),
    (mn.packb({"type": "infer"}) + b"\x01", "more bytes after one complete message"),
])
def test_a_malformed_message_is_explained_in_words(server, payload, words):
    ws, _ = _raw(server.port)
    try:
        r = _ask(ws, payload)
        assert r["error"]["type"] == "bad_request" and words in r["error"]["message"], r
    finally:
        ws.close()
