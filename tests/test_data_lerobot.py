"""LeRobotDataset folders (v2.1 per-episode files, images or video; v3.0 shared files, h264 or AV1)
read into the episode store: frames aligned to rows, actions, state, tasks, names; bad data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfflow_robot.cli import compose
from selfflow_robot.data import DataError, open_store
from selfflow_robot.data.lerobot import LeRobotReader, convert_lerobot
from selfflow_robot.data.synthetic_lerobot import LENGTHS, TASKS, brightness, write_v21, write_v30

pytest.importorskip("pyarrow")

LAYOUTS = {
    "v2.1-video": lambda root: write_v21(root),
    "v2.1-images": lambda root: write_v21(root, video=False),
    "v2.1-image-files": lambda root: write_v21(root, video=False, image_files=True),
    "v3.0-h264": lambda root: write_v30(root),
    "v3.0-av1": lambda root: write_v30(root, codec="libsvtav1"),  # LeRobot's default codec
}


def _dataset_cfg(root, store, *extra):
    return compose("data", ["dataset=lerobot", f"data_dir={root}", f"dataset.store_dir={store}",
                            "dataset.progress=false", *extra]).dataset


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lerobot_dataset_becomes_a_store(tmp_path, layout):
    root = LAYOUTS[layout](str(tmp_path / "ds"))
    store = open_store(_dataset_cfg(root, tmp_path / "store", "dataset.image_size=[32,40]"))
    assert len(store) == 3 and list(store.lengths) == list(LENGTHS)
    assert store.meta["action_names"] == ["x", "y", "gripper"] and store.meta["fps"] == 10
    assert store.meta["camera"] == "observation.images.top" and store.meta["image_shape"] == [32, 40, 3]
    for e, n in enumerate(LENGTHS):
        ep = store.episode(e)
        assert ep["key"] == f"episode_{e:06d}" and ep["instruction"] == TASKS[e % 2]
        np.testing.assert_array_equal(ep["actions"][:, 0], 100 * e + np.arange(n))
        np.testing.assert_array_equal(ep["state"][:, 0], -np.arange(n))
        # the frame shown at each row's timestamp: brightness steps of 8 per frame, 3 per episode
        means = ep["images"].reshape(n, -1).mean(1)
        assert np.abs(means - [brightness(e, k) for k in range(n)]).max() < 1.5, (e, means)


def test_native_size_and_choices(tmp_path):
    root = write_v30(str(tmp_path / "ds"))
    reader = LeRobotReader(root, state_key=None)
    assert reader.image_shape == (64, 80, 3) and reader.state_dim == 0
    first = next(reader.episodes())
    assert first["images"].shape == (LENGTHS[0], 64, 80, 3) and first["state"] is None
    with pytest.raises(DataError, match=r"info.json.*camera 'observation.images.wrist' .*observation.images.top"):
        LeRobotReader(root, camera="observation.images.wrist")
    with pytest.raises(DataError, match="no action feature 'actions'"):
        LeRobotReader(root, action_key="actions")
    with pytest.raises(FileNotFoundError, match="no meta/info.json"):
        LeRobotReader(str(tmp_path))


def test_bad_video_names_file_and_episode_and_skip_keeps_the_rest(tmp_path):
    root = write_v21(str(tmp_path / "ds"))
    bad = Path(root) / "videos/chunk-000/observation.images.top/episode_000001.mp4"
    bad.write_bytes(b"not an mp4")
    with pytest.raises(DataError, match="episode 1"):
        list(LeRobotReader(root).episodes())
    reader = LeRobotReader(root, on_error="skip")
    assert [ep["key"] for ep in reader.episodes()] == ["episode_000000", "episode_000002"]
    assert len(reader.skips) == 1 and "episode 1" in reader.skips.items[0]
    bad.unlink()
    with pytest.raises(DataError, match=r"file .*episode_000001.mp4, episode 1, field 'observation.images.top': "
                                        r"video file missing"):
        list(LeRobotReader(root).episodes())


def test_conversion_resumes_without_duplicates(tmp_path):
    root = write_v30(str(tmp_path / "ds"))
    out = str(tmp_path / "store")
    first = convert_lerobot(LeRobotReader(root, image_size=(16, 20)), out, {"source": "lerobot"}, max_episodes=2,
                            progress=False)
    again = convert_lerobot(LeRobotReader(root, image_size=(16, 20)), out, {"source": "lerobot"}, progress=False)
    assert (first["episodes"], first["added"], again["episodes"], again["added"]) == (2, 2, 3, 1)


def test_finetune_on_a_two_camera_lerobot_dataset_and_serve_the_policy(tmp_path):
    from selfflow_robot.policies import Policy
    from selfflow_robot.policies.policy import ObservationError

    root = write_v30(str(tmp_path / "ds"), wrist=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
           "SELFFLOW_DATA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "selfflow_robot.finetune", "dataset=lerobot", f"data_dir={root}",
           "dataset.image_size=[32,32]", "dataset.camera=[observation.images.top,observation.images.wrist]",
           "model=tiny", "model.video_prediction=x", "trainer.steps=2", "trainer.batch_size=4", "trainer.num_workers=0",
           "logger.wandb=disabled",
           "logger.progress_bar=false", "clip.action_chunk=3", "validation.fraction=0", f"run_dir={tmp_path / 'ft'}"]
    bad = subprocess.run([*cmd, "clip.image_size=[32,40]"], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert bad.returncode != 0 and "tiles 2 camera views side by side" in bad.stderr, bad.stderr[-2000:]
    r = subprocess.run([*cmd, "clip.image_size=[32,64]"], capture_output=True, text=True, timeout=600, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    policy = Policy.load(tmp_path / "ft", sampler_steps=2)
    assert policy.metadata["views"] == ["observation.images.top", "observation.images.wrist"]
    obs = policy.example_observation()
    assert obs["image"].shape == (32, 32, 3) and obs["images"]["observation.images.wrist"].shape == (32, 32, 3)
    scene, wrist = np.zeros((64, 80, 3), np.uint8), np.zeros((48, 64, 3), np.uint8)  # any size: resized per view
    out = policy.infer({"image": scene, "images": {"wrist": wrist}, "state": np.zeros(2, np.float32)})
    assert out["actions"].shape == (3, 3) and np.isfinite(out["actions"]).all()
    with pytest.raises(ObservationError, match=r"sees 2 cameras.*'observation.images.wrist'"):
        policy.infer({"image": scene, "state": np.zeros(2, np.float32)})
    with pytest.raises(ObservationError, match="lacks camera 'observation.images.wrist'"):
        policy.infer({"image": scene, "images": {"top": wrist}, "state": np.zeros(2, np.float32)})
    shutil.rmtree(tmp_path / "cache")


def test_two_cameras_are_tiled_side_by_side(tmp_path):
    root = write_v30(str(tmp_path / "ds"), wrist=True)
    with pytest.raises(DataError, match="differ in size; set image_size"):
        LeRobotReader(root, camera=["observation.images.top", "observation.images.wrist"])
    with pytest.raises(DataError, match="cameras must be distinct"):
        LeRobotReader(root, camera=["observation.images.top", "observation.images.top"])
    store = open_store(_dataset_cfg(root, tmp_path / "store", "dataset.image_size=[32,40]",
                                    "dataset.camera=[observation.images.top,observation.images.wrist]"))
    assert store.meta["image_shape"] == [32, 80, 3]
    assert store.meta["views"] == ["observation.images.top", "observation.images.wrist"]
    from selfflow_robot.data.show import show_episode

    rec = show_episode(store, 0, str(tmp_path / "ep.gif"), min_height=32)
    assert rec["views"] == store.meta["views"] and rec["image_shape"] == [32, 80, 3]
    for e, n in enumerate(LENGTHS):
        images = store.episode(e)["images"].astype(np.float64)
        want = np.array([brightness(e, k) for k in range(n)])
        assert np.abs(images[:, :, :40].reshape(n, -1).mean(1) - want).max() < 1.5  # scene camera, left
        assert np.abs(images[:, :, 40:].reshape(n, -1).mean(1) - (255 - want)).max() < 1.5  # wrist camera, right


def test_synthetic_dataset_command_writes_a_readable_folder(tmp_path, capsys):
    """`python -m selfflow_robot.data.synthetic_lerobot OUT`: a LeRobot folder to try the path on
    (it had no command: running the module wrote nothing and said nothing)."""
    from selfflow_robot.data.synthetic_lerobot import main

    out = str(tmp_path / "ds")
    assert main([out, "--episodes", "4", "--steps", "5", "--wrist"]) == 0
    store = open_store(_dataset_cfg(out, tmp_path / "store", "dataset.camera=[observation.images.top,"
                                                             "observation.images.wrist]", "dataset.image_size=[32,40]"))
    assert len(store) == 4 and [int(x) for x in store.lengths] == [5] * 4
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([out])
    with pytest.raises(SystemExit):  # argparse: --wrist is a v3.0 layout
        main([str(tmp_path / "v21"), "--version", "v2.1", "--wrist"])


def test_a_lerobot_folder_changed_in_place_is_converted_again(tmp_path, monkeypatch):
    """`lerobot record --resume` adds episodes to the same folder: the cached store of the old
    contents was reused silently (same config, same hash)."""
    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(tmp_path / "cache"))
    root = str(tmp_path / "ds")
    cfg = compose("data", ["dataset=lerobot", f"data_dir={root}", "dataset.progress=false",
                           "dataset.image_size=[32,40]"]).dataset
    write_v30(root)
    first = open_store(cfg)
    assert len(first) == len(LENGTHS)
    shutil.rmtree(root)
    write_v30(root, lengths=(*LENGTHS, 6))
    second = open_store(cfg)
    assert len(second) == len(LENGTHS) + 1 and second.path != first.path
    assert open_store(cfg).path == second.path  # unchanged files: the same store, not a rebuild


def test_a_truncated_mp4_is_named_without_ffmpegs_banner(tmp_path):
    root = write_v30(str(tmp_path / "ds"), episodes_per_file=1)
    bad = Path(root) / "videos/observation.images.top/chunk-000/file-002.mp4"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        list(LeRobotReader(root).episodes())
    msg = str(e.value)
    assert msg.startswith(f"file {bad}, episode 2, field 'observation.images.top': cannot decode the video (")
    assert "truncated" in msg and "ffmpeg version" not in msg and "configuration" not in msg and "\n" not in msg


def test_a_camera_of_another_aspect_ratio_is_stretched_with_one_warning(tmp_path, caplog):
    root = write_v30(str(tmp_path / "ds"))  # 64x80 frames
    with caplog.at_level("WARNING", logger="selfflow_robot"):
        eps = list(LeRobotReader(root, image_size=(32, 32)).episodes())
    assert eps[0]["images"].shape[1:] == (32, 32, 3)
    warnings = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert len(warnings) == 1 and "64x80" in warnings[0] and "[32, 40]" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfflow_robot"):
        list(LeRobotReader(root, image_size=(32, 40)).episodes())  # same aspect: no word
    assert not [r for r in caplog.records if "stretched" in r.getMessage()]
