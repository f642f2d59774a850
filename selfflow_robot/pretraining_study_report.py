"""The pretraining study's report: final tables (mean, sample sd with ddof=1, 95% bootstrap interval
over seeds), paired comparisons on shared env seeds, whole curves against steps and against
pretraining compute, steps/FLOPs-to-reach, and a verdict that says what the intervals allow.

`python -m selfflow_robot.pretraining_study_report DIR [DIR ...] [--out OUT] [--force]` rebuilds a
report from runs.json, or merges studies of the same configuration run with other seeds (one GPU
run per seed)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from .study_stats import paired_bootstrap, sample_sd, steps_to_reach, success_mdd, summarize

REFERENCE = "flow_matching"


def _last(rows: list[dict], key: str):
    vals = [r for r in rows if r.get(key) is not None]
    return vals[-1][key] if vals else None


def _success_rows(ft: dict, mode: str) -> list[dict]:
    return [r for r in ft["success"] if r["mode"] == mode and "success" in r]


def finals(runs: list[dict], demos: int, modes: list[str]) -> dict:
    """{arm: {metric: {seed: value}}} at the last step of each run."""
    out: dict = {}
    for r in runs:
        ft = next((f for f in r["finetune"] if f["demos"] == demos), None)
        if ft is None:
            continue
        m = out.setdefault(r["arm"], {})
        vals = {"val_action_mse": _last(ft["validation"], "val_action_mse"),
                "rollout_psnr": ft.get("rollout_psnr"), "rollout_ssim": ft.get("rollout_ssim"),
                "probe_r2": r["pretrain"]["probe"][-1]["probe_r2"],
                "pretrain_val_flow_loss": _last(r["pretrain"]["validation"], "val_flow_loss"),
                "pretrain_s": r["pretrain"]["train_s"],
                "pretrain_tflops": r["pretrain"]["flops_per_step"] * _pretrain_steps(r) / 1e12}
        for mode in modes:
            rows = _success_rows(ft, mode)
            vals[f"success_{mode}"] = rows[-1]["success"] if rows else None
        for k, v in vals.items():
            m.setdefault(k, {})[r["seed"]] = v
    return out


def _pretrain_steps(r: dict) -> int:
    if not r["pretrain"]["run_dir"]:
        return 0
    return int(r["pretrain"].get("steps") or max(p["step"] for p in r["pretrain"]["probe"]))


LABELS = {"success_action_first": ("success, action-first sampling", True, "pct"),
          "success_joint": ("success, joint sampling", True, "pct"),
          "val_action_mse": ("validation action MSE", False, "f4"),
          "rollout_psnr": ("rollout PSNR (dB)", True, "f2"), "rollout_ssim": ("rollout SSIM", True, "f3"),
          "probe_r2": ("probe R^2, object + goal (pretrained backbone)", True, "f3"),
          "pretrain_val_flow_loss": ("pretraining validation flow loss", False, "f4"),
          "pretrain_s": ("pretraining time (s, measured)", False, "f0"),
          "pretrain_tflops": ("pretraining compute (TFLOPs)", False, "g3")}


def _f(v: float, kind: str) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    return f"{v:.{int(kind[1:])}g}" if kind[0] == "g" else f"{v:.{int(kind[1:])}f}"


def _cell(values: dict, kind: str) -> str:
    s = summarize(list(values.values()))
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return f"{_f(s['mean'], kind)} (n=1)"
    lo, hi = s["ci"]
    return f"{_f(s['mean'], kind)} (sd {_f(s['sd'], kind)}; [{_f(lo, kind)}, {_f(hi, kind)}])"


def paired_success(runs: list[dict], demos: int, mode: str, a: str, b: str) -> dict | None:
    """b - a in success over the episodes both arms ran: the same seed and env seed (task|seed key)."""
    ea, eb = {}, {}
    for r in runs:
        ft = next((f for f in r["finetune"] if f["demos"] == demos), None)
        rows = _success_rows(ft, mode) if ft else []
        if rows and r["arm"] in (a, b):
            for k, v in rows[-1]["episodes"].items():
                (ea if r["arm"] == a else eb)[(r["seed"], k)] = v
    keys = sorted(set(ea) & set(eb))
    return paired_bootstrap([ea[k] for k in keys], [eb[k] for k in keys]) if keys else None


def paired_seeds(values: dict, a: str, b: str, metric: str) -> dict | None:
    va, vb = values.get(a, {}).get(metric, {}), values.get(b, {}).get(metric, {})
    seeds = sorted(s for s in set(va) & set(vb) if va[s] is not None and vb[s] is not None)
    return paired_bootstrap([va[s] for s in seeds], [vb[s] for s in seeds]) if seeds else None


def curve(runs: list[dict], arm: str, get) -> tuple[list, list, list]:
    """Steps every seed of the arm has, with the mean and sample sd (ddof=1) over seeds."""
    per_seed = [dict(get(r)) for r in runs if r["arm"] == arm]
    per_seed = [p for p in per_seed if p]
    if not per_seed:
        return [], [], []
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    vals = np.array([[p[s] for s in steps] for p in per_seed], dtype=float)
    return steps, vals.mean(0).tolist(), [sample_sd(vals[:, i]) for i in range(len(steps))]


def _ft(r, demos):
    return next((f for f in r["finetune"] if f["demos"] == demos), {"validation": [], "success": []})


def curves(runs: list[dict], demos_list: list[int], first_mode: str) -> dict:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    c = {"pretrain_val_flow_loss": {}, "probe_r2": {}, "ft": {}}
    for arm in arms:
        c["pretrain_val_flow_loss"][arm] = curve(runs, arm, lambda r: ((v["step"], v["val_flow_loss"])
                                                                        for v in r["pretrain"]["validation"]))
        c["probe_r2"][arm] = curve(runs, arm, lambda r: ((p["step"], p["probe_r2"]) for p in r["pretrain"]["probe"]))
        for d in demos_list:
            c["ft"].setdefault(d, {})[arm] = {
                "val_action_mse": curve(runs, arm, lambda r: ((v["step"], v["val_action_mse"]) for v in _ft(r, d)["validation"]
                                                               if v.get("val_action_mse") is not None)),
                "success": curve(runs, arm, lambda r: ((s["step"], s["success"]) for s in _success_rows(_ft(r, d), first_mode)))}
    return c


def _compute(runs: list[dict], arm: str) -> tuple[float, float]:
    """Mean pretraining FLOPs per step and measured seconds per step of an arm."""
    mine = [r for r in runs if r["arm"] == arm and r["pretrain"]["run_dir"]]
    if not mine:
        return 0.0, 0.0
    return (float(np.mean([r["pretrain"]["flops_per_step"] for r in mine])),
            float(np.mean([r["pretrain"]["train_s"] / max(1, _pretrain_steps(r)) for r in mine])))


def _curve_table(title: str, c: dict, kind: str, runs=None) -> list[str]:
    arms = [a for a in c if c[a][0]]
    if not arms:
        return []
    steps = sorted(set().union(*(c[a][0] for a in arms)))
    lines = [f"#### {title} (mean ± sd over seeds, sd with ddof=1)", "", "| step | " + " | ".join(arms) + " |",
             "|---|" + "---|" * len(arms)]
    for s in steps:
        cells = []
        for a in arms:
            st, m, sd = c[a]
            cells.append(f"{_f(m[st.index(s)], kind)} ± {_f(sd[st.index(s)], kind)}" if s in st else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines + [""]


def _reach_table(runs: list[dict], c: dict) -> list[str]:
    """Steps, TFLOPs and measured seconds each arm needs to reach flow matching's final pretraining value."""
    if REFERENCE not in c["probe_r2"] or not c["probe_r2"][REFERENCE][0]:
        return []
    lines = [f"#### Pretraining steps / TFLOPs / seconds to reach {REFERENCE}'s final value", "",
             "| metric | arm | steps | TFLOPs | seconds |", "|---|---|---|---|---|"]
    for metric, higher in (("pretrain_val_flow_loss", False), ("probe_r2", True)):
        ref = c[metric].get(REFERENCE)
        if not ref or not ref[0]:
            continue
        target = ref[1][-1]
        for arm, (st, m, _) in c[metric].items():
            if not st or arm == "none":
                continue
            hit = steps_to_reach(target, st, m, higher)
            flops, sec = _compute(runs, arm)
            lines.append(f"| {LABELS[metric][0]} ({_f(target, 'f4')}) | {arm} | " + (
                "not reached |  |  |" if hit is None else f"{hit} | {hit * flops / 1e12:.3g} | {hit * sec:.0f} |"))
    return lines + [""]


def verdict(runs: list[dict], demos_list: list[int], mode: str, arms: list[str]) -> list[str]:
    lines = []
    for d in demos_list:
        for arm in (a for a in arms if a not in (REFERENCE,)):
            p = paired_success(runs, d, mode, REFERENCE, arm)
            if p is None:
                continue
            lo, hi = p["ci"]
            what = ("better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from")
            lines.append(f"- {d} demos/task: **{arm} is {what} {REFERENCE}** on {mode.replace('_', '-')} success: "
                         f"{100 * p['diff']:+.1f} points, 95% paired-bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                         f"over {p['n']} shared episodes.")
    return lines


def markdown(runs: list[dict], config: dict) -> tuple[str, dict]:
    demos_list = sorted({f["demos"] for r in runs for f in r["finetune"]})
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    modes = list(config.get("evaluate", {}).get("modes") or ["action_first"])
    seeds = sorted({r["seed"] for r in runs})
    n_tasks = len(config.get("target", {}).get("tasks") or [])
    ep = int(config.get("evaluate", {}).get("episodes_per_task") or 0)
    n_ep = len(seeds) * n_tasks * ep
    lines = [f"Seeds: {seeds} ({len(seeds)}). Every spread is a sample standard deviation (ddof=1) over seeds; "
             "intervals are 95% percentile bootstraps of the seed mean (with 2-3 seeds they are wide and optimistic).", ""]
    if n_ep:
        lines += [f"**Smallest detectable difference.** Success is scored on {n_ep} shared episodes per arm and demo "
                  f"budget ({len(seeds)} seeds x {n_tasks} tasks x {ep} env seeds); a two-sided paired test at 5% "
                  f"with 80% power detects a true difference of about **{100 * success_mdd(n_ep):.0f} points** in the "
                  "worst case (success near 50%, outcomes uncorrelated between arms). Smaller differences read as "
                  "'not distinguishable', not as 'equal'.", ""]
    lines += ["### Verdict (last fine-tuning checkpoint, paired over shared env seeds)", "",
              *verdict(runs, demos_list, modes[0], arms), ""]
    c = curves(runs, demos_list, modes[0])
    for d in demos_list:
        f = finals(runs, d, modes)
        lines += [f"### {d} demos per task: final values", "", "| metric | " + " | ".join(arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for metric, (label, higher, kind) in LABELS.items():
            if not any(f.get(a, {}).get(metric) and any(v is not None for v in f[a][metric].values()) for a in arms):
                continue
            lines.append(f"| {label} ({'higher' if higher else 'lower'} is better) | "
                         + " | ".join(_cell({s: v for s, v in f.get(a, {}).get(metric, {}).items() if v is not None}, kind)
                                      for a in arms) + " |")
        lines += ["", f"Paired differences, arm minus {REFERENCE} (95% paired bootstrap; success over shared episodes, "
                  "the rest over seeds):", "", "| metric | " + " | ".join(a for a in arms if a != REFERENCE) + " |",
                  "|---|" + "---|" * (len(arms) - 1)]
        for mode in modes:
            cells = []
            for a in (a for a in arms if a != REFERENCE):
                p = paired_success(runs, d, mode, REFERENCE, a)
                cells.append("n/a" if p is None else f"{100 * p['diff']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] pts")
            lines.append(f"| {LABELS['success_' + mode][0]} | " + " | ".join(cells) + " |")
        for metric in ("val_action_mse", "rollout_psnr", "rollout_ssim", "probe_r2"):
            cells = []
            for a in (a for a in arms if a != REFERENCE):
                p = paired_seeds(f, REFERENCE, a, metric)
                cells.append("n/a" if p is None else f"{p['diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]")
            lines.append(f"| {LABELS[metric][0]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _curve_table(f"{d} demos: fine-tuning validation action MSE", {a: v["val_action_mse"] for a, v in c["ft"][d].items()}, "f4")
        lines += _curve_table(f"{d} demos: success ({modes[0].replace('_', '-')}) against fine-tuning steps",
                              {a: v["success"] for a, v in c["ft"][d].items()}, "pct")
    lines += ["### Pretraining curves", ""]
    flops = {a: _compute(runs, a) for a in arms}
    lines += ["Compute per pretraining step (mean over seeds): " + ", ".join(
        f"{a} {fl / 1e9:.2f} GFLOPs, {sec * 1000:.0f} ms measured" for a, (fl, sec) in flops.items() if fl) + ".", ""]
    lines += _curve_table("pretraining validation flow loss", c["pretrain_val_flow_loss"], "f4")
    lines += _curve_table("probe R^2 (object + goal) of the pretrained backbone; step 0 is the seeded random init",
                          c["probe_r2"], "f3")
    lines += _reach_table(runs, c)
    return "\n".join(lines) + "\n", c


def plot(runs: list[dict], c: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demos_list = sorted(c["ft"])
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.6))
    for i, arm in enumerate(c["probe_r2"]):
        color = f"C{i}"  # one colour per arm in every panel
        fl, _ = _compute(runs, arm)
        for ax, metric, x_flops in ((axes[0], "pretrain_val_flow_loss", False), (axes[1], "probe_r2", False),
                                    (axes[2], "probe_r2", True)):
            st, m, sd = c[metric].get(arm, ([], [], []))
            if not st or (x_flops and not fl):
                continue
            x = np.array(st) * (fl / 1e12 if x_flops else 1)
            ax.plot(x, m, marker="o", ms=3, label=arm, color=color)
            ax.fill_between(x, np.array(m) - np.nan_to_num(sd), np.array(m) + np.nan_to_num(sd), alpha=0.15, color=color)
        for ax, key in ((axes[3], "val_action_mse"), (axes[4], "success")):
            for d, ls in zip(demos_list, ("-", "--", ":", "-.")):
                st, m, _ = c["ft"][d].get(arm, {}).get(key, ([], [], []))
                if st:
                    ax.plot(st, m, ls, marker="o", ms=3, label=f"{arm}, {d} demos", color=color)
    titles = [("pretraining val flow loss", "pretraining step"), ("probe R^2 (object+goal)", "pretraining step"),
              ("probe R^2 vs compute", "pretraining TFLOPs"), ("fine-tuning val action MSE", "fine-tuning step"),
              ("success (first mode)", "fine-tuning step")]
    for ax, (t, xl) in zip(axes, titles):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    axes[4].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: list[dict], out: str, config: dict, wall_s: float, note: str = "") -> dict:
    if not runs:
        raise ValueError("no (arm, seed) of the study finished: nothing to report")
    md, c = markdown(runs, config)
    paths = {k: os.path.join(out, n) for k, n in (("md", "report.md"), ("png", "curves.png"), ("json", "study.json"))}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    with open(paths["md"], "w") as f:
        f.write(f"# Pretraining study: {' vs '.join(arms)}\n\nwall time {wall_s / 60:.1f} min{note}; "
                f"config study.yaml\n\n![curves](curves.png)\n\n{md}")
    plot(runs, c, paths["png"])
    with open(paths["json"], "w") as f:
        json.dump({"runs": runs, "config": config, "wall_s": wall_s}, f, indent=1)
    return {**paths, "markdown": md}


_LOGISTICS = {"seeds", "out_dir", "collect_workers", "evaluate.workers", "merged_from", "device", "logger"}


def rebuild(study_dirs: list[str], out: str | None = None, force: bool = False) -> dict:
    """One report from the runs.json (or study.json) of one study, or of several studies of the same
    configuration run with other seeds."""
    from omegaconf import OmegaConf

    from .cli import config_leaves

    if out is None and len(study_dirs) != 1:
        raise ValueError("several study dirs need an output dir (--out) for the merged report")
    out = out or study_dirs[0]
    runs, configs, seen, wall = [], [], {}, 0.0
    for d in study_dirs:
        path = os.path.join(d, "runs.json")
        if os.path.exists(path):
            with open(path) as f:
                got = json.load(f)
        elif os.path.exists(os.path.join(d, "study.json")):
            with open(os.path.join(d, "study.json")) as f:
                got = json.load(f)["runs"]
        else:
            raise FileNotFoundError(f"{path} not found: no (arm, seed) of this study finished (or {d} is not a study dir)")
        configs.append(OmegaConf.to_container(OmegaConf.load(os.path.join(d, "study.yaml")), resolve=True))
        wall += max((r.get("finished_s") or 0.0) for r in got) if got else 0.0
        for r in got:
            key = (r["arm"], r["seed"])
            if key in seen:
                raise ValueError(f"{r['arm']} seed {r['seed']} is in both {seen[key]} and {d}: merge studies of different seeds")
            seen[key] = d
            runs.append(r)
    flats = [{k: v for k, v in config_leaves(c) if k not in _LOGISTICS} for c in configs]
    differ = sorted({k for o in flats[1:] for k in set(flats[0]) | set(o) if flats[0].get(k) != o.get(k)})
    if differ and not force:
        raise ValueError(f"the studies measure different things: their settings differ in {', '.join(differ)}; "
                         "--force merges them anyway")
    arms = list(dict.fromkeys(a for c in configs for a in c["arms"]))
    done = {(r["arm"], r["seed"]) for r in runs}
    whole = [r for r in runs if all((a, r["seed"]) in done for a in arms)]  # seeds every arm finished
    if not whole:
        raise ValueError(f"{', '.join(study_dirs)}: no seed has all of {arms} finished")
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) not in {os.path.abspath(d) for d in study_dirs}:
        with open(os.path.join(out, "study.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml({**configs[0], "merged_from": list(study_dirs)}))
    seeds = sorted({r["seed"] for r in whole})
    note = f"; from {', '.join(study_dirs)}: seeds {seeds}" + (f"; settings differ in {', '.join(differ)}" if differ else "")
    whole.sort(key=lambda r: (r["seed"], arms.index(r["arm"])))
    return write_report(whole, out, {**configs[0], "seeds": seeds}, wall_s=wall, note=note)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m selfflow_robot.pretraining_study_report",
                                 description="Rebuild a pretraining study's report, or merge studies of other seeds.")
    ap.add_argument("study_dirs", nargs="+")
    ap.add_argument("--out", help="where the report goes (default: the only study dir)")
    ap.add_argument("--force", action="store_true", help="merge studies whose settings differ")
    a = ap.parse_args(argv)
    from .cli import reported_errors

    with reported_errors("no report written"):
        r = rebuild(a.study_dirs, a.out, a.force)
        print(r["markdown"])
        print(f"[pretraining_study] report {r['md']}")


if __name__ == "__main__":
    main(sys.argv[1:])
