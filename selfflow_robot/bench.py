"""`python -m selfflow_robot.bench {params|train|memory|sample|data|latents|policy} [key=value ...]`: performance figures.

params  backbone parameter count of a model size: `params: N`.
train   training-step throughput of the project's trainer step (compiled blocks, bf16 on CUDA, fused
        AdamW, EMA) for flow matching and Self-Flow on synthetic tokens: samples/s, tokens/s, achieved
        TFLOP/s, MFU against a measured matmul rate, peak memory, and Self-Flow step / FM step.
memory  activation memory kept for backward per sample, with and without activation checkpointing
        (CPU, fp32, forward only), and the fp32 weights + grads + AdamW + EMA size.
data    episode-store reading and clip-sampler throughput (selfflow_robot.data.bench).
latents whether the data path keeps a step on SD-VAE latents of RT-1-sized frames fed (bench_latents).
sample  batch-1 action-chunk latency of the model alone (random weights of any size; eager and
        CUDA-graph compiled; action_first and joint modes).
policy  batch-1 action-chunk latency and server round-trip overhead (selfflow_robot.policies.bench).
Each figure is printed as one JSON line and appended to `out` when given.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time

from omegaconf import DictConfig

from . import cli

VERBS = ("params", "train", "memory", "sample", "data", "latents", "policy")


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def bench_params(cfg: DictConfig) -> int:
    import torch

    from .models import build_model

    with torch.device("meta"):
        model = build_model(cli.to_container(cfg.model))
    n = model.backbone_parameters()
    print(f"params: {n}")
    print(f"model: {model.cfg.name} depth={model.cfg.depth} width={model.cfg.width} heads={model.cfg.heads} "
          f"({n / 1e6:.1f}M backbone parameters)")
    return n


def _time_steps(step, warmup: int, reps: int, device) -> float:
    """Median seconds per call of step()."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _profile(step, device, path: str, steps: int = 3, rows: int = 30) -> None:
    """Kernel-level time table of a few steps (torch.profiler), for finding where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {steps} steps; sorted by {sort}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90))
    print(f"profile: {path}", flush=True)


def _train_setup(cfg: DictConfig, case, kind: str, device, run_dir: str):
    """A Trainer for one objective on one case's synthetic batch."""
    import torch

    from .models import build_model
    from .objectives import build_objective
    from .train import Trainer

    b = cfg.train
    # Every Block shares one compiled-code cache: without a reset, earlier cases' and objectives'
    # variants fill it (8 entries) and a later measurement silently ran eager (H100 job,
    # 2026-11-26: the FP8 teacher at 1536 tokens).
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Latent-like tokens as in SiT-XL/2 on SD-VAE latents: 2x2 patches of 4 channels = 16 dims.
    model = build_model(cli.to_container(cfg.model), patch_size=2, in_channels=4, text="none")
    # "self_flow_fp8": Self-Flow with the teacher's matmuls in FP8 (objective.teacher_fp8).
    objective = build_objective({"kind": kind.removesuffix("_fp8"), "mask_ratio": float(b.mask_ratio),
                                 "teacher_fp8": kind.endswith("_fp8")}, model.cfg)
    batch = {"video_tokens": torch.randn(int(case.batch), int(case.frames), int(case.grid), int(case.grid),
                                         model.patch_dim, device=device)}
    tcfg = {"steps": 10**9, "batch_size": int(case.batch), "compile": bool(b.compile), "device": device.type,
            "warmup_steps": 0, "checkpoint_every": 0, "log_every": 10**9, "num_workers": 0,
            "attention": str(b.attention), "activation_checkpointing": bool(b.activation_checkpointing)}
    trainer = Trainer(tcfg, model, objective, [batch], run_dir,
                      logger_cfg={"wandb": "disabled", "jsonl": False, "progress_bar": False})
    return trainer, objective, batch


def _middle(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def bench_train(cfg: DictConfig) -> list[dict]:
    import torch

    from .train.flops import measure_matmul_peak

    b = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() and b.device != "cpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_matmul_peak(str(device))
    emit({"bench": "matmul_peak", "device": _device_name(device), "tflops": peak / 1e12,
          "torch": torch.__version__}, b.out)
    rounds = int(b.get("rounds", 1))
    if rounds < 1:
        raise ValueError(f"train.rounds must be >= 1, got {rounds}")
    results = []
    for case in b.cases:
        frames, grid, batch_size = int(case.frames), int(case.grid), int(case.batch)
        # rounds > 1 alternates the objectives round by round, each trainer kept alive, so a slow
        # spell of a shared machine hits every objective alike; the ratios come per round.
        times: dict[str, list[float]] = {kind: [] for kind in b.objectives}
        live: dict[str, tuple] = {}
        tmp = tempfile.TemporaryDirectory()
        for r in range(rounds):
            for kind in b.objectives:
                if kind not in live:
                    live[kind] = _train_setup(cfg, case, kind, device, os.path.join(tmp.name, kind))
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                trainer, objective, batch = live[kind]
                times[kind].append(_time_steps(lambda: trainer._train_step(batch), int(b.warmup) if r == 0 else 1,
                                               int(b.reps), device))
                if r < rounds - 1:
                    continue
                if b.profile:
                    _profile(lambda: trainer._train_step(batch), device, f"{b.profile}/train_{case.name}_{kind}.txt")
                step_s = _middle(times[kind])
                flops = objective.flops_per_sample(batch) * batch_size
                n_tokens = frames * grid * grid
                rec = {"bench": "train", "case": case.name, "objective": kind, "model": trainer.model.cfg.name,
                       "device": _device_name(device), "batch": batch_size, "tokens": n_tokens,
                       "compiled": bool(b.compile), "attention": str(b.attention),
                       "activation_checkpointing": bool(b.activation_checkpointing), "step_s": step_s,
                       "samples_per_s": batch_size / step_s, "tokens_per_s": batch_size * n_tokens / step_s,
                       "tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak,
                       # (with rounds > 1 every objective's trainer is alive: no per-objective peak)
                       "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30
                       if device.type == "cuda" and rounds == 1 else None}
                if rounds > 1:
                    rec.update(rounds=rounds, step_s_range=[min(times[kind]), max(times[kind])])
                emit(rec, b.out)
                results.append(rec)
                del live[kind], trainer, objective, batch
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        tmp.cleanup()
        if "flow_matching" in times and len(times) > 1:  # e.g. selfflow_over_fm, dts_over_fm
            ratio = {"bench": "train", "case": case.name}
            for k, ts in times.items():
                if k == "flow_matching":
                    continue
                per_round = [t / fm for t, fm in zip(ts, times["flow_matching"])]
                name = f"{k.replace('self_flow', 'selfflow')}_over_fm"
                ratio[name] = _middle(per_round)
                if rounds > 1:
                    ratio[name + "_range"] = [min(per_round), max(per_round)]
            emit(ratio, b.out)
            results.append(ratio)
    return results


def bench_sample(cfg: DictConfig) -> list[dict]:
    import numpy as np
    import torch

    from .models import build_model
    from .sampling import ActionSampler

    b = cfg.sample
    device = torch.device("cuda" if torch.cuda.is_available() and b.device != "cpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    io = {"image_size": list(b.image_size), "context_frames": int(b.context_frames), "future_frames": int(b.future_frames),
          "frame_stride": 2, "action_chunk": int(b.action_chunk), "action_dim": int(b.action_dim)}
    torch.manual_seed(0)
    model = build_model(cli.to_container(cfg.model), action_dim=io["action_dim"], frame_stride=2).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)  # inference weights in bf16 (training keeps fp32 + autocast)
    image = np.random.default_rng(0).integers(0, 256, (*b.camera_size, 3), dtype=np.uint8)
    results = []
    for compiled in b.compile:
        for mode in b.modes:
            torch._dynamo.reset()  # each measurement compiles afresh (see bench_train)
            sampler = ActionSampler(model, {"io": io}, device, steps=int(b.steps), mode=mode, compile=bool(compiled))
            call = lambda: sampler(image, "pick coke can")  # noqa: E731
            latency = _time_steps(call, int(b.warmup), int(b.reps), device)
            p = model.cfg.patch_size
            n_ctx = io["context_frames"] * (io["image_size"][0] // p) * (io["image_size"][1] // p)
            n_vid = io["future_frames"] * n_ctx // io["context_frames"] if mode == "joint" else 0
            rec = {"bench": "sample", "model": model.cfg.name, "device": _device_name(device), "mode": mode,
                   "compiled": bool(compiled), "steps": int(b.steps), "tokens": n_ctx + n_vid + io["action_chunk"] + model.cfg.max_text_len,
                   "chunk_latency_ms": latency * 1e3, "chunks_per_s": 1 / latency,
                   "camera": list(b.camera_size), "image_size": io["image_size"]}
            emit(rec, b.out)
            results.append(rec)
    return results


def bench_memory(cfg: DictConfig) -> list[dict]:
    """Activation memory a training forward keeps for backward, per sample, with and without
    trainer.activation_checkpointing: the bytes autograd saves, counted on the CPU in fp32 (bf16
    autocast keeps about half). With checkpointing, backward also rebuilds one block at a time."""
    import torch

    from .models import build_model
    from .train.distributed import apply_activation_checkpointing

    results = []
    for case in cfg.train.cases:
        saved = {}
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = build_model(cli.to_container(cfg.model), patch_size=2, in_channels=4, text="none")
            if checkpointing:
                apply_activation_checkpointing(model)
            x = torch.randn(1, int(case.frames), int(case.grid), int(case.grid), model.patch_dim)
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            total = [0]

            def pack(t, total=total, weights=weights):  # weights saved for backward cost no extra memory
                if t.untyped_storage().data_ptr() not in weights:
                    total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(video=x, video_t=torch.rand(1))
            saved[checkpointing] = total[0] / 2**20
        rec = {"bench": "memory", "case": case.name, "model": model.cfg.name, "tokens": int(case.frames) *
               int(case.grid) ** 2, "dtype": "float32", "saved_mib_per_sample": saved[False],
               "checkpointed_saved_mib_per_sample": saved[True], "reduction": saved[False] / saved[True],
               "static_gib": model.backbone_parameters() * 20 / 2**30}  # fp32 weights, grads, AdamW, EMA
        emit(rec, cfg.train.out)
        results.append(rec)
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def main(cfg: DictConfig):
    verb = cfg.get("verb")
    if verb == "params":
        return bench_params(cfg)
    if verb == "train":
        return bench_train(cfg)
    if verb == "sample":
        return bench_sample(cfg)
    if verb == "memory":
        return bench_memory(cfg)
    if verb == "data":
        from .data.bench import main as data_main

        return data_main(cfg)
    if verb == "latents":
        from .bench_latents import bench_latents

        return bench_latents(cfg)
    if verb == "policy":
        from .policies.bench import main as policy_main

        return policy_main(cfg)
    raise SystemExit(f"usage: python -m selfflow_robot.bench {{{'|'.join(VERBS)}}} [key=value ...]")


if __name__ == "__main__":
    cli.run("bench", main, verbs=VERBS)
