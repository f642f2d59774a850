"""scripts/gpu_bench.sh in DRY mode: every stage's command and keys run on a tiny CPU model, so a
broken argument is caught here instead of costing scarce GPU time."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.sim]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"


def test_gpu_job_script_runs_every_stage_dry(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PYTHON": sys.executable, "MUJOCO_GL": "egl",
           "SELFFLOW_DATA_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(["bash", str(SCRIPT), "all"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = [json.loads(x) for x in (out / "bench_train.jsonl").read_text().splitlines()]
    assert {r.get("objective") for r in train} >= {"flow_matching", "self_flow", "self_flow_fp8"}
    assert any("selfflow_fp8_over_fm" in r for r in train)
    assert any(r.get("attention") == "flash" for r in train)  # the attention stage
    assert any(r.get("activation_checkpointing") for r in train)  # the checkpointing stage
    assert {r.get("objective") for r in train if r.get("model") == "s"} >= {"flow_matching", "dts", "self_flow"}  # small
    assert (out / "profile" / "train_dry_self_flow.txt").is_file()
    sample = [json.loads(x) for x in (out / "bench_sample.jsonl").read_text().splitlines()]
    assert [r["compiled"] for r in sample] == [False, False, True]
    policy = json.loads((out / "bench_policy.jsonl").read_text())
    assert [m["compiled"] for m in policy["model"]] == [False, True]
    assert policy["loopback"]["overhead"]["n"] == 3
    runs = json.loads((out / "study_gpu" / "runs.json").read_text())
    assert [r["objective"] for r in runs] == ["flow_matching", "dts", "self_flow"]
    # what comes back from the lent machine: one archive, without checkpoints
    with tarfile.open(out / "study_gpu.tgz") as tar:
        names = tar.getnames()
    assert "study_gpu/runs.json" in names and not any("checkpoints" in n for n in names)
    rows = [json.loads(x) for x in (out / "bench_latents.jsonl").read_text().splitlines()]
    latents = {r["part"]: r for r in rows}
    assert set(latents["summary"]["step_clips_per_s"]) == {"frames", "latents"}
    # the latent step reads a cache that clip.cached_latents' own encoder wrote (every stored frame)
    assert latents["cache"]["frames_encoded"] == 16 and latents["cache"]["bytes_per_frame"] == 8 * 10 * 4 * 2
    assert sorted((r["input"], r["workers"]) for r in rows if r["part"] == "store") == [
        ("frames", 0), ("frames", 1), ("latents", 0), ("latents", 1)]
    assert latents["encode"]["encoder_mparams"] > 80  # the SD-VAE's architecture (83.7M)
    # dist: finetune and pretrain under `torchrun --nproc_per_node 1` with DDP and FSDP2 (gloo here,
    # nccl on the GPU), stopped and resumed; each checkpoint in the requested mode (not silently
    # unwrapped at world size 1), the logged steps continuing across the restart
    dist = [json.loads(x) for x in (out / "dist.jsonl").read_text().splitlines()]
    assert [(Path(r["run"]).name, r["parallel"], r["world_size"], r["step"]) for r in dist] == [
        ("finetune_ddp", "ddp", 1, 4), ("finetune_fsdp", "fsdp", 1, 4),
        ("pretrain_ddp", "ddp", 1, 4), ("pretrain_fsdp", "fsdp", 1, 4)]
    assert all(r["ok"] for r in dist), dist


def test_pretraining_study_stage_runs_dry_and_packs_one_archive(tmp_path):
    """`gpu_bench.sh pstudy` (not part of `all`: it fills a GPU run): the GPU configuration's command
    with tiny overrides; what comes back is one archive without checkpoints or data stores."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PYTHON": sys.executable, "MUJOCO_GL": "egl",
           "SELFFLOW_DATA_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE", "PSTUDY_SEED": "3"}
    proc = subprocess.run(["bash", str(SCRIPT), "pstudy"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "pstudy rc=0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((out / "pstudy_seed3" / "runs.json").read_text())
    assert [(r["arm"], r["seed"]) for r in runs] == [("none", 3), ("flow_matching", 3)]
    with tarfile.open(out / "pstudy_seed3.tgz") as tar:
        names = tar.getnames()
    assert "pstudy_seed3/report.md" in names
    assert not any("checkpoints" in n or n.startswith("pstudy_seed3/data") for n in names)


def test_check_resume_flags_a_restart(tmp_path):
    """A run that started again from step 0 instead of resuming repeats steps in its metrics log."""
    spec = importlib.util.spec_from_file_location("check_resume", SCRIPT.parent / "check_resume.py")
    check_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_resume)
    state = tmp_path / "checkpoints" / "step_00000004" / "trainer_state"
    state.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")
    (state / "state.json").write_text(json.dumps({"step": 4, "parallel": "ddp", "world_size": 1}))
    rows = lambda steps: "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)  # noqa: E731
    (tmp_path / "metrics.jsonl").write_text(rows([1, 2, 3, 4]))
    assert check_resume.check(tmp_path, 2, 4, "ddp")["ok"]
    (tmp_path / "metrics.jsonl").write_text(rows([1, 2, 1, 2, 3, 4]))
    result = check_resume.check(tmp_path, 2, 4, "ddp")
    assert not result["ok"] and "restart" in result["why"]
    assert "parallel=ddp" in check_resume.check(tmp_path, 2, 4, "fsdp")["why"]
