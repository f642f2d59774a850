"""`SelfFlowPolicy`: a selfflow-robot video-action model behind LeRobot's PreTrainedPolicy.

Inference mirrors selfflow_robot's Policy/ActionSampler step for step (the same frame resize,
context history, byte-encoded task, Euler action-first sampler and seeded noise), so an exported
checkpoint gives the same actions through LeRobot as through Policy.load. Training runs the
selfflow-robot objective (flow matching on actions and, with future_frames > 0, on video, plus
the Self-Flow representation loss against an EMA teacher that update() moves).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from lerobot.policies.pretrained import PreTrainedPolicy
from safetensors.torch import load_file
from selfflow_robot import lerobot_format as lf
from selfflow_robot.models import SelfFlowDiT
from selfflow_robot.models.config import model_config
from selfflow_robot.objectives import build_objective
from selfflow_robot.sampling import euler_sample
from selfflow_robot.train.ema import ema_update, make_ema
from selfflow_robot.train.optim import param_groups

from .configuration_selfflow import SelfFlowConfig


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """LeRobot's float [..., 3, H, W] in [0, 1] (uint8 accepted too) -> uint8 [..., H, W, 3]."""
    if images.dtype != torch.uint8:
        images = (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return images.movedim(-3, -1)


def resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, h, w, 3], bilinear and antialiased as sampling.resize_frame."""
    x = frames.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)


class SelfFlowPolicy(PreTrainedPolicy):
    config_class = SelfFlowConfig
    name = lf.POLICY_TYPE

    def __init__(self, config: SelfFlowConfig, dataset_stats=None, dataset_meta=None, **kwargs):
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.model = SelfFlowDiT(model_config(config.model_config()))
        self.objective = build_objective(config.objective, self.model.cfg)
        self._teacher: list = []  # the EMA teacher, outside the state dict (training only)
        self._generator: torch.Generator | None = None
        self.reset()

    # ----------------------------------------------------------------------- loading
    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        """Every model weight must be in the file (LeRobot loads non-strictly by default, which
        would leave a mismatched checkpoint silently random); the objective head may be absent."""
        sd = load_file(model_file, device="cpu")
        own = model.state_dict()
        missing = [k for k in own if k.startswith("model.") and k not in sd]
        shape = [f"{k}: file {tuple(v.shape)} vs policy {tuple(own[k].shape)}" for k, v in sd.items()
                 if k in own and v.shape != own[k].shape]
        unknown = [k for k in sd if k not in own]
        if missing or shape or unknown:
            raise ValueError(f"{model_file} does not fit this selfflow policy: "
                             + "; ".join(f"{name} {items[:5]}" for name, items in
                                         (("missing", missing), ("shape mismatch", shape), ("unexpected", unknown))
                                         if items))
        model.load_state_dict(sd, strict=False)
        return model

    def get_optim_params(self) -> list[dict]:
        """Decay / no-decay groups as selfflow-robot's trainer (no decay on norms, biases, embeddings)."""
        return param_groups({"model": self.model, "objective": self.objective}, self.config.optimizer_weight_decay)

    # ---------------------------------------------------------------------- inference
    def reset(self) -> None:
        self._queue: deque = deque(maxlen=self.config.n_action_steps)
        self._history: deque = deque(maxlen=self.config.context_frames)

    def _frames(self, batch: dict) -> torch.Tensor:
        """The model's frames, uint8 [B, (T,) h, w, 3]: each camera resized to its tile, tiled left
        to right in the config's camera order."""
        names = self.config.cameras
        h, w = self.config.image_size[0], self.config.image_size[1] // len(names)
        tiles = []
        for name in names:
            if name not in batch:
                raise KeyError(f"selfflow policy: the batch lacks camera '{name}' (has {sorted(batch)})")
            img = to_uint8(batch[name])
            lead = img.shape[:-3]
            tiles.append(resize(img.reshape(-1, *img.shape[-3:]), (h, w)).reshape(*lead, h, w, 3))
        return torch.cat(tiles, dim=-2)

    def _condition(self, batch: dict, batch_size: int) -> dict:
        text = None
        if self.model.cfg.text == "bytes":
            task = batch.get("task")
            tasks = [task] * batch_size if isinstance(task, str) else list(task or [""] * batch_size)
            text = self.model.encode_text([t or "" for t in tasks], self.model.type_embed.device)
        state = None
        if self.model.state_embed is not None:
            state = batch[lf.STATE].float()
            if state.dim() == 3:  # training: [B, T, S], the current step is the last context one
                state = state[:, self.config.context_frames - 1]
        return {"text": text, "state": state}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict, **kwargs) -> torch.Tensor:
        """Normalised actions [B, chunk_size, A] for the current observation; the context is the
        last context_frames observations this was called with (the first one repeated at the start)."""
        frame = self._frames(batch).to(self.model.type_embed.device)
        if self._history and self._history[-1].shape != frame.shape:
            self._history.clear()  # another batch size: a new rollout
        if not self._history:
            self._history.extend([frame] * self._history.maxlen)
        else:
            self._history.append(frame)
        context = self.model.frames_to_tokens(torch.stack(list(self._history), dim=1))
        B, dev = context.shape[0], context.device
        if self._generator is None and self.config.seed is not None:
            self._generator = torch.Generator(dev).manual_seed(int(self.config.seed))
        video_shape = None
        if self.config.sampler_mode == "joint" and self.config.future_frames > 0:
            video_shape = (B, self.config.future_frames, *context.shape[2:])
        out = euler_sample(self.model, steps=self.config.sampler_steps, context=context,
                           video_shape=video_shape, action_shape=(B, self.config.chunk_size, self.config.action_dim),
                           generator=self._generator, **self._condition(batch, B))
        return out["action"].float()

    @torch.no_grad()
    def select_action(self, batch: dict, **kwargs) -> torch.Tensor:
        """One normalised action [B, A]; a new chunk every n_action_steps calls."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]
            self._queue.extend(chunk.transpose(0, 1))
        return self._queue.popleft()

    # ------------------------------------------------------------------------ training
    def _teacher_model(self):
        if self.objective.head is None:
            return None
        if not self._teacher:
            self._teacher.append(make_ema(self.model))
        return self._teacher[0]

    def forward(self, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
        """The selfflow-robot training loss on a LeRobotDataset batch (normalised by the preprocessor)."""
        if reduction != "mean":
            raise ValueError("selfflow computes a batch-mean loss only (reduction='mean')")
        n, m = self.config.context_frames, self.config.future_frames
        frames = self._frames(batch)
        if frames.dim() == 4:  # no time axis: one context frame, no future
            frames = frames[:, None]
        B = frames.shape[0]
        clip = {"context": frames[:, :n], "actions": batch[lf.ACTION].float()}
        if "action_is_pad" in batch:
            clip["action_mask"] = ~batch["action_is_pad"].bool()
        if m > 0:
            clip["future"] = frames[:, n:n + m]
            pad = batch.get(f"{self.config.cameras[0]}_is_pad")
            clip["future_mask"] = ~pad[:, n:n + m].bool() if pad is not None else torch.ones(B, m, dtype=torch.bool)
        cond = self._condition(batch, B)
        if cond["state"] is not None:
            clip["state"] = cond["state"]
        if self.model.cfg.text == "bytes":
            task = batch.get("task")
            clip["instruction"] = [task] * B if isinstance(task, str) else list(task or [""] * B)
        loss, metrics = self.objective(self.model, self._teacher_model(), clip)
        return loss, {k: float(v) for k, v in metrics.items()}

    def update(self) -> None:
        """After each optimizer step (lerobot-train calls it): move the EMA teacher."""
        if self._teacher:
            ema_update(self._teacher[0], self.model, self.config.ema_decay)
