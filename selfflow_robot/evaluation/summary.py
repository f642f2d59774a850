"""Summaries of per-episode records: per-task rates, SIMPLER aggregation, markdown / CSV / JSON."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

import numpy as np

from ..fileio import write_json_atomic


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sane at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def per_task(records: list[dict]) -> dict[str, dict]:
    by = defaultdict(list)
    for r in records:
        by[r["task"]].append(r)
    out = {}
    for task, rs in by.items():
        k, n = sum(bool(r["success"]) for r in rs), len(rs)
        out[task] = {"episodes": n, "successes": k, "success_rate": k / n, "ci95": list(wilson(k, n)),
                     "mean_steps": float(np.mean([r["steps"] for r in rs])), **safety_counts(rs)}
    return out


def safety_counts(records: list[dict]) -> dict:
    """Steps the policy's safety layer held (non-finite actions) or clipped, of all steps; empty for
    policies that do not report it (expert, random, records from before it was counted)."""
    rs = [r for r in records if "held_steps" in r]
    if not rs:
        return {}
    return {"steps": int(sum(r["steps"] for r in rs)), "held_steps": int(sum(r["held_steps"] for r in rs)),
            "clipped_steps": int(sum(r.get("clipped_steps", 0) for r in rs))}


def safety_warning(s: dict) -> str | None:
    """A sentence when the safety layer held steps: a 0% that is the safety layer's doing, not the policy's."""
    c = s.get("safety") or {}
    if not c.get("held_steps"):
        return None
    tasks = ", ".join(f"{t} {v['held_steps']}/{v['steps']}" for t, v in sorted(s["tasks"].items()) if v.get("held_steps"))
    return (f"the safety layer held {c['held_steps']} of {c['steps']} steps ({tasks}): the policy output non-finite "
            f"actions (NaN or inf weights, a diverged checkpoint?), so the robot stood still and those episodes "
            f"say nothing about the policy")


def summarize(records: list[dict], cfg: dict, expected: int, throughput: dict | None = None) -> dict:
    tasks = per_task(records)
    env_cfg = cfg["env"]
    summary = {
        "env": env_cfg["name"], "policy": str(cfg["policy"]), "checkpoint": cfg.get("checkpoint"),
        "out_dir": cfg.get("out_dir"),
        "success_mode": env_cfg.get("success_mode"),
        "episodes": len(records), "episodes_expected": expected, "complete": len(records) >= expected,
        "tasks": tasks, "mean_success": float(np.mean([t["success_rate"] for t in tasks.values()])) if tasks else None,
        "throughput": throughput or {},
    }
    counts = safety_counts(records)
    if counts:
        summary["safety"] = counts
    if env_cfg["name"] == "simpler":
        summary["simpler"] = simpler_section(records, env_cfg)
    return summary


def simpler_section(records: list[dict], env_cfg: dict) -> dict:
    from selfflow_robot.envs.simpler_metrics import aggregate, overall_averages, vs_real

    setting = env_cfg.get("setting") or "visual_matching"
    plan = env_cfg.get("episode_plan") or "official"
    seed = env_cfg.get("episode_seed", "official")
    out = {"setting": setting, "episode_plan": plan, "episode_seed": "official" if seed is None else seed,
           "env_kwargs_override": dict(env_cfg.get("env_kwargs") or {})}
    for conv in ("official", "pooled"):
        agg = aggregate(records, conv)
        out[conv] = agg
        out[f"{conv}_averages"] = overall_averages({t: v["success"] for t, v in agg.items()})
    name = env_cfg.get("policy_name")
    if name and not out["env_kwargs_override"]:  # our number for a reference policy, ranked against the
        # others' published sim numbers (never for a run whose env kwargs differ from the protocol's)
        rates = {t: v["success"] for t, v in out["official"].items()}
        coke = out["official"].get("google_robot_pick_coke_can")
        for orientation, rate in (coke or {}).get("subtasks", {}).items():
            rates[f"google_robot_pick_{orientation}_coke_can"] = rate
        # The prepackaged draw is a visual-matching proxy: compared with the visual-matching table.
        out["vs_real"] = vs_real(rates, name, setting if plan == "official" else "visual_matching")
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def to_markdown(s: dict) -> str:
    ckpt, safety = s.get("checkpoint"), s.get("safety")
    lines = [f"# Evaluation: {s['env']} / policy={s['policy']}", "",
             *([f"checkpoint: `{ckpt}`", ""] if ckpt and ckpt != s["policy"] else []),
             f"success mode: `{s['success_mode']}`; episodes: {s['episodes']}/{s['episodes_expected']}", "",
             "| task | episodes | success % | 95% CI | mean steps |" + (" held steps | clipped steps |" if safety else ""),
             "|---|---|---|---|---|" + ("---|---|" if safety else "")]
    for task, t in sorted(s["tasks"].items()):
        lo, hi = t["ci95"]
        lines.append(f"| {task} | {t['episodes']} | {_pct(t['success_rate'])} | {_pct(lo)}-{_pct(hi)} | {t['mean_steps']:.1f} |"
                     + (f" {t.get('held_steps', 0)} | {t.get('clipped_steps', 0)} |" if safety else ""))
    lines.append(f"| **mean over tasks** | {s['episodes']} | {_pct(s['mean_success'])} | | |"
                 + (f" {safety['held_steps']} of {safety['steps']} | {safety['clipped_steps']} of {safety['steps']} |"
                    if safety else ""))
    if safety_warning(s):
        lines += ["", f"**warning:** {safety_warning(s)}"]
    sim = s.get("simpler")
    if sim:
        lines += ["", f"## SIMPLER ({sim['setting']}, plan: {sim['episode_plan']})", "",
                  "| report task | official % | pooled % | episodes | sub-results (official) |", "|---|---|---|---|---|"]
        for task, v in sorted(sim["official"].items()):
            subs = ", ".join(f"{k} {_pct(x)}" for k, x in v["subtasks"].items())
            lines.append(f"| {task} | {_pct(v['success'])} | {_pct(sim['pooled'][task]['success'])} | {v['episodes']} | {subs} |")
        for k, v in sim["official_averages"].items():
            lines.append(f"| {k} | {_pct(v)} | {_pct(sim['pooled_averages'].get(k))} | | |")
        seed = sim.get("episode_seed", "official")
        lines += ["", "episode randomness: " + ("official (as SimplerEnv's evaluator: fresh-env, unseeded reset)"
                                                 if seed == "official" else f"env seed {seed} (not the official one)")]
        if sim.get("env_kwargs_override"):
            lines += ["", f"**not an official score**: env kwargs overridden for every episode: {sim['env_kwargs_override']}"]
        vr = sim.get("vs_real")
        if vr:
            lines += ["", f"MMRV / Pearson vs real robots with this run as `{vr['policy']}`, against "
                          f"{vr['table']}:", "", "| task | MMRV | Pearson r |", "|---|---|---|"]
            lines += [f"| {t} | {m['mmrv']:.3f} | {m['pearson']:.3f} |" for t, m in sorted(vr["rows"].items())]
            if vr["missing"]:
                lines += ["", f"no published {vr['setting']} sim numbers for: {', '.join(vr['missing'])}"]
    tp = s.get("throughput") or {}
    if tp.get("episodes_per_min"):
        lines += ["", f"throughput: {tp['episodes_per_min']:.1f} episodes/min ({tp['episodes_run']} episodes, "
                      f"{tp['workers']} worker(s), {tp['wall_s']:.0f} s)"]
    return "\n".join(lines) + "\n"


def write_summary(s: dict, out_dir: str) -> dict:
    """summary.json / .md / .csv and success.png into out_dir; returns the paths written."""
    from .plots import bar_chart

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"summary.{k}") for k in ("json", "md", "csv")}
    write_json_atomic(paths["json"], s, indent=2, default=str)
    with open(paths["md"], "w") as f:
        f.write(to_markdown(s))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "episodes", "successes", "success_rate", "ci95_low", "ci95_high", "mean_steps",
                    "steps", "held_steps", "clipped_steps"])
        for task, t in sorted(s["tasks"].items()):
            w.writerow([task, t["episodes"], t["successes"], f"{t['success_rate']:.4f}", f"{t['ci95'][0]:.4f}",
                        f"{t['ci95'][1]:.4f}", f"{t['mean_steps']:.2f}",
                        *(t.get(k, "") for k in ("steps", "held_steps", "clipped_steps"))])
        if s.get("safety"):
            w.writerow(["total", s["episodes"], "", "", "", "", "",
                        *(s["safety"][k] for k in ("steps", "held_steps", "clipped_steps"))])
    if s["tasks"]:
        paths["png"] = bar_chart(s, os.path.join(out_dir, "success.png"))
    return paths
