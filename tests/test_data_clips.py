"""Clip sampler indices, padding and masks; normaliser formulas and file round trip."""
import numpy as np
import pytest
import torch

from selfflow_robot.data import ActionNormalizer, ClipDataset, EpisodeStore
from tests.data_fixtures import make_episode, write_store


@pytest.fixture()
def store(tmp_path):
    return EpisodeStore(write_store(tmp_path / "s", embedding_dim=3))


def test_every_start_step_is_a_sample(store):
    ds = ClipDataset(store, context_frames=2, future_frames=2, action_chunk=3)
    assert len(ds) == 29
    assert ds.locate(0) == (0, 0) and ds.locate(10) == (1, 0) and ds.locate(28) == (2, 11)
    # Without actions, the last frame_stride starts of each episode would have no future frame at all
    video = ClipDataset(store, context_frames=2, future_frames=2, frame_stride=2, action_chunk=0)
    assert len(video) == 29 - 3 * 2 and video.locate(8) == (1, 0)
    assert all(video[i]["future_mask"].any() for i in range(len(video)))


def test_clip_indices_padding_and_masks(store):
    ds = ClipDataset(store, context_frames=3, future_frames=3, frame_stride=2, action_chunk=4)
    ep1 = make_episode(7, 1)
    item = ds[10 + 3]  # episode 1 (7 steps), start 3
    assert item["instruction"] == "task 1" and item["context"].dtype == np.uint8
    np.testing.assert_array_equal(item["context"][:, 0, 0, 0], [0, 1, 3])  # steps -1 (clamped to 0), 1, 3
    np.testing.assert_array_equal(item["future"][:, 0, 0, 0], [5, 6, 6])  # 5, 7->pad(6), 9->pad(6)
    np.testing.assert_array_equal(item["future_mask"], [True, False, False])
    np.testing.assert_array_equal(item["actions"][:, 0], [3 + 100, 4 + 100, 5 + 100, 6 + 100])
    np.testing.assert_array_equal(item["action_mask"], [True] * 4)
    np.testing.assert_array_equal(item["state"], ep1["state"][3])
    np.testing.assert_array_equal(item["instruction_embedding"], np.ones(3, np.float32))
    last = ds[10 + 6]
    np.testing.assert_array_equal(last["actions"][:, 0], [106] * 4)
    np.testing.assert_array_equal(last["action_mask"], [True, False, False, False])
    np.testing.assert_array_equal(last["future_mask"], [False] * 3)


def test_resize_and_collate(store):
    ds = ClipDataset(store, context_frames=2, future_frames=3, action_chunk=6, image_size=(16, 20))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["context"].shape == (4, 2, 16, 20, 3) and batch["context"].dtype == torch.uint8
    assert batch["future"].shape == (4, 3, 16, 20, 3) and batch["actions"].shape == (4, 6, 4)
    assert batch["actions"].dtype == torch.float32 and batch["future_mask"].dtype == torch.bool
    assert batch["instruction"] == ["task 0"] * 4


def test_normalizer_q99_mask_and_inverse(store):
    norm = ActionNormalizer.from_store(store)
    st = store.stats()["action"]
    lo, hi = np.array(st["q01"]), np.array(st["q99"])
    ds = ClipDataset(store, context_frames=1, future_frames=0, action_chunk=1, normalizer=norm)
    raw = make_episode(10, 0)["actions"][4]
    got = ds[4]["actions"][0]
    want = np.clip(2 * (raw - lo) / (hi - lo) - 1, -1, 1)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5)
    assert got[3] == raw[3], "gripper (mask False) must pass through"
    inside = np.clip(raw, lo, hi)
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(inside)), inside, rtol=1e-5, atol=1e-5)


def test_constant_dim_maps_to_zero_and_mean_std():
    stats = {"action": {"mean": [1.0, 0.0], "std": [2.0, 0.0], "min": [0, 5], "max": [4, 5],
                        "q01": [0.0, 5.0], "q99": [4.0, 5.0], "count": 9}}
    q = ActionNormalizer(stats)
    np.testing.assert_allclose(q.normalize([[3.0, 5.0], [9.0, 5.0]]), [[0.5, 0.0], [1.0, 0.0]])
    m = ActionNormalizer(stats, mode="mean_std")
    np.testing.assert_allclose(m.normalize([3.0, 5.0]), [1.0 / (1 + 5e-7), 5.0 / 1e-6], rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        ActionNormalizer(stats, mode="minmax")


def test_normalization_json_matches_runtime_reader(store, tmp_path):
    norm = ActionNormalizer.from_store(store)
    norm.save(tmp_path / "normalization.json")
    back = ActionNormalizer.load(tmp_path / "normalization.json")
    a = make_episode(12, 2)["actions"]
    np.testing.assert_array_equal(back.normalize(a), norm.normalize(a))
    assert back.to_dict()["action"]["mask"] == [True, True, True, False]
    runtime = pytest.importorskip("selfflow_robot.policies.normalize")
    rt = runtime.Normalizer.from_json(tmp_path / "normalization.json")
    np.testing.assert_allclose(rt.normalize_action(a), norm.normalize(a), rtol=1e-6)
