"""The study report from runs.json: whole seeds only, merging studies of other seeds, failed rollouts."""
import json
import os

import pytest
import yaml

from selfflow_robot.study_report import complete_seeds, rebuild

ARMS = ["flow_matching", "dts", "self_flow"]


def _run(objective, seed, loss, success=0.5):
    return {"objective": objective, "seed": seed, "run_dir": f"runs/{objective}_seed{seed}", "train_s": 1.0,
            "eval_s": 1.0, "finished_s": 10.0 * (seed + 1),
            "validation": [{"step": 10, "val_flow_loss": loss + 1, "val_action_mse": 0.5},
                           {"step": 20, "val_flow_loss": loss, "val_action_mse": 0.25}],
            "success": [{"step": 20, "success": success, "tasks": {"reach-v3": success}}]}


def _study(path, runs, seeds, **config):
    path.mkdir()
    (path / "runs.json").write_text(json.dumps(runs))
    (path / "study.yaml").write_text(yaml.safe_dump({"objectives": ARMS, "seeds": seeds, "steps": 20,
                                                     "out_dir": str(path), **config}))
    return str(path)


def test_complete_seeds_drops_a_seed_some_arm_did_not_finish():
    runs = [_run(o, 0, 1.0) for o in ARMS] + [_run("flow_matching", 1, 1.0)]
    assert [(r["objective"], r["seed"]) for r in complete_seeds(runs, ARMS)] == [(o, 0) for o in ARMS]


def test_rebuild_reports_the_finished_seeds_of_a_stopped_study(tmp_path):
    runs = [_run(o, 0, 1.0) for o in ARMS] + [_run("flow_matching", 1, 9.0)]
    d = _study(tmp_path / "s", runs, [0, 1, 2])
    report = rebuild([d])
    md = (tmp_path / "s" / "report.md").read_text()
    assert "seeds [0] of [0, 1, 2]" in md
    assert "| 20 | 1.0000 ± n/a | 1.0000 ± n/a | 1.0000 ± n/a |" in md  # seed 1's 9.0 left out; one seed has no sd
    assert report["curves"]["flow_matching"]["val_flow_loss"][3] == 1
    all_seeds = rebuild([d], all_seeds=True)
    assert all_seeds["curves"]["flow_matching"]["val_flow_loss"][3] == 2


def test_rebuild_merges_studies_of_other_seeds_and_names_differing_settings(tmp_path, capsys):
    a = _study(tmp_path / "a", [_run(o, 0, 1.0) for o in ARMS], [0], parallel_arms=3)
    b = _study(tmp_path / "b", [_run(o, 1, 3.0) for o in ARMS], [1], overrides=["trainer.compile=true"])
    report = rebuild([a, b], str(tmp_path / "merged"))
    st, mean, std, n = report["curves"]["self_flow"]["val_flow_loss"]
    assert (st, mean, n) == ([10, 20], [3.0, 2.0], 2)
    assert std == pytest.approx([2 ** 0.5, 2 ** 0.5])  # sample sd (ddof=1) of 1 and 3, not the population's 1.0
    md = (tmp_path / "merged" / "report.md").read_text()
    assert "seeds [0, 1] of [0, 1]" in md and "differ in overrides" in md  # parallel_arms is logistics
    assert "differ in overrides" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "merged" / "study.yaml").read_text())["merged_from"] == [a, b]
    with pytest.raises(ValueError, match="flow_matching seed 0 is in both"):
        rebuild([a, a], str(tmp_path / "twice"))
    with pytest.raises(ValueError, match="need an output dir"):
        rebuild([a, b])


def test_rebuild_refuses_a_study_without_a_finished_seed(tmp_path):
    d = _study(tmp_path / "s", [_run("flow_matching", 0, 1.0)], [0])
    with pytest.raises(ValueError, match="no seed has all of"):
        rebuild([d])
    with pytest.raises(FileNotFoundError, match="runs.json not found"):
        rebuild([str(tmp_path)])


def test_a_failed_rollout_is_recorded_and_reported_not_fatal(tmp_path, monkeypatch, capsys):
    """A broken simulator must not cost the trained arm: the step gets an error, the report says so."""
    from omegaconf import OmegaConf

    import selfflow_robot.evaluate as evaluate_mod
    import selfflow_robot.train.checkpoint as checkpoint_mod
    from selfflow_robot import study

    for step in (10, 20, 30):
        (tmp_path / f"step_{step:08d}").mkdir()
    monkeypatch.setattr(checkpoint_mod, "list_checkpoints",
                        lambda run_dir: sorted(p for p in tmp_path.iterdir() if p.name.startswith("step_")))
    calls = []

    def fake_evaluate(argv):
        calls.append(argv)
        if len(calls) == 1:
            raise RuntimeError("EGL context failed")
        if len(calls) == 3:  # evaluate caught every episode's error itself
            return {"complete": False, "episodes": 0, "episodes_expected": 2, "mean_success": float("nan"),
                    "throughput": {"errors": 2}, "tasks": {}}
        return {"complete": True, "episodes": 2, "episodes_expected": 2, "mean_success": 0.75,
                "throughput": {"errors": 0}, "tasks": {"reach-v3": {"success_rate": 0.75}}}

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    cfg = OmegaConf.create({"device": "cpu", "evaluate": {"episodes_per_task": 2, "seed": 1000, "workers": 0,
                                                          "sampler_steps": 5, "execute_steps": 2, "max_episode_steps": None}})
    rows = study._success(cfg, str(tmp_path), str(tmp_path / "eval"))
    assert rows[:2] == [{"step": 10, "error": "RuntimeError: EGL context failed"},
                        {"step": 20, "success": 0.75, "tasks": {"reach-v3": 0.75}}]
    assert rows[2]["step"] == 30 and rows[2]["error"].startswith("0 of 2 episodes finished, 2 failed")
    assert "EGL context failed" in capsys.readouterr().err
    run = {**_run("flow_matching", 0, 1.0), "success": rows}
    d = _study(tmp_path / "s", [run] + [_run(o, 0, 1.0) for o in ARMS[1:]], [0])
    md = rebuild([d])["markdown"]
    assert "flow_matching seed 0 step 10: RuntimeError: EGL context failed" in md


def test_merging_refuses_studies_that_measure_different_things_unless_forced(tmp_path):
    a = _study(tmp_path / "a", [_run(o, 0, 1.0) for o in ARMS], [0])
    b = _study(tmp_path / "b", [_run(o, 1, 3.0) for o in ARMS], [1], steps=40, tasks=["drawer-close-v3"])
    with pytest.raises(ValueError, match="differ in steps, tasks; --force merges"):
        rebuild([a, b], str(tmp_path / "m"))
    rebuild([a, b], str(tmp_path / "m"), force=True)
    assert "differ in steps, tasks" in (tmp_path / "m" / "report.md").read_text()


def test_merge_order_does_not_matter_and_uneven_seeds_are_labelled(tmp_path):
    """A study of one arm merged with a full one: whole seeds only, or with --all-seeds each arm's
    seed count in its column and no steps-to-reach ratios (they would compare different seeds)."""
    full = _study(tmp_path / "full", [_run(o, 0, 1.0) for o in ARMS], [0])
    one = tmp_path / "one"
    _study(one, [_run("flow_matching", 1, 3.0)], [1])
    (one / "study.yaml").write_text(yaml.safe_dump({"objectives": ["flow_matching"], "seeds": [1], "steps": 20,
                                                    "out_dir": str(one)}))
    for dirs in ([full, str(one)], [str(one), full]):
        c = rebuild(dirs, str(tmp_path / "m"))["curves"]
        assert c["flow_matching"]["val_flow_loss"][3] == 1 and set(c) == set(ARMS)
    md = rebuild([full, str(one)], str(tmp_path / "m"), all_seeds=True)["markdown"]
    assert "| step | flow_matching (n=2) | dts (n=1) | self_flow (n=1) |" in md
    assert "Steps to reach" not in md and "different numbers of seeds" in md


def test_study_report_command_prints_one_error_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.study_report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_a_published_study_with_only_its_summary_rebuilds(tmp_path):
    """docs/results keeps study.json (which holds the runs), not runs.json."""
    from selfflow_robot.study_report import rebuild

    here = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "study_cpu")
    assert not os.path.exists(os.path.join(here, "runs.json"))
    rebuild([here], out=str(tmp_path / "r"))
    assert "seeds [0, 1] of [0, 1]" in (tmp_path / "r" / "report.md").read_text()
