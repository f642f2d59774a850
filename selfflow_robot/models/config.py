"""Model configuration and the registry of named sizes (DiT/SiT naming: S, B, L, XL)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "tiny"
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    # Pixel patches: a p x p x 3 patch of a [-1, 1] frame is one token. With a frozen autoencoder
    # (a trained directory, or its spec dict as saved in checkpoints) a p x p patch of its latent is.
    patch_size: int = 8
    in_channels: int = 3
    autoencoder: Any = None
    # Action stream: 0 means no action layers (pretraining); fine-tuning sets the dataset's action dim.
    action_dim: int = 0
    # Proprioceptive state as one conditioning token (0 = none).
    state_dim: int = 0
    # Frames are `frame_stride` control steps apart; action j sits at time j / frame_stride (RoPE time axis).
    frame_stride: int = 1
    # Instruction encoder: "bytes" (UTF-8 bytes + learned embedding, no download), "embedding"
    # (a precomputed vector such as RT-1's 512-d USE embedding) or "none".
    text: str = "bytes"
    max_text_len: int = 64
    text_embed_dim: int = 512
    qk_norm: bool = False
    # Conditioning tokens (text, state, context frames) attend only among themselves, never to the
    # noisy generated tokens: their keys/values are then computed once per observation and reused
    # by every denoising step (PrefixCache), as prefix caching does in VLA policies.
    isolate_condition: bool = True
    rope_theta: float = 10000.0
    # Token positions: "rope" (3-D rotary over time, height, width) or "sincos2d" (the released
    # SiT/Self-Flow ImageNet network: fixed 2-D sin-cos absolute positions added to every frame's
    # tokens, rotary over time only, so a lone frame sees no rotation; docs/model.md).
    positions: str = "rope"
    # Class-label conditioning as in DiT/SiT: an embedding table whose last row is the null class
    # (used when no label is given, e.g. robot clips); its vector is added to the time embedding.
    # 0 = none; the released ImageNet checkpoint has 1001 (1000 classes + null).
    num_classes: int = 0
    # What the video head predicts: "v" (the velocity eps - x0, as SiT) or "x" (the clean patch x0,
    # turned into a velocity (x_t - x0_hat) / max(t, 0.05) inside forward, so losses and samplers
    # are unchanged). x-prediction suits pixel patches wider than the model (JiT, Li & He 2025).
    # "auto" (the command configs' default): x when a patch holds more values than the width, else v.
    video_prediction: str = "v"
    # Layers for the Self-Flow taps (1-indexed "after block i"); None -> round(0.3 D), round(0.7 D).
    student_layer: int | None = None
    teacher_layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} is not divisible by model.heads={self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"head dim {self.width // self.heads} must be even for rotary positions")
        if self.patch_size < 1:
            raise ValueError(f"model.patch_size must be >= 1, got {self.patch_size}")
        if isinstance(self.autoencoder, str):
            from .autoencoder import autoencoder_spec

            self.autoencoder = autoencoder_spec(self.autoencoder)
        if self.autoencoder:
            self.in_channels = int(self.autoencoder["channels"])
        if self.video_prediction == "auto":  # resolved here, so checkpoints record v or x
            self.video_prediction = "x" if self.patch_size**2 * self.in_channels > self.width else "v"
        if self.video_prediction not in ("v", "x"):
            raise ValueError(f"model.video_prediction must be auto|v|x, got {self.video_prediction!r}")
        if self.positions not in ("rope", "sincos2d"):
            raise ValueError(f"model.positions must be rope|sincos2d, got {self.positions!r}")
        if self.positions == "sincos2d" and self.width % 4:
            raise ValueError(f"model.positions=sincos2d needs model.width divisible by 4, got {self.width}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if self.text not in ("bytes", "embedding", "none"):
            raise ValueError(f"model.text must be bytes|embedding|none, got {self.text!r}")

    @property
    def l_student(self) -> int:
        return self.student_layer or max(1, round(0.3 * self.depth))

    @property
    def k_teacher(self) -> int:
        return self.teacher_layer or min(self.depth, max(self.l_student + 1, round(0.7 * self.depth)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        for f in dataclasses.fields(cls):
            if f.name in d:
                _check_type(f"model.{f.name}", d[f.name], str(f.type))
        return cls(**d)


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict[str, Any]": (dict,)}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """A saved or typed value of the wrong type ("two" for a depth) is named here, not as a
    TypeError deep inside the model code."""
    parts = [p.strip() for p in annotation.split("|")]
    if value is None and "None" in parts or "Any" in parts:
        return
    kinds = [k for p in parts for k in _KINDS.get(p, ())]
    if kinds and (not isinstance(value, tuple(kinds)) or isinstance(value, bool) and bool not in kinds):
        want = " or ".join(p if p != "dict[str, Any]" else "a mapping" for p in parts)
        raise ValueError(f"{key}: expected {want}, got {value!r}")


# depth, width, heads (SiT/DiT sizes; xl = SiT-XL/2: 28 blocks, 1152 wide, 16 heads, ~675M params).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(depth=2, width=64, heads=4),
    "s": dict(depth=12, width=384, heads=6),
    "b": dict(depth=12, width=768, heads=12),
    "l": dict(depth=24, width=1024, heads=16),
    "xl": dict(depth=28, width=1152, heads=16),
}


def model_config(name_or_cfg: str | dict | ModelConfig, **overrides: Any) -> ModelConfig:
    if isinstance(name_or_cfg, ModelConfig):
        base = name_or_cfg.to_dict()
    elif isinstance(name_or_cfg, str):
        if name_or_cfg not in SIZES:
            raise ValueError(f"unknown model size {name_or_cfg!r}; choose from {sorted(SIZES)}")
        base = dict(name=name_or_cfg, **SIZES[name_or_cfg])
    else:
        base = dict(name_or_cfg)
        size = base.get("name")
        if size in SIZES:  # a config group file may give only the name and a few overrides
            base = {**SIZES[size], **base}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(base)
