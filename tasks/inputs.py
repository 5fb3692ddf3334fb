"""What the stages after validation read: the validated manifest and the decoded cache, re-checked on open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bne.data import DomainArrays, FolderDataset, load_cache, to_tensor
from bne.ingest import dataset_from_manifest, read_validation_record
from tasks.paths import Layout, resolve


def validated_dataset(layout: Layout, dataset_root: str | None = None) -> FolderDataset:
    """The samples of the validated manifest, the one way the stages after validation open it.

    Refused, in one line naming the file: no validated copy; a copy whose SHA-256 is not the one validation
    recorded (edited after validation); a copy validated without the configured ``dataset.root`` check, or of
    another dataset; and, re-checked on every open, rows that leave the recorded root (``..``, absolute paths,
    links), labels that are not their class's, unknown domains or classes, duplicate rows. ``dataset_root``
    (the stage's ``dataset.root``, relative to the working or the project folder): the root validation checked.
    """
    manifest = layout.manifest
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no validated manifest; run the ingest and validate stages first (dvc repro validate)")
    record = read_validation_record(manifest)
    if record.get("dataset") != layout.dataset:
        raise ValueError(f"{manifest}: a manifest of dataset {record.get('dataset')!r}, not {layout.dataset!r}; rerun ingest and validate")
    if not record.get("dataset_root"):
        raise ValueError(f"{manifest}: validated without checking its source against dataset.root; rerun the validate stage")
    if dataset_root is not None:
        checked = Path(record["dataset_root"]).resolve()
        if all(resolve(base, dataset_root).resolve() != checked for base in (Path("."), layout.root)):
            raise ValueError(f"{manifest}: validated for dataset.root {record['dataset_root']}, but dataset.root is now "
                             f"{dataset_root!r}; rerun the ingest and validate stages")
    dataset = dataset_from_manifest(manifest)
    if dataset.root.resolve() != Path(record["dataset_root"]).resolve():
        raise ValueError(f"{manifest}: its source {dataset.root} is not the dataset.root {record['dataset_root']} validation checked; "
                         "rerun the ingest and validate stages")
    return dataset


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
