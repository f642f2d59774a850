"""What a LeRobot checkpoint of a selfflow-robot policy holds, with no lerobot import.

The exporter (selfflow_robot.export_lerobot) runs in the training environment, where LeRobot
(Python >= 3.12, torch < 2.12) is usually not installed; the plugin (integrations/lerobot,
distribution `lerobot_policy_selfflow`) runs where LeRobot is. Both use this module, so the
normalisation maths and the file layout are one piece of code, testable without LeRobot.

Normalisation (the same as policies.normalize / data.normalize, in torch):
  q99:      x = clip(2 (a - q01) / (q99 - q01) - 1, -1, 1), 0 where q99 == q01;
            inverse a = 0.5 (x + 1) (q99 - q01) + q01.
  mean_std: x = (a - mean) / (std + 1e-6).
  Dimensions whose mask is False (the gripper) pass through unchanged both ways.
Bounds (Policy.load's default safety, policies.safety): after un-normalising, every dimension -
the masked ones too, whose raw model output nothing else bounds - is clipped to the training data's
range widened by safety.data_margin; `action_bounds` computes them with policies.safety itself.
LeRobot's own QUANTILES step differs on all three points (no clip, eps instead of 0 where
q99 == q01, no per-dimension pass-through), hence our own processor steps.
"""
from __future__ import annotations

import torch

POLICY_TYPE = "selfflow"
ACTION = "action"
STATE = "observation.state"
IMAGE = "observation.image"  # LeRobot's name for a single camera (e.g. gym-pusht)
NORMALIZER_STEP = "selfflow_normalizer"
UNNORMALIZER_STEP = "selfflow_unnormalizer"
PREPROCESSOR = "policy_preprocessor"
POSTPROCESSOR = "policy_postprocessor"
MODES = ("q99", "mean_std")
STD_EPS = 1e-6
STAT_KEYS = ("q01", "q99", "mean", "std")


def stream_stats(d: dict, mode: str, what: str) -> dict:
    """One stream of normalization.json ({"q01", "q99", "mask", ...}) as plain lists for JSON,
    checked: the statistics `mode` needs, equal lengths, q99 >= q01."""
    if mode not in MODES:
        raise ValueError(f"normalization mode must be one of {MODES}, got {mode!r}")
    need = ("q01", "q99") if mode == "q99" else ("mean", "std")
    missing = [k for k in need if d.get(k) is None]
    if missing:
        raise ValueError(f"normalization '{what}' lacks {missing}, needed by mode {mode}")
    out = {k: [float(v) for v in d[k]] for k in need}
    dim = len(out[need[0]])
    out["mask"] = [bool(m) for m in d["mask"]] if d.get("mask") is not None else [True] * dim
    if any(len(v) != dim for v in out.values()):
        raise ValueError(f"normalization '{what}': statistics and mask differ in length "
                         f"({ {k: len(v) for k, v in out.items()} })")
    if mode == "q99" and any(h < lo for lo, h in zip(out["q01"], out["q99"])):
        raise ValueError(f"normalization '{what}': q99 < q01 in some dimension")
    return out


def _tensors(stats: dict, like: torch.Tensor) -> dict:
    return {k: torch.as_tensor(v, dtype=torch.bool if k == "mask" else torch.float64, device=like.device)
            for k, v in stats.items()}


def normalize(x: torch.Tensor, stats: dict, mode: str) -> torch.Tensor:
    """Robot units -> model space along the last dim (float64 inside, as the numpy version)."""
    s, a = _tensors(stats, x), x.double()
    if a.shape[-1] != s["mask"].shape[0]:
        raise ValueError(f"expected last dim {s['mask'].shape[0]}, got shape {tuple(x.shape)}")
    if mode == "q99":
        rng = s["q99"] - s["q01"]
        y = (2.0 * (a - s["q01"]) / torch.where(rng > 0, rng, torch.ones_like(rng)) - 1.0).clamp(-1.0, 1.0)
        y = torch.where(rng > 0, y, torch.zeros_like(y))
    else:
        y = (a - s["mean"]) / (s["std"] + STD_EPS)
    return torch.where(s["mask"], y, a).to(x.dtype if x.is_floating_point() else torch.float32)


def unnormalize(x: torch.Tensor, stats: dict, mode: str, clip: float | None = None) -> torch.Tensor:
    """Model space -> robot units; `clip` bounds the normalised dims first (the policy's
    safety.normalized_clip, 1.0 in q99 mode by default), as Policy.infer does."""
    s, y = _tensors(stats, x), x.double()
    if y.shape[-1] != s["mask"].shape[0]:
        raise ValueError(f"expected last dim {s['mask'].shape[0]}, got shape {tuple(x.shape)}")
    if clip is not None:
        y = torch.where(s["mask"], y.clamp(-float(clip), float(clip)), y)
    if mode == "q99":
        a = 0.5 * (y + 1.0) * (s["q99"] - s["q01"]) + s["q01"]
    else:
        a = y * (s["std"] + STD_EPS) + s["mean"]
    return torch.where(s["mask"], a, y).to(x.dtype)


def action_bounds(normalization: dict, action_dim: int, data_margin: float | None) -> tuple[list | None, list | None]:
    """(low, high) per action dim that Policy.load bounds actions to with safety.data_margin
    (SafetyFilter's own computation: min/max of normalization.json, else q01/q99, widened);
    (None, None) when the margin is None or the statistics give no range."""
    from .policies.safety import SafetyConfig, SafetyFilter, data_range

    f = SafetyFilter(SafetyConfig(data_margin=data_margin), action_dim, data_range=data_range(normalization))
    return tuple(None if v is None else [float(x) for x in v] for v in (f.low, f.high))


def bound(a: torch.Tensor, low: list | None, high: list | None) -> torch.Tensor:
    """Clip the last dim to [low, high] in float64, back to a's dtype (as SafetyFilter.bound)."""
    if low is None and high is None:
        return a
    if any(v is not None and len(v) != a.shape[-1] for v in (low, high)):
        raise ValueError(f"action bounds have {len(low or high)} entries, actions have shape {tuple(a.shape)}")
    lo, hi = (torch.as_tensor(v if v is not None else [fill] * a.shape[-1], dtype=torch.float64, device=a.device)
              for v, fill in ((low, -float("inf")), (high, float("inf"))))
    return torch.clamp(a.double(), lo, hi).to(a.dtype)


def postprocess_action(x: torch.Tensor, step: dict) -> torch.Tensor:
    """Model-space actions -> what Policy.infer returns, by the selfflow_unnormalizer step's config
    (policy_postprocessor.json): clip, un-normalise, bound."""
    a = unnormalize(x, step["streams"][ACTION], step["mode"], step.get("clip"))
    return bound(a, step.get("low"), step.get("high"))


def default_clip(mode: str) -> float | None:
    """Policy's safety.normalized_clip="auto": 1.0 in q99 mode, none in mean_std mode."""
    return 1.0 if mode == "q99" else None


def normalizer_step(mode: str, streams: dict) -> dict:
    """The preprocessor step's JSON entry: statistics inline (small), so no state file."""
    return {"registry_name": NORMALIZER_STEP, "config": {"mode": mode, "streams": streams}}


def unnormalizer_step(mode: str, action: dict, clip: float | None, low: list | None = None,
                      high: list | None = None) -> dict:
    return {"registry_name": UNNORMALIZER_STEP,
            "config": {"mode": mode, "streams": {ACTION: action}, "clip": clip, "low": low, "high": high}}


def pipelines(mode: str, streams: dict, clip: float | None, device: str = "cpu",
              bounds: tuple = (None, None)) -> tuple[dict, dict]:
    """policy_preprocessor.json and policy_postprocessor.json as LeRobot's PolicyProcessorPipeline
    writes them: rename -> batch -> device -> our normaliser; our unnormaliser (+ bounds) -> cpu."""
    pre = {"name": PREPROCESSOR, "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "device_processor", "config": {"device": device, "float_dtype": None}},
        normalizer_step(mode, streams)]}
    post = {"name": POSTPROCESSOR, "steps": [
        unnormalizer_step(mode, streams[ACTION], clip, *bounds),
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    return pre, post
