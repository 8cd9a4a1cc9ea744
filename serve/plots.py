"""Plots of an evaluation: per-bin AP bars and per-class AP against training instances."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from heads.evaluation import Metrics  # noqa: E402


def plot_bins(rows: dict[str, Metrics], path: Path) -> Path:
    """Grouped bars: mask AP per training-instance bin (AP1..AP4) and overall, one bar per row."""
    names = list(rows)
    bins = list(next(iter(rows.values())).bins.names) + ["AP"]
    x = np.arange(len(bins))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, name in enumerate(names):
        summary = rows[name].primary.summary
        values = [100 * max(summary.get(b, 0.0), 0.0) for b in bins]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, bins)
    ax.set_ylabel("mask AP (%)")
    ax.set_title("AP by training-instance bin")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class(rows: dict[str, Metrics], instance_count: dict[int, int], path: Path) -> Path:
    """Scatter of each class's mask AP against its training instances (log x), one colour per row."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, metrics in rows.items():
        per_cat = metrics.primary.per_category
        ids = [c for c, ap in per_cat.items() if ap >= 0 and instance_count.get(int(c), 0) > 0]
        ax.scatter([instance_count[int(c)] for c in ids], [100 * per_cat[c] for c in ids], s=8, alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training instances of the class")
    ax.set_ylabel("mask AP (%)")
    ax.set_title("Per-class AP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
