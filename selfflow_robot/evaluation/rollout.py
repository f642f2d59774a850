"""Run one episode: reset the policy with the instruction, step until the episode ends."""
from __future__ import annotations

import time

import numpy as np

SUCCESS_MODES = ("final_step", "any_step", "early_stop")


def run_episode(env, policy, ep: dict, success_mode: str, record_frames: bool = False) -> tuple[dict, list]:
    """-> (record, frames). SIMPLER envs apply `success_mode` themselves (info["episode_success"]);
    for other envs (Meta-World) the harness applies it to info["success"]."""
    if success_mode not in SUCCESS_MODES:
        raise ValueError(f"success_mode must be one of {SUCCESS_MODES}, got '{success_mode}'")
    t0 = time.perf_counter()
    options = {"episode_idx": ep["plan_idx"]} if "plan_idx" in ep else None
    # SIMPLER plan episodes carry the env's seed apart from the policy's: None = the official randomness.
    env_seed = ep["env_seed"] if "env_seed" in ep else ep["seed"]
    obs, info = env.reset(seed=None if env_seed is None else int(env_seed), options=options)
    if hasattr(policy, "bind"):  # env-aware policies (expert, random): see policy_factory
        policy.bind(env, seed=ep["seed"])
    instruction = obs["instruction"]
    policy.reset(instruction)
    frames = [obs["image"]] if record_frames else []
    steps, ever, success, instructions = 0, False, False, [instruction]
    held = clipped = 0
    reports_safety = hasattr(policy, "last_safety")  # Policy and the ws:// client; expert/random do not
    while True:
        if obs["instruction"] != instruction:  # SIMPLER's apple task switches subtask mid-episode
            instruction = obs["instruction"]
            instructions.append(instruction)
            policy.reset(instruction)
        action = np.asarray(policy.act(obs), dtype=np.float32)
        if reports_safety:  # the safety layer's verdict on this step (a NaN model is held every step)
            flags = policy.last_safety or {}
            held += bool(flags.get("hold"))
            clipped += bool(flags.get("clipped"))
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        if record_frames:
            frames.append(obs["image"])
        if "episode_success" in info:
            success = bool(info["episode_success"])
        else:
            now = bool(info.get("success", False))
            ever = ever or now
            success = ever if success_mode != "final_step" else now
            terminated = terminated or (success_mode == "early_stop" and now)
        if terminated or truncated:
            break
    rec = {k: ep[k] for k in ("key", "task", "subtask", "variant", "episode_id", "seed")}
    if "episode_seed" in info:  # SIMPLER: "official" or the env seed it was reset with
        rec["episode_seed"] = info["episode_seed"]
    rec.update(success=success, steps=steps, instruction=instructions[0], success_mode=success_mode,
               wall_s=round(time.perf_counter() - t0, 3))
    if reports_safety:
        rec.update(held_steps=held, clipped_steps=clipped)
    if len(instructions) > 1:
        rec["instructions"] = instructions
    if "episode_stats" in info:
        rec["episode_stats"] = info["episode_stats"]
    return rec, frames
