"""Self-Flow (Dual-Timestep Scheduling + EMA-teacher self-distillation) and its baselines.

One objective class covers the three arms of the study, selected by `kind`:
  flow_matching  every generated token of a sample at one t ~ p(t);
  dts            Dual-Timestep Scheduling only: t, s ~ p(t) independent and unsorted, each token
                 takes s with probability R_M (Bernoulli per token), else t;
  self_flow      DTS + representation loss: head(student block l) vs the EMA teacher's raw block k,
                 the teacher fed every token at min(t, s) with the same data and the same noise.
The flow loss covers all generated tokens (video patches and action steps). Fine-tuning adds the
video-action recipe: context frames noise-augmented with t ~ U[0, c_max], an action-only subset (no
video tokens, so the policy can sample actions without generating video) and a forward-dynamics
subset (clean actions given, video generated).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..models.dit import TokenTimes
from ..models.fp8 import fp8_matmuls, use_fp8_teacher
from .flow import interpolate, masked_mse, sample_time

KINDS = ("flow_matching", "dts", "self_flow", "repa")


@dataclass
class ObjectiveConfig:
    kind: str = "self_flow"
    time_dist: str = "uniform"
    time_shift: float = 1.0
    time_mu: float = 0.0
    time_sigma: float = 1.0
    mask_ratio: float = 0.25  # R_M: 0.25 for images, 0.1 for video
    rep_weight: float = 0.8  # gamma (Self-Flow) or lambda (REPA, 0.5)
    action_weight: float = 1.0
    context_noise_max: float = 0.2
    action_only_fraction: float = 0.0
    forward_dynamics_fraction: float = 0.0
    # shared: video and action tokens of a sample share t (and s), as in the paper; independent:
    # actions draw their own (t_a, s_a), so one model learns every mix of noisy/clean video/actions.
    video_action_times: str = "shared"
    # The action-only samples (the action-first sampling path): flow_matching trains them with one
    # t per sample in every arm; same gives them the arm's objective (DTS over action tokens and,
    # for self_flow, the representation loss against the teacher on the same action-only input).
    action_only_objective: str = "flow_matching"
    # The no-grad teacher's matmuls in FP8 (GPUs with compute capability >= 8.9); see models/fp8.py.
    teacher_fp8: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectiveConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.kind not in KINDS:
            raise ValueError(f"objective.kind must be one of {KINDS}, got {cfg.kind!r}")
        if cfg.video_action_times not in ("shared", "independent"):
            raise ValueError(f"objective.video_action_times must be shared|independent, got {cfg.video_action_times!r}")
        if cfg.action_only_objective not in ("flow_matching", "same"):
            raise ValueError(f"objective.action_only_objective must be flow_matching|same, got {cfg.action_only_objective!r}")
        if not 0.0 <= cfg.mask_ratio <= 0.5:
            raise ValueError(f"objective.mask_ratio must be in [0, 0.5] (Self-Flow requires R_M <= 0.5), got {cfg.mask_ratio}")
        return cfg


def projection_head(width: int) -> nn.Sequential:
    """The released SimpleHead shape: width -> 2 width -> width with SiLU."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over valid tokens of 1 - cos(student, teacher) along the hidden dimension, and mean cos."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if mask is None:
        return (1 - cos).mean(), cos.mean()
    m = mask.to(cos.dtype)
    n = m.sum().clamp_min(1)
    return ((1 - cos) * m).sum() / n, (cos * m).sum() / n


def forward_flops(mcfg, n: int) -> float:
    """Forward FLOPs of one sample of n tokens: 2 x matmul params per token + attention 4 N^2 d per
    block. Modulation runs once per distinct timestep, not per token, so it is not counted."""
    d, L = mcfg.width, mcfg.depth
    per_block = 2 * (4 + 2 * mcfg.mlp_ratio) * d * d * n + 4 * n * n * d
    return float(L * per_block)


def tokens_per_sample(batch: dict, mcfg) -> int:
    n = 0
    for key in ("video_tokens", "context_tokens"):
        if batch.get(key) is not None:
            n += int(batch[key][0].shape[:-1].numel())
    p = mcfg.patch_size
    for key in ("future", "context"):
        if batch.get(f"{'video' if key == 'future' else key}_tokens") is not None:
            continue
        if batch.get(f"{key}_latents") is not None:
            T, h, w = batch[f"{key}_latents"].shape[1:4]
            n += T * (h // p) * (w // p)
        elif batch.get(key) is not None:  # frames: an autoencoder's latent pixel covers `downsample` pixels
            T, H, W = batch[key].shape[1:4]
            q = p * int((mcfg.autoencoder or {}).get("downsample", 1))
            n += T * (H // q) * (W // q)
    if batch.get("actions") is not None and mcfg.action_dim:
        n += int(batch["actions"].shape[1])
    if mcfg.text == "bytes" and "instruction" in batch:
        n += mcfg.max_text_len
    return n


def dts_index(token_shape, mask_ratio: float, device=None) -> torch.Tensor:
    """Dual-Timestep Scheduling mask: each token independently takes slot 1 (s) with probability R_M,
    else slot 0 (t). With t, s i.i.d. from p(t) and unsorted, every token's marginal is p(t)."""
    if mask_ratio <= 0:
        return torch.zeros(token_shape, dtype=torch.long, device=device)
    return (torch.rand(token_shape, device=device) < mask_ratio).long()


class FlowInputs:
    """A batch from the clip sampler turned into clean tokens on the model's device."""

    def __init__(self, model, batch: dict):
        dev = model.type_embed.device
        # Pre-extracted tokens (benchmarks) are used as they are; cached autoencoder latents
        # (clip.cached_latents) are only patchified.
        self.frames = batch.get("future")  # raw uint8 frames (REPA's encoder targets)
        self.video = self._tokens(model, batch, "future", "video_tokens", dev)
        self.context = self._tokens(model, batch, "context", "context_tokens", dev)
        if self.video is not None and "future_mask" in batch:
            m = batch["future_mask"].to(dev).bool()
            self.video_mask = m[:, :, None, None].expand(self.video.shape[:4])
        else:
            self.video_mask = None
        act = batch.get("actions")
        self.action = act.to(dev).float() if act is not None and act.shape[-1] > 0 and model.action_head is not None else None
        self.action_mask = batch["action_mask"].to(dev).bool() if self.action is not None and "action_mask" in batch else None
        self.text = self.text_emb = None
        if model.cfg.text == "bytes" and "instruction" in batch:
            self.text = model.encode_text(list(batch["instruction"]), dev)
        elif model.cfg.text == "embedding":
            if "instruction_embedding" not in batch:
                raise KeyError("model.text=embedding needs 'instruction_embedding' in the batch (dataset without embeddings?)")
            self.text_emb = batch["instruction_embedding"].to(dev)
        st = batch.get("state")
        self.state = st.to(dev).float() if st is not None and model.state_embed is not None else None
        ref = self.video if self.video is not None else self.action
        if ref is None:
            raise ValueError("batch has neither future frames nor actions to generate")
        self.batch_size = ref.shape[0]

    @staticmethod
    def _tokens(model, batch, frames_key, tokens_key, dev):
        if batch.get(tokens_key) is not None:
            return batch[tokens_key].to(dev)
        if batch.get(f"{frames_key}_latents") is not None:
            return model.latents_to_tokens(batch[f"{frames_key}_latents"].to(dev))
        if batch.get(frames_key) is not None:
            return model.frames_to_tokens(batch[frames_key].to(dev))
        return None

    def take(self, sl: slice) -> "FlowInputs":
        out = object.__new__(FlowInputs)
        for k, v in vars(self).items():
            setattr(out, k, v[sl] if torch.is_tensor(v) else v)
        out.batch_size = len(range(*sl.indices(self.batch_size)))
        return out


class SelfFlowObjective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig, model_cfg):
        super().__init__()
        self.cfg = cfg
        self.l, self.k = model_cfg.l_student, model_cfg.k_teacher
        if cfg.kind == "self_flow" and not self.l < self.k <= model_cfg.depth:
            raise ValueError(f"Self-Flow needs student layer l < teacher layer k <= depth, got l={self.l}, k={self.k}")
        self.head = projection_head(model_cfg.width) if cfg.kind == "self_flow" else None
        self.model_cfg = model_cfg

    def prepare_teacher(self, ema_model: nn.Module, parallel: str = "none") -> None:
        """Called by the trainer on the fresh EMA copy, before compile and sharding."""
        if self.head is None or not self.cfg.teacher_fp8:
            return
        if parallel == "fsdp":
            raise ValueError("objective.teacher_fp8 works with trainer.parallel=none|ddp, not fsdp "
                             "(the FP8 weight copies are not sharded)")
        if not next(ema_model.parameters()).is_cuda:
            warnings.warn("objective.teacher_fp8 on CPU is slower than fp32 (no FP8 units); it is meant for "
                          "GPUs with compute capability >= 8.9", stacklevel=2)
        if use_fp8_teacher(ema_model, self.k) == 0:
            raise ValueError(f"objective.teacher_fp8: no teacher matmul has sizes that are multiples of 16 "
                             f"(model.width={self.model_cfg.width})")

    def flops_per_sample(self, batch: dict) -> float:
        """Training FLOPs per sample: student forward + backward (3x forward), plus the
        teacher's forward truncated after block k for Self-Flow. Counted the adaLN-aware way."""
        n = tokens_per_sample(batch, self.model_cfg)
        fwd = forward_flops(self.model_cfg, n)
        teacher = fwd * self.k / self.model_cfg.depth if self.cfg.kind == "self_flow" else 0.0
        return 3 * fwd + teacher

    # ------------------------------------------------------------------ pieces
    def _t(self, n: int, device) -> torch.Tensor:
        c = self.cfg
        return sample_time(n, c.time_dist, c.time_shift, c.time_mu, c.time_sigma, device=device)

    @property
    def dual(self) -> bool:
        return self.cfg.kind in ("dts", "self_flow")

    def _context(self, inp: FlowInputs):
        """Context frames noise-augmented with t ~ U[0, c_max] (shared by student and teacher)."""
        if inp.context is None:
            return None, None
        ct = torch.rand(inp.batch_size, device=inp.context.device) * self.cfg.context_noise_max
        return interpolate(inp.context, torch.randn_like(inp.context), ct), ct

    def _model_kwargs(self, inp: FlowInputs, ctx, ct) -> dict:
        return dict(context=ctx, context_t=ct, text=inp.text, text_emb=inp.text_emb, state=inp.state)

    # ------------------------------------------------------------------ forward
    def _action_only_count(self, batch_size: int) -> int:
        """batch_size * action_only_fraction samples, rounded at random so that the expected count
        is exact: a micro-batch of 2 under gradient accumulation (2 * 0.25) must not round it to 0.
        At least one sample stays in the joint pass."""
        x = batch_size * self.cfg.action_only_fraction
        n = int(x)
        if x > n:  # a CPU draw only when rounding is needed
            u = torch.rand(())
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # Every rank must make the same model calls (FSDP2 all-gathers per call): rank 0's
                # draw decides. Every rank still draws, so the RNG streams advance alike.
                u = u.to("cuda" if dist.get_backend() == "nccl" else "cpu")
                dist.broadcast(u, src=0)
            if u.item() < x - n:
                n += 1
        return min(n, batch_size - 1)

    def forward(self, model, ema_model, batch: dict):
        inp = FlowInputs(model, batch)
        n_ao = self._action_only_count(inp.batch_size) if inp.action is not None and inp.video is not None else 0
        sums = {"video": [0.0, 0.0], "action": [0.0, 0.0]}
        metrics: dict[str, torch.Tensor] = {}
        rep = self._joint(model, ema_model, inp.take(slice(n_ao, None)), sums, metrics)
        if n_ao and self.cfg.action_only_objective == "same" and self.cfg.kind in ("dts", "self_flow"):
            ao = inp.take(slice(0, n_ao))
            ao.video = ao.video_mask = None  # the same samples without their video tokens
            joint_cos = metrics.get("cos")
            rep_ao = self._joint(model, ema_model, ao, sums, metrics)
            if rep is not None and rep_ao is not None:  # per-sample weighting of the two passes
                rep = (rep * (inp.batch_size - n_ao) + rep_ao * n_ao) / inp.batch_size
                metrics["cos"] = (joint_cos * (inp.batch_size - n_ao) + metrics["cos"] * n_ao) / inp.batch_size
        elif n_ao:
            self._action_only(model, inp.take(slice(0, n_ao)), sums)
        loss = torch.zeros((), device=model.type_embed.device)
        for name, weight in (("video", 1.0), ("action", self.cfg.action_weight)):
            s, n = sums[name]
            if torch.is_tensor(n):
                # Added even when no token was valid (n = 0, s = 0): the loss then keeps the graph and
                # backward gives zero gradients, where a constant loss would fail.
                term = s / n.clamp_min(1)
                loss = loss + weight * term
                if n > 0:
                    metrics[f"flow_{name}"] = term.detach()
        if rep is not None:
            loss = loss + self.cfg.rep_weight * rep
            metrics["rep"] = rep.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _joint(self, model, ema_model, inp: FlowInputs, sums, metrics):
        B, dev = inp.batch_size, model.type_embed.device
        t, s = self._t(B, dev), self._t(B, dev)
        # Slots: 0 = t, 1 = s; independent action times add 2 = t_a, 3 = s_a; the last is clean
        # (given actions, forward dynamics) and is dropped when no action is given (_stream_times).
        levels = [t, s]
        inp.base = {"video": 0, "action": 0}
        if self.cfg.video_action_times == "independent" and inp.video is not None and inp.action is not None:
            levels += [self._t(B, dev), self._t(B, dev)]
            inp.base["action"] = 2
        inp.clean_slot = len(levels)
        student_values = torch.stack(levels + [torch.zeros_like(t)], dim=1)
        ctx, ct = self._context(inp)
        kw = self._model_kwargs(inp, ctx, ct)
        noisy, targets, index = {}, {}, {}
        inp.given_actions = False
        for name in ("video", "action"):
            x0 = getattr(inp, name)
            if x0 is None:
                continue
            tok_shape = x0.shape[:-1]
            idx = dts_index(tok_shape, self.cfg.mask_ratio if self.dual else 0.0, dev) + inp.base[name]
            if name == "action" and inp.video is not None and self.cfg.forward_dynamics_fraction > 0:
                fd = torch.rand(B, device=dev) < self.cfg.forward_dynamics_fraction
                idx = torch.where(fd[:, None], torch.full_like(idx, inp.clean_slot), idx)
                inp.given_actions = True
            noise = torch.randn_like(x0)
            tau = torch.gather(student_values, 1, idx.flatten(1)).view(tok_shape)
            noisy[name], targets[name], index[name] = interpolate(x0, noise, tau), (noise, x0), idx

        taps = (self.l,) if self.head is not None else self._student_taps()
        times = self._stream_times(student_values, index, inp, slots=self.dual or inp.given_actions)
        out = model(video=noisy.get("video"), video_t=times.get("video"),
                    action=noisy.get("action"), action_t=times.get("action"), taps=taps, **kw)
        masks = {"video": inp.video_mask, "action": inp.action_mask}
        for name in noisy:
            noise, x0 = targets[name]
            mask = masks[name]
            if name == "action":  # given (clean) actions carry no flow target
                given = index[name] != inp.clean_slot
                mask = given if mask is None else mask & given
            s_, n_ = masked_mse(out[name], noise - x0, mask)
            sums[name] = [sums[name][0] + s_, sums[name][1] + n_]
        return self._representation(model, ema_model, inp, out, targets, index, student_values, kw, metrics)

    @staticmethod
    def _stream_times(values, index: dict, inp: "FlowInputs", slots: bool) -> dict:
        """Each stream's timestep argument: slots + per-token index when a stream's tokens can
        differ, else its plain [B] level (DiT broadcasting). Streams on the same level get the same
        tensor, so the model embeds it once (fewer slots, less per-token modulation work); the
        clean slot is kept only when actions are given."""
        if not slots:
            level = {b: values[:, b] for b in set(inp.base.values())}
            return {n: level[inp.base[n]] for n in index}
        used = values if inp.given_actions else values[:, :inp.clean_slot]
        return {n: TokenTimes(used, i) for n, i in index.items()}

    def _student_taps(self) -> tuple[int, ...]:
        return ()

    def _gen_mask(self, inp: FlowInputs):
        parts = []
        if inp.video is not None:
            m = inp.video_mask if inp.video_mask is not None else torch.ones(inp.video.shape[:4], dtype=torch.bool, device=inp.video.device)
            parts.append(m.flatten(1))
        if inp.action is not None:
            m = inp.action_mask if inp.action_mask is not None else torch.ones(inp.action.shape[:2], dtype=torch.bool, device=inp.action.device)
            parts.append(m)
        return torch.cat(parts, 1)

    def _representation(self, model, ema_model, inp, out, targets, index, values, kw, metrics):
        if self.head is None:
            return None
        if ema_model is None:
            raise ValueError("objective.kind=self_flow needs the EMA teacher (trainer EMA is off?)")
        tmin = torch.minimum(values[:, 0], values[:, 1])  # paper convention: the cleaner level
        levels = [tmin, tmin]
        if inp.base["action"] == 2:  # independent action times: the cleaner of (t_a, s_a)
            ta_min = torch.minimum(values[:, 2], values[:, 3])
            levels += [ta_min, ta_min]
        teacher_values = torch.stack(levels + [torch.zeros_like(tmin)], dim=1)  # same layout, clean last
        with torch.no_grad(), fp8_matmuls(ema_model):
            tin = {}
            for name, (noise, x0) in targets.items():
                tau = torch.gather(teacher_values, 1, index[name].flatten(1)).view(x0.shape[:-1])
                tin[name] = interpolate(x0, noise, tau)  # same data, same noise, cleaner level
            # Every teacher token of a stream sits at the cleaner level; only given (clean) actions differ.
            tt = self._stream_times(teacher_values, index, inp, slots=inp.given_actions)
            teacher = ema_model(video=tin.get("video"), video_t=tt.get("video"),
                                action=tin.get("action"), action_t=tt.get("action"),
                                taps=(self.k,), stop_after=self.k, **kw)["features"][self.k]
        student = self.head(out["features"][self.l])
        rep, cos = cosine_loss(student, teacher.detach(), self._gen_mask(inp))
        metrics["cos"] = cos.detach()
        return rep

    def _action_only(self, model, inp: FlowInputs, sums):
        """Actions generated without video tokens: the fast action-first sampling path."""
        dev = model.type_embed.device
        t = self._t(inp.batch_size, dev)
        ctx, ct = self._context(inp)
        noise = torch.randn_like(inp.action)
        out = model(action=interpolate(inp.action, noise, t), action_t=t, **self._model_kwargs(inp, ctx, ct))
        s_, n_ = masked_mse(out["action"], noise - inp.action, inp.action_mask)
        sums["action"] = [sums["action"][0] + s_, sums["action"][1] + n_]
