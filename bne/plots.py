"""Figures for the reports (matplotlib, Agg backend): accuracy per method and target, BNE weights."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_bars(metrics: dict, targets: list[str], methods: list[str], path: Path, title: str = "") -> None:
    """Grouped bars: one group per held-out target (and the mean), one bar per method."""
    groups = [*targets, "mean"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.6))
    for i, m in enumerate(methods):
        vals = [metrics[g][m] for g in groups]
        bars = ax.bar(np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(methods), fontsize=8, loc="lower center")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weight_histograms(weights: dict[str, np.ndarray], sources: dict[str, list[str]], path: Path) -> None:
    """Per target, the distribution of the BNE weight given to each source domain ((S, N) arrays)."""
    fig, axes = plt.subplots(1, len(weights), figsize=(3.2 * len(weights), 2.8), squeeze=False)
    for ax, (target, w) in zip(axes[0], weights.items()):
        for d, name in enumerate(sources[target]):
            ax.hist(w[d], bins=np.linspace(0, 1, 41), alpha=0.6, label=name)
        ax.set_title(f"held out: {target}", fontsize=9)
        ax.set_xlabel("BNE weight")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
