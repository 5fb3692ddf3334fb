"""Stage ``train@T``: DeepAll and BNE on every domain but ``T``, every seed, the same budget; resumable.

Writes ``data/train/<dataset>/<T>/seed<k>/<method>/`` (``last.pt`` per epoch, ``best.pt``, ``model.pt``) and
``train.json`` (curves, selected epoch, the weights' SHA-256, seconds). With ``tune.training.enabled`` a
source-only Optuna study of the training hyper-parameters runs first and its best configuration trains the fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace

from bne.io import atomic_torch_save, file_sha256, write_json
from bne.train import METHODS, init_distributed, rank, train, world_size
from tasks.inputs import fold_data, sources
from tasks.paths import Layout

PARAMS = ("dataset.name", "model", "train", "tune.storage", "tune.training")


def run(p, layout: Layout, target: str, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    dataset, arrays = fold_data(layout, p.train.resolution, held_out=target)
    srcs = sources(dataset, arrays, target)
    device = init_distributed(p.train.device)  # under torchrun: this rank's device, in the process group
    main = rank() == 0  # several processes: rank 0 alone writes
    spec = p.model.spec(len(dataset.classes))
    paths = layout.fold(target)
    record: dict = {"target": target, "sources": [a.name for a in srcs], "seeds": {}}
    study = p.tune.training  # read whole: the stage's outputs depend on it when enabled
    storage = p.tune.storage
    tuned = None
    if study.enabled and world_size() > 1:
        raise ValueError("tune.training.enabled: the training study runs on one process; run it without torchrun "
                         "(or set tune.training.enabled: false and train the configuration in train: under torchrun)")
    if study.enabled:
        from tasks.tune import redact, tuned_train_config

        tuned, result = tuned_train_config(spec, p.train.config(p.train.seeds[0]), p.train.resolution, study, storage,
                                           srcs, f"{p.dataset.name}-{target}", paths.train(), device)
        record.update({"tuned_train": asdict(tuned), "train_study": {**result, "storage": redact(result.get("storage", ""))}})
    for seed in p.train.seeds:
        cfg = replace(tuned, seed=seed) if tuned else p.train.config(seed)
        entry = {}
        for method in METHODS:
            t0 = time.time()
            out = paths.train(seed, method)
            res = train(method, spec, srcs, cfg, p.train.resolution, out, device, progress, log=log)
            if not main:
                continue
            atomic_torch_save(res.model.state_dict(), out / "model.pt")
            # Training time: the epochs' own times when recorded (a resumed run does not redo them), else this call's.
            epochs_s = [h["seconds"] for h in res.history if "seconds" in h]
            seconds = sum(epochs_s) if len(epochs_s) == len(res.history) else time.time() - t0
            entry[method] = {"history": res.history, "selected_epoch": res.selected_epoch,
                             "model_sha256": file_sha256(out / "model.pt"), "seconds": round(seconds, 1)}
        record["seeds"][str(seed)] = entry
    if main:
        write_json(paths.train() / "train.json", record)
    return record
