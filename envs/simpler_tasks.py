"""SIMPLER task table: simpler_env task name -> ManiSkill2_real2sim env id, kwargs and limits.

Mirrors `simpler_env.ENVIRONMENT_MAP` (SimplerEnv `simpler_env/__init__.py`) but is our own immutable
copy: `simpler_env.make` writes into its module-level dict, so kwargs would leak between calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

GOOGLE_CONTROL_MODE = ("arm_pd_ee_delta_pose_align_interpolate_by_planner_"
                       "gripper_pd_joint_target_delta_pos_interpolate_by_planner")
WIDOWX_CONTROL_MODE = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
ROBOT_SETUP = {  # robot family -> control rate, physics rate, policy camera, its (H, W)
    "google_robot": dict(control_freq=3, sim_freq=513, camera="overhead_camera", image_hw=(512, 640),
                         control_mode=GOOGLE_CONTROL_MODE),
    "widowx": dict(control_freq=5, sim_freq=500, camera="3rd_view_camera", image_hw=(480, 640),
                   control_mode=WIDOWX_CONTROL_MODE),
}
# Visual-matching robot recolourings; the official VM score is the mean over these four.
URDF_VARIANTS = (None, "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")


@dataclass(frozen=True)
class SimplerTask:
    name: str
    env_id: str
    robot: str                      # "google_robot" | "widowx"
    max_episode_steps: int          # the paper scripts' --max-episode-steps
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    raytraced: bool = False         # drawer/apple scenes use shader_dir="rt" (GPU only in practice)

    def env_kwargs(self) -> dict[str, Any]:
        """A fresh, mutable copy of the task's extra env kwargs."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.kwargs.items()}


def _t(name, env_id, robot, steps, raytraced=False, **kwargs) -> SimplerTask:
    return SimplerTask(name, env_id, robot, steps, MappingProxyType(dict(kwargs)), raytraced)


DRAWERS = ("top", "middle", "bottom")
TASKS: dict[str, SimplerTask] = {t.name: t for t in [
    _t("google_robot_pick_coke_can", "GraspSingleOpenedCokeCanInScene-v0", "google_robot", 80),
    _t("google_robot_pick_horizontal_coke_can", "GraspSingleOpenedCokeCanInScene-v0", "google_robot", 80,
       lr_switch=True),
    _t("google_robot_pick_vertical_coke_can", "GraspSingleOpenedCokeCanInScene-v0", "google_robot", 80,
       laid_vertically=True),
    _t("google_robot_pick_standing_coke_can", "GraspSingleOpenedCokeCanInScene-v0", "google_robot", 80,
       upright=True),
    _t("google_robot_pick_object", "GraspSingleRandomObjectInScene-v0", "google_robot", 80),
    # simpler_env's current map: move_near == _v1; the paper's scripts (and our plans) use v0.
    _t("google_robot_move_near", "MoveNearGoogleBakedTexInScene-v1", "google_robot", 80),
    _t("google_robot_move_near_v0", "MoveNearGoogleBakedTexInScene-v0", "google_robot", 80),
    _t("google_robot_move_near_v1", "MoveNearGoogleBakedTexInScene-v1", "google_robot", 80),
    _t("google_robot_open_drawer", "OpenDrawerCustomInScene-v0", "google_robot", 113, True),
    *[_t(f"google_robot_open_{d}_drawer", f"Open{d.title()}DrawerCustomInScene-v0", "google_robot", 113, True)
      for d in DRAWERS],
    _t("google_robot_close_drawer", "CloseDrawerCustomInScene-v0", "google_robot", 113, True),
    *[_t(f"google_robot_close_{d}_drawer", f"Close{d.title()}DrawerCustomInScene-v0", "google_robot", 113, True)
      for d in DRAWERS],
    _t("google_robot_place_in_closed_drawer", "PlaceIntoClosedDrawerCustomInScene-v0", "google_robot", 200, True),
    *[_t(f"google_robot_place_in_closed_{d}_drawer", f"PlaceIntoClosed{d.title()}DrawerCustomInScene-v0",
         "google_robot", 200, True) for d in DRAWERS],
    _t("google_robot_place_apple_in_closed_top_drawer", "PlaceIntoClosedTopDrawerCustomInScene-v0",
       "google_robot", 200, True, model_ids="baked_apple_v2"),
    _t("widowx_spoon_on_towel", "PutSpoonOnTableClothInScene-v0", "widowx", 60),
    _t("widowx_carrot_on_plate", "PutCarrotOnPlateInScene-v0", "widowx", 60),
    _t("widowx_stack_cube", "StackGreenCubeOnYellowCubeBakedTexInScene-v0", "widowx", 60),
    _t("widowx_put_eggplant_in_basket", "PutEggplantInBasketScene-v0", "widowx", 120),
]}


def get_task(name: str) -> SimplerTask:
    if name not in TASKS:
        raise ValueError(f"unknown SIMPLER task '{name}'; expected one of: {', '.join(TASKS)}")
    return TASKS[name]
