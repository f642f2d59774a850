"""The pretraining study: action-free corpus, statistics on known cases, the probe, arm
initialisation from each pretrained run, and a tiny end-to-end run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selfflow_robot.study_stats import (bootstrap_ci, min_detectable_difference, paired_bootstrap, sample_sd,
                                        steps_to_reach, success_mdd)


def test_corpus_is_video_without_actions_or_state(tmp_path):
    from selfflow_robot.collect import collect_metaworld
    from selfflow_robot.data.store import EpisodeStore

    out = str(tmp_path / "corpus")
    collect_metaworld(out, tasks=["reach-v3"], episodes_per_task=1, image_size=(32, 32), workers=0,
                      seed=10000, progress=False, drop_actions=True)
    store = EpisodeStore(out)
    assert store.meta["action_dim"] == 0 and store.meta["state_dim"] == 0
    assert "action_names" not in store.meta and "state_names" not in store.meta
    assert store.actions(0).shape == (store.episode_length(0), 0) and store.state(0) is None
    assert store.frames(0, np.arange(2)).shape == (2, 32, 32, 3)
    shard = os.path.join(out, json.load(open(os.path.join(out, "index.json")))["shards"][0]["name"])
    assert np.load(os.path.join(shard, "actions.npy")).size == 0 and not os.path.exists(os.path.join(shard, "state.npy"))


def test_sample_sd_is_ddof_1_and_the_detectable_difference_follows_the_formula():
    assert sample_sd([1, 2, 3, 4]) == pytest.approx(1.2909944)  # population std would be 1.1180
    assert np.isnan(sample_sd([1.0]))
    # (z_0.975 + z_0.8) sd / sqrt(n) = 2.8016 * 0.7071 / 10
    assert success_mdd(100) == pytest.approx(0.1981, abs=1e-3)
    assert min_detectable_difference(25, 1.0) == pytest.approx(0.5603, abs=1e-3)
    assert steps_to_reach(0.5, [1, 2, 3], [0.9, 0.5, 0.4], higher=False) == 2
    assert steps_to_reach(0.95, [1, 2], [0.9, 0.8], higher=True) is None


def test_paired_bootstrap_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 5, 200)  # large shared noise (env seeds of very different difficulty)
    p = paired_bootstrap(a, a + 0.3)  # b is better by exactly 0.3 on every unit
    assert p["diff"] == pytest.approx(0.3) and p["ci"] == pytest.approx((0.3, 0.3)) and p["p_not_better"] == 0
    same = paired_bootstrap(a, a.copy())
    assert same["ci"] == (0.0, 0.0) and same["p_not_better"] == 1.0
    # Differences ~ N(0.5, 1), n = 400: the interval is mean +- 1.96 sd / sqrt(n) (= +-0.098)
    d = rng.normal(0.5, 1.0, 400)
    q = paired_bootstrap(np.zeros(400), d)
    half = 1.96 * d.std(ddof=1) / 20
    assert q["ci"][0] == pytest.approx(d.mean() - half, abs=0.015)
    assert q["ci"][1] == pytest.approx(d.mean() + half, abs=0.015)
    # Unpaired, the shared noise would swamp 0.3; paired, it cancels
    lo, hi = bootstrap_ci(a + 0.3)
    assert hi - lo > 1.0
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1, 2], [1])


def test_ridge_probe_recovers_a_linear_target_and_not_noise():
    from selfflow_robot.study_metrics import ridge_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    y = x @ rng.normal(size=(40, 3))
    r2 = ridge_probe(x[:200], y[:200], x[200:], y[200:], alpha=1e-3)["r2"]
    assert min(r2) > 0.99
    noise = rng.normal(size=(300, 3))
    assert max(ridge_probe(x[:200], noise[:200], x[200:], noise[200:], alpha=1.0)["r2"]) < 0.1
    # more features than samples: the dual form gives the same ridge solution as the primal one
    wide, yw = rng.normal(size=(60, 80)), rng.normal(size=(60, 2))
    xs = (wide[:50] - wide[:50].mean(0)) / (wide[:50].std(0) + 1e-8)
    w = np.linalg.solve(xs.T @ xs + 2.0 * np.eye(80), xs.T @ (yw[:50] - yw[:50].mean(0)))
    primal = ((wide[50:] - wide[:50].mean(0)) / (wide[:50].std(0) + 1e-8)) @ w + yw[:50].mean(0)
    assert np.allclose(ridge_probe(wide[:50], yw[:50], wide[50:], yw[50:], alpha=2.0)["pred"], primal)


def test_probe_of_backbone_features_finds_where_a_square_is():
    """A known case for the whole probe: frames with a bright square; its (x, y) is the label. Even a
    random backbone's patch tokens place it linearly well; a constant frame set gives nothing."""
    import torch

    from selfflow_robot.models import build_model
    from selfflow_robot.study_metrics import probe_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny", depth=2, width=32, heads=2, patch_size=8).eval()
    rng = np.random.default_rng(0)
    frames, labels, keys = [], [], []
    for ep in range(12):
        for _ in range(10):
            x, y = rng.integers(0, 28, 2)
            f = np.zeros((32, 32, 3), np.uint8)
            f[y:y + 4, x:x + 4] = 255
            frames.append(f)
            labels.append([0, 0, 0, x, y, 0, x / 2, y / 2, 1])  # hand, object, goal
            keys.append(f"task/seed{ep}")
    out = probe_checkpoint(model, np.stack(frames), np.array(labels, float), np.array(keys), layer=1)
    assert out["probe_r2"] > 0.5, out
    shuffled = np.array(labels, float)[rng.permutation(len(labels))]
    assert probe_checkpoint(model, np.stack(frames), shuffled, np.array(keys), layer=1)["probe_r2"] < 0.2


def test_ssim_is_one_for_identical_frames_and_falls_with_noise():
    from selfflow_robot.study_metrics import ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < 0.9


def _tiny(tmp_path, *extra):
    return ["corpus.tasks=[reach-v3]", "corpus.episodes_per_task=2", "target.tasks=[reach-v3]", "target.demos=[2]",
            "heldout.episodes_per_task=2", "image_size=[32,32]", "model.depth=2", "model.width=32", "model.heads=2",
            "model.patch_size=8", "pretrain.steps=2", "pretrain.batch_size=2", "pretrain.checkpoint_every=2",
            "pretrain.validation_every=2", "pretrain.validation_batches=1", "pretrain.ema_decay=0",
            "finetune.steps=2", "finetune.batch_size=2", "finetune.checkpoint_every=2", "finetune.validation_every=2",
            "finetune.validation_batches=1", "finetune.validation_fraction=0.5", "finetune.ema_decay=0",
            "evaluate.workers=0", "evaluate.max_episode_steps=2", "rollout.chunks=1", "rollout.steps=2",
            "collect_workers=0", f"out_dir={tmp_path / 'study'}", *extra]


def test_every_arm_fine_tunes_from_its_own_pretrained_run(tmp_path, monkeypatch):
    """Fine-tuning composes init=<that arm's pretraining run> (none: seeded random init), the one
    fine-tuning objective for every arm, proprioception only, and the same seed and data."""
    import selfflow_robot.jobs as jobs
    from omegaconf import OmegaConf

    import selfflow_robot.pretraining_study as ps
    from selfflow_robot import cli

    seen = []
    monkeypatch.setattr(jobs, "run_training", lambda cfg, job: seen.append(cfg) or {})
    monkeypatch.setattr(ps, "_validation_rows", lambda run_dir: [])
    monkeypatch.setattr("selfflow_robot.train.checkpoint.list_checkpoints", lambda run_dir: [])
    cfg = cli.compose("pretraining_study", _tiny(tmp_path, "evaluate.episodes_per_task=0", "rollout.episodes=0"))
    for arm, init in (("none", None), ("flow_matching", "/p/fm"), ("self_flow", "/p/sf")):
        ps.finetune_arm(cfg, arm, 3, 2, init, str(tmp_path / "study"), None)
    inits = [str(c.init) for c in seen]
    assert inits == ["none", "/p/fm", "/p/sf"]
    assert {c.objective.kind for c in seen} == {"flow_matching"} and all(c.use_state for c in seen)
    assert {c.dataset.state_mode for c in seen} == {"proprio"} and {c.trainer.seed for c in seen} == {3}
    assert len({OmegaConf.to_yaml(c.dataset) for c in seen}) == 1


@pytest.mark.timeout(600)
def test_tiny_study_end_to_end(tmp_path):
    """Data, pretraining arms, fine-tuning from each, rollouts in both sampling modes, probe, report."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    args = _tiny(tmp_path, "arms=[none,flow_matching,self_flow]", "seeds=[0]", "evaluate.episodes_per_task=1",
                 "evaluate.checkpoints=last", "rollout.episodes=1")
    proc = subprocess.run([sys.executable, "-m", "selfflow_robot.pretraining_study", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "study"
    runs = json.loads((out / "runs.json").read_text())
    assert [r["arm"] for r in runs] == ["none", "flow_matching", "self_flow"]
    for r in runs:
        ft = r["finetune"][0]
        cfg = json.loads((out / "runs" / f"finetune_{r['arm']}_seed0_demos2" / "checkpoints" / "step_00000002"
                          / "config.json").read_text())
        assert str(cfg["init"]) == (r["pretrain"]["run_dir"] or "none")
        assert {s["mode"] for s in ft["success"]} == {"action_first", "joint"}
        assert all(len(s["episodes"]) == 1 for s in ft["success"])
        assert ft["rollout_psnr"] > 0 and 0 < ft["rollout_ssim"] <= 1
        assert [p["step"] for p in r["pretrain"]["probe"]] == ([0] if r["arm"] == "none" else [0, 2])
    assert runs[2]["pretrain"]["flops_per_step"] > runs[1]["pretrain"]["flops_per_step"] > 0  # the teacher's forward
    report = (out / "report.md").read_text()
    for text in ("sample standard deviation (ddof=1)", "Smallest detectable difference", "Verdict",
                 "success, joint sampling", "probe R^2", "rollout SSIM", "TFLOPs"):
        assert text in report
    assert (out / "curves.png").stat().st_size > 1000


def _row(arm, seed, wins, mse=0.1):
    """A runs.json row: `wins` is the per-episode success of the last checkpoint on 4 env seeds."""
    eps = {f"reach-v3|seed={1000 + i}": float(w) for i, w in enumerate(wins)}
    fl = 0.0 if arm == "none" else (2e9 if arm == "self_flow" else 1e9)
    return {"arm": arm, "seed": seed, "finished_s": 10.0,
            "pretrain": {"run_dir": None if arm == "none" else f"runs/{arm}", "train_s": 4.0, "flops_per_step": fl,
                         "layer": 1, "validation": [] if arm == "none" else [{"step": 2, "val_flow_loss": 1.0},
                                                                              {"step": 4, "val_flow_loss": 0.5}],
                         "probe": [{"step": 0, "probe_r2": 0.1}] + ([] if arm == "none" else [
                             {"step": 2, "probe_r2": 0.2}, {"step": 4, "probe_r2": 0.4 if arm == "self_flow" else 0.3}])},
            "finetune": [{"demos": 5, "train_s": 1.0, "validation": [{"step": 2, "val_action_mse": mse}],
                          "rollout_psnr": 20.0, "rollout_ssim": 0.5,
                          "success": [{"step": 2, "mode": m, "success": float(np.mean(wins)), "episodes": eps}
                                      for m in ("action_first", "joint")]}]}


def _study_dir(path, runs, seeds):
    import yaml

    path.mkdir()
    (path / "runs.json").write_text(json.dumps(runs))
    (path / "study.yaml").write_text(yaml.safe_dump({"arms": ["none", "flow_matching", "self_flow"], "seeds": seeds,
                                                     "target": {"tasks": ["reach-v3"]}, "out_dir": str(path),
                                                     "evaluate": {"episodes_per_task": 4, "modes": ["action_first", "joint"]}}))
    return str(path)


def test_report_merges_seeds_pairs_episodes_and_states_the_verdict(tmp_path):
    from selfflow_robot.pretraining_study_report import paired_success, rebuild

    a = _study_dir(tmp_path / "a", [_row("none", 0, [0, 0, 0, 0]), _row("flow_matching", 0, [0, 1, 0, 0]),
                                    _row("self_flow", 0, [1, 1, 1, 1])], [0])
    b = _study_dir(tmp_path / "b", [_row("none", 1, [0, 0, 0, 0]), _row("flow_matching", 1, [0, 0, 1, 0]),
                                    _row("self_flow", 1, [1, 1, 1, 1], mse=0.05)], [1])
    rep = rebuild([a, b], str(tmp_path / "m"))
    runs = json.loads((tmp_path / "m" / "study.json").read_text())["runs"]
    p = paired_success(runs, 5, "action_first", "flow_matching", "self_flow")
    assert p["n"] == 8 and p["diff"] == pytest.approx(0.75) and p["ci"][0] > 0
    md = rep["markdown"]
    assert "**self_flow is better than flow_matching** on action-first success: +75.0 points" in md
    assert "**none is not distinguishable from flow_matching** on action-first success: -25.0 points" in md
    assert "Seeds: [0, 1] (2)" in md and "8 shared episodes per arm" in md
    # the validation action MSE cell: mean, sample sd (0.05 and 0.1 -> 0.0354), interval
    assert "0.0750 (sd 0.0354; [0.0500, 0.1000])" in md
    assert "| probe R^2, object + goal (pretrained backbone) (0.3000) | self_flow | 4 | 0.008 | 4 |" in md
    with pytest.raises(ValueError, match="none seed 0 is in both"):
        rebuild([a, a], str(tmp_path / "twice"))


def test_study_refuses_bad_arms_and_repa_without_a_local_encoder(tmp_path):
    from selfflow_robot.pretraining_study import cli_main

    for args, message in ((["arms=[flow_matching,selfflow]"], r"unknown arm\(s\) \['selfflow'\]"),
                          (["arms=[flow_matching,repa]"], "arm repa needs a frozen image encoder's weights on disk"),
                          (["seeds=[0,0]"], "arms and seeds must not repeat"), (["evaluate.modes=[both]"], "evaluate.modes must be")):
        with pytest.raises(SystemExit, match="^error: " + message):
            cli_main([*args, f"out_dir={tmp_path / 's'}"])
    assert not (tmp_path / "s" / "data").exists()


def test_ctrl_c_says_which_arms_are_kept(tmp_path, monkeypatch, capsys):
    import selfflow_robot.data.store as store_mod
    import selfflow_robot.pretraining_study as ps
    import selfflow_robot.study_metrics as metrics

    monkeypatch.setattr(ps, "build_data", lambda cfg, out: {"corpus": "c", "heldout": "h"})
    monkeypatch.setattr(store_mod, "EpisodeStore", lambda path: None)
    monkeypatch.setattr(metrics, "probe_data", lambda *a: None)
    calls = []

    def pretrain(cfg, arm, *a):
        calls.append(arm)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"run_dir": None, "probe": [], "validation": []}

    monkeypatch.setattr(ps, "pretrain_arm", pretrain)
    monkeypatch.setattr(ps, "finetune_arm", lambda *a: {})
    with pytest.raises(SystemExit) as e:
        ps.cli_main(["arms=[none,flow_matching]", "seeds=[0]", f"out_dir={tmp_path / 's'}"])
    assert e.value.code == 130
    kept = tmp_path / "s" / "runs.json"
    assert f"1 (arm, seed) of 2 finished and are kept in {kept}" in capsys.readouterr().err
    assert [r["arm"] for r in json.loads(kept.read_text())] == ["none"]


def test_the_published_cpu_study_rebuilds_from_its_summary(tmp_path):
    """docs/results/pretraining_study_cpu keeps study.json + study.yaml (no runs.json, checkpoints or
    data): its report must rebuild from them, with every seed docs/study.md cites."""
    from selfflow_robot.pretraining_study_report import rebuild

    here = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "pretraining_study_cpu")
    assert not os.path.exists(os.path.join(here, "runs.json"))
    r = rebuild([here], out=str(tmp_path / "r"))
    text = (tmp_path / "r" / "report.md").read_text()
    assert "seeds [0, 1, 2]" in text and "### Verdict" in text
    with open(os.path.join(here, "report.md")) as f:  # the published report is what its runs give
        published = f.read()
    assert r["markdown"] in published
