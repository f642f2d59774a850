"""`Policy`: observation -> safe, un-normalised action chunk / single action.

The model sits behind `predict_fn(obs) -> normalised [H, A]` (or a dict with "actions" plus
extras such as "video"), so everything here is numpy and testable with a fake predictor.
`Policy.load` builds the predictor from a checkpoint with the model engineer's
`load_checkpoint_model` + `ActionSampler`, imported lazily: importing this module never
imports torch (the server and tests rely on that).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .chunking import ActionChunker, ChunkConfig
from .normalize import Normalizer
from .safety import SafetyConfig, SafetyFilter, add_counts, data_range
from .text_encoder import CachedEncoder, load_text_encoder

log = logging.getLogger("selfflow_robot.policies")

CHECKPOINT_FILES = ("config.json", "model.safetensors", "normalization.json")
MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 4096
INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_WARNED_SIZES = 16  # frame sizes reported for a stretched aspect ratio; then one line says the rest are not


class ObservationError(ValueError):
    """The observation does not follow {"image": uint8[H,W,3], "instruction": str, "state": float[S]}."""


def _check_image(img: Any, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ObservationError(f"{name} must be a uint8 array, got {getattr(img, 'dtype', type(img).__name__)}")
    if img.ndim != 3 or img.shape[2] != 3 or not (0 < img.shape[0] <= MAX_IMAGE_SIDE
                                                   and 0 < img.shape[1] <= MAX_IMAGE_SIDE):
        raise ObservationError(f"{name} must be [H, W, 3] with 0 < H, W <= {MAX_IMAGE_SIDE}, got {list(img.shape)}")


def _extra_views(obs: dict, views: list[str]) -> dict:
    """obs['images'] for the camera views after the first, keyed by their full names; a short name
    ('wrist' for LeRobot's 'observation.images.wrist', 'wrist_image' for RLDS's
    'steps/observation/wrist_image') is accepted too."""
    given = obs.get("images")
    if not isinstance(given, dict):
        raise ObservationError(f"this policy sees {len(views)} cameras: send obs['image'] ({views[0]}) and "
                               f"obs['images'] = {{{', '.join(repr(v) for v in views[1:])}: uint8 [H, W, 3]}}")
    out = {}
    for name in views[1:]:
        key = next((k for k in given if k == name or name.endswith(("." + str(k), "/" + str(k)))), None)
        if key is None:
            raise ObservationError(f"obs['images'] lacks camera '{name}' (got {sorted(map(str, given))})")
        _check_image(given[key], f"obs['images']['{key}']")
        out[name] = given[key]
    return out


def validate_obs(obs: Any, state_dim: int | None = None, embedding_dim: int | None = None,
                 views: list[str] | None = None) -> dict:
    """Check an observation before it reaches the model. state_dim / embedding_dim > 0: the policy
    needs obs['state'] / obs['instruction_embedding'] of that size (0 or None: not needed). views:
    the camera names of a multi-camera policy (obs['image'] is the first, obs['images'] the rest)."""
    if not isinstance(obs, dict):
        raise ObservationError(f"obs must be a dict, got {type(obs).__name__}")
    if "image" not in obs:
        raise ObservationError("obs lacks 'image'")
    _check_image(obs["image"], "obs['image']")
    if views and len(views) > 1:
        obs = {**obs, "images": _extra_views(obs, list(views))}
    instr = obs.get("instruction")
    if instr is not None and (not isinstance(instr, str) or len(instr) > MAX_INSTRUCTION_CHARS):
        raise ObservationError(f"obs['instruction'] must be a str of <= {MAX_INSTRUCTION_CHARS} chars")
    emb = obs.get("instruction_embedding")
    if emb is not None and (not isinstance(emb, np.ndarray) or emb.dtype.kind != "f" or emb.ndim != 1
                            or emb.shape[0] > 65536 or not np.all(np.isfinite(emb))):
        raise ObservationError("obs['instruction_embedding'] must be a finite 1-D float array")
    if embedding_dim and (emb is None or emb.shape[0] != embedding_dim):
        hint = ("; it was trained with model.text=embedding: send the instruction's embedding by the training "
                "data's encoder (RT-1: Universal Sentence Encoder), or load the policy with "
                "text_encoder='module:function' that makes it from the instruction (docs/serving.md)"
                if emb is None else "")
        raise ObservationError(f"this policy conditions on obs['instruction_embedding'] (float[{embedding_dim}]), "
                               f"got {'none' if emb is None else emb.shape[0]}{hint}")
    state = obs.get("state")
    if state is None and state_dim:
        raise ObservationError(f"this policy needs obs['state'] (float[{state_dim}])")
    if state is not None and state_dim == 0:  # a policy without state input ignores it (robots send it anyway)
        obs = {k: v for k, v in obs.items() if k != "state"}
        state = None
    if state is not None:
        if not isinstance(state, np.ndarray) or state.dtype.kind not in "fiu" or state.ndim != 1:
            raise ObservationError("obs['state'] must be a 1-D numeric array")
        if state_dim is not None and state.shape[0] != state_dim:
            raise ObservationError(f"obs['state'] has {state.shape[0]} dims, the policy expects {state_dim}")
        if not np.all(np.isfinite(state)):
            raise ObservationError("obs['state'] contains NaN or inf")
    return obs


def _is_pretraining(ckpt: Path) -> bool:
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("job") == "pretrain" or not (config.get("io") or (config.get("model") or {}).get("action_dim"))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, or a run dir (or its checkpoints/ dir) whose `latest` names one, as the
    trainer's latest_checkpoint reads them."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"policy path {p} does not exist")
    if p.is_file() and p.name in ("latest", *CHECKPOINT_FILES):  # the pointer file, or a file of the checkpoint
        p = p.parent
    latest = next((f for f in (p / "checkpoints" / "latest", p / "latest") if f.is_file()), None)
    if not (p / "config.json").exists() and latest is not None:
        name = latest.read_text().strip()
        p = (latest.parent / name) if not Path(name).is_absolute() else Path(name)
        if not p.is_dir():
            raise FileNotFoundError(f"{latest} names {name!r}, which is not a checkpoint directory")
    missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
    if len(missing) == len(CHECKPOINT_FILES) and p.is_dir():
        raise FileNotFoundError(f"{p} holds no checkpoint (expected a checkpoint directory or a run directory with "
                                "checkpoints/latest); a run writes its first one after trainer.checkpoint_every "
                                "steps, or at its end")
    if missing == ["normalization.json"] and _is_pretraining(p):
        raise ValueError(f"{p} is a pretraining checkpoint (a backbone without action layers): fine-tune it first, "
                         f"e.g. python -m selfflow_robot.finetune init={p} ...")
    if missing:
        raise FileNotFoundError(f"{p} is not a selfflow-robot policy checkpoint: missing {', '.join(missing)}")
    return p


def _first(d: dict, paths: list[str], default=None):
    for path in paths:
        cur: Any = d
        for k in path.split("."):
            cur = cur.get(k) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return default


def chunk_and_safety(chunk: ChunkConfig | None, safety: SafetyConfig | None, overrides: dict,
                     who: str) -> tuple[ChunkConfig, SafetyConfig]:
    """Loaders' keyword options: each is a ChunkConfig or SafetyConfig field (else a TypeError naming it)."""
    chunk_fields = {f.name for f in dataclasses.fields(ChunkConfig)}
    safety_fields = {f.name for f in dataclasses.fields(SafetyConfig)}
    unknown = set(overrides) - chunk_fields - safety_fields
    if unknown:
        raise TypeError(f"unknown {who} options: {sorted(unknown)}")
    chunk = dataclasses.replace(chunk or ChunkConfig(), **{k: v for k, v in overrides.items() if k in chunk_fields})
    safety = dataclasses.replace(safety or SafetyConfig(), **{k: v for k, v in overrides.items() if k in safety_fields})
    return chunk, safety


def merge_safety(chunk: dict | None, step: dict) -> dict:
    """One executed step's safety flags: its own, with the hold and clip of the chunk it was taken
    from (delta_limited stays the step's own: the chunk limits its rows against each other)."""
    return {k: bool(v or k in ("hold", "clipped") and (chunk or {}).get(k)) for k, v in step.items()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_size(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)


def _is_names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# What each io entry of config.json must be (None: the run did not record it).
_IO_TYPES = {"action_chunk": (_is_int, "an integer"), "context_frames": (_is_int, "an integer"),
             "future_frames": (_is_int, "an integer"), "frame_stride": (_is_int, "an integer"),
             "state_dim": (_is_int, "an integer"), "image_size": (_is_size, "[height, width]"),
             "data_image_size": (_is_size, "[height, width]"), "text": (lambda v: isinstance(v, str), "a string"),
             "fps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
             "action_names": (_is_names, "a list of names"), "views": (_is_names, "a list of camera names")}


def _check_io_types(meta: dict, source: str) -> None:
    for k, (ok, want) in _IO_TYPES.items():
        if meta.get(k) is not None and not ok(meta[k]):
            raise ValueError(f"{source}: io.{k} must be {want}, got {meta[k]!r}")


def metadata_from_config(cfg: dict, source: str = "config.json") -> dict:
    """Policy metadata from a run config: fine-tuning writes an `io` section (image_size,
    context/future frames, action_chunk, action_dim, state_dim, fps, action_names)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"{source}: no 'model' section; not a selfflow-robot run config")
    io = cfg.get("io") if isinstance(cfg.get("io"), dict) else {}
    action_dim = io.get("action_dim") or cfg["model"].get("action_dim") or 0
    if not _is_int(action_dim):
        raise ValueError(f"{source}: io.action_dim must be an integer, got {action_dim!r}")
    if action_dim <= 0 or not io:
        raise ValueError(f"{source}: no 'io' section with action_dim > 0, so the model has no action head "
                         "(a pretraining checkpoint?); fine-tune it on robot episodes first")
    meta = {"model": cfg["model"].get("name"), "action_dim": action_dim}
    for k in ("action_chunk", "image_size", "context_frames", "future_frames", "frame_stride", "state_dim",
              "fps", "text", "action_names", "views", "data_image_size"):
        meta[k] = io.get(k)
    _check_io_types(meta, source)
    if meta["text"] == "embedding":  # the instruction arrives as a precomputed vector (RT-1's 512-d)
        meta["instruction_embedding_dim"] = int(cfg["model"].get("text_embed_dim") or 512)
    from selfflow_robot.evaluation.training_env import training_env

    trained_env = training_env(cfg)
    if trained_env:  # evaluating the served policy rolls out as its data was collected / in its action convention
        meta["training_env"] = trained_env
    return meta


class Policy:
    def __init__(self, predict_fn: Callable[[dict], Any], metadata: dict, normalization: dict | None = None,
                 chunk: ChunkConfig | None = None, safety: SafetyConfig | None = None, text_encoder=None):
        """text_encoder: for a policy trained with model.text=embedding, a callable (or its
        "module:function" path) turning the instruction into that embedding when an observation
        brings only the sentence (policies/text_encoder.py)."""
        if "action_dim" not in metadata:
            raise ValueError("metadata must give action_dim")
        self.predict_fn = predict_fn
        self.normalizer = Normalizer(normalization) if normalization is not None else None
        self.action_dim = int(metadata["action_dim"])
        if self.normalizer is not None and self.normalizer.action.dim != self.action_dim:
            raise ValueError(f"normalization has {self.normalizer.action.dim} action dims, "
                             f"metadata.action_dim is {self.action_dim}")
        self.chunk_cfg = chunk or ChunkConfig()
        self.safety_cfg = safety or SafetyConfig()
        mode = self.normalizer.mode if self.normalizer else None
        self.safety = SafetyFilter(self.safety_cfg, self.action_dim, mode,
                                   self.normalizer.action.mask if self.normalizer else None,
                                   data_range(normalization))
        bounds = {k: None if v is None else v.tolist() for k, v in (("low", self.safety.low), ("high", self.safety.high))}
        self.metadata = {**metadata, "normalization": mode,
                         "chunk": dataclasses.asdict(self.chunk_cfg),
                         "safety": dataclasses.asdict(self.safety_cfg), "action_bounds": bounds}
        self.chunker = ActionChunker(self.chunk_cfg)
        self.text_encoder = None
        if text_encoder is not None:
            dim = metadata.get("instruction_embedding_dim")
            if not dim:
                raise ValueError("text_encoder is for policies trained with model.text=embedding; this one reads "
                                 f"the instruction as {metadata.get('text') or 'bytes'} and needs no encoder")
            name = text_encoder if isinstance(text_encoder, str) else getattr(text_encoder, "__name__", "callable")
            self.text_encoder = CachedEncoder(load_text_encoder(text_encoder), int(dim), str(name))
            self.metadata["text_encoder"] = str(name)
        self._lock = threading.Lock()  # one model call at a time, even from several threads
        self._aspect_warned: set[tuple[int, int]] = set()
        self.reset()

    def reset(self, instruction: str | None = None) -> None:
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError("instruction must be a str or None")
        self.instruction = instruction
        self.chunker.reset()
        if callable(getattr(self.predict_fn, "reset", None)):
            self.predict_fn.reset()  # e.g. the sampler's frame history
        self.last_action: np.ndarray | None = None
        self.last_safety: dict = {"hold": False, "clipped": False, "delta_limited": False}
        self._chunk_safety: dict = dict(self.last_safety)  # flags of the chunk the steps come from
        self.safety.reset_counts()

    @property
    def safety_counts(self) -> dict:
        """What the safety layer did since the last reset: chunks, held_chunks, clipped_chunks,
        delta_limited_chunks (infer) and steps, held_steps, clipped_steps, delta_limited_steps (act)."""
        return dict(self.safety.counts)

    def example_observation(self, image: np.ndarray | None = None) -> dict:
        """A valid observation for this policy (zeros at the trained image size unless `image` is
        given; state and instruction embedding when the policy takes them): warm-up and benchmarks."""
        size = self.metadata.get("image_size") or [256, 320]
        views = self.metadata.get("views") or []
        h, w = int(size[0]), int(size[1]) // max(len(views), 1)  # a multi-camera frame tiles its views
        obs = {"image": np.zeros((h, w, 3), np.uint8) if image is None else image, "instruction": ""}
        if len(views) > 1:
            obs["images"] = {name: np.zeros((h, w, 3), np.uint8) for name in views[1:]}
        if self.metadata.get("state_dim"):
            obs["state"] = np.zeros(int(self.metadata["state_dim"]), np.float32)
        if self.metadata.get("instruction_embedding_dim"):
            obs["instruction_embedding"] = np.zeros(int(self.metadata["instruction_embedding_dim"]), np.float32)
        return obs

    def infer(self, obs: dict) -> dict:
        obs = self._with_embedding(obs)
        obs = validate_obs(obs, self.metadata.get("state_dim"), self.metadata.get("instruction_embedding_dim"),
                           self.metadata.get("views"))
        self._check_aspect(obs["image"].shape[:2])
        if obs.get("instruction") is None:
            obs = {**obs, "instruction": self.instruction or ""}
        if obs.get("state") is not None and self.normalizer is not None and self.normalizer.state is not None:
            obs = {**obs, "state": self.normalizer.normalize_state(obs["state"])}  # the model sees normalised state
        t0 = time.perf_counter()
        with self._lock:
            out = self.predict_fn(obs)
        infer_ms = (time.perf_counter() - t0) * 1e3
        extras = {}
        if isinstance(out, dict):
            extras = {k: v for k, v in out.items() if k != "actions" and v is not None}
            out = out.get("actions")
        x = np.asarray(out, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.action_dim or x.shape[0] < 1:
            raise RuntimeError(f"predictor returned actions of shape {list(x.shape)}, "
                               f"expected [H, {self.action_dim}]")
        t1 = time.perf_counter()
        flags = {"hold": False, "clipped": False, "delta_limited": False}
        if np.all(np.isfinite(x)):  # check before clipping: clip would turn inf into a finite bound
            x, flags["clipped"] = self.safety.clip_normalized(x)
            if self.normalizer is not None:
                x = self.normalizer.unnormalize_action(x)
        actions, f = self.safety.chunk(x, self.last_action)
        flags = {k: bool(flags[k] or f[k]) for k in flags}
        add_counts(self.safety.counts, "chunk", flags)
        timing = {"infer_ms": infer_ms, "postprocess_ms": (time.perf_counter() - t1) * 1e3}
        return {"actions": actions, "server_timing": timing, "safety": flags, **extras}

    def _with_embedding(self, obs):
        """The instruction's embedding from the text encoder, when the policy needs one and the
        observation brings only the sentence (or none: the reset's instruction)."""
        if self.text_encoder is None or not isinstance(obs, dict) or obs.get("instruction_embedding") is not None:
            return obs
        instruction = obs.get("instruction")
        instruction = self.instruction if instruction is None else instruction
        if not isinstance(instruction, str) or not instruction:
            raise ObservationError("this policy makes obs['instruction_embedding'] with its text_encoder from the "
                                   "instruction, but there is none: send obs['instruction'] or call reset(instruction)")
        return {**obs, "instruction_embedding": self.text_encoder(instruction)}

    def _check_aspect(self, hw: tuple[int, int]) -> None:
        """Frames are resized to the trained size as the training data's frames were; an aspect ratio
        other than the data's stretches the picture differently, which is almost always a camera or
        crop mismatch on the client: say so, once per frame size. (Older checkpoints do not record the
        data's size: the trained size stands in.)"""
        size, views = self.metadata.get("data_image_size") or self.metadata.get("image_size"), \
            self.metadata.get("views") or []
        if not size or hw in self._aspect_warned or len(self._aspect_warned) > MAX_WARNED_SIZES:
            return
        h, w = int(size[0]), int(size[1]) / max(len(views), 1)  # per view, as the client sends them
        if abs((hw[0] / hw[1]) / (h / w) - 1) > 0.1:
            self._aspect_warned.add(hw)  # bounded: a client cycling through sizes must not grow it (or the log)
            if len(self._aspect_warned) > MAX_WARNED_SIZES:
                log.warning("more than %d frame sizes with another aspect ratio than training; not reporting "
                            "further ones", MAX_WARNED_SIZES)
                return
            log.warning("observation image %dx%d has another aspect ratio than the %dx%d training frames per view "
                        "(%.2f vs %.2f), so the picture is stretched differently; send frames framed as in training",
                        hw[0], hw[1], h, int(w), hw[0] / hw[1], h / w)

    def act(self, obs: dict) -> np.ndarray:
        if self.chunker.needs_chunk():
            reply = self.infer(obs)
            self.chunker.push(reply["actions"])
            self._chunk_safety = reply["safety"]
        a, step = self.safety.step(self.chunker.pop(), self.last_action)
        # a step from a held chunk is held too, though its (hold) action is finite by now
        self.last_safety = merge_safety(self._chunk_safety, step)
        self.last_action = a
        return a

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", *, sampler_steps: int = 10,
             mode: str = "action_first", chunk: ChunkConfig | None = None,
             safety: SafetyConfig | None = None, dtype: str = "auto", compile: bool = False,
             text_encoder=None, **overrides) -> "Policy":
        """Load a checkpoint dir (or a run dir's latest). `overrides` are ChunkConfig /
        SafetyConfig fields, e.g. execute_steps=2, ensemble=True, max_delta=0.05.
        dtype: weights for inference, auto = bfloat16 on CUDA, float32 elsewhere. compile:
        torch.compile the model (mode reduce-overhead: CUDA graphs replay each batch-1 step).
        text_encoder: a callable or "module:function" making the instruction embedding a policy
        trained with model.text=embedding needs (checked here, before the model loads)."""
        if dtype not in INFERENCE_DTYPES:
            raise ValueError(f"dtype must be one of {INFERENCE_DTYPES}, got {dtype!r}")
        ckpt = resolve_checkpoint(path)
        chunk, safety = chunk_and_safety(chunk, safety, overrides, "Policy.load")
        with open(ckpt / "config.json", "rb") as f:
            try:
                cfg = json.loads(f.read().decode("utf-8"))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (garbage bytes)
                raise ValueError(f"{ckpt / 'config.json'}: not valid JSON ({e})") from None
        metadata = metadata_from_config(cfg, str(ckpt / "config.json"))
        if text_encoder is not None and not metadata.get("instruction_embedding_dim"):
            raise ValueError(f"text_encoder={text_encoder!r}: {ckpt} reads the instruction as "
                             f"{metadata.get('text') or 'bytes'} (model.text), so it takes no embedding and needs no "
                             "encoder")
        load_text_encoder(text_encoder)  # a bad path fails now, not after the model loaded
        normalization = Normalizer.from_json(ckpt / "normalization.json").raw

        # Lazy: torch and the model code are only needed here, not by the server or client.
        from selfflow_robot.models import load_checkpoint_model
        from selfflow_robot.sampling import ActionSampler

        import torch

        model, model_cfg = load_checkpoint_model(str(ckpt), device)
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        model = model.to(getattr(torch, dtype))
        sampler = ActionSampler(model, model_cfg, device, steps=sampler_steps, mode=mode, compile=bool(compile))
        metadata.update(checkpoint=str(ckpt), device=str(device), sampler_steps=int(sampler_steps), mode=mode,
                        dtype=dtype, compiled=bool(compile))
        return cls(_SamplerPredictor(sampler), metadata, normalization, chunk, safety, text_encoder=text_encoder)


class _SamplerPredictor:
    """Adapts ActionSampler(image, instruction, state, instruction_embedding) to predict_fn(obs)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, obs: dict):
        kw = {"state": obs.get("state")}
        if obs.get("instruction_embedding") is not None:
            kw["instruction_embedding"] = obs["instruction_embedding"]
        if obs.get("images"):
            kw["views"] = obs["images"]
        return self.sampler(obs["image"], obs.get("instruction") or "", **kw)

    def reset(self) -> None:
        if callable(getattr(self.sampler, "reset", None)):
            self.sampler.reset()
