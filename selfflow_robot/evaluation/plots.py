"""Bar chart of per-task success with 95% intervals (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import PurePath


def short_policy_name(policy: str, parts: int = 3) -> str:
    """A checkpoint path's last few components (a title has no room for /tmp/.../outputs/...)."""
    policy = str(policy)
    if "://" in policy or "/" not in policy:
        return policy
    tail = PurePath(policy).parts[-parts:]
    return ("…/" if len(PurePath(policy).parts) > parts else "") + "/".join(tail)


def bar_chart(summary: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(summary["tasks"])
    rates = [100 * summary["tasks"][t]["success_rate"] for t in tasks]
    # max(0, .): float round-off at 0% / 100% must not make an error bar negative (matplotlib raises)
    lo = [max(0.0, r - 100 * summary["tasks"][t]["ci95"][0]) for t, r in zip(tasks, rates)]
    hi = [max(0.0, 100 * summary["tasks"][t]["ci95"][1] - r) for t, r in zip(tasks, rates)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(tasks) + 2), 3.6))
    ax.bar(range(len(tasks)), rates, yerr=[lo, hi], capsize=3, color="#4c72b0")
    ax.axhline(100 * summary["mean_success"], color="#c44e52", ls="--", lw=1, label="mean")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("success %")
    ax.set_title(f"{summary['env']} / {short_policy_name(summary['policy'])} ({summary['success_mode']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
