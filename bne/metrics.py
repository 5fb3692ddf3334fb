"""Pure summaries of evaluated folds: accuracy tables (mean +- SE over seeds), confusion counts, ablation variants."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bne.embedding import InferenceOptions, aggregate_layers, layer_subset
from bne.evaluate import BranchOutputs

METHOD_KEYS = ("deepall", "bne", "uniform", "nearest", "oracle", "bne_tuned")


def summarize(folds: list[dict], targets: list[str]) -> dict:
    """Per target and mean, in percent; mean +- standard error over seeds when there are several."""
    metrics: dict[str, dict] = {}
    keys = (*METHOD_KEYS, "domain_id_acc")
    for t in targets:
        rows = [f for f in folds if f["target"] == t]
        m = {}
        for k in keys:
            v = 100 * np.array([r[k] for r in rows])
            m[k] = round(float(v.mean()), 2)
            if len(v) > 1:
                m[f"{k}_se"] = round(float(v.std(ddof=1) / np.sqrt(len(v))), 2)
        metrics[t] = m
    metrics["mean"] = {k: round(float(np.mean([metrics[t][k] for t in targets])), 2) for k in keys}
    seeds = sorted({f["seed"] for f in folds})
    if len(seeds) > 1:  # the mean over targets, per seed, then its standard error over seeds
        for k in keys:
            per_seed = [100 * np.mean([f[k] for f in folds if f["seed"] == s]) for s in seeds]
            metrics["mean"][f"{k}_se"] = round(float(np.std(per_seed, ddof=1) / np.sqrt(len(seeds))), 2)
    return metrics


def markdown_table(metrics: dict, targets: list[str]) -> str:
    cols = [("deepall", "DeepAll"), ("bne", "BNE"), ("uniform", "uniform"), ("nearest", "nearest"),
            ("oracle", "oracle branch (ref.)"), ("bne_tuned", "BNE, options tuned on source val"),
            ("domain_id_acc", "domain-id acc. (source val)")]
    lines = ["| held-out | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for t in [*targets, "mean"]:
        cells = []
        for k, _ in cols:
            v = metrics[t][k]
            se = metrics[t].get(f"{k}_se")
            cells.append(f"{v:.1f} ± {se:.1f}" if se is not None else f"{v:.1f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def confusion(probs: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """(K, K) counts: row = true class, column = predicted class."""
    m = torch.zeros(k, k, dtype=torch.long)
    m.index_put_((labels.long(), probs.argmax(-1)), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    return m.tolist()


def distance_profile(out: BranchOutputs, opts: InferenceOptions) -> np.ndarray:
    """(N, S): each image's aggregated distance to every source domain, the space BNE weights in."""
    d = out.dists[(opts.instance_stats, opts.embedding, opts.distance)]
    layers = layer_subset(d.shape[-1], list(opts.layers) if isinstance(opts.layers, tuple) else opts.layers)
    return aggregate_layers(d, layers, opts.aggregate).T.numpy()


def ablation_variants(base: InferenceOptions) -> list[tuple[str, InferenceOptions]]:
    """Inference options varied one at a time from ``base`` (an analysis of trained models; nothing is selected on it)."""
    variants: list[tuple[str, InferenceOptions]] = [("default", base)]
    variants += [(f"embedding={e}", replace(base, embedding=e)) for e in ("population", "instance_average")]
    variants += [(f"distance={d}", replace(base, distance=d)) for d in ("kl", "euclidean")]
    variants += [(f"layers={layer}", replace(base, layers=layer)) for layer in ("early", "middle", "late")]
    variants += [("instance_stats=single_pass", replace(base, instance_stats="single_pass"))]
    variants += [(f"power={p:g}", replace(base, power=p)) for p in (2.0, 4.0, 8.0, 16.0)]
    variants += [(f"population + power={p:g}", replace(base, embedding="population", power=p)) for p in (4.0, 16.0)]
    return variants
