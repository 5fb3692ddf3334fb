"""Figures for the reports (matplotlib, Agg backend): accuracy per method and target, BNE weights."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bne.io import atomic_call  # noqa: E402


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
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
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
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def confusion_matrices(confusions: dict[str, dict[str, list]], classes: list[str] | None, path: Path) -> None:
    """Per target, DeepAll's and BNE's confusion matrices (rows: true class, normalised per row)."""
    methods = list(next(iter(confusions.values())))
    fig, axes = plt.subplots(len(methods), len(confusions), figsize=(3.3 * len(confusions), 3.1 * len(methods)), squeeze=False)
    for j, (target, per_method) in enumerate(confusions.items()):
        for i, m in enumerate(methods):
            c = np.asarray(per_method[m], dtype=float)
            c = c / np.maximum(1, c.sum(1, keepdims=True))
            ax = axes[i][j]
            ax.imshow(c, vmin=0, vmax=1, cmap="Blues")
            names = classes or [str(k) for k in range(len(c))]
            ax.set_xticks(range(len(c)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(c)), names, fontsize=6)
            for (r, k), v in np.ndenumerate(c):
                if v >= 0.05:
                    ax.text(k, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=5, color="white" if v > 0.6 else "black")
            ax.set_title(f"{target}: {m} ({100 * np.trace(np.asarray(per_method[m])) / max(1, np.sum(per_method[m])):.1f}%)", fontsize=8)
    fig.tight_layout()
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def embedding_maps(maps: dict[str, tuple[list[str], dict]], path: Path) -> None:
    """Per target: the source domains and a sample of target images in 2-D.

    Each image is placed by its vector of distances to the source domains' statistics (the space BNE weights
    in), projected on the two principal axes of the source validation images; a domain sits at the mean of
    its validation images. Target points are coloured by their nearest source domain.
    """
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (target, (sources, m)) in zip(axes[0], maps.items()):
        xy = np.asarray(m["target_xy"]).reshape(-1, 2)
        near = np.asarray(m["target_nearest"])
        for d, name in enumerate(sources):
            sel = near == d
            ax.scatter(xy[sel, 0], xy[sel, 1], s=5, alpha=0.4, color=colours[d % len(colours)])
            dx, dy = m["domain_xy"][d]
            ax.scatter([dx], [dy], s=120, marker="*", edgecolor="black", color=colours[d % len(colours)], label=name, zorder=3)
        ax.set_title(f"held out: {target} ({len(xy)} images)", fontsize=9)
        ax.set_xlabel("PC 1 of distance profile", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def paired_differences(summary: dict[str, dict[str, dict]], groups: list[str], path: Path, title: str = "") -> None:
    """Per variant (a row each), its paired difference to DeepAll (points) per held-out domain and on the mean:
    a dot at the mean over seeds, a bar of +- 1 SE where there are two seeds or more, the seed count beside it."""
    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(names) + 1.4))
    offsets = np.linspace(-0.3, 0.3, len(groups))
    for j, g in enumerate(groups):
        ys, xs, errs, ns = [], [], [], []
        for i, name in enumerate(names):
            row = summary[name].get(g)
            if row is None:
                continue
            ys.append(i + offsets[j])
            xs.append(row["diff"][0])
            errs.append(row["diff"][1] or 0.0)
            ns.append(len(row["seeds"]))
        if xs:
            ax.errorbar(xs, ys, xerr=errs, fmt="o", ms=4, capsize=2, label=g, mfc="white" if g != "mean" else None)
            for x, y, n in zip(xs, ys, ns):
                ax.annotate(str(n), (x, y), xytext=(3, -2), textcoords="offset points", fontsize=6)
    ax.axvline(0, color="gray", lw=0.8)
    ax.axvline(2, color="gray", lw=0.8, ls=":")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference to DeepAll (points; number: seeds)")
    ax.legend(fontsize=7, ncol=len(groups), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / max(1, len(names))))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
