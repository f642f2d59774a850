"""A tiny selfflow-robot policy checkpoint with random weights everywhere (zero-initialised
output layers randomised too, so actions depend on the image, state and task), in the layout
fine-tuning writes: config.json (model + io), model.safetensors, normalization.json."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def tiny_checkpoint(out_dir, *, action_dim=4, state_dim=3, views=None, image_size=(32, 32), context_frames=2,
                    action_chunk=4, seed=0, action_q=None, state_q=None, action_mask=None, state_mask=None) -> str:
    from selfflow_robot.models import build_model

    torch.manual_seed(seed)
    model = build_model("tiny", action_dim=action_dim, patch_size=8, state_dim=state_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    io = {"image_size": list(image_size), "data_image_size": list(image_size), "context_frames": context_frames,
          "future_frames": 1, "frame_stride": 1, "action_chunk": action_chunk, "action_dim": action_dim,
          "state_dim": state_dim, "fps": 10, "text": model.cfg.text, "action_names": None, "views": views}
    cfg = {"model": model.cfg.to_dict(), "io": io, "job": "finetune",
           "objective": {"kind": "self_flow", "mask_ratio": 0.1, "action_only_fraction": 0.25},
           "trainer": {"lr": 1e-4, "ema_decay": 0.999}}
    lo, hi = action_q or ([-1.0 - i for i in range(action_dim)], [1.0 + 2 * i for i in range(action_dim)])
    norm = {"mode": "q99", "action": {"q01": lo, "q99": hi,
                                      "mask": action_mask or [True] * (action_dim - 1) + [False]}}
    if state_dim:
        slo, shi = state_q or ([0.0] * state_dim, [1.0 if i != 1 else 0.0 for i in range(state_dim)])
        norm["state"] = {"q01": slo, "q99": shi, "mask": state_mask or [True] * (state_dim - 1) + [False]}
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in (("config.json", cfg), ("normalization.json", norm)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    return str(out_dir)
