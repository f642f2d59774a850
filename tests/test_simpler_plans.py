"""Official episode grids: counts per the SimplerEnv scripts, positions, variants, serialisability."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from selfflow_robot.envs.simpler_plans import official_plan, plan_variants, robot_init_quat

# (task, setting) -> (episodes per variant, number of variants)
EXPECTED = {
    ("google_robot_pick_coke_can", "visual_matching"): (75, 4),
    ("google_robot_pick_coke_can", "variant_aggregation"): (75, 9),
    ("google_robot_pick_horizontal_coke_can", "visual_matching"): (25, 4),
    ("google_robot_move_near", "visual_matching"): (60, 4),
    ("google_robot_move_near", "variant_aggregation"): (60, 8),
    ("google_robot_open_drawer", "visual_matching"): (27, 4),
    ("google_robot_close_drawer", "variant_aggregation"): (27, 7),
    ("google_robot_open_top_drawer", "visual_matching"): (9, 4),
    ("google_robot_place_apple_in_closed_top_drawer", "visual_matching"): (27, 4),
    ("google_robot_place_apple_in_closed_top_drawer", "variant_aggregation"): (27, 7),
    ("widowx_spoon_on_towel", "visual_matching"): (24, 1),
    ("widowx_put_eggplant_in_basket", "visual_matching"): (24, 1),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_counts_and_unique_ids(key):
    task, setting = key
    per_variant, n_variants = EXPECTED[key]
    plan = official_plan(task, setting)
    counts = Counter(e["variant"] for e in plan)
    assert len(counts) == n_variants and set(counts.values()) == {per_variant}
    assert len({e["episode_id"] for e in plan}) == len(plan)
    json.dumps(plan)  # records and worker messages carry plan entries as JSON


def test_visual_matching_coke_grid_is_300_episodes_on_the_scripts_grid():
    plan = official_plan("google_robot_pick_coke_can")
    assert len(plan) == 300
    assert Counter(e["subtask"] for e in plan) == {"horizontal": 100, "vertical": 100, "standing": 100}
    xy = sorted({tuple(e["options"]["obj_init_options"]["init_xy"]) for e in plan})
    assert len(xy) == 25 and xy[0] == (-0.35, -0.02) and xy[-1] == (-0.12, 0.42)
    assert {e["build"]["urdf_version"] for e in plan} == {None, "recolor_tabletop_visual_matching_1",
                                                          "recolor_tabletop_visual_matching_2",
                                                          "recolor_cabinet_visual_matching_1"}
    assert all(e["max_episode_steps"] == 80 and e["options"]["robot_init_options"]["init_xy"] == [0.35, 0.20]
               for e in plan)


def test_robot_orientation_matches_the_scripts_pose_product():
    # Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1]) is a rotation by yaw + pi about z.
    for yaw in (0.0, -0.09, -0.03):
        np.testing.assert_allclose(robot_init_quat(yaw), [np.cos((yaw + np.pi) / 2), 0, 0, np.sin((yaw + np.pi) / 2)],
                                   atol=1e-12)
    move = official_plan("google_robot_move_near")
    assert {e["options"]["obj_init_options"]["episode_id"] for e in move} == set(range(60))
    assert move[0]["env_id"] == "MoveNearGoogleBakedTexInScene-v0"


def test_drawer_and_variant_settings():
    vm = official_plan("google_robot_open_drawer")
    overlays = {e["build"]["rgb_overlay_path"] for e in vm}
    assert len(overlays) == 9 and all(e["build"]["shader_dir"] == "rt" for e in vm)
    assert {e["env_id"] for e in vm} == {f"Open{d}DrawerCustomInScene-v0" for d in ("Top", "Middle", "Bottom")}
    va = official_plan("google_robot_pick_coke_can", "variant_aggregation")
    assert all("rgb_overlay_path" not in e["build"] for e in va)
    assert "more_distractors" in plan_variants("google_robot_pick_coke_can", "variant_aggregation")
    only = official_plan("google_robot_move_near", "variant_aggregation", variants=["no_distractor"])
    assert len(only) == 60 and all(e["build"]["no_distractor"] for e in only)
    apple = official_plan("google_robot_place_apple_in_closed_top_drawer")
    assert all(e["build"]["model_ids"] == "baked_apple_v2" and e["max_episode_steps"] == 200 for e in apple)
    with pytest.raises(ValueError, match="visual-matching"):
        official_plan("widowx_stack_cube", "variant_aggregation")
