"""Euler ODE and Euler-Maruyama SDE sampling with per-token timesteps, from t = 1 (noise) to t = 0 (data).

Modes:
  joint         future frames and the action chunk are denoised together (shared t);
  action_first  only action tokens are generated: no video tokens in the sequence, so video
                generation stays off the control path (the model is trained for this with
                objective.action_only_fraction > 0);
  video         world-model use: frames generated from context + a given (clean) action sequence,
                or from context alone for an action-free model.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from .objectives.flow import shift_time

MODES = ("joint", "action_first", "video")
METHODS = ("ode", "sde")
SDE_LAST_STEP = 0.04  # SiT / Self-Flow: Euler-Maruyama down to t = 0.04, then one deterministic step


def time_grid(steps: int, method: str = "ode", shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data): uniform for the ODE; for the SDE uniform down to
    SDE_LAST_STEP and a last step from there to 0 (SiT's grid). Both optionally time-shifted."""
    if method not in METHODS:
        raise ValueError(f"sampler method must be one of {METHODS}, got {method!r}")
    if method == "ode":
        if steps < 1:
            raise ValueError(f"sampling needs steps >= 1, got {steps}")
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)
    if steps < 2:
        raise ValueError(f"SDE sampling needs steps >= 2 (the last one is deterministic), got {steps}")
    grid = shift_time(torch.linspace(1.0, SDE_LAST_STEP, steps, device=device), shift)
    return torch.cat([grid, grid.new_zeros(1)])


def sde_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor, noise: torch.Tensor | None):
    """One Euler-Maruyama step from t to t - h of the reverse SDE with SiT's "sigma" diffusion
    w(t) = t, for x_t = (1 - t) x0 + t eps and v = eps - x0. The score is -E[eps | x] / t with
    E[eps | x] = x + (1 - t) v, so the drift v + w * (-score) = v + eps_hat has no 1/t.
    noise=None: the deterministic ("Mean") last step."""
    eps_hat = x + (1 - t) * v
    x = x - h * (v + eps_hat)
    return x if noise is None else x + torch.sqrt(2 * t * h) * noise


@torch.no_grad()
def euler_sample(model, *, steps: int, context=None, text=None, text_emb=None, state=None,
                 video_shape=None, action_shape=None, given_actions=None, shift: float = 1.0,
                 context_t: float = 0.0, generator: torch.Generator | None = None, forward=None,
                 encode_prefix=None, method: str = "ode", action_noise: torch.Tensor | None = None) -> dict:
    """Integrate from t = 1 to 0. Shapes are full tensor shapes ([B, T, h, w, P], [B, H, A]).
    method: "ode" (Euler on dx/dt = v; few steps, the control path) or "sde" (Euler-Maruyama as in
    SiT and the Self-Flow release; wants many steps, e.g. 250 for images).
    `forward` / `encode_prefix` may be compiled versions of the model's (e.g. CUDA graphs for
    batch-1 control). action_noise: the initial action noise [B, H, A] (the ONNX export takes it as
    an input, so a runner without torch reproduces a chunk); drawn from `generator` when None."""
    dev = model.type_embed.device
    forward = model if forward is None else forward
    encode_prefix = model.encode_prefix if encode_prefix is None else encode_prefix
    ts = time_grid(steps, method, shift, dev)
    x_v = torch.randn(video_shape, device=dev, generator=generator) if video_shape else None
    x_a = None
    if action_shape and given_actions is None:
        x_a = torch.randn(action_shape, device=dev, generator=generator) if action_noise is None else action_noise
    B = next(s for s in (video_shape, action_shape) if s)[0]
    ctx_t = torch.full((B,), float(context_t), device=dev)
    autocast = _autocast(dev, model.type_embed.dtype)
    cond = dict(context=context, context_t=ctx_t, text=text, text_emb=text_emb, state=state)
    has_cond = any(v is not None for k, v in cond.items() if k != "context_t")
    if model.cfg.isolate_condition and has_cond:
        with autocast:  # the conditioning's keys/values, once for all steps
            cond = {"prefix": encode_prefix(**cond)}
    elif not has_cond:
        cond = {}
    schedule = [None] * steps
    only_generated = not cond or "prefix" in cond  # the forward processes generated tokens alone
    if given_actions is None and only_generated:  # ... and all of them sit at the step's t
        with autocast:
            schedule = model.modulation_schedule(ts[:-1], B)
    for i in range(steps):
        t = ts[i].expand(B)
        with autocast:
            out = forward(video=x_v, video_t=t, action=given_actions if given_actions is not None else x_a,
                          action_t=torch.zeros_like(t) if given_actions is not None else t,
                          modulation=schedule[i], **cond)
        # New tensors every step: compiled (CUDA-graph) outputs are overwritten by the next call.
        x_v, x_a = (_step(x, out.get(name), ts[i], ts[i + 1], method, i == steps - 1, generator)
                    for x, name in ((x_v, "video"), (x_a, "action")))
    return {"video": x_v, "action": x_a}


def _step(x, v, t, t_next, method: str, last: bool, generator):
    if x is None:
        return None
    v = v.float()
    if method == "ode":
        return x + (t_next - t) * v
    noise = None if last else torch.randn(x.shape, device=x.device, generator=generator)
    return sde_step(x, v, t, t - t_next, noise)


def _autocast(device: torch.device, weight_dtype: torch.dtype):
    """bf16 autocast on CUDA (fp32 or bf16 weights); low-precision weights elsewhere run in their
    own dtype; fp32 weights on CPU stay fp32 (CPU bf16 matmuls are slow without AMX)."""
    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16 if weight_dtype == torch.float32 else weight_dtype)
    return torch.autocast(device.type, weight_dtype, enabled=weight_dtype != torch.float32)


def resize_frame(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 tensor [h, w, 3] (bilinear, antialiased)."""
    image = np.asarray(image)
    if not image.flags.writeable:  # e.g. decoded from a message buffer; torch wants writable memory
        image = image.copy()
    x = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


class ActionSampler:
    """Observation -> normalised action chunk (and optionally predicted frames) for Policy.

    Keeps the last `context_frames` observations as the context; the run config's `io` section
    (written by fine-tuning) gives the image size, chunk length and number of future frames.
    """

    def __init__(self, model, config: dict, device="cpu", steps: int = 10, mode: str = "action_first",
                 shift: float = 1.0, seed: int | None = 0, compile: bool = False):
        if mode not in MODES[:2]:
            raise ValueError(f"policy sampling mode must be joint or action_first, got {mode!r}")
        io = config.get("io")
        if not io or int(io.get("action_dim", 0)) <= 0 or model.action_head is None:
            raise ValueError("checkpoint config has no action io section: not a fine-tuned video-action policy")
        self.model, self.io, self.steps, self.mode, self.shift = model.eval(), io, steps, mode, shift
        self.device = torch.device(device)
        self.size = tuple(io["image_size"])
        self.history: deque = deque(maxlen=int(io["context_frames"]))
        self.generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        self._text_cache: tuple[str, torch.Tensor] | None = None
        # Batch-1 control is launch-bound: CUDA graphs (reduce-overhead) replay each denoising step.
        # The once-per-observation prefix is compiled without CUDA graphs: its keys/values must
        # outlive the step graphs' replays, which would overwrite a graph's outputs.
        self.forward = torch.compile(model, mode="reduce-overhead", dynamic=False) if compile else model
        self.encode_prefix = torch.compile(model.encode_prefix, dynamic=False) if compile else model.encode_prefix

    def reset(self) -> None:
        self.history.clear()

    def _text(self, instruction: str, embedding=None):
        if self.model.cfg.text == "embedding":
            if embedding is None:
                raise ValueError("this policy conditions on an instruction embedding: send obs['instruction_embedding']")
            return None, torch.as_tensor(embedding, dtype=torch.float32, device=self.device)[None]
        if self._text_cache is None or self._text_cache[0] != instruction:
            self._text_cache = (instruction, self.model.encode_text([instruction], self.device))
        return self._text_cache[1], None

    def _frame(self, image: np.ndarray, views: dict | None) -> torch.Tensor:
        """The model's frame: the image resized, or with several cameras (io.views) every view resized
        to its share of the width and tiled left to right, as the LeRobot reader stored them."""
        names = self.io.get("views") or []
        if len(names) < 2:
            return resize_frame(image, self.size)
        h, w = self.size[0], self.size[1] // len(names)
        if not views or any(n not in views for n in names[1:]):
            raise ValueError(f"this policy sees cameras {names}: pass the views after the first as views={{name: image}}")
        return torch.cat([resize_frame(image, (h, w)), *(resize_frame(views[n], (h, w)) for n in names[1:])], dim=1)

    def __call__(self, image: np.ndarray, instruction: str, state=None, instruction_embedding=None,
                 views: dict | None = None) -> dict:
        frame = self._frame(image, views).to(self.device)
        if not self.history:  # pad the history with the first frame, as the clip sampler does
            self.history.extend([frame] * self.history.maxlen)
        else:
            self.history.append(frame)
        context = self.model.frames_to_tokens(torch.stack(list(self.history))[None])
        text, text_emb = self._text(instruction, instruction_embedding)
        st = None
        if self.model.state_embed is not None:
            if state is None:
                raise ValueError("this policy needs obs['state']")
            st = torch.as_tensor(np.asarray(state, dtype=np.float32), device=self.device)[None]
        H, A = int(self.io["action_chunk"]), int(self.io["action_dim"])
        video_shape = None
        if self.mode == "joint" and int(self.io.get("future_frames", 0)) > 0:
            video_shape = (1, int(self.io["future_frames"]), *context.shape[2:])
        out = euler_sample(self.model, steps=self.steps, context=context, text=text, text_emb=text_emb, state=st,
                           video_shape=video_shape, action_shape=(1, H, A), shift=self.shift, generator=self.generator,
                           forward=self.forward, encode_prefix=self.encode_prefix)
        video = self.model.tokens_to_frames(out["video"])[0].cpu().numpy() if out["video"] is not None else None
        return {"actions": out["action"][0].float().cpu().numpy(), "video": video}


@torch.no_grad()
def predict_video(model, context_frames: torch.Tensor, instruction: str | None, num_frames: int, *,
                  actions: torch.Tensor | None = None, steps: int = 20, state=None, text_emb=None,
                  generator: torch.Generator | None = None, method: str = "ode") -> torch.Tensor:
    """World-model rollout: uint8 context [B, Tc, H, W, 3] (+ normalised actions [B, H, A]) ->
    uint8 predicted frames [B, num_frames, H, W, 3]."""
    dev = model.type_embed.device
    context = model.frames_to_tokens(context_frames.to(dev))
    B = context.shape[0]
    text = model.encode_text([instruction or ""] * B, dev) if model.cfg.text == "bytes" else None
    out = euler_sample(model, steps=steps, context=context, text=text, text_emb=text_emb, state=state,
                       video_shape=(B, num_frames, *context.shape[2:]),
                       given_actions=None if actions is None else actions.to(dev).float(), generator=generator,
                       method=method)
    return model.tokens_to_frames(out["video"])
