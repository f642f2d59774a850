"""`--policy.type=selfflow`: the LeRobot config of a selfflow-robot video-action policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from selfflow_robot import lerobot_format as lf


@PreTrainedConfig.register_subclass(lf.POLICY_TYPE)
@dataclass
class SelfFlowConfig(PreTrainedConfig):
    """Field names follow selfflow-robot's run config: `model` is its model section (a size name
    such as tiny / s / b plus overrides; action_dim and state_dim come from the features),
    `objective` its objective section, the clip fields its `io` section."""

    # The model and the training objective (configs/model/*.yaml, configs/objective/*.yaml).
    model: dict[str, Any] = field(default_factory=lambda: {"name": "tiny", "patch_size": 8})
    objective: dict[str, Any] = field(default_factory=lambda: {
        "kind": "self_flow", "mask_ratio": 0.1, "action_only_fraction": 0.25, "context_noise_max": 0.2})
    # The model's frame [h, w]: several cameras are tiled left to right, each w / cameras wide.
    image_size: list[int] = field(default_factory=lambda: [64, 64])
    context_frames: int = 1  # observations the model sees (the last queried ones at inference)
    future_frames: int = 0  # frames the world model predicts in training (0: actions only)
    frame_stride: int = 1  # control steps between frames
    chunk_size: int = 8  # actions predicted per query
    n_action_steps: int = 8  # actions executed from each chunk before querying again
    sampler_steps: int = 10  # Euler steps of the action-first sampler
    sampler_mode: str = "action_first"  # or joint (denoises future frames with the actions)
    seed: int | None = 0  # the sampler's noise generator (None: nondeterministic)

    # q99 (clip to [-1, 1]) or mean_std; mask entries False pass through (e.g. the gripper).
    normalization_mode: str = "q99"
    action_mask: list[bool] | None = None
    state_mask: list[bool] | None = None
    normalized_clip: float | None = 1.0  # q99 mode: bound of the normalised actions before un-normalising
    # Bound every action dim (the masked ones too) to the data's range (min/max, else q01/q99) widened by
    # this fraction on each side, as Policy.load's safety.data_margin; None: no bound.
    data_margin: float | None = 0.1
    # LeRobot's own normaliser is not used (see processor_selfflow); kept for its tooling.
    normalization_mapping: dict[str, NormalizationMode] = field(default_factory=lambda: {
        "VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.QUANTILES,
        "ACTION": NormalizationMode.QUANTILES})

    # Training presets (selfflow-robot's trainer defaults for fine-tuning).
    ema_decay: float = 0.999  # the Self-Flow teacher
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 0.0
    optimizer_grad_clip_norm: float = 1.0
    scheduler_warmup_steps: int = 0
    scheduler_decay_steps: int | None = None  # cosine decay to decay_lr over this many steps
    scheduler_decay_lr: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        errors = []
        if self.normalization_mode not in lf.MODES:
            errors.append(f"normalization_mode must be one of {lf.MODES}, got {self.normalization_mode!r}")
        if self.sampler_mode not in ("action_first", "joint"):
            errors.append(f"sampler_mode must be action_first or joint, got {self.sampler_mode!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            errors.append(f"image_size must be [h, w] > 0, got {self.image_size}")
        for name, low in (("context_frames", 1), ("future_frames", 0), ("frame_stride", 1), ("chunk_size", 1),
                          ("n_action_steps", 1), ("sampler_steps", 1)):
            if int(getattr(self, name)) < low:
                errors.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.n_action_steps > self.chunk_size:
            errors.append(f"n_action_steps ({self.n_action_steps}) must be <= chunk_size ({self.chunk_size})")
        m = self.data_margin
        if m is not None and (isinstance(m, bool) or not 0 <= float(m) < float("inf")):
            errors.append(f"data_margin must be a number >= 0 or None, got {m!r}")
        if str(self.model.get("text", "bytes")) == "embedding":
            errors.append("model.text=embedding needs a precomputed instruction embedding, which LeRobot "
                          "batches do not carry; use bytes or none")
        if errors:
            raise ValueError("selfflow policy config: " + "; ".join(errors))

    # -------------------------------------------------------------- what the dataset loads
    @property
    def observation_delta_indices(self) -> list[int] | None:
        """Context frames back to the current step, then the future frames the world model
        learns to predict (training only; inference sees the current step)."""
        n, m, s = self.context_frames, self.future_frames, self.frame_stride
        if n == 1 and m == 0:
            return None
        return [-s * i for i in range(n - 1, -1, -1)] + [s * j for j in range(1, m + 1)]

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None

    # ------------------------------------------------------------------- features
    @property
    def cameras(self) -> list[str]:
        return list(self.image_features)

    @property
    def state_dim(self) -> int:
        ft = self.robot_state_feature
        return int(ft.shape[0]) if ft is not None else 0

    @property
    def action_dim(self) -> int:
        return int(self.action_feature.shape[0])

    def validate_features(self) -> None:
        if not self.image_features:
            raise ValueError("selfflow needs at least one camera (a VISUAL input feature such as observation.image "
                             f"or observation.images.<name>); got inputs {sorted(self.input_features or {})}")
        if self.action_feature is None or len(self.action_feature.shape) != 1:
            raise ValueError(f"selfflow needs a 1-D 'action' output feature; got {self.output_features}")
        state = self.robot_state_feature
        if state is not None and len(state.shape) != 1:
            raise ValueError(f"selfflow needs a 1-D observation.state, got shape {state.shape}")
        for key, ft in self.input_features.items():
            if ft.type is FeatureType.ENV:
                raise ValueError(f"selfflow does not read {key} (an environment state): it sees cameras and "
                                 "observation.state; rename or drop the feature")
        if self.image_size[1] % len(self.cameras):
            raise ValueError(f"image_size width {self.image_size[1]} does not split into {len(self.cameras)} "
                             "equal camera tiles")
        for name, mask, dim in (("action_mask", self.action_mask, self.action_dim),
                                ("state_mask", self.state_mask, self.state_dim)):
            if mask is not None and len(mask) != dim:
                raise ValueError(f"{name} has {len(mask)} entries, the feature has {dim} dims")

    # ------------------------------------------------------------------ training presets
    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=self.optimizer_lr, betas=self.optimizer_betas, eps=self.optimizer_eps,
                           weight_decay=self.optimizer_weight_decay, grad_clip_norm=self.optimizer_grad_clip_norm)

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig | None:
        if self.scheduler_decay_steps is None and self.scheduler_warmup_steps == 0:
            return None  # constant, as selfflow-robot's trainer default
        return CosineDecayWithWarmupSchedulerConfig(
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps or 10**9, peak_lr=self.optimizer_lr,
            decay_lr=self.scheduler_decay_lr)

    def model_config(self) -> dict:
        """The selfflow-robot model section with the features' action and state sizes."""
        return {**self.model, "action_dim": self.action_dim, "state_dim": self.state_dim}
