"""Run an exported ONNX policy without torch: numpy + onnxruntime (+ this package's numpy-only code).

    from selfflow_robot.policies.onnx_runner import load_onnx_policy
    policy = load_onnx_policy("exported/", execute_steps=2, max_delta=0.05)   # a `Policy`
    policy.reset("pick coke can"); out = policy.infer({"image": img_uint8_hw3, "state": s})

`python -m selfflow_robot.export onnx RUN out=DIR` writes the folder (policy.onnx, manifest.json,
normalization.json). The returned object is a `Policy` whose predictor is the ONNX graph, so
validation, state normalisation, the normalised clip, un-normalisation, safety and chunking are the
very code `Policy.load` uses; what this module adds is the part torch did: resizing frames, the
frame history, the instruction's byte ids and the initial noise. A C++ controller does the same
steps (docs/serving.md).
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from .chunking import ChunkConfig
from .policy import Policy, chunk_and_safety
from .safety import SafetyConfig

FORMAT = "selfflow-robot-onnx/1"


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] rows of torch's antialiased bilinear filter (align_corners=False): a triangle
    stretched by the downscale factor, half-pixel centres, each row normalised to sum 1."""
    scale = n_in / n_out
    support, inv = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        row = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
        w[i, lo:hi] = row / row.sum()
    return w.astype(np.float32)


def resize_frame(image: np.ndarray, size) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], as selfflow_robot.sampling.resize_frame (width pass, then
    height, in float32; rounded half to even). Equal sizes are returned unchanged."""
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    x = image.astype(np.float32)
    x = np.einsum("ow,hwc->hoc", _resize_weights(image.shape[1], w), x)
    x = np.einsum("oh,hwc->owc", _resize_weights(image.shape[0], h), x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def text_ids(instruction: str, max_len: int) -> np.ndarray:
    """UTF-8 bytes b -> b + 1, truncated to max_len, padded with 0: int64 [1, max_len]."""
    ids = np.frombuffer(instruction.encode("utf-8")[:max_len], dtype=np.uint8).astype(np.int64) + 1
    out = np.zeros((1, max_len), np.int64)
    out[0, :len(ids)] = ids
    return out


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export with python -m selfflow_robot.export onnx RUN out={folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"this runner reads {FORMAT!r}")
    return manifest


class OnnxPredictor:
    """obs (as Policy.infer hands it over: normalised state) -> normalised action chunk [H, A].

    noise(shape) -> float32 array gives the initial noise of each chunk; default a numpy generator
    seeded with `seed` (pass the same draws to torch to compare the two). threads: onnxruntime's
    intra-op threads (None: its default, one per core)."""

    def __init__(self, folder: str | Path, seed: int | None = 0, noise: Callable[[tuple], np.ndarray] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.manifest = m = read_manifest(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        # Idle worker threads sleep instead of spinning: one chunk per control period leaves them idle
        # most of the time, and spinning threads take the cores from the robot's other processes.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(Path(folder) / m["graph"]), opts, providers=["CPUExecutionProvider"])
        self.inputs = {spec["name"]: spec for spec in m["inputs"]}
        pre = m["preprocess"]
        self.size, self.views, self.max_text_len = tuple(pre["image_size"]), list(pre.get("views") or []), \
            int(pre["max_text_len"])
        self.history: deque = deque(maxlen=int(pre["context_frames"]))
        rng = np.random.default_rng(seed)
        self.noise = noise or (lambda shape: rng.standard_normal(shape).astype(np.float32))

    def reset(self) -> None:
        self.history.clear()

    def _frame(self, image: np.ndarray, views: dict | None) -> np.ndarray:
        if len(self.views) < 2:
            return resize_frame(image, self.size)
        h, w = self.size[0], self.size[1] // len(self.views)
        return np.concatenate([resize_frame(image, (h, w)), *(resize_frame(views[n], (h, w)) for n in self.views[1:])],
                              axis=1)

    def __call__(self, obs: dict) -> np.ndarray:
        frame = self._frame(obs["image"], obs.get("images"))
        if not self.history:  # pad the history with the first frame, as the torch sampler does
            self.history.extend([frame] * self.history.maxlen)
        else:
            self.history.append(frame)
        feeds = {"frames": np.stack(list(self.history))[None],
                 "noise": np.asarray(self.noise(tuple(self.inputs["noise"]["shape"])), np.float32)}
        if "text" in self.inputs:
            feeds["text"] = text_ids(obs.get("instruction") or "", self.max_text_len)
        if "text_embedding" in self.inputs:
            feeds["text_embedding"] = np.asarray(obs["instruction_embedding"], np.float32)[None]
        if "state" in self.inputs:
            feeds["state"] = np.asarray(obs["state"], np.float32)[None]
        return self.session.run(["actions"], feeds)[0][0]


def load_onnx_policy(folder: str | Path, *, chunk: ChunkConfig | None = None, safety: SafetyConfig | None = None,
                     seed: int | None = 0, noise=None, threads: int | None = None, **overrides) -> Policy:
    """A `Policy` over the exported graph; `overrides` are ChunkConfig / SafetyConfig fields as for Policy.load."""
    chunk, safety = chunk_and_safety(chunk, safety, overrides, "load_onnx_policy")
    predictor = OnnxPredictor(folder, seed=seed, noise=noise, threads=threads)
    m = predictor.manifest
    metadata = {**m["metadata"], "checkpoint": m.get("checkpoint"), "runtime": "onnxruntime",
                "sampler_steps": m["steps"], "mode": m["mode"], "dtype": "float32"}
    return Policy(predictor, metadata, m["normalization"], chunk, safety)
