"""Video/image folders (action-free), the stats command, Hydra dataset configs, the bench."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from selfflow_robot.cli import compose
from selfflow_robot.data import ClipDataset, DataError, EpisodeStore, open_store
from selfflow_robot.data.video_folder import convert_video_folder, fit
from tests.data_fixtures import make_episode, write_store


def _folder(tmp_path):
    import imageio.v2 as imageio
    from PIL import Image

    root = tmp_path / "videos"
    (root / "seq").mkdir(parents=True)
    frames = [np.full((48, 64, 3), 10 * k, np.uint8) for k in range(20)]
    imageio.mimwrite(root / "a.mp4", frames, fps=10, macro_block_size=16)
    for k in range(5):
        Image.fromarray(np.full((40, 40, 3), 50 * k, np.uint8)).save(root / "seq" / f"{k:03d}.png")
    return root


def test_fit_centre_crops_then_resizes():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the centre square
    out = fit(img, (16, 16))
    assert out.shape == (16, 16, 3) and out.min() == 200


def test_video_folder_store(tmp_path):
    root = _folder(tmp_path)
    s = convert_video_folder(str(root), str(tmp_path / "st"), image_size=(32, 32), clip_frames=8, progress=False)
    assert s["episodes"] == 4 and s["files"] == 2
    store = EpisodeStore(tmp_path / "st")
    keys = [store.key(i) for i in range(len(store))]
    assert keys == ["a.mp4#0", "a.mp4#1", "a.mp4#2", "seq#0"]
    assert [store.episode_length(i) for i in range(4)] == [8, 8, 4, 5]
    assert store.meta["action_dim"] == 0 and store.actions(0).shape == (8, 0)
    np.testing.assert_allclose(store.frames(1, [0]).mean(), 80, atol=4)  # frame 8 of the video (10 * 8)
    np.testing.assert_array_equal(store.frames(3, [2])[0, 0, 0], [100, 100, 100])
    item = ClipDataset(store, context_frames=1, future_frames=2, action_chunk=4)[0]
    assert item["actions"].shape == (4, 0) and item["future"].shape == (2, 32, 32, 3)
    assert store.stats()["action"]["count"] == 25


def test_video_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        convert_video_folder(str(empty), str(tmp_path / "o1"), progress=False)
    root = _folder(tmp_path)
    (root / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="broken.mp4"):
        convert_video_folder(str(root), str(tmp_path / "o2"), image_size=(16, 16), progress=False)
    s = convert_video_folder(str(root), str(tmp_path / "o3"), image_size=(16, 16), on_error="skip", progress=False)
    assert s["skipped"] == 1 and "broken.mp4" in s["skipped_items"][0] and s["episodes"] == 2
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.mp4").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=str(only_bad)):
        convert_video_folder(str(only_bad), str(tmp_path / "o4"), on_error="skip", progress=False)


def test_unreadable_video_is_named_in_one_line_without_the_ffmpeg_banner(tmp_path):
    root = _folder(tmp_path)
    (root / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError) as err:
        convert_video_folder(str(root), str(tmp_path / "o"), image_size=(16, 16), progress=False)
    msg = str(err.value)
    assert "broken.mp4" in msg and "Invalid data found" in msg, msg  # the file and ffmpeg's reason
    assert "\n" not in msg and "ffmpeg version" not in msg and "configuration:" not in msg, msg


def test_truncated_faststart_mp4_is_corrupt_not_short(tmp_path):
    """A faststart mp4 (moov atom first) cut in half decodes without error up to the cut."""
    import imageio.v2 as imageio

    root = tmp_path / "videos"
    root.mkdir()
    rng = np.random.default_rng(0)  # noise: every frame takes about as many bytes
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(40)]
    imageio.mimwrite(root / "whole.mp4", frames, fps=10, macro_block_size=16,
                     output_params=["-movflags", "+faststart"])
    data = (root / "whole.mp4").read_bytes()
    assert data.index(b"moov") < 64  # right after ftyp
    (root / "cut.mp4").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.mp4.*truncated: decoded \d+ of 40 frames"):
        convert_video_folder(str(root), str(tmp_path / "o1"), image_size=(16, 16), clip_frames=8, progress=False)
    s = convert_video_folder(str(root), str(tmp_path / "o2"), image_size=(16, 16), clip_frames=8, on_error="skip",
                             progress=False)
    assert s["files"] == 1 and s["skipped"] == 1 and "cut.mp4" in s["skipped_items"][0]  # whole.mp4 is kept
    assert re.search(r"its first \d clip\(s\), decoded before this, are kept", s["skipped_items"][0])


@pytest.mark.parametrize("name", ["video_folder", "lerobot"])
def test_data_dir_mistakes_are_named_before_any_store_folder(tmp_path, monkeypatch, name):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(cache))
    with pytest.raises(ValueError, match="data_dir is not set: point it at") as err:
        open_store(compose("data", [f"dataset={name}"]).dataset)
    assert "None" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{tmp_path / 'nope'}' does not exist")):
        open_store(compose("data", [f"dataset={name}", f"data_dir={tmp_path / 'nope'}"]).dataset)
    if name == "lerobot":  # a folder, but not a dataset's
        with pytest.raises(FileNotFoundError, match="no meta/info.json"):
            open_store(compose("data", [f"dataset={name}", f"data_dir={tmp_path}"]).dataset)
    assert not cache.exists()  # no store folder, no .build.lock


def test_video_folder_config(tmp_path):
    root = _folder(tmp_path)
    cfg = compose("data", ["dataset=video_folder", f"data_dir={root}", f"dataset.store_dir={tmp_path / 'vf'}",
                           "dataset.image_size=[16,16]", "dataset.progress=false"]).dataset
    assert len(open_store(cfg)) == 2


def test_every_dataset_config_composes():
    for name in ("metaworld", "rt1", "bridge", "video_folder", "store", "lerobot"):
        cfg = compose("data", [f"dataset={name}", "data_dir=/some/where"]).dataset
        assert cfg.source in ("metaworld", "rlds", "video_folder", "store", "lerobot")
        assert cfg.normalization.mode == "q99"
    assert compose("data", ["dataset=rt1", "data_dir=/x"]).dataset.data_dir == "/x"


def test_store_path_hashes_on_error_skip_only(tmp_path, monkeypatch):
    """on_error=skip gets a store of its own; the default (raise) adds nothing to the hash."""
    from omegaconf import OmegaConf

    from selfflow_robot.data import store_path

    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(tmp_path))
    for name in ("lerobot", "video_folder", "rt1"):
        cfg = compose("data", [f"dataset={name}", "data_dir=/some/where"]).dataset
        without = OmegaConf.to_container(cfg, resolve=True)
        without.pop("on_error", None)
        assert store_path(cfg) == store_path(without), name
        skip = compose("data", [f"dataset={name}", "data_dir=/some/where", "dataset.on_error=skip"]).dataset
        assert store_path(skip) != store_path(cfg), name
    mw = compose("data", ["dataset=metaworld"]).dataset
    assert store_path(mw) == store_path(dict(OmegaConf.to_container(mw, resolve=True), on_error="skip"))


def test_stats_command_prints_json(tmp_path):
    write_store(tmp_path / "s")
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data", "stats", "dataset=store",
                        f"data_dir={tmp_path / 's'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
    assert out["episodes"] == 3 and out["steps"] == 29 and out["action_dim"] == 4
    acts = np.concatenate([make_episode(t, i)["actions"] for i, t in enumerate((10, 7, 12))]).astype(np.float64)
    np.testing.assert_allclose(out["action"]["q99"], np.quantile(acts, 0.99, 0), rtol=1e-6)
    assert len(out["state"]["mean"]) == 2
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data", "stats", "dataset=store",
                        f"data_dir={tmp_path / 'nothing'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and str(tmp_path / "nothing") in r.stderr


def test_bench_runs_on_tiny_settings(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from selfflow_robot.data.bench import main

    recs = main({"data": {"rlds_episodes": 2, "rlds_steps": 5, "clips": 40, "batch_size": 8, "convert_workers": 2,
                          "lerobot_episodes": 2, "lerobot_steps": 4, "out": str(tmp_path / "b.jsonl")}})
    names = [r["bench"] for r in recs]
    assert names == ["data.rlds_read", "data.rlds_read_small", "data.convert", "data.convert_parallel",
                     "data.clips", "data.clips_resized", "data.clips_batched", "data.lerobot_convert"]
    assert all((r.get("frames_per_s") or r.get("clips_per_s")) > 0 for r in recs)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 8
    # null skips the resized case; a work_dir that does not exist yet is made
    recs = main({"data": {"rlds_episodes": 2, "rlds_steps": 5, "clips": 40, "batch_size": 8, "convert_workers": 1,
                          "lerobot_episodes": 0, "resize_image_size": None, "work_dir": str(tmp_path / "new" / "w")}})
    assert "data.clips_resized" not in [r["bench"] for r in recs] and (tmp_path / "new" / "w").is_dir()


def test_show_command_writes_video_and_plot(tmp_path):
    import imageio.v2 as imageio

    write_store(tmp_path / "s")
    out = tmp_path / "vids" / "ep.mp4"
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data", "show", "dataset=store", f"data_dir={tmp_path / 's'}",
                        "episode=[0,2]", f"out={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [(x["episode"], x["key"], x["instruction"], x["steps"]) for x in recs] == [(0, "ep0", "task 0", 10),
                                                                                     (2, "ep2", "task 2", 12)]
    for rec, n in zip(recs, (10, 12)):
        frames = imageio.mimread(rec["video"])
        assert len(frames) == n and frames[0].shape == (256, 256, 3)  # 32x32 upscaled 8x
        assert rec["plot"].endswith("_actions.png") and (tmp_path / "vids" / rec["plot"]).stat().st_size > 1000
    assert {p.name for p in (tmp_path / "vids").iterdir()} == {"ep_ep0.mp4", "ep_ep0_actions.png", "ep_ep2.mp4",
                                                               "ep_ep2_actions.png"}
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data", "show", "dataset=store", f"data_dir={tmp_path / 's'}",
                        "episode=3", f"out={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "episode=3" in r.stderr and "0..2" in r.stderr
    r = subprocess.run([sys.executable, "-m", "selfflow_robot.data", "show", "dataset=store", f"data_dir={tmp_path / 's'}",
                        "episode=0", f"out={tmp_path / 'ep.avi'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.startswith("error: out=") and ".mp4 or .gif" in r.stderr


def test_show_episode_of_an_action_free_store_has_no_plot(tmp_path):
    from selfflow_robot.data.show import show_episode

    convert_video_folder(str(_folder(tmp_path)), str(tmp_path / "st"), image_size=(32, 32), clip_frames=8,
                         progress=False)
    rec = show_episode(EpisodeStore(tmp_path / "st"), 0, str(tmp_path / "v.gif"), min_height=64)
    assert rec["plot"] is None and rec["fps"] > 0
    import imageio.v2 as imageio

    frames = imageio.mimread(rec["video"])
    assert len(frames) == rec["steps"] and frames[0].shape[:2] == (64, 64)


def test_upscale_repeats_pixels_by_an_integer_factor():
    from selfflow_robot.video import upscale

    frames = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)
    big = upscale(frames, 7)  # 3 rows -> factor 3 (9 >= 7)
    assert big.shape == (2, 9, 6, 3)
    np.testing.assert_array_equal(big[:, ::3, ::3], frames)
    assert upscale(frames, 3) is frames


def test_panel_labels_are_drawn_in_each_panel_only_at_the_top():
    from selfflow_robot.video import label_panels

    frames = np.full((2, 64, 128, 3), 127, np.uint8)
    out = label_panels(frames, ["prediction", "recorded"])
    assert out.shape == frames.shape and (frames == 127).all()  # the input is left alone
    for panel in (out[:, :16, :64], out[:, :16, 64:]):
        assert (panel == 0).any() and (panel > 200).any()  # a dark box with light text in each half
    assert (out[:, 20:] == 127).all()  # the picture below the label is untouched
