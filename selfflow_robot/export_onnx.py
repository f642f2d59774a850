"""ONNX export of a policy: `python -m selfflow_robot.export onnx RUN out=DIR [steps=10] [opset=18]`.

DIR receives
  policy.onnx         the whole fixed-step action-first sampler in one graph: context frames (uint8 at
                      the model's image size, oldest first), the instruction (UTF-8 byte ids or a
                      precomputed embedding), the normalised state and the initial noise -> the
                      normalised action chunk. The conditioning prefix is encoded once and the
                      `steps` Euler steps are unrolled; their timesteps are constants of the graph.
  normalization.json  the checkpoint's statistics (un-normalise the chunk with them)
  manifest.json       inputs and outputs (names, dtypes, shapes, meaning), the preprocessing, steps,
                      action meaning, normalisation and the policy metadata `Policy` takes.
The numpy + onnxruntime runner (selfflow_robot.policies.onnx_runner) reads exactly these files and
reproduces `Policy.infer`; a C++ controller does the same steps (docs/serving.md).
Only the action-first mode is exported: the controller needs actions, not predicted frames.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

FORMAT = "selfflow-robot-onnx/1"
KEYS = {"out": "output folder (required)", "steps": "Euler steps baked into the graph (10)",
        "opset": "ONNX opset (18)", "check": "compare the graph with torch on random inputs (true)"}


class FixedStepSampler(torch.nn.Module):
    """frames, noise[, text | text_embedding][, state] -> normalised chunk, as ActionSampler computes it."""

    def __init__(self, model, steps: int, extra_inputs: list[str]):
        super().__init__()
        self.model, self.steps, self.extra_inputs = model, int(steps), extra_inputs

    def forward(self, frames, noise, *extra):
        from .sampling import euler_sample

        kw = dict(zip(self.extra_inputs, extra))
        context = self.model.frames_to_tokens(frames)
        out = euler_sample(self.model, steps=self.steps, context=context, text=kw.get("text"),
                           text_emb=kw.get("text_embedding"), state=kw.get("state"),
                           action_shape=tuple(noise.shape), action_noise=noise)
        return out["action"]


def _inputs(model, io: dict) -> list[dict]:
    """The graph's inputs with dtype, shape and meaning, in the order the graph takes them."""
    h, w = (int(x) for x in io["image_size"])
    tc, H, A = int(io["context_frames"]), int(io["action_chunk"]), int(io["action_dim"])
    specs = [
        {"name": "frames", "dtype": "uint8", "shape": [1, tc, h, w, 3],
         "meaning": "the last context_frames camera frames, oldest first, each resized to image_size "
                    "(bilinear, antialiased; several views resized to image_size[1] / len(views) wide and "
                    "tiled left to right); at the first step after a reset, copies of the first frame"},
        {"name": "noise", "dtype": "float32", "shape": [1, H, A],
         "meaning": "initial action noise, standard normal (a fresh draw per chunk)"},
    ]
    if model.cfg.text == "bytes":
        specs.append({"name": "text", "dtype": "int64", "shape": [1, int(model.cfg.max_text_len)],
                      "meaning": "instruction as UTF-8 bytes b -> b + 1, truncated to max_text_len, padded with 0"})
    elif model.cfg.text == "embedding":
        specs.append({"name": "text_embedding", "dtype": "float32", "shape": [1, int(model.cfg.text_embed_dim)],
                      "meaning": "precomputed instruction embedding (the one the policy was trained with)"})
    if model.state_embed is not None:
        specs.append({"name": "state", "dtype": "float32", "shape": [1, int(model.cfg.state_dim)],
                      "meaning": "proprioceptive state, normalised with normalization.json's 'state' statistics"})
    return specs


def _example(spec: dict, gen: torch.Generator) -> torch.Tensor:
    shape, dtype = spec["shape"], spec["dtype"]
    if dtype == "uint8":
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if dtype == "int64":
        return torch.randint(0, 257, shape, generator=gen, dtype=torch.int64)
    return torch.randn(shape, generator=gen)


def _postprocess_text(norm: dict) -> str:
    mode = norm.get("mode", "q99")
    inverse = ("a = 0.5 (x + 1)(q99 - q01) + q01" if mode == "q99" else "a = x (std + 1e-6) + mean")
    return (f"normalization mode {mode}: clip x to [-1, 1] on dims with mask true (q99 mode; the normalised clip of "
            f"SafetyConfig), then {inverse} on those dims; dims with mask false (the gripper) pass through. "
            "A non-finite chunk is replaced by the hold action; then bound every dim to the training data's "
            "range widened by safety.data_margin (SafetyConfig), and apply your action_low/high and max_delta.")


def export_onnx(run: str, out: str, steps: int = 10, opset: int = 18, check: bool = True) -> dict:
    """Write policy.onnx, normalization.json and manifest.json to `out`; returns the manifest."""
    from .models import load_checkpoint_model
    from .policies.normalize import Normalizer
    from .policies.policy import metadata_from_config, resolve_checkpoint

    if int(steps) < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    ckpt = resolve_checkpoint(run)
    model, cfg = load_checkpoint_model(str(ckpt), "cpu")
    model = model.float()
    metadata = metadata_from_config(cfg, str(ckpt / "config.json"))
    norm = Normalizer.from_json(ckpt / "normalization.json").raw
    io = cfg["io"]
    specs = _inputs(model, io)
    wrapper = FixedStepSampler(model, steps, [s["name"] for s in specs[2:]]).eval()
    gen = torch.Generator().manual_seed(0)
    example = tuple(_example(s, gen) for s in specs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter: deprecated since torch 2.9 but needs no onnxscript, and traces in seconds.
    # Shapes are fixed on purpose (batch 1, the trained image size), so its tracer warnings say nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapper, example, str(out_dir / "policy.onnx"), dynamo=False, opset_version=int(opset),
                          input_names=[s["name"] for s in specs], output_names=["actions"], do_constant_folding=True)
    shutil.copyfile(ckpt / "normalization.json", out_dir / "normalization.json")
    manifest = {
        "format": FORMAT, "graph": "policy.onnx", "checkpoint": str(ckpt), "model": metadata.get("model"),
        "mode": "action_first", "method": "ode", "steps": int(steps), "opset": int(opset),
        "inputs": specs,
        "outputs": [{"name": "actions", "dtype": "float32", "shape": [1, int(io["action_chunk"]), int(io["action_dim"])],
                     "meaning": "normalised action chunk: row i is the action for control step t + i"}],
        "preprocess": {"image_size": list(io["image_size"]), "resize": "bilinear, antialiased (torch antialias=True, "
                       "PIL's triangle filter), half-pixel centres, rounded to uint8",
                       "context_frames": int(io["context_frames"]), "views": metadata.get("views") or [],
                       "max_text_len": int(model.cfg.max_text_len), "text": model.cfg.text},
        "actions": {"dim": int(io["action_dim"]), "chunk": int(io["action_chunk"]), "fps": io.get("fps"),
                    "names": metadata.get("action_names"), "postprocess": _postprocess_text(norm)},
        "normalization": norm,
        "metadata": metadata,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if check:
        manifest["check_max_abs_diff"] = _check(out_dir, wrapper, specs, example)
    return manifest


def _check(out_dir: Path, wrapper, specs, example) -> float | None:
    """The exported graph against torch on the export's example inputs (when onnxruntime is installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(out_dir / "policy.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {s["name"]: x.numpy() for s, x in zip(specs, example)})[0]
    with torch.no_grad():
        want = wrapper(*example).numpy()
    return float(abs(got - want).max())


def cli(args: list[str]) -> None:
    from .export import parse

    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m selfflow_robot.export onnx RUN out=DIR [key=value ...]\n")
        print("\n".join(f"  {k:<6} {v}" for k, v in KEYS.items()))
        return
    run, opts = parse(args, KEYS)
    if not opts.get("out"):
        raise ValueError("out is not set: pass out=DIR (the folder for policy.onnx and manifest.json)")
    ints = {}
    for key, default in (("steps", 10), ("opset", 18)):
        try:
            ints[key] = int(opts.get(key, default))
        except ValueError:
            raise ValueError(f"{key}={opts[key]!r}: expected an integer") from None
    m = export_onnx(run, opts["out"], check=opts.get("check", "true").lower() in ("true", "1", "yes"), **ints)
    size = (Path(opts["out"]) / "policy.onnx").stat().st_size / 2**20
    print(f"wrote {opts['out']}/policy.onnx ({size:.1f} MiB), manifest.json, normalization.json "
          f"(model {m['model']}, {m['steps']} steps, chunk {m['actions']['chunk']} x {m['actions']['dim']})")
    if m.get("check_max_abs_diff") is not None:
        print(f"onnxruntime vs torch on random inputs: max |diff| {m['check_max_abs_diff']:.2e}")
