"""`python -m selfflow_robot.study` on a reduced configuration: three arms, report, table and plot."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_study_runs_three_arms_and_writes_the_report(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    args = ["tasks=[reach-v3]", "episodes_per_task=2", "image_size=[32,32]", "model.depth=2", "model.width=32",
            "model.patch_size=8", "seeds=[0]", "steps=4", "batch_size=4", "checkpoint_every=2", "validation.every=2",
            "validation.batches=1", "validation.fraction=0.5", "evaluate.episodes_per_task=1", "evaluate.workers=0",
            "evaluate.max_episode_steps=4", f"out_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.study", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    arms = ["flow_matching", "dts", "self_flow"]
    runs = json.loads((out / "runs.json").read_text())
    assert [r["objective"] for r in runs] == arms
    for r in runs:
        assert [v["step"] for v in r["validation"]] == [2, 4], r["validation"]
        assert all(v["val_flow_loss"] > 0 and v["val_action_mse"] > 0 for v in r["validation"])
        assert [s["step"] for s in r["success"]] == [2, 4]
        cfg = json.loads((out / "runs" / f"{r['objective']}_seed0" / "checkpoints" / "step_00000002" / "config.json").read_text())
        assert cfg["objective"]["kind"] == r["objective"] and cfg["trainer"]["seed"] == 0
    # the same initialisation and data: the first validation differs only through 2 training steps
    first = [r["validation"][0]["val_flow_loss"] for r in runs]
    assert max(first) - min(first) < 0.2 * max(first)
    report = (out / "report.md").read_text()
    for header in ("validation flow loss", "validation action MSE", "success rate", "Steps to reach flow_matching"):
        assert header in report
    assert "| step | flow_matching | dts | self_flow |" in report
    assert (out / "curves.png").stat().st_size > 1000
    assert "| success rate |" in proc.stdout


def test_in_process_commands_answer_help_cfg_and_bad_keys(capsys):
    """quickstart and study compose other commands' configs, so they parse argv themselves."""
    from selfflow_robot.quickstart import cli_main as quickstart
    from selfflow_robot.study import cli_main as study

    with pytest.raises(SystemExit) as e:
        study(["--help"])
    assert e.value.code == 0 and "seeds: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        study(["steps=3", "--cfg", "job"])
    assert e.value.code == 0 and re.search(r"(?m)^steps: 3$", capsys.readouterr().out)
    with pytest.raises(SystemExit, match=r"^error: unknown option stepz \(did you mean steps\?\)"):
        study(["stepz=3"])
    with pytest.raises(SystemExit, match=r"^error: unknown option parralel_arms \(did you mean parallel_arms"):
        study(["+parralel_arms=2"])  # what Hydra's own message suggests for a typo
    with pytest.raises(SystemExit, match="unknown option --bogus"):
        quickstart(["--bogus"])


def test_study_refuses_bad_options_before_collecting_demos(tmp_path, monkeypatch, capsys):
    """Mistakes that would surface only after data collection and earlier arms are caught first:
    one `error:` line each, nothing collected."""
    from selfflow_robot.study import cli_main as study

    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(tmp_path / "cache"))
    out = f"out_dir={tmp_path / 'study'}"
    for args, message in ((["objectives=[flow_matching,selfflow]"], r"unknown objective\(s\) \['selfflow'\]"),
                          (["parallel_arms=0"], "parallel_arms must be >= 1"),
                          (["seeds=[0,0]"], "objectives and seeds must not repeat"),
                          (["objectives=[]"], "study option objectives is empty")):
        with pytest.raises(SystemExit, match="^error: " + message):
            study([*args, out])
    assert not (tmp_path / "cache").exists()
    (tmp_path / "study" / "runs").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds a study"):
        study([out])


def test_single_values_are_lists():
    from omegaconf import OmegaConf

    from selfflow_robot.study import check

    cfg = OmegaConf.create({"objectives": "self_flow", "seeds": 0, "tasks": "reach-v3", "parallel_arms": 1,
                            "out_dir": "/nonexistent/study"})
    check(cfg)
    assert (list(cfg.objectives), list(cfg.seeds), list(cfg.tasks)) == (["self_flow"], [0], ["reach-v3"])


def test_steps_to_reach_counts_from_the_reference_reaching_its_own_final_value():
    """Identical curves read 1.00x; an arm that gets there at half the steps reads 0.50x."""
    from selfflow_robot.study_report import markdown

    steps = [10, 20, 30, 40]
    flat = {"success": (steps, [0.25, 0.5, 0.5, 0.5], [0, 0, 0, 0], 2)}
    table = markdown({"flow_matching": flat, "dts": flat,
                      "self_flow": {"success": (steps, [0.5, 0.5, 0.5, 0.75], [0, 0, 0, 0], 2)}})
    row = next(line for line in table.splitlines() if line.startswith("| success rate |"))
    assert row == "| success rate | 50% (20) | 20 (1.00x) | 10 (0.50x) |"


def test_parallel_arms_stop_with_the_failing_arm_named(tmp_path):
    """parallel_arms=2: each arm is its own process; one that fails stops the study with its name."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    args = ["tasks=[reach-v3]", "episodes_per_task=2", "image_size=[32,32]", "model.depth=1", "model.width=32",
            "model.patch_size=8", "seeds=[0]", "steps=2", "batch_size=2", "parallel_arms=2", "collect_workers=0",
            "evaluate.episodes_per_task=0", "overrides=['trainer.bogus_key=1']", f"out_dir={tmp_path / 'study'}"]
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.study", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "bogus_key" in proc.stderr
    assert re.search(r"study arm (flow_matching|dts|self_flow)_seed0 failed \(exit code 1\)", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "study" / "runs.json").exists()


def test_ctrl_c_keeps_the_finished_runs_and_says_so(tmp_path):
    """SIGINT to the process group mid-study: exit 130, one line naming the runs kept, no traceback.
    Sent as soon as the second run starts (its line on stderr), while the first run's objects are
    being freed: a Ctrl-C landing in a weakref callback there was ignored and the study ran on."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "study"
    args = ["tasks=[reach-v3]", "episodes_per_task=2", "image_size=[32,32]", "model.depth=1", "model.width=32",
            "model.patch_size=8", "seeds=[0,1]", "objectives=[flow_matching]", "steps=300", "batch_size=2",
            "checkpoint_every=300", "validation.every=300", "validation.batches=1", "validation.fraction=0.5",
            "evaluate.episodes_per_task=0", "collect_workers=0", f"out_dir={out}"]
    with open(tmp_path / "stdout.txt", "w") as stdout:  # a file: an unread pipe could block the study
        proc = subprocess.Popen([sys.executable, "-m", "selfflow_robot.study", *args], env=env, cwd=tmp_path,
                                start_new_session=True, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        err = ""
        for line in proc.stderr:  # ends when the study does; pytest's timeout bounds a hang
            err += line
            if "[study] flow_matching_seed1: fine-tuning" in line:
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                break
        else:
            pytest.fail(f"the second run never started:\n{err[-3000:]}")
        err += proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted: 1 of 2 runs finished and are kept in {out / 'runs.json'}" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert [r["seed"] for r in json.loads((out / "runs.json").read_text())] == [0]
