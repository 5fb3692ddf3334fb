"""Ingest a ``<domain>/<class>/<image>`` tree into ``manifest.parquet``: one row per image, dataset metadata in the schema.

Rows (in domain, class, path order): ``path`` (relative to the source, POSIX), ``domain``, ``class``, ``label``
(0-based index into the class list), ``split`` (``train`` / ``val``), ``sha256``, ``bytes``, ``width``, ``height``,
``mode`` (as stored; null when the file does not decode), ``converted`` (e.g. ``"CMYK->RGB"``, empty when already
RGB) and ``error`` (why the file does not decode, empty when it does). Bad images are recorded, not fatal: the
validation stage fails on them, naming the file.

Splits: with PACS-format split files, ``train``/``crossval`` lists give ``train``/``val`` (labels from the folder,
duplicates dropped, files in neither list go to ``train``; each fix is recorded); without them a seeded stratified
split. There is no ``test`` value: under leave-one-domain-out the test set of a domain is all of its images (PACS's
``*_test_kfold.txt`` lists, when present, are only checked to cover their domain).

The schema metadata key ``bne`` holds JSON: dataset name, source, classes (label order), domains, how the split was
made, the fixes, the checksum verification. ``ingest_report.json`` next to the manifest holds the same plus the
converted, undecodable and ignored files. Both files are written to a temporary name and renamed, so a failed
ingest leaves the previous ones intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from bne.data import (
    FolderDataset,
    Sample,
    load_folder_dataset,
    read_split_file,
    safe_relpath,
    scan_folder,
)
from bne.progress import progress as progress_bar

MANIFEST = "manifest.parquet"
REPORT = "ingest_report.json"
SUMS = "SHA256SUMS"
META_KEY = b"bne"
# Pillow modes that convert to RGB without losing the picture (alpha is dropped, a palette expanded).
RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("domain", pa.string()),
        ("class", pa.string()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mode", pa.string()),
        ("converted", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    bytes: int
    width: int | None
    height: int | None
    mode: str | None
    converted: str
    error: str


def inspect_image(path: Path) -> ImageFacts:
    """Hash a file and decode it fully (truncation shows only then); decode errors are returned, not raised."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            converted = "" if im.mode == "RGB" else f"{im.mode}->RGB"
            if converted:
                im.convert("RGB")
            return ImageFacts(digest, len(data), im.width, im.height, im.mode, converted, "")
    except UnidentifiedImageError:  # its message names an in-memory buffer
        error = "empty file" if not data else "not an image format Pillow reads"
    except Exception as e:  # Pillow raises many types; the manifest records which
        error = f"{type(e).__name__}: {e}"
    return ImageFacts(digest, len(data), None, None, None, "", error)


def find_sums(source: Path) -> Path | None:
    """``SHA256SUMS`` in ``source`` or its parent (PACS keeps it next to ``images/``)."""
    return next((d / SUMS for d in (source, source.parent) if (d / SUMS).is_file()), None)


def read_sums(path: Path, source: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of a ``sha256sum`` file; paths are relative to ``source``.

    A file outside ``source`` may also prefix them with the source folder's name (``images/<domain>/...``).
    """
    sums = {}
    prefix = "" if path.parent.resolve() == source.resolve() else f"{source.name}/"
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition(" ")
        rel = rel.lstrip(" *")
        if len(digest) != 64 or not rel:
            raise ValueError(f"{path}:{n}: not a '<sha256>  <path>' line: {line!r}")
        sums[safe_relpath(source, rel.removeprefix(prefix) if prefix else rel, f"{path}:{n}")] = digest.lower()
    return sums


def verify_sums(path: Path, sums: dict[str, str], digests: dict[str, str], source: Path) -> dict:
    """Compare listed checksums with the computed ones; a mismatch or a listed file that is gone raises.

    Listed files that exist but are not images (a README) are not checked; they show in the report's ``ignored``.
    """
    gone = sorted(rel for rel in sums if rel not in digests and not (source / rel).exists())
    if gone:
        raise FileNotFoundError(f"{path} lists {len(gone)} file(s) missing from {source}: {', '.join(gone[:5])}")
    bad = [rel for rel, h in sums.items() if rel in digests and digests[rel] != h]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{path}: checksum mismatch for {', '.join(bad[:5])}{more}")
    unlisted = sorted(set(digests) - set(sums))
    verified = len(digests) - len(unlisted)
    return {"file": str(path), "verified": verified, "unlisted": len(unlisted), "unlisted_examples": unlisted[:20]}


def _check_test_lists(splits_dir: Path, source: Path, ds: FolderDataset, files: set[str], fixes: list[str]) -> None:
    """PACS ``<domain>_test_kfold.txt`` lists, where present, must name only images; unlisted ones are recorded."""
    for dom in ds.domains:
        f = splits_dir / f"{dom}_test_kfold.txt"
        if not f.is_file():
            continue
        listed = set(read_split_file(f, source, fixes, ds.classes))
        absent = sorted(listed - files)
        if absent:
            raise FileNotFoundError(f"{f}: lists {absent[0]}, which is not an image under {source}")
        unlisted = sorted(rel for rel in files - listed if rel.startswith(f"{dom}/"))
        fixes.extend(f"{rel}: not in {f.name} (kept; the test set is the whole domain)" for rel in unlisted)


def _ignored_files(source: Path, taken: set[str]) -> list[str]:
    """Non-hidden files under ``source`` that are not in the manifest (wrong depth or suffix, broken links)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = Path(dirpath, name).relative_to(source).as_posix()
            if not name.startswith(".") and rel not in taken and rel != SUMS:
                out.append(rel)
    return out


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def default_name(source: Path) -> str:
    """The dataset's name: the source folder's, or its parent's when the source is an ``images`` folder."""
    source = Path(source).resolve()
    return source.parent.name if source.name == "images" else source.name


def ingest(
    source: Path | str,
    out_dir: Path | str,
    splits: Path | str | None = None,
    sums: Path | str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    name: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    domains: list[str] | None = None,
) -> dict:
    """Write ``out_dir/manifest.parquet`` and ``out_dir/ingest_report.json``; returns the report.

    ``sums`` defaults to ``SHA256SUMS`` in ``source`` or its parent, when there is one. ``domains``: only
    these domains of ``source`` (for example new ones), with labels still indexed over every class of ``source``.
    """
    source, out_dir = Path(source), Path(out_dir)
    ds = load_folder_dataset(source, splits, val_fraction, seed, require_all_classes=False)
    if domains is not None:
        unknown = sorted(set(domains) - set(ds.domains))
        if unknown:
            raise ValueError(f"domain(s) {unknown} not found under {source} (domains: {ds.domains})")
        ds = replace(ds, domains=[d for d in ds.domains if d in domains], samples=[s for s in ds.samples if s.domain in domains])
    fixes = list(ds.fixes)
    paths = [s.path for s in ds.samples]
    if splits is not None:
        _check_test_lists(Path(splits), source, ds, set(paths), fixes)
    sums_file = Path(sums) if sums is not None else find_sums(source)
    if sums_file is not None and not sums_file.is_file():
        raise FileNotFoundError(f"checksum file not found: {sums_file}")
    listed = read_sums(sums_file, source) if sums_file else None
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(lambda rel: inspect_image(source / rel), paths)
        facts = list(progress_bar(it, total=len(paths), desc="ingest", unit="img", enabled=progress))
    digests = {p: f.sha256 for p, f in zip(paths, facts)}
    checksums = verify_sums(sums_file, listed, digests, source) if listed is not None else None
    meta = {
        "dataset": name or default_name(source),
        "source": str(source),
        "classes": ds.classes,
        "domains": ds.domains,
        "split": (
            {
                "method": "official split files",
                "splits": str(splits),
                "train": "*_train_kfold.txt and files in neither list",
                "val": "*_crossval_kfold.txt",
            }
            if splits is not None
            else {"method": "seeded stratified", "val_fraction": val_fraction, "seed": seed}
        )
        | {"test": "all images of the held-out domain"},
        "fixes": fixes,
        "checksums": checksums,
    }
    rows = [
        {"path": s.path, "domain": s.domain, "class": s.cls, "label": s.label, "split": s.split} | asdict(f)
        for s, f in zip(ds.samples, facts)
    ]
    report = meta | {
        "manifest": str(out_dir / MANIFEST),
        "images": len(rows),
        "converted": {r["path"]: r["converted"] for r in rows if r["converted"]},
        "undecodable": {r["path"]: r["error"] for r in rows if r["error"]},
        "ignored": [f for f in _ignored_files(source, set(paths)) if domains is None or f.split("/")[0] in domains],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({META_KEY: json.dumps(meta)}))
    _atomic_write(out_dir / MANIFEST, lambda p: pq.write_table(table, p))
    _atomic_write(out_dir / REPORT, lambda p: p.write_text(json.dumps(report, indent=1, ensure_ascii=False)))
    return report


def read_manifest_meta(manifest: Path | str) -> dict:
    """The dataset metadata stored in a manifest's schema."""
    meta = pq.read_schema(manifest).metadata or {}
    if META_KEY not in meta:
        raise ValueError(f"{manifest}: no 'bne' metadata; not a manifest written by `bne ingest`")
    return json.loads(meta[META_KEY])


def validated_path(manifest: Path | str) -> Path:
    """Where validation copies a manifest that passed (``manifest.validated.parquet``); later stages read that."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.validated.parquet")


def dataset_from_manifest(manifest: Path | str) -> FolderDataset:
    """The samples of a (validated) manifest as a :class:`FolderDataset`, in manifest order.

    Refuses a manifest with undecodable rows: only what validation let through reaches the cache and training.
    """
    meta = read_manifest_meta(manifest)
    table = pq.read_table(manifest, columns=["path", "domain", "class", "label", "split", "error"]).to_pylist()
    bad = [r["path"] for r in table if r["error"]]
    if bad:
        raise ValueError(f"{manifest}: {len(bad)} image(s) do not decode, e.g. {bad[:3]}; run `bne validate` first")
    samples = [Sample(r["path"], r["domain"], r["class"], int(r["label"]), r["split"]) for r in table]
    return FolderDataset(Path(meta["source"]), list(meta["domains"]), list(meta["classes"]), samples, list(meta.get("fixes", [])))


def find_new_domains(source: Path | str, manifest: Path | str) -> list[str]:
    """Domains of the ``source`` tree that the manifest does not have."""
    known = set(read_manifest_meta(manifest)["domains"])
    return [d for d in sorted(scan_folder(Path(source))) if d not in known]
