"""Runtime un-normalisation against hand-computed values (normalization.json contract)."""
import json

import numpy as np
import pytest

from selfflow_robot.policies.normalize import STD_EPS, Normalizer

STATS = {"mean": [0.0, 1.0, 0.5], "std": [2.0, 0.5, 1.0], "min": [-1, 0, 0], "max": [1, 2, 1],
         "q01": [-0.5, 0.0, 0.0], "q99": [1.5, 4.0, 1.0], "mask": [True, True, False]}


def test_q99_unnormalize_hand_values():
    n = Normalizer({"mode": "q99", "action": STATS})
    x = np.array([[-1.0, 0.0, 0.7], [1.0, 0.5, -3.0]], np.float32)
    a = n.unnormalize_action(x)
    # a = 0.5 (x + 1)(q99 - q01) + q01 on masked dims; dim 2 (gripper, mask False) passes through
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, [[-0.5, 2.0, 0.7], [1.5, 3.0, -3.0]], rtol=0, atol=1e-6)


def test_q99_normalize_inverts_and_clips():
    n = Normalizer({"mode": "q99", "action": STATS})
    a = np.array([0.5, 1.0, 0.3], np.float32)
    np.testing.assert_allclose(n.normalize_action(a), [0.0, -0.5, 0.3], atol=1e-6)
    np.testing.assert_allclose(n.normalize_action([10.0, -10.0, 5.0]), [1.0, -1.0, 5.0])
    np.testing.assert_allclose(n.unnormalize_action(n.normalize_action(a)), a, atol=1e-6)


def test_q99_constant_dim_maps_to_zero_and_back_to_q01():
    n = Normalizer({"action": {"q01": [2.0, 0.0], "q99": [2.0, 1.0]}})  # mode defaults to q99
    assert n.mode == "q99"
    np.testing.assert_allclose(n.normalize_action([2.0, 1.0]), [0.0, 1.0])
    np.testing.assert_allclose(n.unnormalize_action([0.3, -1.0]), [2.0, 0.0])


def test_mean_std_hand_values():
    n = Normalizer({"mode": "mean_std", "action": STATS})
    a = n.unnormalize_action([1.0, -2.0, 0.25])
    np.testing.assert_allclose(a, [2.0 + STD_EPS, 1.0 - 2 * (0.5 + STD_EPS), 0.25], rtol=1e-6)


def test_state_normalisation_optional():
    n = Normalizer({"action": STATS, "state": {"q01": [0.0], "q99": [2.0]}})
    np.testing.assert_allclose(n.normalize_state(np.array([1.5])), [0.5])
    assert Normalizer({"action": STATS}).state is None


@pytest.mark.parametrize("bad, msg", [
    ({"mode": "minmax", "action": STATS}, "unknown normalization mode"),
    ({"mode": "q99", "action": {"q01": [0, 0], "q99": [1]}}, "equal length"),
    ({"mode": "q99", "action": {"mean": [0], "std": [1]}}, "lacks"),
    ({"action": {"q01": [0, 0], "q99": [1, 1], "mask": [True]}}, "mask"),
    ({"action": {"q01": [1.0], "q99": [0.0]}}, "q99 < q01"),
    ({"state": {}}, "'action' entry"),
])
def test_invalid_files_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Normalizer(bad)


def test_from_json_names_the_file(tmp_path):
    p = tmp_path / "normalization.json"
    p.write_text(json.dumps({"mode": "q99", "action": {"q01": [0.0], "q99": [2.0]}}))
    np.testing.assert_allclose(Normalizer.from_json(p).unnormalize_action([0.0]), [1.0])
    p.write_text("{not json")
    with pytest.raises(ValueError, match="normalization.json"):
        Normalizer.from_json(p)
    with pytest.raises(ValueError, match=r"normalization.json.*unknown"):
        p.write_text(json.dumps({"mode": "x", "action": {}}))
        Normalizer.from_json(p)


def test_wrong_action_dim():
    with pytest.raises(ValueError, match="last dim 3"):
        Normalizer({"action": STATS}).unnormalize_action(np.zeros((4, 2)))
