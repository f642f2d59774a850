"""Serving benchmark: loopback websocket overhead and batch-1 chunk latency.

main(cfg) reads the `policy_bench` section of cfg if there is one, else cfg itself; keys (all optional):
  checkpoint (or policy): checkpoint/run dir -> real-model batch-1 chunk latency
  random_model: a size (tiny/s/b/l/xl) -> the same latency with random weights (latency does not
      depend on the weights), built with patch_size 16, context_frames 1, future_frames 2
  image_size [256, 320], iters 200, warmup 20, device auto, sampler_steps 10,
  modes [action_first, joint], compile [false] (a list: true adds torch.compile / CUDA-graph runs),
  action_dim 7, action_chunk 6, patch_size 16, onnx false (true: also the ONNX runner against torch eager,
  as a ratio), out (JSON lines, appended).
Overhead = client round trip - server-reported infer_ms, with an instant fake policy, so it is
the cost of msgpack encoding, the websocket hop, validation, safety and the worker-thread hand-off.
Standalone: python -m selfflow_robot.policies.bench [key=value ...] (--help lists the keys); an
unknown key is refused, standalone or as policy_bench.KEY.
"""
from __future__ import annotations

import difflib
import json
import platform
import sys
import time

import numpy as np

from selfflow_robot.bench import cpu_name, emit


# key: (default, meaning); main() reads these defaults, --help prints them
KEYS = {
    "checkpoint": (None, "checkpoint/run dir: also batch-1 Policy.infer latency of the real model"),
    "policy": (None, "same as checkpoint"),
    "random_model": (None, "a size (tiny/s/b/l/xl): the same latency with random weights"),
    "image_size": ([256, 320], "camera image [H, W]"),
    "iters": (200, "timed codec / loopback calls"),
    "warmup": (20, "untimed calls first"),
    "model_iters": (None, "timed model calls; null: max(3, iters // 10)"),
    "device": ("auto", "auto (cuda if available), cpu, cuda, cuda:1, ..."),
    "sampler_steps": (10, "denoising steps per chunk"),
    "modes": (["action_first", "joint"], "sampling modes to time"),
    "compile": ([False], "[false, true] also times the torch.compile (CUDA-graph) policy"),
    "action_dim": (7, "action dim of the fake / random policy"),
    "action_chunk": (6, "chunk length H of the fake / random policy"),
    "patch_size": (16, "patch size of the random model"),
    "onnx": (False, "also time the ONNX export (onnxruntime) against torch eager: action_first, CPU, interleaved"),
    "out": (None, "append the result as a JSON line to this file"),
}


def check_keys(keys) -> None:
    """A ValueError naming each unknown key (with the closest known one) instead of ignoring it."""
    unknown = [str(k) for k in keys if k not in KEYS]
    if unknown:
        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(KEYS), n=1)
            msgs.append(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError("policy bench: " + "; ".join(msgs) + f". Known keys: {', '.join(KEYS)}")


def usage() -> str:
    lines = ["usage: python -m selfflow_robot.policies.bench [key=value ...]", "",
             __doc__.split("\n\n")[0], ""]
    rows = [("key", "default", "meaning")] + [(k, json.dumps(d).replace(", ", ","), m) for k, (d, m) in KEYS.items()]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines += [f"  {k:<{w0}}  {d:<{w1}}  {m}" for k, d, m in rows]
    lines += ["", "e.g. python -m selfflow_robot.policies.bench random_model=xl 'compile=[false,true]' iters=100"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> dict:
    """key=value arguments as main() takes them; SystemExit(2) with a message for anything else."""
    args = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or not key:
            print(f"error: expected key=value, got {a!r} (python -m selfflow_robot.policies.bench --help "
                  "lists the keys)", file=sys.stderr)
            raise SystemExit(2)
        args[key] = value
    try:
        check_keys(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for k in ("image_size", "modes", "compile"):
        if k in args and args[k].startswith("["):
            try:
                args[k] = json.loads(args[k])
            except json.JSONDecodeError:  # Hydra-style [a,b] without quotes
                args[k] = [x.strip() for x in args[k].strip("[]").split(",") if x.strip()]
    return args


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


def _opt(cfg, key):
    return _get(cfg, key, KEYS[key][0])


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


def bench_model(path: str, obs: dict, iters: int, warmup: int, device: str, steps: int, mode: str,
                compile: bool = False) -> dict:
    from .policy import Policy

    policy = Policy.load(path, device=device, sampler_steps=steps, mode=mode, compile=compile)
    obs = policy.example_observation(image=obs["image"])  # the state / embedding this policy takes
    times = []
    for i in range(warmup + iters):
        r = policy.infer(obs)  # infer_ms spans predict_fn, which returns numpy (so CUDA is synced)
        if i >= warmup:
            times.append(r["server_timing"]["infer_ms"])
    return {"checkpoint": policy.metadata.get("checkpoint"), "model": policy.metadata.get("model"),
            "device": device, "sampler_steps": steps, "mode": mode, "compiled": compile,
            "dtype": policy.metadata.get("dtype"), "image_size": policy.metadata.get("image_size"),
            "chunk_shape": list(r["actions"].shape), "infer": _stats(times)}


def bench_onnx(path: str, obs: dict, iters: int, warmup: int, steps: int) -> dict:
    """Batch-1 Policy.infer of the exported ONNX graph (onnxruntime, as many threads as torch) against
    torch eager on the same checkpoint and observation, calls alternating so that a busy machine slows
    both alike; the ratio is the median of the per-pair ratios."""
    import tempfile

    import onnxruntime
    import torch

    from selfflow_robot.export_onnx import export_onnx

    from .onnx_runner import load_onnx_policy
    from .policy import Policy

    eager = Policy.load(path, device="cpu", sampler_steps=steps, mode="action_first")
    obs = eager.example_observation(image=obs["image"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(path, tmp, steps=steps, check=False)
        export_s = time.perf_counter() - t0
        runner = load_onnx_policy(tmp, threads=torch.get_num_threads())
        times: dict = {"torch": [], "onnx": []}
        for i in range(warmup + iters):
            for name, policy in (("torch", eager), ("onnx", runner)):
                ms = policy.infer(obs)["server_timing"]["infer_ms"]
                if i >= warmup:
                    times[name].append(ms)
    ratios = [o / t for o, t in zip(times["onnx"], times["torch"])]
    return {"model": eager.metadata.get("model"), "steps": steps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "export_s": export_s,
            "torch_eager": _stats(times["torch"]), "onnxruntime_runner": _stats(times["onnx"]),
            "onnx_over_torch": float(np.median(ratios)), "onnx_over_torch_range": [min(ratios), max(ratios)]}


def random_checkpoint(size: str, out_dir: str, image_size, action_dim: int, action_chunk: int,
                      patch_size: int = 16, context_frames: int = 1, future_frames: int = 2, state_dim: int = 0) -> str:
    """A checkpoint dir with random weights of the given size (for latency only)."""
    import os

    from safetensors.torch import save_file

    from selfflow_robot.models import build_model

    model = build_model(size, action_dim=action_dim, patch_size=patch_size, state_dim=state_dim)
    io = {"image_size": list(image_size), "context_frames": context_frames, "future_frames": future_frames,
          "frame_stride": 1, "action_chunk": action_chunk, "action_dim": action_dim, "state_dim": state_dim or None,
          "fps": 3, "text": model.cfg.text}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model": model.cfg.to_dict(), "io": io}, f)
    norm = {"mode": "q99", "action": {"q01": [-1.0] * action_dim, "q99": [1.0] * action_dim}}
    with open(os.path.join(out_dir, "normalization.json"), "w", encoding="utf-8") as f:
        json.dump(norm, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def main(cfg) -> dict:
    section = _get(cfg, "policy_bench", None)
    cfg = section if section is not None else cfg
    if section is not None or isinstance(cfg, dict):  # not a whole Hydra config lacking the section
        check_keys(list(cfg.keys()))
    h, w = (int(x) for x in _opt(cfg, "image_size"))
    iters, warmup = int(_opt(cfg, "iters")), int(_opt(cfg, "warmup"))
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "instruction": "pick coke can",
           "state": np.zeros(8, np.float32)}
    action_dim, action_chunk = int(_opt(cfg, "action_dim")), int(_opt(cfg, "action_chunk"))
    result = {"cpu": cpu_name(), "python": platform.python_version(), "numpy": np.__version__,
              "image": [h, w, 3], "iters": iters,
              "codec": bench_codec(obs, iters),
              "loopback": bench_loopback(obs, iters, warmup, action_dim, action_chunk)}
    path = _opt(cfg, "checkpoint") or _opt(cfg, "policy")
    size = _opt(cfg, "random_model")
    if path or size:
        import tempfile

        device = str(_opt(cfg, "device"))
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tmp = None
        if not path:
            tmp = tempfile.TemporaryDirectory()
            path = random_checkpoint(str(size), tmp.name, (h, w), action_dim, action_chunk,
                                     int(_opt(cfg, "patch_size")))
            result["random_model"] = str(size)
        modes = _opt(cfg, "modes")
        modes = [modes] if isinstance(modes, str) else list(modes)
        n = int(_get(cfg, "model_iters", max(3, iters // 10)))
        compiles = _opt(cfg, "compile")
        compiles = [compiles] if isinstance(compiles, (bool, str)) else list(compiles)
        compiles = [str(c).lower() in ("true", "1", "yes") for c in compiles]
        # compiled runs warm up longer: the first calls compile and record the CUDA graphs
        result["model"] = [bench_model(str(path), obs, n, max(min(warmup, 3), 5 if c else 0), device,
                                       int(_opt(cfg, "sampler_steps")), str(m), c)
                           for c in compiles for m in modes]
        if str(_opt(cfg, "onnx")).lower() in ("true", "1", "yes"):
            result["onnx"] = bench_onnx(str(path), obs, n, max(min(warmup, 3), 1), int(_opt(cfg, "sampler_steps")))
        if device.startswith("cuda"):
            import torch
            result["gpu"] = torch.cuda.get_device_name()
        if tmp is not None:
            tmp.cleanup()
    emit(result, _opt(cfg, "out"))
    return result


if __name__ == "__main__":
    if any(a in ("-h", "--help", "help") for a in sys.argv[1:]):
        print(usage())
        raise SystemExit(0)
    args = parse_args(sys.argv[1:])
    try:
        main(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # a bad value or path: one line
        raise SystemExit(f"error: {e}") from None
