"""What the stages after validation read: the validated manifest and the decoded cache, re-checked on open."""

from __future__ import annotations

import numpy as np
import torch

from bne.data import DomainArrays, FolderDataset, load_cache, to_tensor
from bne.ingest import dataset_from_manifest
from tasks.paths import Layout


def validated_dataset(layout: Layout) -> FolderDataset:
    """The samples of the validated manifest; training never starts from an unvalidated folder scan."""
    if not layout.manifest.is_file():
        raise FileNotFoundError(f"{layout.manifest}: no validated manifest; run the ingest and validate stages first (dvc repro validate)")
    return dataset_from_manifest(layout.manifest)


def fold_data(layout: Layout, resolution: int, held_out: str | None = None) -> tuple[FolderDataset, dict[str, DomainArrays]]:
    """The validated dataset and its memory-mapped cache; ``held_out``'s file is never opened."""
    dataset = validated_dataset(layout)
    if held_out is not None and held_out not in dataset.domains:
        raise ValueError(f"held-out domain {held_out!r} is not a domain of {layout.manifest} ({dataset.domains})")
    cache = layout.cache(resolution)
    if not (cache / "index.json").is_file():
        raise FileNotFoundError(f"{cache}: no image cache at {resolution} px; run the cache stage first (dvc repro cache)")
    return dataset, load_cache(dataset, cache, skip=[held_out] if held_out else [])


def sources(dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str) -> list[DomainArrays]:
    """The source domains of the fold that holds ``target`` out, in dataset order."""
    if target not in dataset.domains:
        raise ValueError(f"held-out domain {target!r} is not a domain of the dataset ({dataset.domains})")
    return [arrays[d] for d in dataset.domains if d != target]


def source_val(srcs: list[DomainArrays]):
    """The sources' validation images, labels and each image's domain index."""
    images = np.concatenate([a.images[a.val] for a in srcs])
    labels = np.concatenate([a.labels[a.val] for a in srcs])
    domains = torch.as_tensor(np.concatenate([np.full(len(a.val), d) for d, a in enumerate(srcs)]))
    return images, labels, domains


def source_batches(arr: DomainArrays, rows, batch: int):
    """Batches of ``rows`` of one domain as float tensors (for statistics passes)."""
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch):
        yield to_tensor(arr.images[rows[i : i + batch]])

