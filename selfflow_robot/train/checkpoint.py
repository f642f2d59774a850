"""Checkpoint directories (see docs/design.md "Checkpoint directory"). No pickle anywhere.

<run_dir>/checkpoints/step_00001000/
  model.safetensors          EMA weights of the whole model (plain state-dict keys)
  config.json, config.yaml   resolved run config
  <extra files>.json         e.g. normalization.json
  trainer_state/
    student.safetensors      student (non-EMA) weights
    objective.safetensors    parameters/buffers of an nn.Module objective (if any)
    optimizer.safetensors    optimizer tensors, "state.<param fqn>.<key>" (exp_avg, exp_avg_sq, step)
    optimizer.json           param_groups (hyper-parameters + parameter FQNs) and non-tensor state
    state.json               step, data position, nan skips, wandb run id, world size
    rng_rank<r>.json         python / numpy / torch (CPU + CUDA) RNG state of each rank
<run_dir>/checkpoints/latest text file naming the newest complete checkpoint directory

A visible step_* directory is always complete: it appears by one rename of a fully written hidden
.tmp_ directory, and pruning renames it to a hidden .trash_ name before deleting it, so a kill at
any moment leaves only hidden leftovers, which the next save (or a resume) removes.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import write_json_atomic

STEP_DIR = "step_{:08d}"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


# ---------------------------------------------------------------- small file helpers
def write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors file; tied tensors are stored once per key (cloned), on CPU, contiguous."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        v = v.to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600 files: readable like the JSON beside them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("_orig_mod.", "")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


# ---------------------------------------------------------------- finding checkpoints
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)
             and (p / "model.safetensors").is_file()]  # half-deleted dirs of older versions are not checkpoints
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint for a run dir, a `checkpoints/` dir or a checkpoint dir."""
    path = Path(path)
    if path.is_file() and path.name == "latest":  # RUN/checkpoints/latest itself
        path = path.parent
    if (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if (target / "model.safetensors").is_file():
                return target
            found = list_checkpoints(root.parent) if root.name == "checkpoints" else []
            if found:  # `latest` names a pruned or missing dir: the newest complete one still loads
                return found[-1]
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint directory with "
                                f"model.safetensors, or a run directory with checkpoints/latest)")
    return found


def read_checkpoint_config(path: str | Path) -> dict:
    """The resolved run config saved with a checkpoint (path: checkpoint or run dir)."""
    ckpt = resolve_checkpoint(path)
    with open(ckpt / "config.json", "rb") as f:
        try:
            config = json.loads(f.read().decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (garbage bytes)
            raise ValueError(f"{ckpt / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{ckpt / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------- model weights
def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, with an error that names the file: a truncated or half-copied
    checkpoint otherwise surfaces as a bare parser error."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): truncated, or copied while "
                         f"being written? Use an earlier checkpoint of the run") from None


def mismatch_report(problems: list[str], limit: int = 8) -> str:
    """The first `limit` mismatches, then a count: a wrong model size mismatches every layer."""
    more = [f"  ... and {len(problems) - limit} more"] if len(problems) > limit else []
    return "\n".join(problems[:limit] + more)


def describe_model(path: str | Path) -> str:
    """"xl (depth 28, width 1152)" from a checkpoint's config.json, or "" when it has none."""
    try:
        m = read_checkpoint_config(path).get("model") or {}
    except (FileNotFoundError, ValueError, OSError):
        return ""
    return f"{m.get('name', '?')} (depth {m.get('depth', '?')}, width {m.get('width', '?')})" if m else ""


def state_dict_mismatches(saved: dict, own: dict, strict: bool = True) -> list[str]:
    """Shape differences, and with `strict` missing / unexpected keys, as report lines (empty: fits).
    Shapes are global ones, also for FSDP2's sharded DTensors."""
    problems = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in saved.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if strict:
        problems += [f"  missing in checkpoint: {k} (model {tuple(v.shape)})" for k, v in own.items() if k not in saved]
        problems += [f"  unexpected in checkpoint: {k} ({tuple(v.shape)})" for k, v in saved.items() if k not in own]
    return problems


def load_model_weights(model: nn.Module, path: str | Path, strict: bool = True,
                       file: str = "model.safetensors") -> nn.Module:
    """Load EMA weights (checkpoint dir, run dir or a .safetensors file) into `model`.

    On mismatch raises a ValueError listing each missing / unexpected key and each
    parameter whose shape differs (e.g. a checkpoint of another model size)."""
    path = Path(path)
    file_path = path if path.suffix == ".safetensors" else resolve_checkpoint(path) / file
    sd = read_safetensors(file_path)
    own = model.state_dict()
    problems = state_dict_mismatches(sd, own, strict)
    if problems:
        saved = describe_model(file_path.parent)
        raise ValueError(f"cannot load {file_path} into {type(model).__name__} ({len(problems)} "
                         f"mismatches; a checkpoint of another model size or config?"
                         + (f" It was saved from model {saved}" if saved else "") + "):\n" + mismatch_report(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=strict)
    return model


# ---------------------------------------------------------------- optimizer state
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """FQN-keyed optimizer state dict ({"state": {fqn: {k: v}}, "param_groups": [...]}) ->
    tensors {"state.<fqn>.<k>": tensor} + a JSON dict with param_groups and non-tensor state."""
    tensors, scalars = {}, {}
    for fqn, entries in osd["state"].items():
        for k, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{fqn}.{k}"] = v
            else:
                scalars[f"{fqn}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    items = [(k[len("state."):], v) for k, v in tensors.items()] + list(rest.get("scalar_state", {}).items())
    for key, v in items:
        fqn, name = key.rsplit(".", 1)  # state keys (exp_avg, step, ...) never contain dots
        state.setdefault(fqn, {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # different GPU count on resume: restore the current device only
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


# ---------------------------------------------------------------- directory commit / prune
def tmp_dir_for(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / (".tmp_" + STEP_DIR.format(step))


def commit(run_dir: str | Path, tmp: Path, step: int, keep_last: int | None) -> Path:
    """Atomically publish a fully written temp dir, point `latest` at it, prune old ones."""
    root = checkpoint_root(run_dir)
    final = root / STEP_DIR.format(step)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then delete
        old = root / (".old_" + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    prune(run_dir, keep_last, keep=final)
    return final


def prune(run_dir: str | Path, keep_last: int | None, keep: Path | None = None) -> None:
    """Delete hidden leftovers of killed saves/prunes, then all but the newest `keep_last`
    checkpoints (0/None: keep all) and never `keep` nor the one `latest` names.
    Each doomed dir is first renamed to a hidden name, so none is ever visible half-deleted."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".trash_", ".old_", ".tmp_")):  # no save runs while we prune
            shutil.rmtree(p, ignore_errors=True)
    # dirs named step_* but incomplete (left visible by versions that deleted in place)
    doomed = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and not (p / "model.safetensors").exists()]
    if keep_last and keep_last > 0:
        latest = latest_checkpoint(root)
        doomed += [p for p in list_checkpoints(run_dir)[:-keep_last] if p not in (keep, latest)]
    for old in doomed:
        trash = root / (".trash_" + old.name)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        _fsync_dir(root)  # the rename is durable before any file of the dir goes
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        if p.is_dir():
            _fsync_dir(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
