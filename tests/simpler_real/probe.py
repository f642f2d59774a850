"""Checks against the real SIMPLER, run inside the SIMPLER venv by tests/test_simpler_real.py.

    python tests/simpler_real/probe.py google|widowx|apple|distractors|kwargs  -> one JSON line (last)

Each command builds as few real envs as it can (about 12 s each on 2 CPU cores) and reports raw
measurements; the pytest side asserts on them. Stage meshes are absent from the upstream snapshot,
so every env here is built on a scene that is present (PRESENT_SCENE, or the drawer tasks' own
frl_apartment_stage_simple) and rasterised: these are mechanics checks, never a score.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "simpler_double"))

from selfflow_robot.envs.simpler import OFFICIAL_EPISODE_SEED, SimplerGym  # noqa: E402
from selfflow_robot.envs.simpler_plans import official_plan  # noqa: E402

PRESENT_SCENE = "dummy_tabletop"  # procedural table + ground: present in every checkout
T0 = time.perf_counter()


def note(msg: str) -> None:
    print(f"[probe {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def on_present_scene(entries, **extra):
    """Plan entries with the absent stage swapped for PRESENT_SCENE (and no real-image overlay)."""
    out = []
    for e in entries:
        e = json.loads(json.dumps(e))
        e["build"].update(scene_name=PRESENT_SCENE, **extra)
        e["build"].pop("rgb_overlay_path", None)
        e["build"].pop("rgb_overlay_cameras", None)
        out.append(e)
    return out


def google() -> dict:
    task = "google_robot_pick_coke_can"
    plan = on_present_scene(official_plan(task, "variant_aggregation", "base")[:2])
    env = SimplerGym(task, setting="variant_aggregation", episode_plan=plan, include_state=True, max_episode_steps=4)
    t = time.perf_counter()
    obs, info = env.reset(options={"episode_idx": 0})
    out = {"scene": PRESENT_SCENE, "build_reset_s": time.perf_counter() - t, "image_shape": list(obs["image"].shape),
           "instruction": obs["instruction"], "episode_seed": info["episode_seed"]}
    sim = env.unwrapped_sim
    q0, s0 = sim.agent.robot.get_qpos(), obs["state"]
    t = time.perf_counter()
    obs, _, term, trunc, info = env.step([0.02, 0, 0.02, 0, 0, 0, 1.0])  # +x, +z (base frame), close
    out["step_s"] = time.perf_counter() - t
    q1, s1 = sim.agent.robot.get_qpos(), obs["state"]
    gripper = sim.agent.controller.controllers["gripper"]
    out["gripper_target_after_close"] = np.asarray(gripper._target_qpos).tolist()
    out.update(dxyz=(s1[:3] - s0[:3]).tolist(), fingers_before=q0[-4:-2].tolist(), fingers_after=q1[-4:-2].tolist(),
               head_before=q0[-2:].tolist(), head_after=q1[-2:].tolist(), closedness_after_close=float(s1[7]),
               env_closedness=float(sim.agent.get_gripper_closedness()))
    obs, *_ = env.step([0, 0, 0, 0, 0, 0, -1.0])  # relative: -1 opens again
    out["closedness_after_open"] = float(obs["state"][7])  # the fingers still move towards the old target
    out["gripper_target_after_open"] = np.asarray(gripper._target_qpos).tolist()
    _, _, term, trunc, info = env.step([0, 0, 0, 0, 0, 0, 0, 0.3])  # terminate flag 0.3 > 0
    out.update(terminated_by_flag=term, policy_terminated=info["policy_terminated"])
    # The official success rule: the env's `done` at the last step. The real evaluate() is kept and
    # only its success flag is forced (False, True, False) so that a success happens mid-episode.
    env.reset(options={"episode_idx": 1})
    real_evaluate = sim.evaluate
    for mode in ("final_step", "any_step"):
        env.reset(options={"episode_idx": 1})
        env.success_mode = mode
        flags = iter([False, True, False, False])

        def forced(**kw):
            info = real_evaluate(**kw)
            info["success"] = next(flags)
            return info
        sim.evaluate = forced
        steps = []
        while True:
            _, _, term, trunc, info = env.step(np.zeros(7))
            steps.append([bool(info["success"]), bool(info["episode_success"]), term, trunc])
            if term or trunc:
                break
        sim.evaluate = real_evaluate
        out[f"success_{mode}"] = steps
    env.close()
    return out


def widowx() -> dict:
    task = "widowx_carrot_on_plate"
    plan = on_present_scene(official_plan(task)[:1])
    env = SimplerGym(task, episode_plan=plan, include_state=True, max_episode_steps=4)
    t = time.perf_counter()
    obs, info = env.reset(options={"episode_idx": 0})
    out = {"scene": PRESENT_SCENE, "build_reset_s": time.perf_counter() - t, "image_shape": list(obs["image"].shape),
           "instruction": obs["instruction"]}
    s0 = obs["state"]
    obs, *_ = env.step([0, 0, 0.02, 0, 0, 0, -1.0])  # +z, absolute gripper -1 = closed
    out.update(dz=float(obs["state"][2] - s0[2]), closedness_open=float(s0[7]), closedness_closed=float(obs["state"][7]),
               env_closedness=float(env.unwrapped_sim.agent.get_gripper_closedness()))
    obs, *_ = env.step([0, 0, 0, 0, 0, 0, 1.0])  # +1 = open
    out["closedness_reopened"] = float(obs["state"][7])
    env.close()
    return out


def apple() -> dict:
    """Subtask advance timing with the real env's own rule; force_advance_subtask_time_steps=3 (a
    constructor argument of the real env) instead of 100 keeps it to a few steps."""
    task = "google_robot_place_apple_in_closed_top_drawer"
    entries = json.loads(json.dumps(official_plan(task, "variant_aggregation", "base")[:1]))
    entries[0]["build"].update(shader_dir="ibl", force_advance_subtask_time_steps=3)  # rasterised (the default shader) on CPU
    env = SimplerGym(task, setting="variant_aggregation", episode_plan=entries, max_episode_steps=6)
    t = time.perf_counter()
    obs, info = env.reset(options={"episode_idx": 0})
    out = {"scene": entries[0]["build"]["scene_name"], "build_reset_s": time.perf_counter() - t,
           "instructions": [obs["instruction"]], "final": [info["is_final_subtask"]]}
    for _ in range(4):
        obs, _, term, trunc, info = env.step(np.zeros(7))
        out["instructions"].append(obs["instruction"])
        out["final"].append(info["is_final_subtask"])
    env.reset(options={"episode_idx": 0})
    obs, _, term, _, info = env.step([0, 0, 0, 0, 0, 0, 0, 1.0])  # "done" before the last subtask: advance
    out.update(terminate_first=[term, obs["instruction"], info["is_final_subtask"]])
    _, _, term, _, info = env.step([0, 0, 0, 0, 0, 0, 0, 1.0])
    out["terminate_final"] = [term, info["policy_terminated"]]
    env.close()
    return out


def _distractor_poses(sim) -> dict:
    return {a.name: [float(x) for x in a.pose.p] for a in sim.distractor_objs}


def distractors() -> dict:
    """Variant-aggregation coke can with distractors: where SimplerEnv's own evaluator puts them (a
    fresh env per episode via its env builder, reset without a seed) vs SimplerGym (one env,
    reset(seed=None) -> OFFICIAL_EPISODE_SEED) vs the old behaviour (the run seed)."""
    import sapien.core as sapien
    from simpler_env.utils.env.env_builder import build_maniskill2_env, get_robot_control_mode
    from transforms3d.euler import euler2quat

    task = "google_robot_pick_coke_can"
    idx = [0, 12]  # two horizontal-can positions: one build kwargs set, so SimplerGym keeps its env
    plan = on_present_scene(official_plan(task, "variant_aggregation", "distractors"))
    xs, ys = np.linspace(-0.35, -0.12, 5), np.linspace(-0.02, 0.42, 5)
    grid = [(x, y) for x in xs for y in ys]  # the script's obj_init_xs x obj_init_ys order
    quat = (sapien.Pose(q=euler2quat(0, 0, 0)) * sapien.Pose(q=[0, 0, 0, 1])).q
    out = {"scene": PRESENT_SCENE, "episodes": [plan[i]["episode_id"] for i in idx], "official": [], "ours": [],
           "run_seed_1000": [], "official_episode_seed": OFFICIAL_EPISODE_SEED}
    for i in idx:  # the official evaluator's way
        t = time.perf_counter()
        env = build_maniskill2_env(
            "GraspSingleOpenedCokeCanDistractorInScene-v0", lr_switch=True, obs_mode="rgbd", robot="google_robot_static",
            sim_freq=513, control_mode=get_robot_control_mode("google_robot_static", "octo-base"), control_freq=3,
            max_episode_steps=80, scene_name=PRESENT_SCENE, camera_cfgs={"add_segmentation": True},
            rgb_overlay_path=None, renderer_kwargs={"offscreen_only": True})
        env.reset(options={"robot_init_options": {"init_xy": np.array([0.35, 0.20]), "init_rot_quat": quat},
                           "obj_init_options": {"init_xy": np.array(grid[i % 25])}})
        out["official"].append(_distractor_poses(env.unwrapped))
        out["official_episode_seed_seen"] = int(env.unwrapped._episode_seed)
        env.close()
        note(f"official fresh env for {plan[i]['episode_id']}: {time.perf_counter() - t:.1f} s")
    env = SimplerGym(task, setting="variant_aggregation", episode_plan=plan)
    for i in idx:
        _, info = env.reset(options={"episode_idx": i})
        out["ours"].append(_distractor_poses(env.unwrapped_sim))
        out["ours_episode_seed"] = info["episode_seed"]
    env.reset(seed=1000, options={"episode_idx": idx[0]})  # what a run seed used to do
    out["run_seed_1000"].append(_distractor_poses(env.unwrapped_sim))
    env.close()
    return out


def kwargs() -> dict:
    """Constructor keyword arguments each real env accepts (its __init__ chain) vs the double's."""
    import inspect

    import fake_simpler_env.envs as double
    import gymnasium as gym
    import mani_skill2_real2sim.envs  # noqa: F401
    from mani_skill2_real2sim.utils.registration import REGISTERED_ENVS
    from selfflow_robot.envs.simpler_tasks import TASKS

    def accepted(cls):
        names = set()
        for c in cls.__mro__:
            if "__init__" not in c.__dict__:
                continue
            params = inspect.signature(c.__dict__["__init__"]).parameters.values()
            names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return sorted(names)

    ids = sorted({t.env_id for t in TASKS.values()} | {e["env_id"] for t in TASKS for s in ("visual_matching",
                  "variant_aggregation") for e in _plan_or_empty(t, s)})
    out = {}
    for env_id in ids:
        fake = gym.spec(f"{double.GYM_NAMESPACE}/{env_id}").entry_point
        out[env_id] = {"real": accepted(REGISTERED_ENVS[env_id].cls),
                       "double": sorted(double.BASE_KWARGS | double.KIND_KWARGS[fake.KIND]),
                       "real_max_steps": REGISTERED_ENVS[env_id].max_episode_steps,
                       "double_max_steps": gym.spec(f"{double.GYM_NAMESPACE}/{env_id}").max_episode_steps}
    return out


def _plan_or_empty(task, setting):
    try:
        return official_plan(task, setting)
    except ValueError:
        return []


if __name__ == "__main__":
    result = {"google": google, "widowx": widowx, "apple": apple, "distractors": distractors, "kwargs": kwargs}[sys.argv[1]]()
    result["wall_s"] = time.perf_counter() - T0
    print(json.dumps(result, default=float), flush=True)
