"""scripts/gpu_bench.sh in DRY mode: every stage's command and keys run on a tiny CPU model, so a
broken argument is caught here instead of costing scarce GPU time."""
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
