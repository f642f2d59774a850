"""`python -m selfflow_robot.export lerobot RUN out=DIR`: a checkpoint LeRobot loads with --policy.path=DIR.

DIR holds what LeRobot's `PreTrainedPolicy.from_pretrained` and `make_pre_post_processors` read:
  config.json                    {"type": "selfflow", input/output features, model, sampler, ...}
  model.safetensors              "model.*" = our EMA weights (+ "objective.*", the Self-Flow head,
                                 when the run saved it, so lerobot-train can go on from here)
  policy_preprocessor.json       rename -> batch -> device -> selfflow_normalizer (state, action)
  policy_postprocessor.json      selfflow_unnormalizer (clip, un-normalise, bound to the data's range) -> cpu
  selfflow_run_config.json       the source run's config, for the record
It needs no LeRobot here; loading DIR needs the plugin (pip install integrations/lerobot).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import lerobot_format as lf
from .policies.safety import SafetyConfig

USAGE = ("usage: python -m selfflow_robot.export lerobot RUN out=DIR [camera=observation.image] [device=cpu] "
         "[sampler_steps=10] [n_action_steps=N] [data_margin=0.1] [overwrite=false]\n"
         "  RUN: a fine-tuned checkpoint directory, or a run directory (its latest checkpoint)\n"
         "  camera: LeRobot name(s) of the camera feature(s), comma-separated, in the training order "
         "(default: the run's io.views, else observation.image)\n"
         "  n_action_steps: actions executed per predicted chunk (default: the whole chunk)\n"
         "  data_margin: bound every action dim to the training data's range widened by this fraction, as "
         "Policy.load's safety.data_margin (default: its default); null: no bound")
OPTIONS = ("out", "camera", "device", "sampler_steps", "n_action_steps", "data_margin", "overwrite")
DEFAULT_MARGIN = SafetyConfig.data_margin  # what Policy.load bounds with unless told otherwise


def _feature(kind: str, shape) -> dict:
    return {"type": kind, "shape": [int(s) for s in shape]}


def lerobot_config(cfg: dict, norm_mode: str, cameras: list[str], device: str, sampler_steps: int,
                   n_action_steps: int | None, data_margin: float | None = DEFAULT_MARGIN) -> dict:
    """config.json of the LeRobot policy from a fine-tuned run config (its `io` section)."""
    io = cfg["io"]
    h, w = (int(v) for v in io["image_size"])
    w_view = w // len(cameras)
    inputs = {name: _feature("VISUAL", [3, h, w_view]) for name in cameras}
    if int(io.get("state_dim") or 0):
        inputs[lf.STATE] = _feature("STATE", [io["state_dim"]])
    chunk = int(io["action_chunk"])
    n_action_steps = chunk if n_action_steps is None else int(n_action_steps)
    if not 1 <= n_action_steps <= chunk:
        raise ValueError(f"n_action_steps={n_action_steps}: must be in 1..{chunk} (the chunk length)")
    trainer = cfg.get("trainer") or {}
    return {
        "type": lf.POLICY_TYPE,
        "n_obs_steps": 1,
        "input_features": inputs,
        "output_features": {lf.ACTION: _feature("ACTION", [io["action_dim"]])},
        "device": device,
        "model": cfg["model"],
        "objective": cfg.get("objective") or {},
        "image_size": [h, w],
        "context_frames": int(io["context_frames"]),
        "future_frames": int(io.get("future_frames") or 0),
        "frame_stride": int(io.get("frame_stride") or 1),
        "chunk_size": chunk,
        "n_action_steps": n_action_steps,
        "sampler_steps": int(sampler_steps),
        "normalization_mode": norm_mode,
        "data_margin": data_margin,
        "ema_decay": float(trainer.get("ema_decay", 0.999)),
        "optimizer_lr": float(trainer.get("lr", 1e-4)),
    }


def _cameras(io: dict, camera: str | None) -> list[str]:
    views = [str(v) for v in (io.get("views") or [])]
    if camera:
        names = [c.strip() for c in str(camera).split(",") if c.strip()]
        if views and len(names) != len(views):
            raise ValueError(f"camera={camera}: this policy was trained on {len(views)} cameras {views}; "
                             "name as many, in that order")
        if not views and len(names) != 1:
            raise ValueError(f"camera={camera}: this policy sees one camera; name one")
        return names
    return views or [lf.IMAGE]


def export_lerobot(run, out, camera: str | None = None, device: str = "cpu", sampler_steps: int = 10,
                   n_action_steps: int | None = None, data_margin: float | None = DEFAULT_MARGIN,
                   overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from .policies.normalize import Normalizer
    from .policies.policy import metadata_from_config, resolve_checkpoint
    from .train.checkpoint import read_safetensors

    ckpt = resolve_checkpoint(run)
    try:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{ckpt / 'config.json'}: not valid JSON ({e})") from None
    meta = metadata_from_config(cfg, str(ckpt / "config.json"))
    if meta.get("text") == "embedding":
        raise ValueError(f"{ckpt}: this policy conditions on a precomputed instruction embedding (model.text="
                         "embedding), which LeRobot observations do not carry; export a policy with "
                         "model.text=bytes or none")
    if int(sampler_steps) < 1:
        raise ValueError(f"sampler_steps={sampler_steps}: must be >= 1")
    norm = Normalizer.from_json(ckpt / "normalization.json").raw
    mode = norm.get("mode", "q99")
    streams = {lf.ACTION: lf.stream_stats(norm["action"], mode, "action")}
    if int(cfg["io"].get("state_dim") or 0) and norm.get("state"):
        streams[lf.STATE] = lf.stream_stats(norm["state"], mode, "state")
    bounds = lf.action_bounds(norm, int(cfg["io"]["action_dim"]), data_margin)
    config = lerobot_config(cfg, mode, _cameras(cfg["io"], camera), device, sampler_steps, n_action_steps,
                            data_margin)

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out={out} exists and is not empty; pass overwrite=true to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"model.{k}": v for k, v in read_safetensors(ckpt / "model.safetensors").items()}
    head = ckpt / "trainer_state" / "objective.safetensors"
    if head.is_file():
        weights.update({f"objective.{k}": v for k, v in read_safetensors(head).items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    pre, post = lf.pipelines(mode, streams, lf.default_clip(mode), device, bounds)
    for name, obj in (("config.json", config), (f"{lf.PREPROCESSOR}.json", pre),
                      (f"{lf.POSTPROCESSOR}.json", post), ("selfflow_run_config.json", cfg)):
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _bool(key: str, v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{key}={v}: expected true or false")


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """RUN key=value ... -> (RUN, kwargs of export_lerobot); bad input is one ValueError."""
    runs = [a for a in argv if "=" not in a]
    pairs = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(runs) != 1:
        raise ValueError(f"expected one RUN (a checkpoint or run directory), got {runs or 'none'}")
    unknown = sorted(set(pairs) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; expected {', '.join(OPTIONS)}")
    if not pairs.get("out"):
        raise ValueError("out is not set: pass out=DIR")
    kw: dict = {"out": pairs["out"], "camera": pairs.get("camera") or None, "device": pairs.get("device", "cpu")}
    for key in ("sampler_steps", "n_action_steps"):
        if key in pairs:
            try:
                kw[key] = int(pairs[key])
            except ValueError:
                raise ValueError(f"{key}={pairs[key]}: expected an integer") from None
    if "data_margin" in pairs:
        v = pairs["data_margin"]
        try:
            kw["data_margin"] = None if v.lower() in ("null", "none") else float(v)
        except ValueError:
            raise ValueError(f"data_margin={v}: expected a number >= 0 or null") from None
    if "overwrite" in pairs:
        kw["overwrite"] = _bool("overwrite", pairs["overwrite"])
    return runs[0], kw


def cli(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    try:
        run, kw = parse_args(argv)
        out = export_lerobot(run, **kw)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} (load it with lerobot-eval --policy.path={out} after pip install integrations/lerobot)",
          file=sys.stdout)
