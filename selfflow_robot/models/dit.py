"""SelfFlowDiT: a DiT/SiT-style transformer over video, action, context-frame and text tokens.

Token order is [text | context frames | video | action]; video and action are the generated
streams (their outputs are velocities), text and context condition them. Every token carries its
own timestep (paper convention: 0 = clean, 1 = noise). Positions are 3D RoPE (t, h, w), so the
number of frames and the resolution may change between pretraining and fine-tuning.
With model.positions=sincos2d (the released ImageNet network) each frame's tokens get fixed 2-D
sin-cos positions instead and rotary acts on time alone; model.num_classes adds DiT class labels.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import Block, FinalLayer, Rope3D, TimestepEmbedder, sincos_2d
from .text import ByteTextEncoder, EmbeddingTextEncoder, encode_bytes
from .tokens import float_to_frames, frames_to_float, patchify, unpatchify

MAX_SLOTS = 8  # above this many distinct timesteps per sample, modulate per token
X_PRED_MIN_T = 0.05  # x-prediction: the velocity (x_t - x0_hat) / t divides by at least this (JiT)
STREAM_TYPES = ("text", "context", "video", "action", "state")


class TokenTimes(NamedTuple):
    """Timesteps of one stream as K distinct values per sample and a per-token index into them."""

    values: torch.Tensor  # [B, K] float
    index: torch.Tensor  # [B, *token_shape] long, entries in [0, K)


def _as_token_times(t, batch: int, token_shape: tuple[int, ...], device) -> TokenTimes:
    """Accept None (clean), a float, [B] per-sample, token-shaped per-token, or TokenTimes."""
    n = 1
    for s in token_shape:
        n *= s
    if isinstance(t, TokenTimes):
        return TokenTimes(t.values.float(), t.index.reshape(batch, n))
    if t is None or isinstance(t, (int, float)):
        v = torch.full((batch, 1), float(t or 0.0), device=device)
        return TokenTimes(v, torch.zeros(batch, n, dtype=torch.long, device=device))
    t = t.float().to(device)
    if t.dim() == 1:
        return TokenTimes(t[:, None], torch.zeros(batch, n, dtype=torch.long, device=device))
    if tuple(t.shape) != (batch, *token_shape):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} fit neither [B]={batch} nor tokens {token_shape}")
    idx = torch.arange(n, device=device).expand(batch, n)
    return TokenTimes(t.reshape(batch, n), idx)


def _shared_source(t):
    """The tensor that identifies a stream's timestep slots: streams given the same [B] tensor or
    the same TokenTimes.values share their slots instead of duplicating them."""
    if isinstance(t, TokenTimes):
        return t.values
    return t if torch.is_tensor(t) and t.dim() == 1 else None


def _slice_cond(cond, select, tokens: slice):
    """The conditioning of a token range: slot rows + sliced one-hot, or sliced per-token rows."""
    if cond is None:  # precomputed modulation
        return None, None
    if select is not None:
        return cond, select[:, tokens]
    return (cond[:, tokens] if cond.shape[1] > 1 else cond), None


class PrefixCache(NamedTuple):
    """Per-block (keys, values) of the conditioning tokens, and how many context frames they hold."""

    kv: list
    context_frames: int


class Modulation(NamedTuple):
    """adaLN outputs for one timestep shared by every processed token: [B, 1, 6D] per block and
    [B, 1, 2D] per output head. They depend on t alone, so a sampler computes its whole schedule
    in one batched matmul per layer instead of re-reading the modulation weights every step."""

    blocks: list
    video: torch.Tensor
    action: torch.Tensor | None


class SelfFlowDiT(nn.Module):
    # Methods that read root-level weights outside forward (objectives, validation and samplers
    # call them); FSDP2 gathers the weights for these as for forward.
    FSDP_FORWARD_METHODS = ("encode_prefix", "modulation_schedule", "frames_to_tokens", "tokens_to_frames")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_dim = cfg.patch_size**2 * cfg.in_channels
        self.autoencoder = None
        if cfg.autoencoder:
            from .autoencoder import build_frozen_autoencoder

            self.autoencoder = build_frozen_autoencoder(cfg.autoencoder)
        self.video_embed = nn.Linear(self.patch_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.type_embed = nn.Parameter(torch.zeros(len(STREAM_TYPES), D))
        if cfg.text == "bytes":
            self.text_encoder = ByteTextEncoder(D, cfg.max_text_len)
        elif cfg.text == "embedding":
            self.text_encoder = EmbeddingTextEncoder(D, cfg.text_embed_dim)
        else:
            self.text_encoder = None
        self.state_embed = nn.Linear(cfg.state_dim, D) if cfg.state_dim > 0 else None
        self.class_embed = nn.Embedding(cfg.num_classes, D) if cfg.num_classes > 0 else None
        self.rope = Rope3D(D // cfg.heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.video_head = FinalLayer(D, self.patch_dim)
        if cfg.action_dim > 0:
            self.add_action_layers(cfg.action_dim)
        else:
            self.action_embed = self.action_head = None
        self.initialize_weights()

    # ----------------------------------------------------------------------------- set-up
    def add_action_layers(self, action_dim: int) -> None:
        """New action input/output layers (fine-tuning a pretrained backbone creates these)."""
        self.cfg.action_dim = action_dim
        self.action_embed = nn.Linear(action_dim, self.cfg.width)
        self.action_head = FinalLayer(self.cfg.width, action_dim)
        nn.init.xavier_uniform_(self.action_embed.weight)
        nn.init.zeros_(self.action_embed.bias)
        self._zero_final(self.action_head)

    @staticmethod
    def _zero_final(layer: FinalLayer) -> None:
        for lin in (layer.adaLN_modulation[-1], layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) time MLP, zero adaLN-Zero and output layers."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name, child in self.named_children():  # a frozen autoencoder keeps its weights (the
            if name != "autoencoder":  # SD-VAE has linear attention layers too)
                child.apply(_basic)
        if self.cfg.positions == "sincos2d":  # stream types start equal: a lone image is the released network
            nn.init.zeros_(self.type_embed)
        else:
            nn.init.normal_(self.type_embed, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self._zero_final(self.video_head)
        if self.action_head is not None:
            self._zero_final(self.action_head)

    def backbone_parameters(self) -> int:
        """Parameters without the action layers (the number `bench params` reports)."""
        skip = {id(p) for m in (self.action_embed, self.action_head, self.autoencoder) if m is not None
                for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # -------------------------------------------------------------------------- tokens
    def frames_to_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> [B, T, h, w, P]: [-1, 1] pixel patches, or autoencoder-latent patches."""
        x = frames_to_float(frames)
        if self.autoencoder is not None:
            B, T = x.shape[:2]
            with torch.no_grad():
                z = self.autoencoder.encode(x.flatten(0, 1).permute(0, 3, 1, 2).to(self.type_embed.dtype))
            return self.latents_to_tokens(z.permute(0, 2, 3, 1).unflatten(0, (B, T)))
        return patchify(x, self.cfg.patch_size)

    def latents_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents [B, T, h, w, C] (e.g. float16 from a latent cache) -> [B, T, h/p, w/p, P]."""
        if latents.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"latents of {latents.shape[-1]} channels for a model of {self.cfg.in_channels} "
                             "input channels (cached by another autoencoder?)")
        return patchify(latents.float(), self.cfg.patch_size)

    def tokens_to_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        x = unpatchify(tokens, self.cfg.patch_size)
        if self.autoencoder is not None:
            B, T = x.shape[:2]
            with torch.no_grad():
                img = self.autoencoder.decode(x.flatten(0, 1).permute(0, 3, 1, 2).to(self.type_embed.dtype))
            x = img.permute(0, 2, 3, 1).unflatten(0, (B, T)).float()
        return float_to_frames(x)

    def encode_text(self, instructions: Sequence[str], device=None) -> torch.Tensor:
        return encode_bytes(instructions, self.cfg.max_text_len).to(device or self.type_embed.device)

    def _positions(self, T: int, h: int, w: int, t0: float, device) -> torch.Tensor:
        """Rotary positions (t, h, w) per token; under sincos2d h and w stay 0 (no rotation): the
        frame's absolute embedding carries them, rotary carries time only."""
        spatial = 1.0 if self.cfg.positions == "rope" else 0.0  # a float: ONNX tracing has no Tensor * bool
        tt, hh, ww = torch.meshgrid(
            torch.arange(T, device=device, dtype=torch.float32) + t0,
            torch.arange(h, device=device, dtype=torch.float32) * spatial,
            torch.arange(w, device=device, dtype=torch.float32) * spatial, indexing="ij")
        return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)

    def _embed_frames(self, frames: torch.Tensor, stream: int) -> torch.Tensor:
        """[B, T, h, w, P] patches -> [B, T*h*w, D] tokens (+ 2-D sin-cos positions under sincos2d)."""
        x = self.video_embed(frames)
        if self.cfg.positions == "sincos2d":
            x = x + sincos_2d(frames.shape[2], frames.shape[3], self.cfg.width, frames.device).to(x.dtype)
        return x.flatten(1, 3) + self.type_embed[stream]

    def class_vector(self, class_labels, batch: int, device) -> torch.Tensor | None:
        """[B, D] class embeddings added to the time embedding; no labels -> the null class (last row)."""
        if self.class_embed is None:
            if class_labels is not None:
                raise ValueError("class_labels given but this model has no class embedding (model.num_classes=0)")
            return None
        if class_labels is None:
            class_labels = torch.full((batch,), self.cfg.num_classes - 1, dtype=torch.long, device=device)
        return self.class_embed(torch.as_tensor(class_labels, device=device).long().reshape(batch))

    # -------------------------------------------------------------------------- forward
    def _condition_tokens(self, B, dev, context, context_t, text, text_emb, state):
        """Embedded conditioning streams: (tokens, positions, timesteps) lists and the context length."""
        parts, pos, times = [], [], []
        if self.text_encoder is not None and (text is not None or text_emb is not None):
            tx = self.text_encoder(text if self.cfg.text == "bytes" else text_emb)
            parts.append(tx + self.type_embed[0])
            pos.append(torch.zeros(tx.shape[1], 3, device=dev))
            times.append((_as_token_times(None, B, (tx.shape[1],), dev), None))
        if self.state_embed is not None and state is not None:
            parts.append(self.state_embed(state.float()).unsqueeze(1) + self.type_embed[4])
            pos.append(torch.zeros(1, 3, device=dev))
            times.append((_as_token_times(None, B, (1,), dev), None))
        n_ctx_frames = 0
        if context is not None:
            n_ctx_frames, h, w = context.shape[1:4]
            parts.append(self._embed_frames(context, 1))
            pos.append(self._positions(n_ctx_frames, h, w, -(n_ctx_frames - 1), dev))
            times.append((_as_token_times(context_t, B, tuple(context.shape[1:4]), dev), _shared_source(context_t)))
        return parts, pos, times, n_ctx_frames

    def _generated_tokens(self, B, dev, video, video_t, action, action_t, n_ctx_frames):
        parts, pos, times = [], [], []
        if video is not None:
            T, h, w = video.shape[1:4]
            parts.append(self._embed_frames(video, 2))
            pos.append(self._positions(T, h, w, 1.0 if n_ctx_frames else 0.0, dev))
            times.append((_as_token_times(video_t, B, tuple(video.shape[1:4]), dev), _shared_source(video_t)))
        if action is not None:
            if self.action_embed is None:
                raise ValueError("this model has no action layers (model.action_dim=0)")
            H = action.shape[1]
            parts.append(self.action_embed(action) + self.type_embed[3])
            at = torch.arange(H, device=dev, dtype=torch.float32) / self.cfg.frame_stride
            pos.append(torch.stack([at, torch.zeros_like(at), torch.zeros_like(at)], -1))
            times.append((_as_token_times(action_t, B, (H,), dev), _shared_source(action_t)))
        return parts, pos, times

    def _prepare(self, parts, pos, times, time_embed: bool = True, class_labels=None):
        """Concatenate streams; time-embed the distinct timestep slots; choose each token's slot."""
        x = torch.cat(parts, dim=1)
        if torch.is_autocast_enabled(x.device.type):
            # Keep the residual stream in the autocast dtype (as plain DiT does): fp32 type
            # embeddings would otherwise promote every block's elementwise work to fp32.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        rope = self.rope(torch.cat(pos, dim=0))
        if not time_embed:  # the caller brings precomputed modulation
            return x, rope, None, None
        # A timestep tensor shared by streams gets its slots once. Compared with `is`, not id():
        # under torch.compile id() guards on the tensor object, so each new tensor recompiled.
        # Plain loops: torch 2.4's dynamo cannot trace this generator expression (it captures source).
        offsets, values, index, seen = 0, [], [], []  # seen: (source, first slot)
        for tt, source in times:
            first = None
            for s, slot in seen:
                if source is not None and s is source:
                    first = slot
                    break
            if first is None:
                first = offsets
                seen.append((source, first))
                values.append(tt.values)
                offsets += int(tt.values.shape[1])  # an int: under ONNX tracing a size is a tensor, and += would alias a slot
            index.append(tt.index + first)
        values, index = torch.cat(values, 1), torch.cat(index, 1)
        cond = self.t_embedder(values)  # [B, K, D]
        y = self.class_vector(class_labels, values.shape[0], values.device)
        if y is not None:  # DiT: c = t_emb + y_emb
            cond = cond + y[:, None].to(cond.dtype)
        K = values.shape[1]
        if K == 1:  # one shared timestep: plain DiT broadcasting
            select = None
        elif K <= MAX_SLOTS:  # a few distinct timesteps (DTS): modulation per slot, one-hot choice
            select = F.one_hot(index, K).to(cond.dtype)
        else:  # arbitrary per-token timesteps: condition every token (the released per-token path)
            cond = torch.gather(cond, 1, index[..., None].expand(-1, -1, cond.shape[-1]))
            select = None
        return x, rope, cond, select

    @staticmethod
    def _velocity_from_x(noisy: torch.Tensor, x0_hat: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps and v = eps - x0 give v = (x_t - x0) / t; t is clipped from below."""
        B, shape = noisy.shape[0], tuple(noisy.shape[1:4])
        tt = _as_token_times(t, B, shape, noisy.device)
        tau = torch.gather(tt.values, 1, tt.index).view(B, *shape, 1)
        return (noisy - x0_hat) / tau.clamp_min(X_PRED_MIN_T).to(x0_hat.dtype)

    @torch.no_grad()
    def encode_prefix(self, context=None, context_t=None, text=None, text_emb=None, state=None) -> PrefixCache:
        """Keys/values of the conditioning tokens at every block, computed once per observation.
        Needs model.isolate_condition (conditioning never attends to generated tokens), so that
        every denoising step can reuse them and process only the generated tokens."""
        if not self.cfg.isolate_condition:
            raise ValueError("encode_prefix needs model.isolate_condition=true")
        ref = next(x for x in (context, text, text_emb, state) if x is not None)
        parts, pos, times, n_ctx = self._condition_tokens(ref.shape[0], ref.device, context, context_t, text,
                                                            text_emb, state)
        x, rope, cond, select = self._prepare(parts, pos, times)
        kv: list = []
        for i, block in enumerate(self.blocks, 1):  # start= as a keyword breaks torch 2.4's graph
            x = block(x, cond, select, rope, kv_out=kv, kv_only=i == len(self.blocks))
        return PrefixCache(kv, n_ctx)

    @torch.no_grad()
    def modulation_schedule(self, ts: torch.Tensor, batch: int) -> list[Modulation]:
        """Modulation for each timestep of a sampling schedule ts [S], computed in one pass."""
        emb = self.t_embedder(ts.reshape(-1, 1))  # [S, 1, D]
        y = self.class_vector(None, 1, ts.device)  # samplers of robot clips run with the null class
        if y is not None:
            emb = emb + y.to(emb.dtype)

        def rows(m):
            return m(emb).unsqueeze(1).expand(-1, batch, -1, -1).unbind(0)  # S x [B, 1, C]

        blocks = [rows(b.modulation) for b in self.blocks]
        video = rows(self.video_head.adaLN_modulation)
        action = rows(self.action_head.adaLN_modulation) if self.action_head is not None else [None] * len(video)
        return [Modulation([b[i] for b in blocks], video[i], action[i]) for i in range(len(video))]

    def forward(self, video=None, video_t=None, action=None, action_t=None, context=None, context_t=None,
                text=None, text_emb=None, state=None, taps: Sequence[int] = (), stop_after: int | None = None,
                prefix: PrefixCache | None = None, modulation: Modulation | None = None, class_labels=None) -> dict:
        """Velocities for the generated streams, plus residual-stream taps.

        video   [B, T, h, w, P] noisy frame tokens; context [B, Tc, h, w, P] conditioning frames;
        action  [B, H, A] noisy action tokens; text [B, L] byte ids or text_emb [B, E]; state [B, S].
        *_t: None (clean), [B], token-shaped, or TokenTimes. taps: 1-indexed blocks whose output
        (generated tokens only) is returned in out["features"]; stop_after=k ends after block k.
        prefix: the conditioning's cached keys/values from encode_prefix (then pass no conditioning).
        modulation: from modulation_schedule, when every processed token shares one timestep
        (generated tokens after a prefix); it replaces the time embedding of video_t/action_t.
        class_labels [B] long (model.num_classes > 0): None means the null class (the last one).
        """
        ref = next(x for x in (video, action, context) if x is not None)
        B, dev = ref.shape[0], ref.device
        if prefix is not None:
            if any(c is not None for c in (context, text, text_emb, state)):
                raise ValueError("pass the conditioning either as inputs or as a prefix cache, not both")
            parts, pos, times, n_ctx_frames = [], [], [], prefix.context_frames
        else:
            parts, pos, times, n_ctx_frames = self._condition_tokens(B, dev, context, context_t, text, text_emb, state)
        gen_start = sum(p.shape[1] for p in parts)
        g_parts, g_pos, g_times = self._generated_tokens(B, dev, video, video_t, action, action_t, n_ctx_frames)
        if modulation is not None and parts:
            raise ValueError("precomputed modulation covers generated tokens only: pass the conditioning as a prefix")
        if modulation is not None and class_labels is not None:
            raise ValueError("precomputed modulation holds the null class: pass class_labels without it")
        x, rope, cond, select = self._prepare(parts + g_parts, pos + g_pos, times + g_times, modulation is None,
                                              class_labels)
        n_prefix = gen_start if self.cfg.isolate_condition else 0

        out: dict = {"features": {}}
        taps = set(taps)
        last = stop_after if stop_after is not None else len(self.blocks)
        for i, block in enumerate(self.blocks[:last], 1):
            past = prefix.kv[i - 1] if prefix is not None else None
            x = block(x, cond, select, rope, n_prefix, past, mod=modulation.blocks[i - 1] if modulation else None)
            if i in taps:
                out["features"][i] = x[:, gen_start:]
        if stop_after is not None:
            return out

        start = gen_start
        if video is not None:
            n = video.shape[1] * video.shape[2] * video.shape[3]
            c, sel = _slice_cond(cond, select, slice(start, start + n))
            mod = modulation.video if modulation else None
            out["video"] = self.video_head(x[:, start:start + n], c, sel, mod).view(*video.shape[:4], -1)
            if self.cfg.video_prediction == "x":
                out["video"] = self._velocity_from_x(video, out["video"], video_t)
            start += n
        if action is not None:
            c, sel = _slice_cond(cond, select, slice(start, None))
            out["action"] = self.action_head(x[:, start:], c, sel, modulation.action if modulation else None)
        return out
