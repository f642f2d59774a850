"""Build a model from a checkpoint directory: config.json + model.safetensors (EMA), no pickle."""
from __future__ import annotations

import os

from .config import model_config
from .dit import SelfFlowDiT


def load_checkpoint_model(path, device="cpu") -> tuple[SelfFlowDiT, dict]:
    from ..train.checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
    from ..train.distributed import pick_device

    device = pick_device(device)  # a device this machine lacks is named before any weights load
    ckpt = resolve_checkpoint(path)
    config = read_checkpoint_config(ckpt)
    if "model" not in config:
        raise ValueError(f"{ckpt / 'config.json'} has no 'model' section: not a selfflow-robot checkpoint")
    try:
        mcfg = model_config(config["model"])
    except (ValueError, TypeError) as e:  # a wrong value or type in the saved model section
        raise ValueError(f"{ckpt / 'config.json'}: {e}") from None
    model = SelfFlowDiT(mcfg)
    load_model_weights(model, ckpt / "model.safetensors", strict=True)
    return model.to(device).eval().requires_grad_(False), config


# Layers a fine-tuned model may add on top of a pretrained backbone (an instruction encoder, e.g.
# on the released ImageNet weights, which have class labels instead).
NEW_LAYER_PREFIXES = ("action_embed.", "action_head.", "state_embed.", "text_encoder.")


def load_backbone(model: SelfFlowDiT, path) -> list[str]:
    """Initialise from a pretrained checkpoint: every backbone parameter must fit; action/state
    layers missing from the checkpoint keep their fresh init. Returns the names created anew."""
    from ..train.checkpoint import describe_model, mismatch_report, read_safetensors, resolve_checkpoint

    file = resolve_checkpoint(path) / "model.safetensors"
    sd, own = read_safetensors(file), model.state_dict()
    problems = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in sd.items() if k in own and v.shape != own[k].shape]
    problems += [f"  {k}: not in this model" for k in sd if k not in own and not k.startswith(NEW_LAYER_PREFIXES)]
    created = [k for k in own if k not in sd]
    if _autoencoder_from_folder(model):  # a backbone without one (the released weights) + model.autoencoder=DIR
        created = [k for k in created if not k.startswith("autoencoder.")]
    dropped = sorted({k.split(".")[0] for k in sd if k not in own and k.startswith(NEW_LAYER_PREFIXES)})
    if dropped:  # e.g. pretraining initialised from a fine-tuned run: its action layers have no place here
        import warnings

        warnings.warn(f"init={path}: this model has no {', '.join(dropped)}; the checkpoint's are left out",
                      stacklevel=2)
    problems += [f"  {k}: missing in checkpoint" for k in created if not k.startswith(NEW_LAYER_PREFIXES)]
    if problems:
        c, saved, differ = model.cfg, describe_model(file.parent), _settings_that_differ(model, file.parent)
        raise ValueError(f"init={path}: {file} does not fit this model ({len(problems)} mismatches; "
                         + (f"the checkpoint is {saved}, " if saved else "")
                         + f"this run is {c.name} (depth {c.depth}, width {c.width})"
                         # a differing patch size or autoencoder leaves those descriptions equal
                         + (f"; settings that differ (checkpoint vs this run): {', '.join(differ)}" if differ else "")
                         + _release_hint(file.parent) + _autoencoder_hint(model, sd) + "):\n"
                         + mismatch_report(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    _warn_if_prediction_differs(model, file.parent)
    return created


def _autoencoder_hint(model: SelfFlowDiT, sd: dict) -> str:
    if model.autoencoder is None and any(k.startswith("autoencoder.") for k in sd):
        return ("; the checkpoint was trained on a frozen autoencoder's latents: add model.autoencoder=DIR "
                "with the same autoencoder folder")
    return ""


def _release_hint(ckpt) -> str:
    from ..train.checkpoint import read_checkpoint_config

    try:
        source = read_checkpoint_config(ckpt).get("converted_from") or {}
    except (FileNotFoundError, ValueError, OSError):
        return ""
    return ("; it is a converted Self-Flow release: fine-tune it with model=selfflow_xl"
            if source.get("format") == "selfflow_release" else "")


def _autoencoder_from_folder(model: SelfFlowDiT) -> bool:
    spec = model.cfg.autoencoder or {}
    return model.autoencoder is not None and bool(spec.get("path")) and os.path.isdir(spec["path"])


def load_objective_head(objective, path) -> bool:
    """The Self-Flow projection head from <checkpoint>/objective.safetensors (written by
    `convert selfflow_release`: the release's projector), so self-distillation continues from it.
    Returns whether one was loaded."""
    from ..train.checkpoint import read_safetensors, resolve_checkpoint

    file = resolve_checkpoint(path) / "objective.safetensors"
    head = getattr(objective, "head", None)
    if head is None or not file.is_file():
        return False
    sd = {k.removeprefix("head."): v for k, v in read_safetensors(file).items() if k.startswith("head.")}
    own = head.state_dict()
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own):
        raise ValueError(f"init={path}: {file} holds a projection head that does not fit this objective's "
                         f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in sd.items())})")
    head.load_state_dict(sd)
    return True


# Fine-tuning adds action/state layers to an action-free backbone: a 0 on either side is expected.
NEW_LAYER_SETTINGS = ("action_dim", "state_dim")


def _settings_that_differ(model: SelfFlowDiT, ckpt) -> list[str]:
    """"patch_size 16 vs 8" for each model setting saved with the checkpoint that this run changes."""
    from ..train.checkpoint import read_checkpoint_config

    try:
        saved = read_checkpoint_config(ckpt).get("model") or {}
    except (FileNotFoundError, ValueError, OSError):  # weights without a config: the tensor list says it all
        return []
    return [f"{k} {saved[k]} vs {v}" for k, v in model.cfg.to_dict().items()
            if k in saved and saved[k] != v and not (k in NEW_LAYER_SETTINGS and 0 in (saved[k], v))]


def _warn_if_prediction_differs(model: SelfFlowDiT, ckpt) -> None:
    """The video head's target (v or x) is not in the weights' shapes: a mismatch loads silently."""
    import warnings

    from ..train.checkpoint import read_checkpoint_config

    try:
        saved = (read_checkpoint_config(ckpt).get("model") or {}).get("video_prediction", "v")
    except (FileNotFoundError, ValueError):  # weights without a config: nothing to compare
        return
    if saved != model.cfg.video_prediction:
        warnings.warn(f"init={ckpt}: its video head was trained with video_prediction={saved}, this run uses "
                      f"{model.cfg.video_prediction}; set model.video_prediction={saved} to keep it", stacklevel=3)
