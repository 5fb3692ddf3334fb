"""Stage ``report``: every fold's ``fold.json`` -> metrics.json, metrics.md, details.json, ablation.json and figures."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bne.evaluate import (
    BranchOutputs,
    bne_predict,
    leave_own_out_accuracy,
    method_accuracies,
)
from bne.io import atomic_write, load_npy, read_json, write_json
from bne.metrics import ablation_variants, markdown_table, summarize
from bne.plots import (
    accuracy_bars,
    confusion_matrices,
    embedding_maps,
    weight_histograms,
)
from tasks.inputs import validated_dataset
from tasks.paths import Layout

PARAMS = ("dataset.name", "dataset.folds", "model.backbone", "model.norm", "train.resolution", "train.epochs",
          "train.seeds", "eval.options")
METHODS = ["deepall", "bne", "uniform", "nearest", "oracle", "bne_tuned"]


def ablation(layout: Layout, base, folds: list[dict]) -> list[dict]:
    """Inference options varied one at a time: mean target and leave-own-out source-val accuracy (analysis only)."""
    loaded = []
    for f in folds:
        paths = layout.fold(f["target"])
        val = paths.embed(f["seed"])
        loaded.append((BranchOutputs.load(paths.eval(f["seed"]) / "target_outputs.npz", "evaluate"),
                       BranchOutputs.load(val / "val_outputs.npz", "embed"),
                       torch.from_numpy(load_npy(val / "val_domains.npy", "domain indices", "embed"))))
    rows = []
    for name, o in ablation_variants(base):
        tgt, loo = [], []
        for out, val, dom in loaded:
            if (o.instance_stats, o.embedding, o.distance) not in out.dists:
                break
            tgt.append(method_accuracies(out, o)["bne"])
            loo.append(leave_own_out_accuracy(val, dom, o))
        else:
            rows.append({"variant": name, "target_acc": round(100 * float(np.mean(tgt)), 2),
                         "source_val_leave_own_out_acc": round(100 * float(np.mean(loo)), 2)})
    return rows


def run(p, layout: Layout, log: Callable[[str], None] = print) -> dict:
    name, targets, seeds = p.dataset.name, list(p.dataset.folds), list(p.train.seeds)
    opts = p.eval.options.options()
    # the class names of the figures: from the validated copy, re-checked like every stage's (never a tampered one)
    classes = validated_dataset(layout).classes if layout.manifest.is_file() else None
    folds = []
    for t in targets:
        folds += read_json(layout.fold(t).eval() / "fold.json", f"evaluation of {t}", "evaluate")["folds"]
    reports = layout.reports
    # Everything is computed before anything is written: a torn input fails the stage with the old report intact.
    metrics = summarize(folds, targets)
    abl = ablation(layout, opts, folds)
    first = [f for f in folds if f["seed"] == seeds[0]]
    weights = {f["target"]: bne_predict(BranchOutputs.load(layout.fold(f["target"]).eval(f["seed"]) / "target_outputs.npz", "evaluate"), opts)[1].numpy()
               for f in first}
    train_s = sum(f["seconds"]["train"] for f in folds)
    eval_s = sum(f["seconds"]["evaluate"] for f in folds)
    keep = ("target", "seed", "sources", "tuned_options", "tuned_leave_own_out_val_acc", "history", "selected_epoch",
            "seconds", "bne_mean_max_weight", "mean_weights", "confusion")
    config = {"backbone": p.model.backbone, "norm": p.model.norm, "resolution": p.train.resolution,
              "epochs": p.train.epochs, "seeds": seeds, "options": p.eval.options.model_dump()}
    detail = {"train_seconds_total": round(train_s, 1), "evaluate_seconds_total": round(eval_s, 1), "classes": classes,
              "folds": [{k: f[k] for k in keep} for f in folds], "config": config}
    md = [f"# {name}: leave-one-domain-out accuracy (%)\n\n", markdown_table(metrics, targets)]
    md.append(f"\nBackbone {p.model.backbone}, normalization {p.model.norm}, {p.train.resolution} px, "
              f"{p.train.epochs} epochs, seeds {seeds}; training of all folds {train_s / 60:.1f} min, "
              f"evaluation {eval_s / 60:.1f} min.\n")
    md.append("\n## Inference options, one at a time (target accuracy is analysis only; nothing is selected on it)\n\n")
    md.append("| variant | mean target acc. | mean source-val acc., own branch left out |\n|---|---|---|\n")
    md += [f"| {r['variant']} | {r['target_acc']:.1f} | {r['source_val_leave_own_out_acc']:.1f} |\n" for r in abl]
    md.append("\n## Tuned inference options (chosen on source validation, own branch left out)\n\n")
    md += [f"- {f['target']} seed {f['seed']}: {f['tuned_options']} (source score {100 * f['tuned_leave_own_out_val_acc']:.1f})\n" for f in folds]
    write_json(reports / "metrics.json", metrics)
    write_json(reports / "ablation.json", abl)
    write_json(reports / "details.json", detail)
    atomic_write(reports / "metrics.md", "".join(md))
    accuracy_bars(metrics, targets, METHODS, reports / "accuracy.png", f"{name}: leave-one-domain-out")
    weight_histograms(weights, {f["target"]: f["sources"] for f in first}, reports / "bne_weights.png")
    confusion_matrices({f["target"]: f["confusion"] for f in first}, classes, reports / "confusion.png")
    embedding_maps({f["target"]: (f["sources"], f["map"]) for f in first}, reports / "embedding_map.png")
    log("".join(md))
    return metrics
