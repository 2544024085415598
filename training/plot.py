"""The training curves from metrics.jsonl: loss, and the task's metric (per question type when it has them)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: Path, out: Path, metric: str = "anls") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    key, by_type = f"eval_{metric}", f"eval_{metric}_by_type"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [r for r in records if "eval_loss" in r and key in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
        ax_metric.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="k", label="all")
        for kind in sorted({k for r in evals for k in r.get(by_type, {})} - {"all"}):
            points = [(r["step"], r[by_type][kind]) for r in evals if kind in r.get(by_type, {})]
            ax_metric.plot(*zip(*points), ".--", lw=1, label=kind)
    ax_loss.set(xlabel="step", ylabel="cross-entropy per target token", title="loss")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
