"""The benchmark commands run and report every figure they promise (tiny sizes, CPU)."""
import json
import os
import subprocess
import sys


def bench(*args, tmp_path):
    out = str(tmp_path / "bench.jsonl")
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.bench", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in open(out)] if os.path.exists(out) else proc.stdout


def test_bench_train_reports_throughput_mfu_and_selfflow_overhead(tmp_path):
    rows = bench("train", "model=tiny", "train.compile=false", "train.warmup=1", "train.reps=2",
                 "train.objectives=[flow_matching,dts,self_flow,self_flow_fp8]", "train.cases=[{name: t, frames: 2, grid: 4, batch: 4}]", f"train.out={tmp_path / 'bench.jsonl'}",
                 tmp_path=tmp_path)
    steps = [r for r in rows if "samples_per_s" in r]
    assert {r["objective"] for r in steps} == {"flow_matching", "dts", "self_flow", "self_flow_fp8"}
    for r in steps:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] == r["samples_per_s"] * 32 and 0 < r["mfu"]
    ratio = next(r for r in rows if "selfflow_over_fm" in r)
    assert all(ratio[f"{k}_over_fm"] > 0 for k in ("dts", "selfflow", "selfflow_fp8"))


def test_bench_train_rounds_alternate_objectives_and_report_a_range(tmp_path):
    rows = bench("train", "model=tiny", "train.compile=false", "train.warmup=1", "train.reps=1", "train.rounds=3",
                 "train.objectives=[flow_matching,dts]", "train.cases=[{name: t, frames: 1, grid: 4, batch: 2}]",
                 f"train.out={tmp_path / 'bench.jsonl'}", tmp_path=tmp_path)
    for r in (r for r in rows if "samples_per_s" in r):  # the median round, within its range
        assert r["rounds"] == 3 and r["step_s_range"][0] <= r["step_s"] <= r["step_s_range"][1]
    ratio = next(r for r in rows if "dts_over_fm" in r)
    lo, hi = ratio["dts_over_fm_range"]
    assert 0 < lo <= ratio["dts_over_fm"] <= hi


def test_bench_sample_reports_chunk_latency(tmp_path):
    rows = bench("sample", "model=tiny", "model.patch_size=16", "sample.image_size=[32,48]", "sample.compile=[false]",
                 "sample.warmup=1", "sample.reps=2", f"sample.out={tmp_path / 'bench.jsonl'}", tmp_path=tmp_path)
    assert {r["mode"] for r in rows} == {"action_first", "joint"}
    assert all(r["chunk_latency_ms"] > 0 for r in rows)


def test_bench_memory_reports_activation_checkpointing_savings(tmp_path):
    rows = bench("memory", "model=tiny", "train.cases=[{name: t, frames: 2, grid: 8, batch: 4}]",
                 f"train.out={tmp_path / 'bench.jsonl'}", tmp_path=tmp_path)
    (row,) = rows
    assert row["tokens"] == 128 and row["saved_mib_per_sample"] > 4 * row["checkpointed_saved_mib_per_sample"] > 0
    assert row["static_gib"] > 0


def test_bench_needs_a_verb(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.bench", "model=tiny"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "params|train" in (proc.stderr + proc.stdout)


def test_bench_policy_on_a_checkpoint_that_takes_state(tmp_path):
    from selfflow_robot.policies.bench import main, random_checkpoint

    ckpt = random_checkpoint("tiny", str(tmp_path / "ckpt"), (32, 32), action_dim=4, action_chunk=3, patch_size=8,
                             state_dim=39)  # e.g. the quickstart's Meta-World policy
    r = main({"checkpoint": ckpt, "image_size": [32, 32], "iters": 5, "warmup": 1, "model_iters": 2,
              "modes": ["action_first"], "device": "cpu", "sampler_steps": 2, "out": str(tmp_path / "p.jsonl")})
    assert r["loopback"]["overhead"]["median_ms"] > 0 and r["codec"]["median_ms"] > 0
    (m,) = r["model"]
    assert m["chunk_shape"] == [3, 4] and m["infer"]["median_ms"] > 0
