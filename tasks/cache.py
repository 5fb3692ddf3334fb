"""Stage ``cache``: decode every image of the validated manifest once into memory-mappable per-domain arrays."""

from __future__ import annotations

from bne.data import build_cache
from tasks.inputs import validated_dataset
from tasks.paths import Layout

PARAMS = ("dataset.name", "train.resolution")
WORKERS = 4  # decoding threads


def run(p, layout: Layout, progress: bool = True) -> str:
    dataset = validated_dataset(layout)
    out = layout.cache(p.train.resolution)
    build_cache(dataset, p.train.resolution, out, WORKERS, progress)
    return f"{out}: {len(dataset.samples)} images of {len(dataset.domains)} domains at {p.train.resolution}x{p.train.resolution}"
