"""Stage ``stats@T``: per-domain statistics of the fold's BNE model on its source domains, one Parquet file.

Kinds: ``running`` (what the branches normalize with: EMA, or PreciseBN with ``eval.branch_stats=precise``),
``population`` (exact, one no-grad pass) and ``instance_average``. The held-out domain is not read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

import pyarrow as pa

from bne.io import read_json, write_parquet
from bne.model_io import load_model
from bne.stats import (
    population_stats,
    precise_running_stats,
    running_stats,
    stats_table,
)
from bne.train import config_hash, pick_device
from tasks.inputs import fold_data, source_batches, sources
from tasks.paths import Layout

PARAMS = ("dataset.name", "model", "train", "eval.branch_stats", "eval.batch")


def run(p, layout: Layout, target: str, log: Callable[[str], None] = print):
    dataset, arrays = fold_data(layout, p.train.resolution, held_out=target)
    srcs = sources(dataset, arrays, target)
    names = [a.name for a in srcs]
    paths = layout.fold(target)
    trained = read_json(paths.train() / "train.json", "training record", "train")
    device = pick_device(p.train.device)
    spec = p.model.spec(len(dataset.classes), names)
    batch, kind = p.eval.batch, p.eval.branch_stats
    tables, hashes = [], {}
    for seed in p.train.seeds:
        model = load_model(spec, paths.train(seed, "bne") / "model.pt", device)
        hashes[str(seed)] = trained["seeds"][str(seed)]["bne"]["model_sha256"]
        if kind == "precise":
            precise_running_stats(model, [(d, source_batches(a, a.train, batch)) for d, a in enumerate(srcs)], device)
        run_ = running_stats(model.norm_layers())
        pop, inst = population_stats(model, [(d, source_batches(a, a.train, batch)) for d, a in enumerate(srcs)], device)
        tables.append(pa.table(stats_table([run_, pop, inst], names, dataset=p.dataset.name, held_out=target, seed=seed)))
    model_params = p.model.spec(len(dataset.classes))  # the hash keys the file to the training configuration
    table = pa.concat_tables(tables).replace_schema_metadata({
        "dataset": p.dataset.name, "held_out": target, "sources": json.dumps(names), "seeds": json.dumps(list(p.train.seeds)),
        "checkpoint_sha256": json.dumps(hashes),
        "params_hash": config_hash(model_params, p.train.config(0), p.train.resolution, kind),
        "norm": spec.norm, "branch_stats": kind, "backbone": spec.backbone,
        "resolution": str(p.train.resolution), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    write_parquet(table, paths.stats)
    log(f"{target}: statistics of {len(names)} source domains x {len(p.train.seeds)} seed(s) -> {paths.stats}")
    return paths.stats
