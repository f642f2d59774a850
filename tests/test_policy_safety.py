"""Safety limits: normalised clip, absolute bounds, per-step deltas, non-finite hold."""
import numpy as np
import pytest

from selfflow_robot.policies.safety import SafetyConfig, SafetyFilter


def test_normalized_clip_auto_depends_on_mode():
    x = np.array([[1.5, -2.0, 3.0]], np.float32)
    q = SafetyFilter(SafetyConfig(), 3, "q99", np.array([True, True, False]))
    y, clipped = q.clip_normalized(x)
    np.testing.assert_array_equal(y, [[1.0, -1.0, 3.0]])  # unmasked gripper dim untouched
    assert clipped
    m = SafetyFilter(SafetyConfig(), 3, "mean_std")
    assert m.clip_normalized(x)[0] is x
    m3 = SafetyFilter(SafetyConfig(normalized_clip=2.5), 3, "mean_std")
    np.testing.assert_array_equal(m3.clip_normalized(x)[0], [[1.5, -2.0, 2.5]])


def test_bounds_and_delta_hand_values():
    f = SafetyFilter(SafetyConfig(action_low=[-1, -1], action_high=[1, 0.5], max_delta=[0.2, 1.0]), 2)
    a, flags = f.step(np.array([3.0, 0.9]), last=np.array([0.5, 0.0], np.float32))
    # bounds: (1.0, 0.5); delta from (0.5, 0): dim 0 limited to 0.7, dim 1 within 1.0
    np.testing.assert_allclose(a, [0.7, 0.5])
    assert flags == {"hold": False, "clipped": True, "delta_limited": True}
    a, flags = f.step(np.array([0.6, 0.1]), last=np.array([0.5, 0.0]))
    np.testing.assert_allclose(a, [0.6, 0.1])
    assert flags == {"hold": False, "clipped": False, "delta_limited": False}


def test_chunk_delta_limits_are_sequential():
    f = SafetyFilter(SafetyConfig(max_delta=0.1), 1)
    out, flags = f.chunk(np.array([[1.0], [1.0], [1.0]], np.float32), last=np.array([0.0]))
    np.testing.assert_allclose(out[:, 0], [0.1, 0.2, 0.3], atol=1e-6)
    assert flags["delta_limited"]
    out, _ = f.chunk(np.array([[1.0], [1.05]], np.float32), last=None)  # no history: first row free
    np.testing.assert_allclose(out[:, 0], [1.0, 1.05], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_holds_still(bad):
    last = np.array([0.3, -0.2, 1.0], np.float32)
    zeros = SafetyFilter(SafetyConfig(hold="zeros", hold_keep_dims=[2]), 3)
    a, flags = zeros.step(np.array([0.1, bad, 0.0]), last)
    np.testing.assert_array_equal(a, [0.0, 0.0, 1.0])  # deltas zero, gripper keeps its last value
    assert flags["hold"]
    held = SafetyFilter(SafetyConfig(hold="last"), 3)
    chunk, flags = held.chunk(np.array([[0.0, 0.0, 0.0], [bad, 0.0, 0.0]], np.float32), last)
    np.testing.assert_array_equal(chunk, [last, last])  # one bad value poisons the whole chunk
    assert flags["hold"]
    a, _ = held.step(np.array([bad, 0, 0]), None)
    np.testing.assert_array_equal(a, [0, 0, 0])


@pytest.mark.parametrize("kw", [dict(hold="freeze"), dict(normalized_clip="yes"), dict(max_delta=-1.0),
                                dict(action_low=[1.0], action_high=[0.0])])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        SafetyConfig(**kw)


def test_dimension_mismatch():
    with pytest.raises(ValueError, match="action_low"):
        SafetyFilter(SafetyConfig(action_low=[0, 0]), 3)
    with pytest.raises(ValueError, match="hold_keep_dims"):
        SafetyFilter(SafetyConfig(hold_keep_dims=[5]), 3)


@pytest.mark.parametrize("clip", [-1, -0.5, 0, float("nan"), True])
def test_non_positive_normalized_clip_is_refused(clip):
    """np.clip(x, 1, -1) maps every action to the lower bound (q01): a robot driven to one corner."""
    with pytest.raises(ValueError, match="normalized_clip"):
        SafetyConfig(normalized_clip=clip)
    assert SafetyFilter(SafetyConfig(normalized_clip=0.5), 1, "q99").clip == 0.5


def test_bounds_of_different_lengths_name_both_fields():
    with pytest.raises(ValueError, match=r"action_low has 3 entries but safety\.action_high has 2"):
        SafetyConfig(action_low=[-1, -1, -1], action_high=[1, 1])


@pytest.mark.parametrize("kw", [dict(max_delta=float("nan")), dict(max_delta=[0.1, -0.1]),
                                dict(max_delta="0.1"), dict(action_low=[float("nan")], action_high=[1.0])])
def test_other_numeric_fields_are_checked(kw):
    (field,) = [k for k in kw if k != "action_high"]
    with pytest.raises(ValueError, match=field):
        SafetyConfig(**kw)
