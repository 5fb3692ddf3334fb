"""Stage ``evaluate@T``: the only stage that reads the held-out domain: every image of it, every method and seed.

Also the source-side numbers that depend on the inference options: domain identification on source validation
and the 2-D map (PCA of the source images' distance profiles). Writes ``fold.json`` and ``target_outputs.npz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bne.evaluate import (
    accuracy,
    bne_predict,
    branch_chunk,
    branch_outputs,
    domain_id_accuracy,
    leave_own_out_accuracy,
    method_accuracies,
    options_dict,
    options_from_dict,
    plain_probs,
)
from bne.io import read_json, write_json
from bne.metrics import METHOD_KEYS, confusion, distance_profile
from bne.model_io import load_model, model_with_stats
from bne.train import pick_device
from tasks.embed import load_val
from tasks.inputs import fold_data, sources
from tasks.paths import Layout

PARAMS = ("dataset.name", "model", "train.resolution", "train.seeds", "train.device",
          "eval.batch", "eval.single_pass", "eval.branch_chunk", "eval.options")
MAP_SAMPLE = 300  # target images drawn on the 2-D map


def run(p, layout: Layout, target: str, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    dataset, arrays = fold_data(layout, p.train.resolution)
    srcs = sources(dataset, arrays, target)
    names = [a.name for a in srcs]
    paths = layout.fold(target)
    device = pick_device(p.train.device)
    k = len(dataset.classes)
    trained = read_json(paths.train() / "train.json", "training record", "train")
    tuned = read_json(paths.tune / "best.json", "tuning result", "tune")
    opts = p.eval.options.options()
    batch, chunk = p.eval.batch, branch_chunk(p.eval.branch_chunk, p.eval.batch, device)
    results = []
    for seed in p.train.seeds:
        t0 = time.time()
        model, kinds = model_with_stats(p.model.spec(k, names), paths.train(seed, "bne") / "model.pt", paths.stats, seed, device)
        deep = load_model(p.model.spec(k), paths.train(seed, "deepall") / "model.pt", device)
        val, val_domains = load_val(paths, seed)
        best = tuned["seeds"].get(str(seed)) if tuned.get("tuned") else None
        tuned_opts = options_from_dict(best["options"]) if best else opts
        prof = distance_profile(val, opts)
        center = prof.mean(0)
        basis = np.linalg.svd(prof - center, full_matrices=False)[2][:2]
        val_xy = (prof - center) @ basis.T
        # Only now is the held-out domain read.
        tgt = arrays[target]
        out = branch_outputs(model, tgt.images, tgt.labels, kinds, batch, device, p.eval.single_pass,
                             desc=f"{target}: target" if progress else "", chunk=chunk)
        deep_probs = plain_probs(deep, tgt.images, batch, device, desc=f"{target}: deepall" if progress else "")
        out.save(paths.eval(seed) / "target_outputs.npz")
        acc = method_accuracies(out, opts)
        bne_probs, weights = bne_predict(out, opts)
        pick = np.random.default_rng(seed).permutation(len(out.labels))[:MAP_SAMPLE]
        target_xy = (distance_profile(out, opts)[pick] - center) @ basis.T
        history = trained["seeds"][str(seed)]
        result = {
            "target": target,
            "seed": seed,
            "sources": names,
            "deepall": accuracy(deep_probs, out.labels),
            **{m: acc[m] for m in ("bne", "uniform", "nearest", "oracle")},
            "bne_tuned": method_accuracies(out, tuned_opts)["bne"],
            "bne_mean_max_weight": acc["mean_max_weight"],
            "domain_id_acc": domain_id_accuracy(val, val_domains, opts),
            "leave_own_out_val_acc": leave_own_out_accuracy(val, val_domains, opts),
            "tuned_options": options_dict(tuned_opts),
            "tuned_leave_own_out_val_acc": best["value"] if best else leave_own_out_accuracy(val, val_domains, opts),
            "confusion": {"deepall": confusion(deep_probs, out.labels, out.probs.shape[-1]),
                          "bne": confusion(bne_probs, out.labels, out.probs.shape[-1])},
            "mean_weights": weights.mean(1).tolist(),
            "map": {"domain_xy": [val_xy[val_domains.numpy() == d].mean(0).tolist() for d in range(len(names))],
                    "target_xy": target_xy.round(4).tolist(), "target_nearest": weights[:, pick].argmax(0).tolist()},
            "history": {m: history[m]["history"] for m in ("deepall", "bne")},
            "selected_epoch": {m: history[m]["selected_epoch"] for m in ("deepall", "bne")},
            "seconds": {"train": round(sum(history[m]["seconds"] for m in ("deepall", "bne")), 1),
                        "evaluate": round(time.time() - t0, 1)},
        }
        results.append(result)
        log(f"{target} seed {seed}: " + " ".join(f"{m} {result[m]:.4f}" for m in METHOD_KEYS))
    write_json(paths.eval() / "fold.json", {"target": target, "folds": results})
    return results
