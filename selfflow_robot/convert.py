"""`python -m selfflow_robot.convert selfflow_release ckpt=FILE out=DIR`: import released weights.

The Self-Flow ImageNet release (SelfFlowPerTokenDiT, SiT-XL/2 with per-token timesteps) becomes a
SelfFlowDiT with model.positions=sincos2d and model.num_classes=1001, in this toolkit's convention
(t = 0 clean, 1 noise; the output is the velocity eps - x0). Differences folded into the weights:
  * the release embeds 1 - t: cos/sin((1 - t) f) are a fixed rotation of cos/sin(t f), folded
    into the first time-MLP matrix, so the converted model embeds t itself;
  * the release negates its network's output: the video head's rows are negated;
  * its patches are ordered (channel, row, column), ours (row, column, channel): the patch
    embedding's columns and the head's rows are permuted;
  * learn_sigma: the head's second half (never used by the velocity) is dropped.
Hence  converted(video=x, video_t=t, class_labels=y)["video"] == release.forward(x, t, y)  up to
the patch order (tests/test_selfflow_release.py). The Self-Flow projector goes to
objective.safetensors (loaded by init= when objective=self_flow); the teacher's block-20 features
are the model's own.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import cli

VERBS = ("selfflow_release",)
LAYOUTS = ("model", "state_dict")  # what the release's sample.py unwraps, then a "module." prefix


def read_release_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The .pt's tensors: a plain state dict, or one under "model" / "state_dict", keys maybe "module."."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle with objects, or not a torch file at all
        raise ValueError(f"ckpt={path}: not readable with torch.load(weights_only=True) ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict):
        for key in LAYOUTS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"ckpt={path}: expected a state dict of tensors (top level or under 'model' / "
                         f"'state_dict'), found {found}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _infer(sd: dict, path, heads: int, patch: int) -> dict:
    """Sizes from the tensors; refuses a state dict that is not the release's network."""
    for k in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"):
        if k not in sd:
            raise ValueError(f"ckpt={path}: no {k!r}; not a Self-Flow/SiT release state dict "
                             f"(first keys: {sorted(sd)[:6]})")
    D, patch_dim = sd["x_embedder.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_rows = sd["final_layer.linear.weight"].shape[0]
    if patch_dim % (patch * patch) or out_rows not in (patch_dim, 2 * patch_dim):
        raise ValueError(f"ckpt={path}: x_embedder.proj.weight {tuple(sd['x_embedder.proj.weight'].shape)} and "
                         f"final_layer.linear.weight {tuple(sd['final_layer.linear.weight'].shape)} do not fit "
                         f"patch_size={patch}")
    if D % heads:
        raise ValueError(f"ckpt={path}: width {D} is not divisible by heads={heads}")
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * D
    return dict(width=int(D), depth=depth, heads=heads, patch_size=patch, in_channels=patch_dim // patch**2,
                learn_sigma=out_rows == 2 * patch_dim, num_classes=int(sd["y_embedder.embedding_table.weight"].shape[0]),
                mlp_ratio=mlp_hidden / D, grid=int(math.isqrt(sd["pos_embed"].shape[1])) if "pos_embed" in sd else None)


def expected_shapes(s: dict) -> dict[str, tuple]:
    """Every tensor of SelfFlowPerTokenDiT with these sizes (timm Attention/Mlp with biases)."""
    D, P, H = s["width"], s["patch_size"] ** 2 * s["in_channels"], int(s["width"] * s["mlp_ratio"])
    out = (2 if s["learn_sigma"] else 1) * P
    shapes = {"x_embedder.proj.weight": (D, P), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.embedding_table.weight": (s["num_classes"], D),
              "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
              "projector.linear1.weight": (2 * D, D), "projector.linear1.bias": (2 * D,),
              "projector.linear2.weight": (D, 2 * D), "projector.linear2.bias": (D,)}
    if s["grid"] is not None:
        shapes["pos_embed"] = (1, s["grid"] ** 2, D)
    for i in range(s["depth"]):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,),
                       b + "mlp.fc2.weight": (D, H), b + "mlp.fc2.bias": (D,),
                       b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    return shapes


def check_release_state(sd: dict, path, s: dict) -> None:
    want = expected_shapes(s)
    problems = [f"  missing: {k} {want[k]}" for k in want if k not in sd]
    problems += [f"  unexpected: {k} {tuple(v.shape)}" for k, v in sd.items() if k not in want]
    problems += [f"  {k}: shape {tuple(sd[k].shape)}, expected {want[k]}" for k in want
                 if k in sd and tuple(sd[k].shape) != want[k]]
    if problems:
        from .train.checkpoint import mismatch_report

        raise ValueError(f"ckpt={path} is not the released SelfFlowPerTokenDiT layout for width {s['width']}, "
                         f"depth {s['depth']} ({len(problems)} problems):\n" + mismatch_report(problems, 12))


def flip_time_weight(w: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """W acting on [cos(s f), sin(s f)] with s = 1 - t  ->  W' acting on [cos(t f), sin(t f)]:
    cos((1-t)f) = cos f cos tf + sin f sin tf,  sin((1-t)f) = sin f cos tf - cos f sin tf."""
    w64, f = w.double(), freqs.double()
    half = f.numel()
    wc, ws = w64[:, :half], w64[:, half:2 * half]
    c, s = f.cos(), f.sin()
    out = w64.clone()
    out[:, :half] = wc * c + ws * s
    out[:, half:2 * half] = wc * s - ws * c
    return out.to(w.dtype)


def convert_release(sd: dict, path, heads: int = 16, patch_size: int = 2, student_layer: int | None = 8,
                    teacher_layer: int | None = 20, vae: str | None = None):
    """(SelfFlowDiT, objective head state dict, model config) from the release's state dict."""
    from .models import SIZES, build_model
    from .models.layers import sincos_2d

    s = _infer(sd, path, heads, patch_size)
    check_release_state(sd, path, s)
    p, C, D = s["patch_size"], s["in_channels"], s["width"]
    if s["grid"] is not None:  # fixed, but a different table would mean a different network
        ref = sincos_2d(s["grid"], s["grid"], D).reshape(1, -1, D)
        err = (sd["pos_embed"].float() - ref).abs().max().item()
        if err > 1e-5:
            raise ValueError(f"ckpt={path}: pos_embed differs from the 2-D sin-cos table by {err:.3g}; "
                             "this converter expects the release's fixed positions")
    name = next((n for n, z in SIZES.items() if z == dict(depth=s["depth"], width=D, heads=heads)), "custom")
    model = build_model(dict(name=name, depth=s["depth"], width=D, heads=heads, mlp_ratio=s["mlp_ratio"],
                             patch_size=p, in_channels=C, positions="sincos2d", num_classes=s["num_classes"],
                             text="none", video_prediction="v", qk_norm=False, autoencoder=vae or None,
                             student_layer=student_layer if student_layer and student_layer < s["depth"] else None,
                             teacher_layer=teacher_layer if teacher_layer and teacher_layer <= s["depth"] else None))
    # (c p q) -> (p q c): the release patchifies channel-first, ours channel-last
    perm = torch.arange(p * p * C).view(C, p, p).permute(1, 2, 0).reshape(-1)
    head_w = sd["final_layer.linear.weight"].view(p, p, -1, D)[:, :, :C].reshape(p * p * C, D)
    head_b = sd["final_layer.linear.bias"].view(p, p, -1)[:, :, :C].reshape(p * p * C)
    new = {"video_embed.weight": sd["x_embedder.proj.weight"][:, perm], "video_embed.bias": sd["x_embedder.proj.bias"],
           "t_embedder.mlp.0.weight": flip_time_weight(sd["t_embedder.mlp.0.weight"], model.t_embedder.freqs),
           "class_embed.weight": sd["y_embedder.embedding_table.weight"],
           "video_head.linear.weight": -head_w, "video_head.linear.bias": -head_b,
           "type_embed": torch.zeros_like(model.type_embed)}
    for k in ("t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"):
        new[k] = sd[k]
    for k in ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
        new["video_head." + k] = sd["final_layer." + k]
    new.update({k: v for k, v in sd.items() if k.startswith("blocks.")})
    new.update({k: v for k, v in model.state_dict().items() if k.startswith("autoencoder.")})  # from vae=
    own = model.state_dict()
    missing = sorted(set(own) - set(new))
    if missing:  # a model option this converter does not fill (would be a bug here, not in the file)
        raise ValueError(f"conversion leaves {missing[:6]} unset")
    model.load_state_dict({k: v.float() for k, v in new.items()}, strict=True)
    head = {"head.0.weight": sd["projector.linear1.weight"], "head.0.bias": sd["projector.linear1.bias"],
            "head.2.weight": sd["projector.linear2.weight"], "head.2.bias": sd["projector.linear2.bias"]}
    return model.eval(), {k: v.float() for k, v in head.items()}, s


def write_converted(model, head: dict, out: str | Path, source: dict) -> Path:
    from .fileio import write_json_atomic
    from .train.checkpoint import save_tensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), out / "model.safetensors")
    save_tensors(head, out / "objective.safetensors")
    write_json_atomic(out / "config.json", {"model": model.cfg.to_dict(), "objective": {"kind": "self_flow"},
                                            "converted_from": source}, indent=1)
    return out


def main(cfg: DictConfig) -> Path:
    if cfg.verb != "selfflow_release":
        raise ValueError(f"unknown source {cfg.verb!r}; expected one of {VERBS}")
    sd = read_release_state(cfg.ckpt)
    ignore = tuple(cfg.get("ignore") or ())
    dropped = sorted(k for k in sd if ignore and k.startswith(ignore))
    if dropped:  # the user named them: extra training-time tensors the released network does not use
        print(f"ignoring {len(dropped)} tensors: {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}")
        sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    model, head, s = convert_release(sd, cfg.ckpt, int(cfg.heads), int(cfg.patch_size), cfg.student_layer,
                                     cfg.teacher_layer, cfg.get("vae"))
    out = write_converted(model, head, cfg.out, {"format": "selfflow_release", "file": os.path.abspath(cfg.ckpt),
                                                 "learn_sigma": s["learn_sigma"]})
    n = model.backbone_parameters()
    print(f"converted {cfg.ckpt} -> {out} ({n / 1e6:.1f}M parameters, {model.cfg.name}: depth {s['depth']}, "
          f"width {s['width']}, {s['num_classes']} classes)\ncheck it: python -m selfflow_robot.sample_images "
          f"ckpt={out}{'' if cfg.get('vae') else ' vae=SD_VAE_DIR'} classes=[207,360] out=grid.png")
    return out


def cli_main() -> None:
    cli.run("convert", main, verbs=VERBS)


if __name__ == "__main__":
    cli_main()
