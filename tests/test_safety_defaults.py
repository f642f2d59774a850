"""Default safety: every action dim, the pass-through gripper included, stays near the training data's range."""
import numpy as np
import pytest

from selfflow_robot.policies import Policy, SafetyConfig

IMG = np.zeros((8, 10, 3), np.uint8)
# dims 0-1 normalised, dim 2 (gripper) passes through normalisation unchanged
NORM = {"mode": "q99", "action": {"q01": [-1, 0, 0], "q99": [1, 2, 1], "min": [-2, 0, -1], "max": [2, 4, 1],
                                  "mask": [True, True, False]}}


def _policy(chunk, norm=NORM, **safety):
    return Policy(lambda o: np.asarray(chunk, np.float32), {"action_dim": 3}, norm, safety=SafetyConfig(**safety))


def test_a_wild_gripper_output_is_bounded_by_default():
    r = _policy([[0.0, 0.0, -1e6], [0.0, 0.0, 0.5]]).infer({"image": IMG})
    np.testing.assert_allclose(r["actions"][:, 2], [-1.2, 0.5], rtol=1e-6)  # min -1 - 0.1 * range 2
    assert r["safety"]["clipped"]


def test_margin_is_configurable_and_can_be_switched_off():
    assert _policy([[0, 0, 5.0]], data_margin=0.5).infer({"image": IMG})["actions"][0, 2] == pytest.approx(2.0)
    assert _policy([[0, 0, 5.0]], data_margin=None).infer({"image": IMG})["actions"][0, 2] == 5.0
    for bad in (-0.1, "x", float("inf"), True):
        with pytest.raises(ValueError, match="safety.data_margin"):
            SafetyConfig(data_margin=bad)


def test_without_min_max_the_quantiles_bound_and_explicit_bounds_also_apply():
    norm = {"mode": "q99", "action": {k: v for k, v in NORM["action"].items() if k not in ("min", "max")}}
    p = _policy([[0, 0, 9.0]], norm, action_high=[9, 9, 0.5])
    np.testing.assert_allclose(p.metadata["action_bounds"]["low"], [-1.2, -0.2, -0.1])
    np.testing.assert_allclose(p.metadata["action_bounds"]["high"], [1.2, 2.2, 0.5])  # the tighter of the two
    assert p.infer({"image": IMG})["actions"][0, 2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"action dims \[2\]"):
        _policy([[0, 0, 0]], action_low=[-9, -9, 5], action_high=[9, 9, 6])


def test_counts_of_held_and_clipped_chunks_and_steps():
    p = _policy([[0.0, 0.0, -1e6], [0.0, 0.0, 0.5]], max_delta=0.1)
    p.infer({"image": IMG})
    for _ in range(3):  # one chunk of 2 steps, then a second chunk
        p.act({"image": IMG})
    c = p.safety_counts
    assert (c["chunks"], c["clipped_chunks"], c["held_chunks"], c["steps"]) == (3, 3, 0, 3)
    # the chunk pass already limited row 2 (-1.2 -> 0.5 became -1.1), so the executed steps needed no more
    assert c["delta_limited_chunks"] == 3 and c["delta_limited_steps"] == 0
    held = _policy([[np.nan, 0.0, 0.0]])
    held.infer({"image": IMG})
    assert held.safety_counts["held_chunks"] == 1
    p.reset()
    assert set(p.safety_counts.values()) == {0}
