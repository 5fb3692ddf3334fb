"""Ingest a ``<domain>/<class>/<image>`` tree into ``manifest.parquet``: one row per image, dataset metadata in the schema.

Rows (in domain, class, path order): ``path`` (relative to the source, POSIX), ``domain``, ``class``, ``label``
(0-based index into the class list), ``split`` (``train`` / ``val``), ``sha256``, ``bytes``, ``width``, ``height``,
``mode`` (as stored; null when the file does not decode), ``converted`` (e.g. ``"CMYK->RGB"``, empty when already
RGB) and ``error`` (why the file does not decode, empty when it does). Bad images are recorded, not fatal: the
validation stage fails on them, naming the file. So are odd files: a name that is not UTF-8 or holds a backslash
(the row's path shows it printable), an image above ``max_pixels`` (``dataset.max_pixels``: refused from its
header, never decoded); a JPEG above ``bne.data.DRAFT_PIXELS`` is checked at 1/8 scale.

After validation, :func:`dataset_from_manifest` is the one loader: it requires the validation record beside the
copy (:func:`write_validation_record`: the copy's SHA-256) and re-checks the rows the stages rely on.

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
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import UnidentifiedImageError
from PIL.Image import DecompressionBombError

from bne.data import (
    DRAFT_PIXELS,
    RGB_MODES,  # noqa: F401  (re-exported: validation checks the recorded modes against it)
    FolderDataset,
    Sample,
    load_folder_dataset,
    name_problem,
    open_image,
    pixel_limit,
    printable,
    read_split_file,
    safe_relpath,
    scan_folder,
)
from bne.io import atomic_call
from bne.progress import progress as progress_bar

MANIFEST = "manifest.parquet"
REPORT = "ingest_report.json"
SUMS = "SHA256SUMS"
META_KEY = b"bne"
#: Beside a validated manifest (``<name>.validation.json``): its SHA-256 and what validation checked.
RECORD_SUFFIX = ".validation.json"
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


def inspect_image(path: Path, max_pixels: int) -> ImageFacts:
    """Hash a file and decode it fully (truncation shows only then); decode errors are returned, not raised.

    An image above ``max_pixels`` is refused from its header, never decoded; a JPEG above
    ``bne.data.DRAFT_PIXELS`` is decoded at 1/8 scale (every byte of it is still read). Size and mode are the file's.
    """
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable (permissions, vanished): a row error naming the file, not an abort
        return ImageFacts("", 0, None, None, None, "", f"cannot read the file: {e.strerror or e}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with open_image(data, "", max_pixels) as im:
            width, height, mode = im.width, im.height, im.mode
            if im.format == "JPEG" and width * height > DRAFT_PIXELS:
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
            converted = "" if mode == "RGB" else f"{mode}->RGB"
            if converted:
                im.convert("RGB")
            return ImageFacts(digest, len(data), width, height, mode, converted, "")
    except UnidentifiedImageError:  # its message names an in-memory buffer
        error = "empty file" if not data else "not an image format Pillow reads"
    except Exception as e:  # Pillow raises many types; the manifest records which
        error = f"{type(e).__name__}: {e}"
        if isinstance(e, DecompressionBombError):  # Pillow's own limit, above ours
            error += f" (above {pixel_limit(max_pixels)} too)"
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
                out.append(printable(rel))
    return out


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
    *,
    max_pixels: int,
) -> dict:
    """Write ``out_dir/manifest.parquet`` and ``out_dir/ingest_report.json``; returns the report.

    ``max_pixels``: larger images are row errors, refused from their header (``dataset.max_pixels``). ``sums`` defaults to ``SHA256SUMS`` in ``source`` or its parent, when there is one. ``domains``: only
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
        it = pool.map(lambda rel: inspect_image(source / rel, max_pixels), paths)
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
    rows = [_row(s, f) for s, f in zip(ds.samples, facts)]
    report = meta | {
        "manifest": str(out_dir / MANIFEST),
        "images": len(rows),
        "converted": {r["path"]: r["converted"] for r in rows if r["converted"]},
        "undecodable": {r["path"]: r["error"] for r in rows if r["error"]},
        "ignored": [f for f in _ignored_files(source, set(paths)) if domains is None or f.split("/")[0] in domains],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({META_KEY: json.dumps(meta)}))
    atomic_call(out_dir / MANIFEST, lambda p: pq.write_table(table, p))
    text = json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8", "backslashreplace")
    atomic_call(out_dir / REPORT, lambda p: p.write_bytes(text))
    return report


def _row(s: Sample, f: ImageFacts) -> dict:
    """A manifest row; a file name that cannot be used as it is (not UTF-8, a backslash) is a row error naming it."""
    row = {"path": s.path, "domain": s.domain, "class": s.cls, "label": s.label, "split": s.split} | asdict(f)
    problem = name_problem(s.path.rsplit("/", 1)[-1])
    if problem:
        row |= {"path": printable(s.path), "error": f"{problem}: rename the file"}
    return row


def read_manifest_meta(manifest: Path | str) -> dict:
    """The dataset metadata stored in a manifest's schema; a file that is not a manifest is one line naming it."""
    try:
        meta = pq.read_schema(manifest).metadata or {}
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
        raise ValueError(f"{manifest}: not a Parquet manifest ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "rerun the ingest stage") from None
    if META_KEY not in meta:
        raise ValueError(f"{manifest}: no 'bne' metadata; not a manifest written by `bne ingest`")
    try:
        out = json.loads(meta[META_KEY])
    except ValueError:
        raise ValueError(f"{manifest}: its 'bne' metadata is not valid JSON; rerun `bne ingest`") from None
    if not isinstance(out, dict):
        raise ValueError(f"{manifest}: its 'bne' metadata is not a mapping; rerun `bne ingest`")
    return out


def validated_path(manifest: Path | str) -> Path:
    """Where validation copies a manifest that passed (``manifest.validated.parquet``); later stages read that."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.validated.parquet")


def record_path(manifest: Path | str) -> Path:
    """The validation record beside a validated manifest: ``<name>.validation.json``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + RECORD_SUFFIX)


def manifest_sha256(manifest: Path | str) -> str:
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()


def write_validation_record(manifest: Path | str, record: dict) -> dict:
    """After a validation that passed: the validated copy's SHA-256 and ``record`` (what was checked), atomically."""
    manifest = Path(manifest)
    rec = {"manifest": manifest.name, "sha256": manifest_sha256(manifest), **record}
    text = json.dumps(rec, indent=1, sort_keys=True, ensure_ascii=False)
    atomic_call(record_path(manifest), lambda p: p.write_text(text, encoding="utf-8"))
    return rec


def read_validation_record(manifest: Path | str) -> dict:
    """The validation record of ``manifest`` once the file's SHA-256 is the one validation recorded.

    A manifest that never passed validation, or was edited after it, is refused with one line naming it.
    """
    manifest = Path(manifest)
    rec_file = record_path(manifest)
    if not rec_file.is_file():
        raise ValueError(f"{manifest}: no {rec_file.name} beside it, so not a manifest that passed `bne validate`; run the validate stage")
    try:
        rec = json.loads(rec_file.read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{rec_file}: not valid JSON; rerun the validate stage") from None
    actual = manifest_sha256(manifest)
    if not isinstance(rec, dict) or rec.get("sha256") != actual:
        recorded = str(rec.get("sha256"))[:16] if isinstance(rec, dict) else "?"
        raise ValueError(f"{manifest}: sha256 {actual[:16]}... is not the {recorded}... that validation recorded in "
                         f"{rec_file.name}: edited after validation; rerun the validate stage")
    return rec


def path_problem(root: Path, rel: object, resolved_root: Path | None = None, folders: dict | None = None) -> str:
    """Why ``rel`` is not a file inside ``root`` ("" when it is): not a normalised relative POSIX path, or a link out.

    ``folders``: a cache of resolved folders shared across calls (each folder resolved once, then one ``lstat`` a file).
    """
    if not isinstance(rel, str) or not rel:
        return "empty path"
    p = PurePosixPath(rel)
    if "\\" in rel or p.is_absolute() or ".." in p.parts or str(p) != rel:
        return f"path {rel!r} is not a relative path inside the dataset root {root}"
    resolved_root = resolved_root or Path(root).resolve()
    folders = {} if folders is None else folders
    parent = str(p.parent)
    if parent not in folders:
        folders[parent] = (Path(root) / parent).resolve()
    resolved = folders[parent] / p.name
    if resolved.is_symlink():
        resolved = resolved.resolve()
    if not resolved.is_relative_to(resolved_root):
        return f"path {rel!r} resolves to {resolved}, outside the dataset root {root}"
    return ""


def manifest_problems(rows: list[dict], meta: dict) -> list[str]:
    """What a stage relies on, re-checked row by row: paths inside the recorded root, ``<domain>/<class>/<file>``
    matching the row, labels the class list's, known domains, classes and splits, no duplicate paths.

    One message per problem, naming the row (its number and path).
    """
    classes, domains = meta.get("classes"), meta.get("domains")
    for key, values in (("classes", classes), ("domains", domains)):
        if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values) and len(set(values)) == len(values)):
            return [f"metadata {key} {values!r} is not a list of distinct names"]
    if not isinstance(meta.get("source"), str) or not meta["source"]:
        return [f"metadata source {meta.get('source')!r} is not a folder"]
    root = Path(meta["source"])
    resolved_root = root.resolve()
    label_of = {c: i for i, c in enumerate(classes)}
    out, seen, present, folders = [], {}, set(), {}
    for n, r in enumerate(rows):
        where = f"row {n} ({r.get('path')!r})"
        problem = path_problem(root, r.get("path"), resolved_root, folders)
        if problem:
            out.append(f"{where}: {problem}")
            continue
        dom, cls, label = r.get("domain"), r.get("class"), r.get("label")
        if dom not in domains:
            out.append(f"{where}: domain {dom!r} is not one of the manifest's domains {domains}")
        if cls not in label_of:
            out.append(f"{where}: class {cls!r} is not one of the manifest's classes {classes}")
        elif label != label_of[cls]:
            out.append(f"{where}: label {label!r}, but class {cls!r} is label {label_of[cls]} in the manifest's classes")
        if r["path"].split("/")[:-1] != [dom, cls]:
            out.append(f"{where}: path is not <domain>/<class>/<file> of its domain {dom!r} and class {cls!r}")
        if r.get("split") not in ("train", "val", "test"):
            out.append(f"{where}: split {r.get('split')!r} is not train, val or test")
        if "sha256" in r and not (isinstance(r["sha256"], str) and len(r["sha256"]) == 64
                                  and all(c in "0123456789abcdef" for c in r["sha256"])):
            out.append(f"{where}: sha256 {r['sha256']!r} is not 64 hex digits")
        if r["path"] in seen:
            out.append(f"{where}: duplicate of row {seen[r['path']]}")
        seen.setdefault(r["path"], n)
        present.add(dom)
    out += [f"domain {d!r} of the metadata has no rows" for d in domains if d not in present]
    return out


def dataset_from_manifest(manifest: Path | str, validated: bool = True) -> FolderDataset:
    """The samples of a validated manifest as a :class:`FolderDataset`, in manifest order, each with its SHA-256.

    The one loader of the stages after validation. ``validated``: the file must be the copy validation wrote (its
    SHA-256 recorded beside it, :func:`read_validation_record`). Then, whatever the record says, what the stages
    rely on is re-checked (:func:`manifest_problems`); undecodable rows are refused. Every refusal is one line
    naming the manifest and the first rows at fault.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest")
    if validated:
        read_validation_record(manifest)
    meta = read_manifest_meta(manifest)
    try:
        table = pq.read_table(manifest, columns=["path", "domain", "class", "label", "split", "sha256", "error"]).to_pylist()
    except Exception as e:  # noqa: BLE001 - a missing column, a torn file: name it
        raise ValueError(f"{manifest}: not a readable manifest ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    bad = [r["path"] for r in table if r["error"]]
    if bad:
        raise ValueError(f"{manifest}: {len(bad)} image(s) do not decode, e.g. {bad[:3]}; run `bne validate` first")
    problems = manifest_problems(table, meta)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{manifest}: {'; '.join(problems[:3])}{more}; rerun `bne ingest` and `bne validate`")
    samples = [Sample(r["path"], r["domain"], r["class"], int(r["label"]), r["split"], r["sha256"]) for r in table]
    return FolderDataset(Path(meta["source"]), list(meta["domains"]), list(meta["classes"]), samples, list(meta.get("fixes", [])))


def find_new_domains(source: Path | str, manifest: Path | str) -> list[str]:
    """Domains of the ``source`` tree that the manifest does not have."""
    known = set(read_manifest_meta(manifest)["domains"])
    return [d for d in sorted(scan_folder(Path(source))) if d not in known]
