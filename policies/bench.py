"""Serving benchmark: loopback websocket overhead and batch-1 chunk latency.

main(cfg) keys (all optional): policy (checkpoint/run dir; adds real-model latency),
image_size [256, 320], iters 200, warmup 20, device cpu, sampler_steps 10, mode, action_dim 7,
action_chunk 4 (fake policy), out (write the JSON result there).
Overhead = client round trip - server-reported infer_ms, with an instant fake policy, so it is
the cost of msgpack encoding, the websocket hop, validation, safety and the worker-thread hand-off.
Standalone: python -m selfflow_robot.policies.bench [key=value ...]
"""
from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": int(a.size)}


def _get(cfg, key, default):
    try:
        v = cfg.get(key, default)
    except AttributeError:
        v = getattr(cfg, key, default)
    return default if v is None else v


def bench_codec(obs: dict, iters: int) -> dict:
    from . import msgpack_numpy

    packer, times = msgpack_numpy.Packer(), []
    for _ in range(iters):
        t0 = time.perf_counter()
        msgpack_numpy.unpackb(packer.pack({"type": "infer", "obs": obs}))
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def bench_loopback(obs: dict, iters: int, warmup: int, action_dim: int, chunk: int) -> dict:
    from .client import WebsocketClientPolicy
    from .policy import Policy
    from .server import PolicyServer

    actions = np.zeros((chunk, action_dim), np.float32)
    server = PolicyServer(Policy(lambda o: actions, {"action_dim": action_dim}), port=0)
    port = server.start_in_thread()
    try:
        with WebsocketClientPolicy(f"ws://127.0.0.1:{port}") as client:
            rt, overhead = [], []
            for i in range(warmup + iters):
                t = client.infer(obs)["server_timing"]
                if i >= warmup:
                    rt.append(t["roundtrip_ms"])
                    overhead.append(t["roundtrip_ms"] - t["infer_ms"])
    finally:
        server.stop()
    return {"roundtrip": _stats(rt), "overhead": _stats(overhead)}


def bench_model(path: str, obs: dict, iters: int, warmup: int, device: str, steps: int, mode: str) -> dict:
    from .policy import Policy

    policy = Policy.load(path, device=device, sampler_steps=steps, mode=mode)
    times = []
    for i in range(warmup + iters):
        r = policy.infer(obs)
        if i >= warmup:
            times.append(r["server_timing"]["infer_ms"])
    return {"checkpoint": policy.metadata.get("checkpoint"), "model": policy.metadata.get("model"),
            "device": device, "sampler_steps": steps, "mode": mode,
            "chunk_shape": list(r["actions"].shape), "infer": _stats(times)}


def main(cfg) -> dict:
    h, w = (int(x) for x in _get(cfg, "image_size", [256, 320]))
    iters, warmup = int(_get(cfg, "iters", 200)), int(_get(cfg, "warmup", 20))
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "instruction": "pick coke can",
           "state": np.zeros(8, np.float32)}
    result = {"cpu": cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
              "image": [h, w, 3], "iters": iters,
              "codec": bench_codec(obs, iters),
              "loopback": bench_loopback(obs, iters, warmup, int(_get(cfg, "action_dim", 7)),
                                         int(_get(cfg, "action_chunk", 4)))}
    path = _get(cfg, "policy", None)
    if path:
        result["model"] = bench_model(str(path), obs, max(1, iters // 10), min(warmup, 3),
                                      str(_get(cfg, "device", "cpu")), int(_get(cfg, "sampler_steps", 10)),
                                      str(_get(cfg, "mode", "action_first")))
    text = json.dumps(result, indent=2)
    print(text)
    out = _get(cfg, "out", None)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    if "image_size" in args:
        args["image_size"] = json.loads(args["image_size"])
    main(args)
