"""Stage ``final``: BNE trained on every domain (train lists; epoch chosen on the val lists), then its statistics.

The model ``bne predict`` uses: ``data/final/<dataset>/`` holds ``model.pt``, ``model.json`` (spec, classes, domains,
resolution, inference options, the weights' SHA-256) and ``stats.parquet`` (every domain's statistics).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

from bne.evaluate import options_dict
from bne.predict import batches, save_model, stats_tables, write_stats
from bne.stats import precise_running_stats
from bne.train import pick_device, train
from tasks.inputs import fold_data
from tasks.paths import Layout

PARAMS = ("dataset.name", "model", "train", "eval.branch_stats", "eval.batch", "eval.options")


def run(p, layout: Layout, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    dataset, arrays = fold_data(layout, p.train.resolution)
    out = layout.final
    device = pick_device(p.train.device)
    srcs = [arrays[d] for d in dataset.domains]
    seed = p.train.seeds[0]
    batch = p.eval.batch
    t0 = time.time()
    res = train("bne", p.model.spec(len(dataset.classes)), srcs, p.train.config(seed), p.train.resolution, out / "checkpoints",
                device, progress, log=log)
    model = res.model
    if p.eval.branch_stats == "precise":
        precise_running_stats(model, [(d, batches(a, a.train, batch)) for d, a in enumerate(srcs)], device)
    tables = stats_tables(model, srcs, dataset.domains, p.dataset.name, batch, device)
    info = {
        "dataset": p.dataset.name, "spec": asdict(model.spec), "classes": dataset.classes, "domains": dataset.domains,
        "resolution": p.train.resolution, "options": options_dict(p.eval.options.options()), "seed": seed,
        "history": res.history, "selected_epoch": res.selected_epoch, "train_seconds": round(time.time() - t0, 1),
    }
    info = save_model(model, out, info)
    write_stats(out / "stats.parquet", tables, {"dataset": p.dataset.name, "held_out": "none", "checkpoint_sha256": info["model_sha256"],
                                                "norm": model.spec.norm, "created_at": info["created_at"]})
    log(f"final model on {dataset.domains}: {out / 'model.pt'} (epoch {res.selected_epoch}, {info['train_seconds']:.0f} s)")
    return info
