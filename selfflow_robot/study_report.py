"""The study's report: per-objective curves (mean over seeds), a markdown table and the steps Self-Flow
needs to reach flow matching's final value of each metric.

`python -m selfflow_robot.study_report OUT_DIR [--all-seeds]` rebuilds the report of a study that
stopped early from its runs.json: by default from the seeds every arm finished."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# metric -> (label, higher is better)
METRICS = {"val_flow_loss": ("validation flow loss", False), "val_action_mse": ("validation action MSE", False),
           "success": ("success rate", True)}


def curves(runs: list[dict]) -> dict:
    """{objective: {metric: (steps, mean, std, n_seeds)}} averaged over seeds at the steps all seeds share."""
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
                out[obj][metric] = (steps, vals.mean(0).tolist(), vals.std(0).tolist(), len(per_seed))
    return out


def steps_to_reach(target: float, steps: list[int], values: list[float], higher: bool) -> int | None:
    for s, v in zip(steps, values):
        if (v >= target - 1e-9) if higher else (v <= target + 1e-9):
            return s
    return None


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.0f}%" if metric == "success" else f"{v:.4f}"


def markdown(c: dict, reference: str = "flow_matching") -> str:
    lines = []
    for metric, (label, higher) in METRICS.items():
        objs = [o for o in c if metric in c[o]]
        if not objs:
            continue
        steps = sorted(set().union(*(c[o][metric][0] for o in objs)))
        lines += [f"### {label} ({'higher' if higher else 'lower'} is better; mean ± std over seeds)", "",
                  "| step | " + " | ".join(objs) + " |", "|---|" + "---|" * len(objs)]
        for s in steps:
            cells = []
            for o in objs:
                st, m, sd, _ = c[o][metric]
                cells.append(f"{_fmt(metric, m[st.index(s)])} ± {_fmt(metric, sd[st.index(s)])}" if s in st else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    if reference in c:
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
                ax.fill_between(st, m - sd, m + sd, alpha=0.2)
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
    md = markdown(c)
    errors = failed_rollouts(runs)
    if errors:  # the study records a failed rollout and goes on; say so next to the tables
        md += "\nRollouts that failed (no success rate; details in runs.json):\n\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    paths = {k: os.path.join(out, n) for k, n in (("md", "report.md"), ("png", "curves.png"), ("json", "study.json"))}
    with open(paths["md"], "w") as f:
        f.write(f"# Study: flow matching vs DTS vs Self-Flow\n\nwall time {wall_s / 60:.1f} min; "
                f"config {os.path.join(out, 'study.yaml')}{note}\n\n![curves](curves.png)\n\n{md}")
    plot(c, paths["png"])
    with open(paths["json"], "w") as f:
        json.dump({"curves": c, "runs": runs, "config": config, "wall_s": wall_s}, f, indent=1)
    return {**paths, "markdown": md, "curves": c}


def complete_seeds(runs: list[dict], objectives: list[str]) -> list[dict]:
    """The runs of the seeds for which every objective finished (a fair comparison)."""
    done = {(r["seed"], r["objective"]) for r in runs}
    keep = {r["seed"] for r in runs if all((r["seed"], o) in done for o in objectives)}
    return [r for r in runs if r["seed"] in keep]


def rebuild(out: str, all_seeds: bool = False) -> dict:
    """Report of a study (finished or not) from OUT/runs.json and OUT/study.yaml."""
    from omegaconf import OmegaConf

    path = os.path.join(out, "runs.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no arm of this study finished (or {out} is not a study dir)")
    with open(path) as f:
        runs = json.load(f)
    config = OmegaConf.to_container(OmegaConf.load(os.path.join(out, "study.yaml")), resolve=True)
    kept = runs if all_seeds else complete_seeds(runs, list(config["objectives"]))
    if not kept:
        raise ValueError(f"{path}: no seed has all of {config['objectives']} finished; --all-seeds uses what is there")
    dropped = sorted({f"{r['objective']}_seed{r['seed']}" for r in runs} - {f"{r['objective']}_seed{r['seed']}" for r in kept})
    note = f"; rebuilt from runs.json ({len(kept)} of {len(config['objectives']) * len(config['seeds'])} runs" + (
        f", left out the unfinished seeds' {', '.join(dropped)})" if dropped else ")")
    wall_s = max((r.get("finished_s") or 0.0) for r in runs)
    return write_report(kept, out, config, wall_s=wall_s, note=note)


def main(argv: list[str]) -> None:
    args = [a for a in argv if a != "--all-seeds"]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m selfflow_robot.study_report OUT_DIR [--all-seeds]")
    report = rebuild(args[0], all_seeds="--all-seeds" in argv)
    print(report["markdown"])
    print(f"[study] report {report['md']}\n[study] plot {report['png']}\n[study] data {report['json']}")


if __name__ == "__main__":
    main(sys.argv[1:])
