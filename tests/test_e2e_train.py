"""The real commands on tiny configs: pretrain, fine-tune (Meta-World and RT-1 format), resume, init."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.data_fixtures import write_blob_store

pytestmark = pytest.mark.slow
TINY = ["model=tiny", "trainer.batch_size=8", "trainer.num_workers=0", "trainer.warmup_steps=5", "trainer.lr=1e-3",
        "trainer.log_every=1", "trainer.ema_decay=0.9", "logger.wandb=disabled", "logger.progress_bar=false", "clip.image_size=[32,32]"]


def run(module, *args, cwd, env_extra=None, check=True):
    # Passive OpenMP waits: spinning threads slow training ~10x when another process shares the cores.
    env = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "OMP_WAIT_POLICY": "PASSIVE", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", f"selfflow_robot.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """A store of smooth moving-blob episodes whose actions are the blob's motion."""
    return write_blob_store(tmp_path_factory.mktemp("data") / "store")


@pytest.mark.parametrize("teacher_fp8", [False, True])
def test_pretrain_lowers_loss_and_resume_is_exact(toy_store, tmp_path, teacher_fp8):
    # teacher_fp8: the FP8 weight copies are rebuilt from the loaded EMA, so resuming stays exact.
    common = ["dataset=store", f"data_dir={toy_store}", *TINY, "objective=self_flow", "trainer.checkpoint_every=10",
              f"objective.teacher_fp8={str(teacher_fp8).lower()}"]
    straight = str(tmp_path / "straight")
    proc = run("pretrain", *common, "trainer.steps=20", f"run_dir={straight}", cwd=tmp_path)
    # video_prediction=auto: 192-value pixel patches into width 64 predict clean patches, no bottleneck warning
    assert "video_prediction=v with" not in proc.stderr
    assert json.load(open(os.path.join(straight, "checkpoints", "step_00000020", "config.json"))
                     )["model"]["video_prediction"] == "x"
    first = losses(straight)
    assert np.mean([first[s] for s in range(16, 21)]) < np.mean([first[s] for s in range(1, 6)])
    # Stop at 10, resume to 20: the same loss sequence as the uninterrupted run.
    split = str(tmp_path / "split")
    run("pretrain", *common, "trainer.steps=10", f"run_dir={split}", cwd=tmp_path)
    resume = "trainer.resume=true" if teacher_fp8 else "resume=true"  # both spellings the docs use
    run("pretrain", *common, "trainer.steps=20", f"run_dir={split}", resume, cwd=tmp_path)
    second = losses(split)
    for s in range(1, 21):
        assert second[s] == pytest.approx(first[s], rel=1e-5, abs=1e-6), s
    assert os.path.isfile(os.path.join(straight, "checkpoints", "step_00000020", "model.safetensors"))
    if not teacher_fp8:
        # Resume naming only the run: its model, data, objective and trainer settings come back
        # from the checkpoint (as LeRobot's --resume), so the continuation is still exact.
        bare = str(tmp_path / "bare")
        run("pretrain", *common, "trainer.steps=10", f"run_dir={bare}", cwd=tmp_path)
        proc = run("pretrain", f"run_dir={bare}", "resume=true", "trainer.steps=20", "logger.progress_bar=false",
                   cwd=tmp_path)
        assert "as in" in proc.stdout + proc.stderr and "settings that differ" not in proc.stderr
        resumed = json.load(open(os.path.join(bare, "checkpoints", "step_00000020", "config.json")))
        assert resumed["logger"]["wandb"] == "disabled"  # the run's logging, not the default (wandb auto)
        third = losses(bare)
        for s in range(1, 21):
            assert third[s] == pytest.approx(first[s], rel=1e-5, abs=1e-6), s


def test_finetune_from_pretrained_lowers_action_error(toy_store, tmp_path):
    from selfflow_robot.policies import Policy

    pre = str(tmp_path / "pre")
    run("pretrain", "dataset=store", f"data_dir={toy_store}", *TINY, "trainer.steps=5", f"run_dir={pre}", cwd=tmp_path)
    ft = str(tmp_path / "ft")
    run("finetune", "dataset=store", f"data_dir={toy_store}", *TINY, "trainer.steps=80", f"init={pre}",
        "validation.fraction=0.2", "trainer.checkpoint_every=80", f"run_dir={ft}", cwd=tmp_path)
    rows = [json.loads(line) for line in open(os.path.join(ft, "metrics.jsonl"))]
    val = [r for r in rows if "eval/val_action_mse" in r]
    assert val, rows[-3:]
    assert os.path.getsize(os.path.join(ft, "curves.png")) > 10_000  # drawn at the checkpoint
    # the action error of the trained EMA policy vs an untrained one, on the same clips
    from selfflow_robot.data import ClipDataset, EpisodeStore
    from selfflow_robot.models import build_model, load_checkpoint_model
    from selfflow_robot.train.loader import make_loader
    from selfflow_robot.validation import Validator

    model, config = load_checkpoint_model(ft)
    store = EpisodeStore(toy_store)
    from selfflow_robot.data import ActionNormalizer

    norm = ActionNormalizer.load(os.path.join(ft, "checkpoints", open(os.path.join(ft, "checkpoints", "latest")).read().strip(), "normalization.json"))
    clips = ClipDataset(store, context_frames=1, future_frames=2, frame_stride=2, action_chunk=6, image_size=(32, 32),
                        normalizer=norm)
    validator = Validator(make_loader(clips, 16, seed=3), 2, model.cfg, 0.2)
    trained = validator(model)["val_action_mse"]
    fresh = validator(build_model(model.cfg))["val_action_mse"]
    assert trained < 0.7 * fresh, (trained, fresh)
    # saved and reloaded policy gives identical actions
    obs = {"image": np.asarray(store.frames(0, np.array([0]))[0]), "instruction": "push the blob"}
    a = Policy.load(ft).infer(obs)["actions"]
    b = Policy.load(ft).infer(obs)["actions"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 2) and config["io"]["action_chunk"] == 6
    # resuming needs neither the run's overrides nor its init checkpoint (every weight is in the run's)
    import shutil

    shutil.rmtree(pre)
    run("finetune", f"run_dir={ft}", "resume=true", "trainer.steps=82", "logger.progress_bar=false", cwd=tmp_path)
    assert json.load(open(os.path.join(ft, "checkpoints", "step_00000082", "config.json")))["init"] == pre


def test_init_from_another_model_size_names_the_parameter(toy_store, tmp_path):
    pre = str(tmp_path / "pre")
    run("pretrain", "dataset=store", f"data_dir={toy_store}", *TINY, "trainer.steps=2", f"run_dir={pre}", cwd=tmp_path)
    proc = run("finetune", "dataset=store", f"data_dir={toy_store}", *TINY, "model.width=96", "model.heads=4",
               "trainer.steps=2", f"init={pre}", f"run_dir={tmp_path / 'ft'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "does not fit this model" in err and "mlp.fc1.weight: checkpoint (256, 64) vs model (384, 96)" in err
    assert re.search(r"the checkpoint is tiny \(depth \d+, width 64\), this run is tiny \(depth \d+, width 96\)", err)
    assert "more\n" in err and len(err.splitlines()) < 20  # capped, not one line per parameter


def test_bad_patch_size_is_named(toy_store, tmp_path):
    proc = run("pretrain", "dataset=store", f"data_dir={toy_store}", *TINY, "model.patch_size=5", "trainer.steps=1",
               f"run_dir={tmp_path / 'r'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "patch_size" in proc.stderr
    proc = run("pretrain", "dataset=store", f"data_dir={toy_store}", *TINY, "model.video_prediction=v",
               "trainer.steps=1", f"run_dir={tmp_path / 'v'}", cwd=tmp_path)
    assert "model.video_prediction=v with 192-value patches into width 64" in proc.stderr  # the bottleneck warning
    proc = run("finetune", "dataset=store", f"data_dir={toy_store}", *TINY, "clip.action_chunk=0", "trainer.steps=1",
               f"run_dir={tmp_path / 'a'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: clip.action_chunk=0: a video-action model needs at least one" in proc.stderr


def test_trained_frame_size_keeps_the_data_aspect_ratio():
    from selfflow_robot.jobs import _clip_image_size

    assert _clip_image_size(None, [128, 160], 8, 1) == (64, 80)  # RT-1's 4:5, not squashed to 64x64
    assert _clip_image_size(None, [128, 128], 8, 1) == (64, 64)
    assert _clip_image_size(None, [32, 40], 8, 1) == (32, 40)  # small data is not upscaled
    assert _clip_image_size(None, [128, 320], 8, 2) == (64, 160)  # two tiled views: whole patches per view
    assert _clip_image_size([48, 64], [96, 128], 16, 1) == (48, 64)
    with pytest.warns(UserWarning, match=r"clip.image_size=\[64, 64\] squashes the stored 128x160 frames"):
        _clip_image_size([64, 64], [128, 160], 8, 1)
    with pytest.warns(UserWarning, match=r"frames of 64x64 with model.patch_size 8 x the autoencoder's downsample 8 "
                                         r"= 64 give 1 token\(s\) per frame"):
        _clip_image_size(None, [64, 64], 64, 1, "model.patch_size 8 x the autoencoder's downsample 8 = 64")


def test_a_clip_longer_than_every_episode_is_refused():
    from types import SimpleNamespace

    from selfflow_robot.jobs import _check_clip_fits

    class Store:
        lengths = np.array([8, 12])

        def __len__(self):
            return 2

    clip = SimpleNamespace(action_chunk=6, future_frames=2, frame_stride=2)
    _check_clip_fits(clip, Store(), finetune=True)
    with pytest.raises(ValueError, match="clip.action_chunk=13 is longer than every episode .the longest has 12"):
        _check_clip_fits(SimpleNamespace(action_chunk=13, future_frames=2, frame_stride=2), Store(), finetune=True)
    _check_clip_fits(SimpleNamespace(action_chunk=13, future_frames=2, frame_stride=2), Store(), finetune=False)
    with pytest.warns(UserWarning, match="reaches 12 steps ahead, past the end of every episode"):
        _check_clip_fits(SimpleNamespace(action_chunk=6, future_frames=6, frame_stride=2), Store(), finetune=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow writes the RLDS fixture")
def test_finetune_rt1_format_end_to_end(tmp_path):
    from selfflow_robot.data.synthetic_rt1 import write_fractal_rlds

    builder = write_fractal_rlds(str(tmp_path / "rlds"), num_episodes=4, steps=10)
    out = str(tmp_path / "rt1run")
    proc = run("finetune", "dataset=rt1", f"data_dir={builder}", *TINY, "dataset.image_size=[32,40]",
               "clip.image_size=null", "trainer.steps=4", f"run_dir={out}", cwd=tmp_path,
               env_extra={"SELFFLOW_DATA_CACHE": str(tmp_path / "cache")})
    assert "squashes" not in proc.stderr
    config = json.load(open(os.path.join(out, "checkpoints", "step_00000004", "config.json")))
    norm = json.load(open(os.path.join(out, "checkpoints", "step_00000004", "normalization.json")))
    assert config["io"]["action_dim"] == 7 and config["io"]["fps"] == 3
    # clip.image_size=null trains at the data's 4:5 aspect, and the policy knows the data's frame size
    assert config["io"]["image_size"] == [32, 40] and config["io"]["data_image_size"] == [32, 40]
    assert norm["action"]["mask"] == [True] * 6 + [False]


def test_bench_params_xl(tmp_path):
    proc = run("bench", "params", "model=xl", cwd=tmp_path)
    n = int(next(line for line in proc.stdout.splitlines() if line.startswith("params:")).split()[1])
    assert 665e6 <= n <= 685e6


def test_sampler_modes_and_world_model():
    from selfflow_robot.models import build_model
    from selfflow_robot.sampling import ActionSampler, predict_video

    torch.manual_seed(0)
    model = build_model("tiny", action_dim=3, frame_stride=2)
    io = {"image_size": [16, 24], "context_frames": 2, "future_frames": 2, "frame_stride": 2, "action_chunk": 5,
          "action_dim": 3}
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    joint = ActionSampler(model, {"io": io}, steps=3, mode="joint")(img, "open drawer")
    assert joint["actions"].shape == (5, 3) and joint["video"].shape == (2, 16, 24, 3)
    fast = ActionSampler(model, {"io": io}, steps=3)(img, "open drawer")
    assert fast["video"] is None and np.isfinite(fast["actions"]).all()
    ctx = torch.randint(0, 256, (2, 1, 16, 24, 3), dtype=torch.uint8)
    frames = predict_video(model, ctx, "open drawer", 3, actions=torch.zeros(2, 5, 3), steps=2)
    assert frames.shape == (2, 3, 16, 24, 3) and frames.dtype == torch.uint8
    with pytest.raises(ValueError, match="io"):
        ActionSampler(build_model("tiny"), {}, steps=2)


def test_frozen_autoencoder_train_and_use(toy_store, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from selfflow_robot.models import load_checkpoint_model

    ae_dir = str(tmp_path / "ae")
    run("autoencoder", "dataset=store", f"data_dir={toy_store}", f"out={ae_dir}", "image_size=[32,32]", "downsample=4",
        "width=16", "trainer.steps=6", "trainer.batch_size=8", "trainer.num_workers=0", "logger.wandb=disabled",
        f"run_dir={tmp_path / 'ae_run'}", cwd=tmp_path)
    ae = load_file(os.path.join(ae_dir, "model.safetensors"))
    pre = str(tmp_path / "pre")
    run("pretrain", "dataset=store", f"data_dir={toy_store}", *TINY, f"model.autoencoder={ae_dir}", "model.patch_size=2",
        "trainer.steps=3", f"run_dir={pre}", cwd=tmp_path)
    # 36 pixels is a whole number of 4-pixel (downsample) latents, not of 2 x 4 = 8-pixel patches: refused up front
    tiny = [a for a in TINY if not a.startswith("clip.image_size")]
    proc = run("pretrain", "dataset=store", f"data_dir={toy_store}", *tiny, "clip.image_size=[32,36]",
               f"model.autoencoder={ae_dir}", "model.patch_size=2", "trainer.steps=1", f"run_dir={tmp_path / 'odd'}",
               cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "clip.image_size=[32, 36] is not divisible by model.patch_size 2 x the autoencoder's downsample 4 = 8" in proc.stderr
    shutil.rmtree(ae_dir)  # the checkpoint carries the frozen weights: it loads without the directory
    model, config = load_checkpoint_model(pre)
    assert config["model"]["in_channels"] == 4 and config["model"]["autoencoder"]["downsample"] == 4
    for k, v in ae.items():  # frozen: unchanged by training
        torch.testing.assert_close(model.autoencoder.state_dict()[k], v)
    tok = model.frames_to_tokens(torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8))
    assert tok.shape == (1, 1, 4, 4, 2 * 2 * 4)
    assert model.tokens_to_frames(tok).shape == (1, 1, 32, 32, 3)


def test_world_model_rollout_video(toy_store, tmp_path):
    import imageio.v2 as imageio
    import imageio_ffmpeg

    ft = str(tmp_path / "ft")
    run("finetune", "dataset=store", f"data_dir={toy_store}", *TINY, "trainer.steps=2", f"run_dir={ft}",
        "model.video_prediction=x", cwd=tmp_path)
    one = run("predict", f"policy={ft}", f"out={tmp_path / 'roll.mp4'}", "chunks=2", "steps=3", cwd=tmp_path)
    assert re.search(r"episode 0: wrote 4 frames .* PSNR [0-9.]+ dB", one.stdout)
    several = run("predict", f"policy={ft}", f"out={tmp_path / 'roll.gif'}", "chunks=2", "steps=3", "sampler=sde",
                  "episode=[0,3]", cwd=tmp_path)
    assert "mean PSNR over 2 episodes" in several.stdout
    frames = imageio.mimread(str(tmp_path / "roll_ep3.gif"))
    # 2 chunks x 2 frames, prediction | recorded, 32x32 frames upscaled 8x to min_height 256
    assert len(frames) == 4 and frames[0].shape[:2] == (256, 512)
    n_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "roll.mp4"))
    assert n_frames == 4
    bad = run("predict", f"policy={ft}", "episode=[0,99]", f"out={tmp_path / 'bad.mp4'}", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "error: episode=99: the store has episodes 0..5" in bad.stderr
    assert not list(tmp_path.glob("bad*"))  # checked before episode 0 was rolled out
    late = run("predict", f"policy={ft}", "start=10", cwd=tmp_path, check=False)  # step 12 is past the end
    assert late.returncode == 1 and "error: start=10: episode 0 has 12 steps and frames are 2 apart, so start " \
                                    "must be in 0..9" in late.stderr
    edge = run("predict", f"policy={ft}", "start=9", "chunks=1", "steps=2", f"data_dir={toy_store}",
               f"out={tmp_path / 'edge.gif'}", cwd=tmp_path)  # data_dir: another store of the same kind
    assert "episode 0: wrote 1 frames" in edge.stdout
    none = run("predict", f"policy={ft}", "chunks=0", cwd=tmp_path, check=False)
    assert none.returncode == 1 and "error: chunks=0: must be at least 1" in none.stderr
    # 12 steps, chunks of 2 frames 2 steps apart (steps 2,4 | 6,8 | 10,12): step 12 has no recording
    long = run("predict", f"policy={ft}", f"out={tmp_path / 'long.gif'}", "chunks=50", "steps=2", cwd=tmp_path)
    assert "wrote 5 frames" in long.stdout and "the episode ended before the last chunk" in long.stdout


def test_accumulation_resume_and_tiny_micro_batches(toy_store, tmp_path):
    """Micro-batches of 1 under accumulation: some lack a loss term (no valid future frame or only
    given actions), which the logged metrics must survive; a bare resume keeps the run's
    accumulation; frames-free clips are refused."""
    ft = str(tmp_path / "ft")
    common = ["dataset=store", f"data_dir={toy_store}", *TINY, "trainer.grad_accum_steps=8",
              "objective.forward_dynamics_fraction=0.5", "objective.action_only_fraction=0"]
    run("finetune", *common, "trainer.steps=4", f"run_dir={ft}", cwd=tmp_path)
    run("finetune", f"run_dir={ft}", "resume=true", "trainer.steps=5", "logger.progress_bar=false", cwd=tmp_path)
    assert max(losses(ft)) == 5
    pre = str(tmp_path / "pre")  # batch 1: a clip without any future frame left no gradient to take
    run("pretrain", "dataset=store", f"data_dir={toy_store}", *[a for a in TINY if "batch_size" not in a],
        "trainer.batch_size=1", "objective=flow_matching", "trainer.steps=12", f"run_dir={pre}", cwd=tmp_path)
    proc = run("finetune", "dataset=store", f"data_dir={toy_store}", *TINY, "clip.future_frames=0",
               f"run_dir={tmp_path / 'none'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "error: clip.future_frames=0: the model generates at least one" in proc.stderr
