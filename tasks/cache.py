"""Stage ``cache``: decode every image of the validated manifest once into memory-mappable per-domain arrays.

Content-addressed (``bne.data.build_cache``): rows key on each image's SHA-256 from the manifest and the decoding,
so an image whose content changed is decoded again; ``--verify`` re-hashes every source file first.
"""

from __future__ import annotations

from bne.data import build_cache
from tasks.inputs import validated_dataset
from tasks.paths import Layout

PARAMS = ("dataset.name", "dataset.root", "dataset.max_pixels", "train.resolution")
WORKERS = 4  # decoding threads


def run(p, layout: Layout, progress: bool = True, verify: bool = False) -> str:
    dataset = validated_dataset(layout, dataset_root=p.dataset.root)
    out = layout.cache(p.train.resolution)
    build_cache(dataset, p.train.resolution, out, WORKERS, progress, verify=verify, max_pixels=p.dataset.max_pixels)
    checked = "; every source re-hashed" if verify else ""
    return f"{out}: {len(dataset.samples)} images of {len(dataset.domains)} domains at {p.train.resolution}x{p.train.resolution}{checked}"
