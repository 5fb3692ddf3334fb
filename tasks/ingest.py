"""Stage ``ingest``: scan ``dataset.root``, hash and inspect every image, write the Parquet manifest."""

from __future__ import annotations

from pathlib import Path

from bne.ingest import ingest
from tasks.paths import Layout, resolve

PARAMS = ("dataset.name", "dataset.root", "dataset.splits", "dataset.val_fraction", "dataset.max_pixels")
SPLIT_SEED = 0  # the seeded stratified split when there are no split files


def run(p, layout: Layout, base: Path, progress: bool = True) -> dict:
    """``layout.ingest``/manifest.parquet and ingest_report.json; paths in params are relative to ``base``."""
    source = resolve(base, p.dataset.root)
    return ingest(source, layout.ingest, resolve(base, p.dataset.splits), None, p.dataset.val_fraction, SPLIT_SEED,
                  p.dataset.name, None, progress, max_pixels=p.dataset.max_pixels)


def summary(r: dict) -> str:
    checked = r["checksums"]
    sums = f"{checked['verified']} verified against {checked['file']}" if checked else "no SHA256SUMS"
    return (f"{r['manifest']}: {r['images']} images, {len(r['domains'])} domains {r['domains']}, {len(r['classes'])} classes\n"
            f"split: {r['split']['method']}; fixes: {len(r['fixes'])}; converted to RGB: {len(r['converted'])}; "
            f"undecodable: {len(r['undecodable'])}; ignored files: {len(r['ignored'])}; checksums: {sums}")
