"""Official SIMPLER episode grids (SimplerEnv `scripts/*.sh`) as explicit episode plans.

Each entry is a JSON-serialisable dict: the env to build (`env_id`, `build` kwargs) and the
`reset(options=...)` that places robot and objects, plus `task`, `subtask` (coke-can orientation or
drawer), `variant` (URDF recolouring for visual matching, scene variant for variant aggregation) and
a stable `episode_id`. `rgb_overlay_path` is relative to ManiSkill2_real2sim's `ASSET_DIR`.
Counts per variant: coke 75 (3 orientations x 5x5), move near 60, drawers 27 open + 27 close,
apple 27, Bridge 24 (docs/evaluation.md, "SIMPLER adapter").
"""
from __future__ import annotations

import numpy as np

from .rotations import euler2quat, quat_mul
from .simpler_tasks import DRAWERS, ROBOT_SETUP, URDF_VARIANTS, get_task

SETTINGS = ("visual_matching", "variant_aggregation")
COKE_ORIENTATIONS = {"horizontal": {"lr_switch": True}, "vertical": {"laid_vertically": True},
                     "standing": {"upright": True}}
_GOOGLE_SCENE = "google_pick_coke_can_1_v4"
_TABLES = ("Baked_sc1_staging_objaverse_cabinet1_h870", "Baked_sc1_staging_objaverse_cabinet2_h870")
_BACKGROUNDS = ("google_pick_coke_can_1_v4_alt_background", "google_pick_coke_can_1_v4_alt_background_2")
# Tabletop VA variants: name -> (scene, extra build kwargs).
_TABLETOP_VA = {
    "base": (_GOOGLE_SCENE, {}),
    "table_texture_1": (_TABLES[0], {}), "table_texture_2": (_TABLES[1], {}),
    "background_1": (_BACKGROUNDS[0], {}), "background_2": (_BACKGROUNDS[1], {}),
    "darker_lighting": (_GOOGLE_SCENE, {"slightly_darker_lighting": True}),
    "brighter_lighting": (_GOOGLE_SCENE, {"slightly_brighter_lighting": True}),
}
# Drawer / apple VA variants (all ray-traced): name -> (scene, extra build kwargs).
_DRAWER_VA = {
    "base": ("frl_apartment_stage_simple", {}),
    "background_bedroom": ("modern_bedroom_no_roof", {}), "background_office": ("modern_office_no_roof", {}),
    "brighter_lighting": ("frl_apartment_stage_simple", {"light_mode": "brighter"}),
    "darker_lighting": ("frl_apartment_stage_simple", {"light_mode": "darker"}),
    "cabinet_2": ("frl_apartment_stage_simple", {"station_name": "mk_station2"}),
    "cabinet_3": ("frl_apartment_stage_simple", {"station_name": "mk_station3"}),
}
# Visual-matching drawer robot poses (x, y, yaw), each with its own inpainted background.
_DRAWER_VM_POSES = {
    "a0": (0.644, -0.179, -0.03), "a1": (0.765, -0.182, -0.02), "a2": (0.889, -0.203, -0.06),
    "b0": (0.652, 0.009, 0.0), "b1": (0.752, 0.009, 0.0), "b2": (0.851, 0.035, 0.0),
    "c0": (0.665, 0.224, 0.0), "c1": (0.765, 0.222, -0.025), "c2": (0.865, 0.222, -0.025),
}
_DRAWER_VM_BUILD = {"shader_dir": "rt", "station_name": "mk_station_recolor", "light_mode": "simple",
                    "disable_bad_material": True}


def _grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(v) for v in np.linspace(lo, hi, n)]


def robot_init_quat(yaw: float) -> list[float]:
    """The scripts' `Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1])` (wxyz)."""
    return [float(v) for v in quat_mul(euler2quat(0.0, 0.0, yaw), [0.0, 0.0, 0.0, 1.0])]


def _urdf_name(u) -> str:
    return f"urdf_{u or 'default'}"


def _entry(task, subtask, variant, episode_id, env_id, robot, scene, robot_pose, obj_options,
           overlay=None, extra=None, robot_uid=None) -> dict:
    setup = ROBOT_SETUP[robot]
    build = dict(obs_mode="rgbd", robot=robot_uid or ("google_robot_static" if robot == "google_robot" else "widowx"),
                 control_mode=setup["control_mode"], control_freq=setup["control_freq"],
                 sim_freq=setup["sim_freq"], scene_name=scene, camera_cfgs={"add_segmentation": True})
    if overlay is not None:
        build["rgb_overlay_path"] = f"real_inpainting/{overlay}"
        build["rgb_overlay_cameras"] = [setup["camera"]]
    build.update(extra or {})
    x, y, yaw = robot_pose
    options = {"robot_init_options": {"init_xy": [float(x), float(y)], "init_rot_quat": robot_init_quat(yaw)},
               "obj_init_options": obj_options}
    return dict(task=task, subtask=subtask, variant=variant, episode_id=f"{variant}/{subtask}/{episode_id}",
                env_id=env_id, build=build, options=options, max_episode_steps=get_task(task).max_episode_steps)


def _coke(task, setting, orientations):
    xy = [[x, y] for x in _grid(-0.35, -0.12, 5) for y in _grid(-0.02, 0.42, 5)]
    pose = (0.35, 0.20, 0.0)
    if setting == "visual_matching":
        variants = {_urdf_name(u): ("GraspSingleOpenedCokeCanInScene-v0", _GOOGLE_SCENE, {"urdf_version": u},
                                    "google_coke_can_real_eval_1.png") for u in URDF_VARIANTS}
    else:
        variants = {n: ("GraspSingleOpenedCokeCanInScene-v0", s, kw, None) for n, (s, kw) in _TABLETOP_VA.items()}
        variants["distractors"] = ("GraspSingleOpenedCokeCanDistractorInScene-v0", _GOOGLE_SCENE, {}, None)
        variants["more_distractors"] = ("GraspSingleOpenedCokeCanDistractorInScene-v0", _GOOGLE_SCENE,
                                        {"distractor_config": "more"}, None)
    return [_entry(task, o, v, f"obj_{i:02d}", env_id, "google_robot", scene, pose, {"init_xy": p}, overlay,
                   {**COKE_ORIENTATIONS[o], **kw})
            for v, (env_id, scene, kw, overlay) in variants.items() for o in orientations for i, p in enumerate(xy)]


def _move_near(task, setting):
    pose = (0.35, 0.21, -0.09)
    if setting == "visual_matching":
        variants = {_urdf_name(u): ("MoveNearGoogleBakedTexInScene-v0", _GOOGLE_SCENE, {"urdf_version": u},
                                    "google_move_near_real_eval_1.png") for u in URDF_VARIANTS}
    else:
        variants = {n: ("MoveNearGoogleInScene-v0", s, kw, None) for n, (s, kw) in _TABLETOP_VA.items()}
        variants["no_distractor"] = ("MoveNearGoogleInScene-v0", _GOOGLE_SCENE, {"no_distractor": True}, None)
    return [_entry(task, "move_near", v, f"episode_{k:02d}", env_id, "google_robot", scene, pose, {"episode_id": k},
                   overlay, kw)
            for v, (env_id, scene, kw, overlay) in variants.items() for k in range(60)]


def _drawer(task, setting, verbs, drawers):
    out = []
    for verb in verbs:
        for d in drawers:
            env_id, sub = f"{verb.title()}{d.title()}DrawerCustomInScene-v0", f"{verb}_{d}"
            if setting == "visual_matching":
                for u in URDF_VARIANTS:
                    for name, pose in _DRAWER_VM_POSES.items():
                        out.append(_entry(task, sub, _urdf_name(u), f"robot_{name}", env_id, "google_robot",
                                          "dummy_drawer", pose, {"init_xy": [0.0, 0.0]}, f"open_drawer_{name}.png",
                                          {**_DRAWER_VM_BUILD, "urdf_version": u}))
            else:
                poses = [(x, y, 0.0) for x in _grid(0.65, 0.85, 3) for y in _grid(-0.2, 0.2, 3)]
                for v, (scene, kw) in _DRAWER_VA.items():
                    out += [_entry(task, sub, v, f"robot_{i}", env_id, "google_robot", scene, p,
                                   {"init_xy": [0.0, 0.0]}, None, {"shader_dir": "rt", **kw})
                            for i, p in enumerate(poses)]
    return out


def _apple(task, setting):
    env_id, obj = "PlaceIntoClosedTopDrawerCustomInScene-v0", [[x, y] for x in _grid(-0.08, -0.02, 3)
                                                               for y in _grid(-0.02, 0.08, 3)]
    out = []
    if setting == "visual_matching":
        for u in URDF_VARIANTS:
            for name in ("a0", "b0", "c0"):
                out += [_entry(task, "apple", _urdf_name(u), f"robot_{name}_obj_{i}", env_id, "google_robot",
                               "dummy_drawer", _DRAWER_VM_POSES[name], {"init_xy": p}, f"open_drawer_{name}.png",
                               {**_DRAWER_VM_BUILD, "urdf_version": u, "model_ids": "baked_apple_v2"})
                        for i, p in enumerate(obj)]
    else:
        for v, (scene, kw) in _DRAWER_VA.items():
            for j, y in enumerate(_grid(-0.2, 0.2, 3)):
                out += [_entry(task, "apple", v, f"robot_{j}_obj_{i}", env_id, "google_robot", scene, (0.65, y, 0.0),
                               {"init_xy": p}, None, {"shader_dir": "rt", "model_ids": "apple", **kw})
                        for i, p in enumerate(obj)]
    return out


_BRIDGE = {  # task -> (env id, robot uid, scene, overlay, robot xy)
    "widowx_spoon_on_towel": ("PutSpoonOnTableClothInScene-v0", "widowx", "bridge_table_1_v1",
                              "bridge_real_eval_1.png", (0.147, 0.028)),
    "widowx_carrot_on_plate": ("PutCarrotOnPlateInScene-v0", "widowx", "bridge_table_1_v1",
                               "bridge_real_eval_1.png", (0.147, 0.028)),
    "widowx_stack_cube": ("StackGreenCubeOnYellowCubeBakedTexInScene-v0", "widowx", "bridge_table_1_v1",
                          "bridge_real_eval_1.png", (0.147, 0.028)),
    "widowx_put_eggplant_in_basket": ("PutEggplantInBasketScene-v0", "widowx_sink_camera_setup",
                                      "bridge_table_1_v2", "bridge_sink.png", (0.127, 0.06)),
}


def _bridge(task, setting):
    if setting != "visual_matching":
        raise ValueError("Bridge (WidowX) tasks only have the visual-matching setting")
    env_id, uid, scene, overlay, (x, y) = _BRIDGE[task]
    return [_entry(task, task, "visual_matching", f"episode_{k:02d}", env_id, "widowx", scene, (x, y, 0.0),
                   {"episode_id": k}, overlay, robot_uid=uid) for k in range(24)]


def official_plan(task: str, setting: str = "visual_matching", variants=None) -> list[dict]:
    """Every official episode of `task` in `setting`, optionally restricted to some variants."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got '{setting}'")
    orient = {f"google_robot_pick_{o}_coke_can": [o] for o in COKE_ORIENTATIONS}
    if task == "google_robot_pick_coke_can":
        plan = _coke(task, setting, list(COKE_ORIENTATIONS))
    elif task in orient:
        plan = _coke(task, setting, orient[task])
    elif task in ("google_robot_move_near", "google_robot_move_near_v0"):
        plan = _move_near(task, setting)
    elif task in ("google_robot_open_drawer", "google_robot_close_drawer"):
        plan = _drawer(task, setting, [task.split("_")[2]], DRAWERS)
    elif task.startswith(("google_robot_open_", "google_robot_close_")) and task.endswith("_drawer"):
        _, _, verb, d, _ = task.split("_")
        plan = _drawer(task, setting, [verb], [d])
    elif task == "google_robot_place_apple_in_closed_top_drawer":
        plan = _apple(task, setting)
    elif task in _BRIDGE:
        plan = _bridge(task, setting)
    else:
        raise ValueError(f"no official episode plan for SIMPLER task '{task}'")
    if variants is not None:
        keep = {variants} if isinstance(variants, str) else set(variants)
        unknown = keep - {e["variant"] for e in plan}
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)} for {task} / {setting}; "
                             f"available: {plan_variants(task, setting)}")
        plan = [e for e in plan if e["variant"] in keep]
    return plan


def plan_variants(task: str, setting: str = "visual_matching") -> list[str]:
    return list(dict.fromkeys(e["variant"] for e in official_plan(task, setting)))
