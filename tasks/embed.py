"""Stage ``embed@T``: the sources' validation images projected into the embedding.

Writes per seed ``val_outputs.npz`` (every branch's probabilities and per-layer distances) and
``val_domains.npy``: the input of ``tune`` and of ``evaluate``'s source-side numbers. The held-out domain is not read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bne.evaluate import BranchOutputs, branch_chunk, branch_outputs
from bne.io import load_npy, save_npy
from bne.model_io import model_with_stats
from bne.train import pick_device
from tasks.inputs import fold_data, source_val, sources
from tasks.paths import Layout

PARAMS = ("dataset.name", "model", "train.resolution", "train.seeds", "train.device",
          "eval.batch", "eval.single_pass", "eval.branch_chunk")


def run(p, layout: Layout, target: str, progress: bool = True, log: Callable[[str], None] = print):
    dataset, arrays = fold_data(layout, p.train.resolution, held_out=target)
    srcs = sources(dataset, arrays, target)
    names = [a.name for a in srcs]
    paths = layout.fold(target)
    device = pick_device(p.train.device)
    spec = p.model.spec(len(dataset.classes), names)
    images, labels, domains = source_val(srcs)
    for seed in p.train.seeds:
        model, kinds = model_with_stats(spec, paths.train(seed, "bne") / "model.pt", paths.stats, seed, device)
        val = branch_outputs(model, images, labels, kinds, p.eval.batch, device, p.eval.single_pass,
                             desc=f"{target}: source val" if progress else "",
                             chunk=branch_chunk(p.eval.branch_chunk, p.eval.batch, device))
        out = paths.embed(seed)
        val.save(out / "val_outputs.npz")
        save_npy(out / "val_domains.npy", domains.numpy())
    log(f"{target}: {len(labels)} source validation images embedded x {len(p.train.seeds)} seed(s) -> {paths.embed()}")
    return paths.embed()


def load_val(paths, seed: int):
    """The source-validation outputs of ``embed`` and each image's domain index; missing or torn: one line naming it."""
    d = paths.embed(seed)
    return BranchOutputs.load(d / "val_outputs.npz", "embed"), torch.from_numpy(load_npy(d / "val_domains.npy", "domain indices", "embed"))
