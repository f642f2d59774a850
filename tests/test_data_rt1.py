"""RT-1 (fractal20220817_data) through `dataset=rt1`: a real-schema RLDS fixture written by TF in a
child process, read here without TensorFlow; standardised actions, gripper, statistics, bad data."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import importlib.util

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tfrecord")
if importlib.util.find_spec("tensorflow") is None:  # only the fixture writer (a child process) needs it
    pytest.skip("tensorflow is needed to write the RLDS fixture", allow_module_level=True)

from selfflow_robot.cli import compose
from selfflow_robot.data import DataError, EpisodeStore, open_store
from selfflow_robot.data.rlds import RLDSMapping, RLDSReader, rel2abs_gripper, write_tfrecord
from selfflow_robot.data.rlds_convert import convert_rlds
from selfflow_robot.data.sources import make_normalizer
from selfflow_robot.data.synthetic_rt1 import fractal_episode, frame, write_fractal_rlds

# Hand-derived from GRIPPER_PATTERNS with the rel2abs rule (1 = open).
EXPECTED_GRIPPER = {0: [1, 1, 0, 0, 0, 0, 1, 1, 1, 1], 1: [1] * 10, 2: [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]}


@pytest.fixture(scope="module")
def builder_dir(tmp_path_factory):
    return write_fractal_rlds(str(tmp_path_factory.mktemp("rlds")), num_episodes=3, steps=10)


def rt1_cfg(builder_dir, store_dir, *extra):
    cfg = compose("data", ["dataset=rt1", f"data_dir={builder_dir}", f"dataset.store_dir={store_dir}",
                           "dataset.progress=false", *extra])
    return cfg.dataset


def test_rel2abs_rule():
    np.testing.assert_array_equal(rel2abs_gripper([0, 1, 0, -1, 0]), [1, 0, 0, 1, 1])
    np.testing.assert_array_equal(rel2abs_gripper([0, -1, 0, 1, 0]), [0, 1, 1, 0, 0])  # starts closed
    np.testing.assert_array_equal(rel2abs_gripper([0.1, -0.1, 0.0]), [1, 1, 1])  # |a| <= 0.1: no event
    for i, want in EXPECTED_GRIPPER.items():
        np.testing.assert_array_equal(rel2abs_gripper(fractal_episode(i)["action"]["gripper_closedness_action"]), want)


def test_rt1_standardised_store(builder_dir, tmp_path):
    cfg = rt1_cfg(builder_dir, tmp_path / "store", "dataset.image_size=null")
    assert cfg.data_dir == builder_dir
    store = open_store(cfg)
    assert len(store) == 3 and store.num_steps == 30
    assert store.meta["image_shape"] == [256, 320, 3] and store.meta["action_dim"] == 7
    assert store.meta["state_dim"] == 8 and store.meta["embedding_dim"] == 512 and store.meta["fps"] == 3
    assert store.meta["action_mask"] == [True] * 6 + [False]
    for i in range(3):
        ref = fractal_episode(i)
        ep = store.episode(i)
        assert ep["key"] == f"fractal20220817_data-train.tfrecord-00000-of-00001:{i}"
        assert ep["instruction"] == f"pick object {i}"
        want = np.concatenate([ref["action"]["world_vector"], ref["action"]["rotation_delta"],
                               np.array(EXPECTED_GRIPPER[i], np.float32)[:, None]], 1)
        np.testing.assert_allclose(ep["actions"], want, rtol=1e-6)
        np.testing.assert_allclose(ep["state"], np.concatenate([ref["observation"]["base_pose_tool_reached"],
                                                                ref["observation"]["gripper_closed"]], 1))
        np.testing.assert_allclose(ep["instruction_embedding"], ref["observation"]["natural_language_embedding"][0])
        err = np.abs(ep["images"].astype(int) - ref["observation"]["image"].astype(int)).mean()
        assert err < 3, f"decoded frames differ from the written ones by {err:.1f} levels"


def test_rt1_statistics_and_normalisation(builder_dir, tmp_path):
    store = open_store(rt1_cfg(builder_dir, tmp_path / "store"))
    assert store.meta["image_shape"] == [128, 160, 3]  # rt1.yaml stores 128x160 by default
    acts = np.concatenate([np.concatenate([fractal_episode(i)["action"]["world_vector"],
                                           fractal_episode(i)["action"]["rotation_delta"],
                                           np.array(EXPECTED_GRIPPER[i], np.float32)[:, None]], 1)
                           for i in range(3)]).astype(np.float64)
    st = store.stats()["action"]
    assert st["count"] == 30
    for name, ref in [("mean", acts.mean(0)), ("std", acts.std(0)), ("min", acts.min(0)), ("max", acts.max(0)),
                      ("q01", np.quantile(acts, 0.01, 0)), ("q99", np.quantile(acts, 0.99, 0))]:
        np.testing.assert_allclose(st[name], ref, rtol=1e-5, atol=1e-7, err_msg=name)
    assert st["mean"][6] == pytest.approx(23 / 30)  # 23 open steps of 30
    norm = make_normalizer(store, rt1_cfg(builder_dir, tmp_path / "store"))
    x = norm.normalize(acts)
    lo, hi = np.quantile(acts, 0.01, 0), np.quantile(acts, 0.99, 0)
    np.testing.assert_allclose(x[:, :6], np.clip(2 * (acts[:, :6] - lo[:6]) / (hi[:6] - lo[:6]) - 1, -1, 1), atol=1e-5)
    np.testing.assert_array_equal(x[:, 6], acts[:, 6])  # gripper left as is
    ref0 = frame(0, 0)
    small = store.frames(0, [0])[0].astype(int)
    from PIL import Image
    want = np.asarray(Image.fromarray(ref0).resize((160, 128), Image.BILINEAR)).astype(int)
    assert np.abs(small - want).mean() < 4


def test_reader_never_imports_tensorflow(builder_dir):
    code = ("import sys; from selfflow_robot.data.rlds import RLDSReader, RLDSMapping; from omegaconf import OmegaConf;"
            "m = RLDSMapping.from_config(OmegaConf.load('configs/dataset/rt1.yaml').rlds);"
            f"eps = list(RLDSReader({builder_dir!r}, m).episodes());"
            "print(len(eps), sum(len(e['actions']) for e in eps), 'tensorflow' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-3:] == ["3", "30", "False"]


def test_conversion_resumes_and_is_cached(builder_dir, tmp_path):
    mapping = RLDSMapping.from_config(compose("data", ["dataset=rt1"]).dataset.rlds)
    reader = RLDSReader(builder_dir, mapping, image_size=(32, 40))
    out = str(tmp_path / "conv")
    assert convert_rlds(reader, out, {}, max_episodes=1, progress=False)["added"] == 1  # "interrupted"
    s = convert_rlds(reader, out, {}, progress=False)
    assert s["added"] == 2 and s["episodes"] == 3
    store = EpisodeStore(out)
    assert sorted(store.key(i) for i in range(3)) == [f"fractal20220817_data-train.tfrecord-00000-of-00001:{i}"
                                                      for i in range(3)]
    cfg = rt1_cfg(builder_dir, tmp_path / "cached", "dataset.image_size=[32,40]")
    open_store(cfg)
    mtime = os.path.getmtime(tmp_path / "cached" / "index.json")
    open_store(cfg)
    assert os.path.getmtime(tmp_path / "cached" / "index.json") == mtime


def test_generic_mapping_other_keys(builder_dir):
    """Another dataset's layout is only a different mapping: no embedding, no state, an
    absolute gripper stored as 1 = closed (inverted), a scalar terminate flag."""
    m = RLDSMapping.from_config({"image": "steps/observation/image", "instruction": None,
                                 "actions": ["steps/action/world_vector", "steps/observation/gripper_closed"],
                                 "gripper_index": 3, "gripper": "invert", "terminate": "steps/is_last",
                                 "state": []})
    reader = RLDSReader(builder_dir, m, image_size=(16, 20))
    assert reader.action_dim == 4 and reader.state_dim == 0 and reader.embedding_dim == 0
    ep = next(iter(reader.episodes()))
    ref = fractal_episode(0)
    np.testing.assert_allclose(ep["actions"][:, :3], ref["action"]["world_vector"])
    np.testing.assert_allclose(ep["actions"][:, 3], 1 - ref["observation"]["gripper_closed"][:, 0], rtol=1e-6)
    assert ep["state"] is None and ep["instruction"] == "" and ep["instruction_embedding"] is None
    np.testing.assert_array_equal(ep["terminate"], np.arange(10) == 9)
    assert ep["images"].shape == (10, 16, 20, 3)
    with pytest.raises(ValueError, match="no feature 'steps/action/nope'"):
        RLDSReader(builder_dir, RLDSMapping(actions=["steps/action/nope"]))
    # a misspelt key names the likely one and what its parent holds
    with pytest.raises(ValueError, match=r"no feature 'steps/observation/imagex' \(did you mean "
                                         r"'steps/observation/image'\?\); steps/observation/ holds .*\bimage\b"):
        RLDSReader(builder_dir, RLDSMapping(image="steps/observation/imagex"))
    with pytest.raises(ValueError, match="unknown RLDS mapping keys"):
        RLDSMapping.from_config({"actoins": []})


def test_rt1_terminate_flag(builder_dir):
    mapping = RLDSMapping.from_config(compose("data", ["dataset=rt1"]).dataset.rlds)
    ep = next(iter(RLDSReader(builder_dir, mapping, image_size=(16, 20)).episodes()))
    np.testing.assert_array_equal(ep["terminate"], np.arange(10) == 9)  # one-hot [1, 0, 0] on the last step


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        open_store(compose("data", ["dataset=rt1"]).dataset)
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        RLDSReader(str(tmp_path), RLDSMapping())


# -- bad data -------------------------------------------------------------------------------

def _tiny_jpeg():
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _edit(kind):
    """Return a function that breaks one tf.train.Example (record 1) in the way `kind` says."""
    def edit(ex):
        f = ex.features.feature
        if kind == "missing":
            del f["steps/action/rotation_delta"]
        elif kind == "misshapen":
            del f["steps/action/world_vector"].float_list.value[-1]
        elif kind == "nan":
            f["steps/action/world_vector"].float_list.value[4] = float("nan")
        elif kind == "empty":
            for k in list(f):
                if k.startswith("steps/"):
                    f[k].ClearField(f[k].WhichOneof("kind"))
        elif kind == "bad_image":
            f["steps/observation/image"].bytes_list.value[3] = _tiny_jpeg()
    return edit


CASES = [("corrupt", None, "data checksum mismatch"),
         ("missing", "steps/action/rotation_delta", "missing feature"),
         ("misshapen", "steps/action/world_vector", "misshapen: 29 values for 10 steps"),
         ("nan", "steps/action/world_vector", "non-finite value at step 1, dim 1"),
         ("empty", "steps/observation/image", "empty episode"),
         ("bad_image", "steps/observation/image", "step 3: image is 10x10, expected 256x320")]


@pytest.mark.parametrize("kind,field,message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_raises_or_is_skipped(builder_dir, tmp_path, capsys, kind, field, message):
    from tfrecord import example_pb2

    from selfflow_robot.data.rlds import read_tfrecord

    bad = tmp_path / "bad"
    shutil.copytree(builder_dir, bad)
    shard = glob.glob(str(bad / "*.tfrecord-*"))[0]
    records = [r for _, r in read_tfrecord(shard)]
    if kind == "corrupt":  # flip one byte inside record 1's data (its checksum no longer matches)
        with open(shard, "r+b") as f:
            f.seek(12 + len(records[0]) + 4 + 12 + len(records[1]) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        ex = example_pb2.Example()
        ex.ParseFromString(records[1])
        _edit(kind)(ex)
        records[1] = ex.SerializeToString()
        write_tfrecord(shard, records)
    name = os.path.basename(shard)
    with pytest.raises(DataError) as e:
        open_store(rt1_cfg(str(bad), tmp_path / "raise", "dataset.image_size=[32,40]"))
    msg = str(e.value)
    assert message in msg and f"{name}:1" in msg and f"file {bad}" in msg, msg
    if field:
        assert f"field '{field}'" in msg, msg
    store = open_store(rt1_cfg(str(bad), tmp_path / "skip", "dataset.image_size=[32,40]", "dataset.on_error=skip"))
    kept = [store.key(i).split(":")[1] for i in range(len(store))]
    assert kept == ["0", "2"]
    summary = json.loads((tmp_path / "skip" / "conversion.json").read_text())["summary"]
    assert summary["skipped"] == 1 and message in summary["skipped_items"][0]
    assert "skipped 1 episodes" in capsys.readouterr().err



def _split_shards(builder_dir, dst, edit_record=None):
    """The fixture re-sharded into 2 files (records 0, 1 | 2); optionally break one record."""
    from tfrecord import example_pb2

    from selfflow_robot.data.rlds import read_tfrecord

    shutil.copytree(builder_dir, dst)
    shard = glob.glob(str(dst / "*.tfrecord-*"))[0]
    records = [r for _, r in read_tfrecord(shard)]
    if edit_record is not None:
        ex = example_pb2.Example()
        ex.ParseFromString(records[edit_record])
        _edit("nan")(ex)
        records[edit_record] = ex.SerializeToString()
    os.remove(shard)
    base = str(dst / "fractal20220817_data-train.tfrecord-")
    write_tfrecord(base + "00000-of-00002", records[:2])
    write_tfrecord(base + "00001-of-00002", records[2:])


def test_parallel_conversion_matches_sequential(builder_dir, tmp_path):
    _split_shards(builder_dir, tmp_path / "two")
    seq = open_store(rt1_cfg(str(tmp_path / "two"), tmp_path / "seq", "dataset.image_size=[32,40]"))
    par = open_store(rt1_cfg(str(tmp_path / "two"), tmp_path / "par", "dataset.image_size=[32,40]",
                             "dataset.workers=2"))
    assert len(par) == len(seq) == 3
    by_key = {seq.key(i): seq.episode(i) for i in range(3)}
    for i in range(3):
        ep = par.episode(i)
        ref = by_key[ep["key"]]
        np.testing.assert_array_equal(ep["images"], ref["images"])
        np.testing.assert_array_equal(ep["actions"], ref["actions"])
        assert ep["instruction"] == ref["instruction"]
    ps, ss = par.stats()["action"], seq.stats()["action"]  # episode order differs: equal up to rounding
    for k in ("mean", "std", "min", "max", "q01", "q99"):
        np.testing.assert_allclose(ps[k], ss[k], rtol=1e-12, err_msg=k)


def test_parallel_conversion_bad_data(builder_dir, tmp_path):
    _split_shards(builder_dir, tmp_path / "two", edit_record=2)
    with pytest.raises(DataError, match="00001-of-00002:0.*world_vector.*non-finite"):
        open_store(rt1_cfg(str(tmp_path / "two"), tmp_path / "r", "dataset.image_size=[32,40]", "dataset.workers=2"))
    store = open_store(rt1_cfg(str(tmp_path / "two"), tmp_path / "s", "dataset.image_size=[32,40]",
                               "dataset.workers=2", "dataset.on_error=skip"))
    assert len(store) == 2
    assert json.loads((tmp_path / "s" / "conversion.json").read_text())["summary"]["skipped"] == 1


def test_terminate_as_action_dimension(builder_dir):
    """RT-1's terminate one-hot can be learned as an 8th, unnormalised action dimension."""
    from omegaconf import OmegaConf

    from selfflow_robot.cli import CONFIG_DIR

    mapping = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/dataset/rt1.yaml"))["rlds"]
    reader = RLDSReader(builder_dir, RLDSMapping.from_config(dict(mapping, terminate_as_action=True)))
    assert reader.action_dim == 8
    ep = next(iter(reader.episodes()))
    assert ep["actions"].shape == (10, 8)
    np.testing.assert_array_equal(ep["actions"][:, 7], (np.arange(10) == 9).astype(np.float32))


def test_two_cameras_are_tiled_side_by_side(tmp_path):
    from selfflow_robot.data.synthetic_rt1 import wrist_frame

    builder = write_fractal_rlds(str(tmp_path / "rlds"), num_episodes=2, steps=4, wrist=True)
    cams = "[steps/observation/image,steps/observation/wrist_image]"
    with pytest.raises(ValueError, match="differ in size"):
        open_store(rt1_cfg(builder, tmp_path / "native", "dataset.image_size=null", f"dataset.rlds.image={cams}"))
    store = open_store(rt1_cfg(builder, tmp_path / "store", "dataset.image_size=[64,80]", f"dataset.rlds.image={cams}"))
    assert store.meta["image_shape"] == [64, 160, 3]
    assert store.meta["views"] == ["steps/observation/image", "steps/observation/wrist_image"]
    from PIL import Image

    def small(img):
        return np.asarray(Image.fromarray(img).resize((80, 64), Image.BILINEAR)).astype(np.float64)

    images = store.episode(1)["images"].astype(np.float64)
    for k in range(4):  # scene camera left, wrist camera right (JPEG and resize tolerance)
        assert np.abs(images[k, :, :80] - small(frame(1, k))).mean() < 6
        assert np.abs(images[k, :, 80:] - small(wrist_frame(1, k))).mean() < 6


# -- store identity, truncated shards, data_dir mistakes, the fixture writer -----------------

def _copy_builder(builder_dir, dst):
    """A copy of the fixture (3 episodes in one shard): (shard path, its raw records)."""
    from selfflow_robot.data.rlds import read_tfrecord

    shutil.copytree(builder_dir, dst)
    shard = glob.glob(str(dst / "*.tfrecord-*"))[0]
    return shard, [r for _, r in read_tfrecord(shard)]


def _truncate(shard, records, keep):
    """Cut the shard 20 bytes into record `keep`, as a partly copied file ends."""
    os.truncate(shard, sum(12 + len(r) + 4 for r in records[:keep]) + 20)


def cache_cfg(data_dir, *extra):
    """dataset=rt1 with its store in the cache ($SELFFLOW_DATA_CACHE), named by the hash."""
    return compose("data", ["dataset=rt1", f"data_dir={data_dir}", "dataset.progress=false",
                            "dataset.image_size=[16,20]", *extra]).dataset


def test_store_identity_follows_on_error_and_source_files(builder_dir, tmp_path, monkeypatch):
    from selfflow_robot.data import store_path

    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shard, records = _copy_builder(builder_dir, src)
    good = tmp_path / "good_shard"
    shutil.copy(shard, good)
    _truncate(shard, records, keep=1)
    skip_store = open_store(cache_cfg(src, "dataset.on_error=skip"))
    assert len(skip_store) == 1
    shutil.copy(good, shard)  # the good shard is back: a new store, not the skip one
    store = open_store(cache_cfg(src))
    assert len(store) == 3 and store.path != skip_store.path
    assert store_path(cache_cfg(src, "dataset.on_error=skip")) != store.path  # same files, other policy
    assert store_path(cache_cfg(src)) == store.path  # unchanged files: the same store
    write_tfrecord(shard, records[:2])  # regenerated with 2 episodes at the same data_dir
    info = json.loads((src / "dataset_info.json").read_text())
    info["splits"][0]["shardLengths"] = ["2"]
    (src / "dataset_info.json").write_text(json.dumps(info))
    assert len(open_store(cache_cfg(src))) == 2


def test_reopening_a_store_built_with_skips_warns(builder_dir, tmp_path, recwarn):
    shard, records = _copy_builder(builder_dir, tmp_path / "src")
    _truncate(shard, records, keep=1)
    cfg = rt1_cfg(str(tmp_path / "src"), tmp_path / "store", "dataset.image_size=[16,20]", "dataset.on_error=skip")
    assert len(open_store(cfg)) == 1
    assert not recwarn.list  # the build itself printed its report
    with pytest.warns(UserWarning, match=r"built with on_error=skip: 2 episodes were skipped.*conversion.json"):
        assert len(open_store(cfg)) == 1


def test_explicit_store_dir_warns_when_the_source_changed(builder_dir, tmp_path):
    shard, records = _copy_builder(builder_dir, tmp_path / "src")
    cfg = rt1_cfg(str(tmp_path / "src"), tmp_path / "store", "dataset.image_size=[16,20]")
    assert len(open_store(cfg)) == 3
    write_tfrecord(shard, records[:2])
    os.utime(shard, (1, 1))  # an mtime surely different from the conversion's
    with pytest.warns(UserWarning, match="converted from other files.*delete it to convert again"):
        assert len(open_store(cfg)) == 3  # store_dir is the user's: kept, but not silently


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_shard_counts_every_lost_episode(builder_dir, tmp_path, capsys, workers):
    shard, records = _copy_builder(builder_dir, tmp_path / "src")
    name = os.path.basename(shard)
    _truncate(shard, records, keep=1)  # record 1 cut short: 1 and 2 are lost (shardLengths: 3)
    with pytest.raises(DataError, match=rf"{name}:1: truncated record.*ended after 1 of 3 episodes.*2 episodes lost"):
        open_store(rt1_cfg(str(tmp_path / "src"), tmp_path / "r", "dataset.image_size=[16,20]"))
    store = open_store(rt1_cfg(str(tmp_path / "src"), tmp_path / "s", "dataset.image_size=[16,20]",
                               "dataset.on_error=skip", f"dataset.workers={workers}"))
    assert len(store) == 1
    summary = json.loads((tmp_path / "s" / "conversion.json").read_text())["summary"]
    assert summary["skipped"] == 2 and len(summary["skipped_items"]) == 1
    assert "ended after 1 of 3 episodes" in summary["skipped_items"][0]
    assert "skipped 2 episodes" in capsys.readouterr().err
    write_tfrecord(shard, records[:2])  # cut between records: nothing fails to read, 1 lost
    store = open_store(rt1_cfg(str(tmp_path / "src"), tmp_path / "s2", "dataset.image_size=[16,20]",
                               "dataset.on_error=skip", f"dataset.workers={workers}"))
    summary = json.loads((tmp_path / "s2" / "conversion.json").read_text())["summary"]
    assert len(store) == 2 and summary["skipped"] == 1
    assert f"episode {name}:2..2" in summary["skipped_items"][0]
    assert "ended after 2 of 3 episodes" in summary["skipped_items"][0]


def test_data_dir_mistakes_are_named_before_any_store_folder(builder_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELFFLOW_DATA_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(cache_cfg(tmp_path / "nope"))
    parent = os.path.dirname(builder_dir)  # .../fractal20220817_data
    for wrong in (parent, os.path.dirname(parent)):  # the dataset folder, synthetic_rt1's OUT
        with pytest.raises(FileNotFoundError, match=f"did you mean '{builder_dir}'"):
            open_store(cache_cfg(wrong))
    multi = tmp_path / "multi"
    for v in ("0.1.0", "1.0.0"):
        (multi / v).mkdir(parents=True)
        (multi / v / "dataset_info.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"did you mean one of .*0\.1\.0.*1\.0\.0"):
        open_store(cache_cfg(multi))
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        open_store(rt1_cfg(str(tmp_path), tmp_path / "store"))
    assert not cache.exists() and not (tmp_path / "store").exists()  # no empty folder with a .build.lock


def _synthetic(*args):
    return subprocess.run([sys.executable, "-m", "selfflow_robot.data.synthetic_rt1", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_synthetic_writer_command_line(builder_dir, tmp_path):
    r = _synthetic()
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr
    r = _synthetic(tmp_path / "x", 3, 10, "fancy")
    assert r.returncode == 2 and "invalid choice: 'fancy'" in r.stderr and not (tmp_path / "x").exists()
    out = tmp_path / "out"
    shutil.copytree(os.path.dirname(os.path.dirname(builder_dir)), out)
    builder = out / "fractal20220817_data" / "0.1.0"
    r = _synthetic(out, 3, 10)  # the fixture's own settings: kept as it is
    assert r.returncode == 0 and "kept" in r.stdout, r.stderr
    r = _synthetic(out, 2, 3)  # other settings: written again, not the old episodes
    assert r.returncode == 0, r.stderr
    assert json.loads((builder / "dataset_info.json").read_text())["splits"][0]["shardLengths"] == ["2"]
    mapping = RLDSMapping.from_config(compose("data", ["dataset=rt1"]).dataset.rlds)
    eps = list(RLDSReader(str(builder), mapping, image_size=(8, 10)).episodes())
    assert [len(e["actions"]) for e in eps] == [3, 3]
    os.remove(builder / "synthetic_rt1.json")  # not ours (e.g. the real data): refused
    r = _synthetic(out, 4)
    assert r.returncode == 1 and "not written by this tool" in r.stderr
