"""The study's report: per-objective curves (mean over seeds), a markdown table and the steps Self-Flow
needs to reach flow matching's final value of each metric.

`python -m selfflow_robot.study_report DIR [DIR ...] [--out OUT] [--all-seeds]` rebuilds the report
of a study that stopped early from its runs.json (by default from the seeds every arm finished), or
merges studies of the same configuration run with other seeds."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# metric -> (label, higher is better)
METRICS = {"val_flow_loss": ("validation flow loss", False), "val_action_mse": ("validation action MSE", False),
           "success": ("success rate", True)}


def curves(runs: list[dict]) -> dict:
    """{objective: {metric: (steps, mean, sd, n_seeds)}} over seeds at the steps all seeds share; sd is
    the sample standard deviation (ddof=1), nan for one seed."""
    out: dict = {}
    for obj in dict.fromkeys(r["objective"] for r in runs):
        mine = [r for r in runs if r["objective"] == obj]
        out[obj] = {}
        for metric in METRICS:
            per_seed = [{row["step"]: row[metric] for row in r["success" if metric == "success" else "validation"]
                         if row.get(metric) is not None} for r in mine]
            steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
            if steps:
                vals = np.array([[p[s] for s in steps] for p in per_seed], dtype=float)
                sd = vals.std(0, ddof=1) if len(per_seed) > 1 else np.full(len(steps), np.nan)
                out[obj][metric] = (steps, vals.mean(0).tolist(), sd.tolist(), len(per_seed))
    return out


def steps_to_reach(target: float, steps: list[int], values: list[float], higher: bool) -> int | None:
    for s, v in zip(steps, values):
        if (v >= target - 1e-9) if higher else (v <= target + 1e-9):
            return s
    return None


def _fmt(metric: str, v: float) -> str:
    if v != v:  # nan: the sd of one seed
        return "n/a"
    return f"{100 * v:.0f}%" if metric == "success" else f"{v:.4f}"


def markdown(c: dict, reference: str = "flow_matching") -> str:
    lines = []
    seeds = {o: max(v[3] for v in c[o].values()) for o in c if c[o]}
    uneven = len(set(seeds.values())) > 1  # --all-seeds: arms averaged over different seeds
    for metric, (label, higher) in METRICS.items():
        objs = [o for o in c if metric in c[o]]
        if not objs:
            continue
        steps = sorted(set().union(*(c[o][metric][0] for o in objs)))
        head = [f"{o} (n={c[o][metric][3]})" if uneven else o for o in objs]
        lines += [f"### {label} ({'higher' if higher else 'lower'} is better; mean ± sample sd over seeds, ddof=1)", "",
                  "| step | " + " | ".join(head) + " |", "|---|" + "---|" * len(objs)]
        for s in steps:
            cells = []
            for o in objs:
                st, m, sd, _ = c[o][metric]
                cells.append(f"{_fmt(metric, m[st.index(s)])} ± {_fmt(metric, sd[st.index(s)])}" if s in st else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    if uneven:
        lines.append("No steps-to-reach table: the arms are averaged over different numbers of seeds "
                     f"({', '.join(f'{o} {n}' for o, n in seeds.items())}).")
    elif reference in c:
        # Ratios are against the step at which the reference itself first reached its final value:
        # identical curves read 1.00x, whatever the step budget.
        lines += [f"### Steps to reach {reference}'s final value", "",
                  f"| metric | {reference} final (first reached at step) | "
                  + " | ".join(o for o in c if o != reference) + " |",
                  "|---|---|" + "---|" * (len(c) - 1)]
        for metric, (label, higher) in METRICS.items():
            if metric not in c[reference]:
                continue
            st, m, _, _ = c[reference][metric]
            own = steps_to_reach(m[-1], st, m, higher)  # never None: the final value itself qualifies
            cells = []
            for o in (o for o in c if o != reference):
                if metric not in c[o]:
                    cells.append("n/a")
                    continue
                hit = steps_to_reach(m[-1], c[o][metric][0], c[o][metric][1], higher)
                cells.append("not reached" if hit is None else f"{hit} ({hit / own:.2f}x)")
            lines.append(f"| {label} | {_fmt(metric, m[-1])} ({own}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(c: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, (metric, (label, _)) in zip(axes, METRICS.items()):
        for o in c:
            if metric in c[o]:
                st, m, sd, n = c[o][metric]
                m, sd = np.array(m), np.array(sd)
                ax.plot(st, m, marker="o", ms=3, label=f"{o} (n={n})")
                ax.fill_between(st, m - np.nan_to_num(sd), m + np.nan_to_num(sd), alpha=0.2)
        ax.set_xlabel("fine-tuning step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def failed_rollouts(runs: list[dict]) -> list[str]:
    return [f"{r['objective']} seed {r['seed']} step {row['step']}: {row['error']}"
            for r in runs for row in r["success"] if "error" in row]


def write_report(runs: list[dict], out: str, config: dict, wall_s: float, note: str = "") -> dict:
    c = curves(runs)
    if not any(c.values()):
        raise ValueError("no metric has a step that every seed of an arm evaluated: nothing to report "
                         "(studies with different steps or validation.every do not merge)")
    md = markdown(c)
    errors = failed_rollouts(runs)
    if errors:  # the study records a failed rollout and goes on; say so next to the tables
        md += "\nRollouts that failed (no success rate; details in runs.json):\n\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    paths = {k: os.path.join(out, n) for k, n in (("md", "report.md"), ("png", "curves.png"), ("json", "study.json"))}
    with open(paths["md"], "w") as f:
        f.write(f"# Study: {' vs '.join(c)}\n\nwall time {wall_s / 60:.1f} min; "
                f"config study.yaml{note}\n\n![curves](curves.png)\n\n{md}")
    plot(c, paths["png"])
    with open(paths["json"], "w") as f:
        json.dump({"curves": c, "runs": runs, "config": config, "wall_s": wall_s}, f, indent=1)
    return {**paths, "markdown": md, "curves": c}


def print_report(report: dict) -> None:
    print(report["markdown"])
    print(f"[study] report {report['md']}\n[study] plot {report['png']}\n[study] data {report['json']}")


def complete_seeds(runs: list[dict], objectives: list[str]) -> list[dict]:
    """The runs of the seeds for which every objective finished (a fair comparison)."""
    done = {(r["seed"], r["objective"]) for r in runs}
    keep = {r["seed"] for r in runs if all((r["seed"], o) in done for o in objectives)}
    return [r for r in runs if r["seed"] in keep]


# Settings that change where or how fast a study runs, not what it measures.
_LOGISTICS = {"seeds", "out_dir", "parallel_arms", "collect_workers", "evaluate.workers", "store_dir", "merged_from"}
# Settings that may differ between merged studies, named in the report (e.g. trainer.compile in overrides).
_NOTED = {"overrides", "device", "objectives", "logger"}
_ABSENT = object()


def _load(study_dir: str) -> tuple[list[dict], dict]:
    from omegaconf import OmegaConf

    path, summary = os.path.join(study_dir, "runs.json"), os.path.join(study_dir, "study.json")
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    elif os.path.exists(summary):  # a finished study's summary holds the same runs (published results keep only it)
        with open(summary) as f:
            saved = json.load(f)
        runs = [{"finished_s": saved.get("wall_s"), **r} for r in saved["runs"]]  # its wall time, if runs lack one
    else:
        raise FileNotFoundError(f"{path} not found: no arm of this study finished (or {study_dir} is not a study dir)")
    return runs, OmegaConf.to_container(OmegaConf.load(os.path.join(study_dir, "study.yaml")), resolve=True)


def rebuild(study_dirs: list[str], out: str | None = None, all_seeds: bool = False, force: bool = False) -> dict:
    """Report from the runs.json of one study (finished or not) or of several studies of the same
    configuration run with different seeds (a study spread over several sessions)."""
    from omegaconf import OmegaConf

    from .cli import config_leaves

    if out is None and len(study_dirs) != 1:
        raise ValueError("several study dirs need an output dir for the merged report")
    out = out or study_dirs[0]
    runs, configs, seen, wall_s = [], [], {}, 0.0
    for d in study_dirs:
        got, config = _load(d)
        configs.append(config)
        wall_s += max((r.get("finished_s") or 0.0) for r in got) if got else 0.0
        for r in got:
            key = (r["objective"], r["seed"])
            if key in seen:
                raise ValueError(f"{r['objective']} seed {r['seed']} is in both {seen[key]} and {d}: "
                                 "merge studies of different seeds")
            seen[key] = d
            runs.append(r)
    config = configs[0]
    flats = [{k: v for k, v in config_leaves(c) if k not in _LOGISTICS} for c in configs]
    differ = sorted({k for other in flats[1:] for k in set(flats[0]) | set(other)
                     if flats[0].get(k, _ABSENT) != other.get(k, _ABSENT)})
    objectives = list(dict.fromkeys(o for c in configs for o in c["objectives"]))  # every study's arms, in order
    kept = runs if all_seeds else complete_seeds(runs, objectives)
    if not kept:
        raise ValueError(f"{', '.join(study_dirs)}: no seed has all of {objectives} finished; "
                         "--all-seeds reports what is there")
    planned = sorted({int(s) for c in configs for s in c["seeds"]})
    finished = sorted({r["seed"] for r in kept})
    note = f"; rebuilt from runs.json of {', '.join(study_dirs)}: seeds {finished} of {planned}"
    measured = [k for k in differ if k.split(".")[0] not in _NOTED]
    if measured and not force:
        raise ValueError(f"the studies measure different things: their settings differ in {', '.join(measured)}; "
                         "--force merges them anyway")
    if differ:
        note += f"; the studies' settings differ in {', '.join(differ)}"
        print(f"warning: merged studies differ in {', '.join(differ)}", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) not in {os.path.abspath(d) for d in study_dirs}:
        with open(os.path.join(out, "study.yaml"), "w") as f:  # the report names it
            f.write(OmegaConf.to_yaml({**config, "merged_from": list(study_dirs)}))
    return write_report(sorted(kept, key=lambda r: (r["seed"], objectives.index(r["objective"]))), out,
                        {**config, "seeds": finished, "merged_from": list(study_dirs)}, wall_s=wall_s, note=note)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m selfflow_robot.study_report",
                                 description="Rebuild a study's report from its runs.json, or merge studies of other seeds.")
    ap.add_argument("study_dirs", nargs="+", help="study output dirs (each with runs.json and study.yaml)")
    ap.add_argument("--out", help="where the report goes (default: the only study dir)")
    ap.add_argument("--all-seeds", action="store_true", help="also seeds that not every arm finished")
    ap.add_argument("--force", action="store_true", help="merge studies whose data, model or budget differ")
    a = ap.parse_args(argv)
    from .cli import reported_errors

    with reported_errors("no report written"):
        print_report(rebuild(a.study_dirs, a.out, a.all_seeds, a.force))


if __name__ == "__main__":
    main(sys.argv[1:])
