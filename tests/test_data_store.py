"""Episode store: round trip, sharding, resume without duplicates, atomicity, workers, errors."""
import json
import os

import numpy as np
import pytest
import torch

from selfflow_robot.data import DataError, EpisodeStore, EpisodeWriter
from tests.data_fixtures import make_episode, write_store


def test_round_trip_across_shards(tmp_path):
    # ~3 KB per frame: a 10 KB shard limit forces several shards.
    write_store(tmp_path / "s", embedding_dim=5, shard_bytes=10_000)
    store = EpisodeStore(tmp_path / "s")
    assert len(store) == 3 and store.num_steps == 29
    assert len([d for d in os.listdir(tmp_path / "s") if d.startswith("shard_")]) == 3
    assert store.meta["image_shape"] == [32, 32, 3] and store.meta["fps"] == 10
    for i, t in enumerate((10, 7, 12)):
        ref = make_episode(t, i)
        ep = store.episode(i)
        assert store.episode_length(i) == t and ep["key"] == f"ep{i}" and ep["instruction"] == f"task {i}"
        np.testing.assert_array_equal(ep["images"], ref["images"])
        np.testing.assert_array_equal(ep["actions"], ref["actions"])
        np.testing.assert_array_equal(ep["state"], ref["state"])
        np.testing.assert_array_equal(ep["instruction_embedding"], np.full(5, i, np.float32))
        np.testing.assert_array_equal(store.frames(i, np.array([t - 1, 0]))[:, 0, 0, 0], [t - 1, 0])
    with pytest.raises(IndexError):
        store.frames(1, [7])
    with pytest.raises(IndexError):
        store.episode(3)


def test_resume_skips_existing_keys_and_appends(tmp_path):
    write_store(tmp_path / "s", lengths=(10, 7))
    write_store(tmp_path / "s", lengths=(10, 7, 12))  # same keys ep0, ep1 + a new ep2
    store = EpisodeStore(tmp_path / "s")
    assert [store.key(i) for i in range(len(store))] == ["ep0", "ep1", "ep2"]
    assert store.num_steps == 29
    with pytest.raises(FileExistsError, match="resume"):
        write_store(tmp_path / "s", resume=False)


def test_interrupted_write_keeps_a_valid_store(tmp_path):
    path = tmp_path / "s"
    meta = dict(image_shape=[32, 32, 3], action_dim=4, state_dim=2)
    with pytest.raises(RuntimeError):
        with EpisodeWriter(path, meta, shard_bytes=1) as w:  # one shard per episode
            w.add(key="a", instruction="", **make_episode(5, 0))
            w.add(key="b", instruction="", **make_episode(5, 1))
            os.makedirs(path / ".tmp-shard_000009-123")  # a half-written shard from a crash
            raise RuntimeError("killed")
    with EpisodeWriter(path, meta) as w:
        assert w.has("a") and w.has("b") and not w.has("c")
        w.add(key="c", instruction="", **make_episode(4, 2))
    assert not any(n.startswith(".tmp-") for n in os.listdir(path))
    assert [EpisodeStore(path).key(i) for i in range(3)] == ["a", "b", "c"]


def test_meta_mismatch_on_resume(tmp_path):
    write_store(tmp_path / "s")
    with pytest.raises(ValueError, match="action_dim"):
        EpisodeWriter(tmp_path / "s", dict(image_shape=[32, 32, 3], action_dim=7, state_dim=2))


def test_invalid_store_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        EpisodeStore(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json"):
        EpisodeStore(tmp_path)


def test_stats_are_exact_and_cached(tmp_path):
    write_store(tmp_path / "s")
    store = EpisodeStore(tmp_path / "s")
    acts = np.concatenate([make_episode(t, i)["actions"] for i, t in enumerate((10, 7, 12))]).astype(np.float64)
    st = store.stats()
    assert st["num_steps"] == 29 and st["action"]["count"] == 29
    np.testing.assert_allclose(st["action"]["mean"], acts.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st["action"]["std"], acts.std(0), rtol=1e-6)
    np.testing.assert_allclose(st["action"]["q01"], np.quantile(acts, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(st["action"]["max"], acts.max(0), rtol=1e-6)
    assert len(st["state"]["q99"]) == 2
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["action"] == st["action"]
    sub = store.stats(episodes=[1])
    np.testing.assert_allclose(sub["action"]["min"], make_episode(7, 1)["actions"].min(0))


def test_multi_worker_dataloader(tmp_path):
    from selfflow_robot.data import ClipDataset

    write_store(tmp_path / "s", shard_bytes=10_000)
    ds = ClipDataset(EpisodeStore(tmp_path / "s"), context_frames=1,
                     future_frames=0, action_chunk=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = torch.cat([b["actions"][:, 0, 0] for b in loader]).numpy()
    want = np.concatenate([make_episode(t, i)["actions"][:, 0] for i, t in enumerate((10, 7, 12))])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("field,change,match", [
    ("actions", lambda e: e.update(actions=e["actions"][:0], images=e["images"][:0]), "empty episode"),
    ("actions", lambda e: e["actions"].__setitem__((3, 2), np.nan), "non-finite value at step 3, dim 2"),
    ("images", lambda e: e.update(images=e["images"][:, :16]), "expected uint8"),
    ("state", lambda e: e.update(state=None), "missing"),
    ("state", lambda e: e.update(state=e["state"][:, :1]), "expected shape"),
])
def test_bad_episodes_raise_or_skip(tmp_path, capsys, field, change, match):
    meta = dict(image_shape=[32, 32, 3], action_dim=4, state_dim=2)
    ep = make_episode(6, 0)
    change(ep)
    with EpisodeWriter(tmp_path / "r", meta) as w:
        with pytest.raises(DataError, match=match) as e:
            w.add(key="bad", instruction="", source="x.tfrecord", **ep)
    assert "x.tfrecord" in str(e.value) and "episode bad" in str(e.value) and f"field '{field}'" in str(e.value)
    with EpisodeWriter(tmp_path / "k", meta, on_error="skip") as w:
        assert not w.add(key="bad", instruction="", **ep)
        assert w.add(key="good", instruction="", **make_episode(6, 1))
    assert len(EpisodeStore(tmp_path / "k")) == 1
    assert "skipped 1 episodes" in capsys.readouterr().out


def test_one_writer_at_a_time(tmp_path):
    meta = dict(image_shape=[32, 32, 3], action_dim=4, state_dim=2)
    with EpisodeWriter(tmp_path / "s", meta):
        with pytest.raises(RuntimeError, match="another process"):
            EpisodeWriter(tmp_path / "s", meta)
    with EpisodeWriter(tmp_path / "s", meta) as w:  # released on close
        w.add(key="a", instruction="", **make_episode(3, 0))


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"images\.npy: damaged or truncated"),
    ("object_header", r"actions\.npy: damaged or truncated"),
    ("episodes_json", r"episodes\.json: unreadable"),
    ("missing", r"actions\.npy is missing: store .* is damaged"),
    ("nan", r"episode 1 \(ep1\) has a non-finite action \(nan\) at step 3, dimension 2"),
])
def test_a_damaged_store_is_a_data_error_naming_the_file(tmp_path, damage, match):
    """Never numpy's bare message (nor its advice to load pickled data), never a KeyError, and a NaN
    is named before it turns the normalisation statistics into NaN."""
    write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard_000000"
    if damage == "truncate":
        f = shard / "images.npy"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "object_header":
        f = shard / "actions.npy"
        header = b"{'descr': '|O', 'fortran_order': False, 'shape': (29, 4), }".ljust(117) + b"\n"
        f.write_bytes(b"\x93NUMPY\x01\x00v\x00" + header + f.read_bytes()[128:])
    elif damage == "episodes_json":
        (shard / "episodes.json").write_text("[\n")
    elif damage == "missing":
        (shard / "actions.npy").unlink()
    else:
        a = np.load(shard / "actions.npy")
        a[10 + 3, 2] = np.nan  # episode 1 starts after episode 0's 10 steps
        np.save(shard / "actions.npy", a)
        (tmp_path / "s" / "stats.json").unlink(missing_ok=True)
    with pytest.raises(DataError, match=match):
        store = EpisodeStore(tmp_path / "s")
        store.actions(0)
        store.stats()
