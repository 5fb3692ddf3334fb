"""Folder datasets (``<domain>/<class>/<image>``), official split files, a decoded uint8 cache, augmentation."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bne.io import atomic_write, load_npy, save_npy
from bne.progress import progress as progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: Pillow modes that convert to RGB without losing the picture (alpha is dropped, a palette expanded). 16-bit and
#: floating-point modes (``I;16``, ``I``, ``F``) do not: ``convert("RGB")`` clips them to a white image.
RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
#: The largest image accepted (width x height) is the caller's ``max_pixels`` (``dataset.max_pixels`` of the
#: pipeline), read from the header before any decoding: ingest, cache, validation and predict apply the same rule.
#: JPEGs above this many pixels are decoded at a reduced scale (libjpeg's DCT scaling, ``Image.draft``), never in full.
DRAFT_PIXELS = 4096 * 4096
#: How the cache decodes: part of its key, so a change re-decodes every image.
DECODE = "Pillow convert RGB, resize bilinear reducing_gap=None; JPEG draft above DRAFT_PIXELS"


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, POSIX separators
    domain: str
    cls: str
    label: int
    split: str  # train | val
    sha256: str = field(default="", compare=False)  # the file's content as ingested ("" from a folder scan)


@dataclass
class FolderDataset:
    """Samples of a ``<domain>/<class>/<image>`` tree, with the class list in label order."""

    root: Path
    domains: list[str]
    classes: list[str]
    samples: list[Sample]
    fixes: list[str] = field(default_factory=list)  # what was repaired in split files, for the report

    def of(self, domain: str, split: str | None = None) -> list[Sample]:
        return [s for s in self.samples if s.domain == domain and (split is None or s.split == split)]


def safe_relpath(root: Path, rel: str, where: str) -> str:
    """``rel`` as a normalised relative path that stays inside ``root`` (also through symlinks)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{where}: path {rel!r} leaves the dataset root")
    resolved = (root / p).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: {rel!r} resolves to {resolved}, outside the dataset root {root}")
    return str(p)


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (kept by ``os`` as surrogates) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str:
    """Why a file or folder name cannot go into the manifest as it is ("" when it can)."""
    if printable(name) != name:
        return "file name is not valid UTF-8"
    if "\\" in name:
        return "file name contains a backslash (a path separator on Windows)"
    if any(ord(c) < 32 for c in name):
        return "file name contains a control character"
    return ""


def scan_folder(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{domain: {class: [relative image paths]}}`` of a folder tree; hidden files are skipped.

    A file whose name is not valid UTF-8 or holds a backslash is kept under its name as the OS gives it (ingest
    records it as a row error, see :func:`name_problem`); such a domain or class folder is refused, naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    tree: dict[str, dict[str, list[str]]] = {}
    for dom in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes = {}
        for cdir in sorted(p for p in dom.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for folder in (dom, cdir):
                if name_problem(folder.name):
                    raise ValueError(f"{printable(str(folder))}: {name_problem(folder.name).replace('file', 'folder')}; rename it")
            files = sorted(
                f"{dom.name}/{cdir.name}/{f.name}"
                for f in cdir.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            classes[cdir.name] = [_confined(root, f) if name_problem(f) else safe_relpath(root, f, str(root)) for f in files]
        if not any(classes.values()):
            raise ValueError(f"domain {dom.name!r} in {root} has no images")
        tree[dom.name] = classes
    if not tree:
        raise ValueError(f"no <domain>/<class>/<image> folders under {root}")
    return tree


def _confined(root: Path, rel: str) -> str:
    """``rel`` unchanged (an odd name, not normalised) once it resolves inside ``root``."""
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"{root}: {printable(rel)!r} resolves to {printable(str(resolved))}, outside the dataset root")
    return rel


def read_split_file(path: Path, root: Path, fixes: list[str], classes: Sequence[str] | None = None) -> list[str]:
    """Relative paths listed in a PACS-format split file (``<domain>/<class>/<file> <label>``), de-duplicated.

    The folder names the class, so labels are not used; with ``classes`` (label order), a label that disagrees
    with its folder (PACS labels are 1-based) is recorded in ``fixes``, like each dropped duplicate. A line whose
    last word is not an integer is a path without a label (file names may contain spaces).
    """
    seen: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        words = line.strip().rsplit(None, 1)
        has_label = len(words) == 2 and words[1].lstrip("-").isdigit()
        rel, label = (words[0], int(words[1])) if has_label else (line.strip(), None)
        rel = safe_relpath(root, rel, f"{path}:{n}")
        if rel in seen:
            fixes.append(f"{Path(path).name}:{n}: duplicate of line {seen[rel]} ({rel}), dropped")
            continue
        seen[rel] = n
        cls = PurePosixPath(rel).parent.name
        if classes is not None and label is not None and cls in classes and label != classes.index(cls) + 1:
            fixes.append(
                f"{Path(path).name}:{n}: label {label} disagrees with folder {cls!r} "
                f"(label {classes.index(cls) + 1}), folder kept ({rel})"
            )
    return list(seen)


def load_folder_dataset(
    root: Path | str,
    splits_dir: Path | str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    require_all_classes: bool = True,
) -> FolderDataset:
    """Scan ``root`` and assign train/val splits from PACS-format split files, or a seeded stratified split.

    Without ``require_all_classes`` a class missing from a domain is left for validation to report.
    """
    root = Path(root)
    tree = scan_folder(root)
    domains = sorted(tree)
    classes = sorted({c for d in tree.values() for c in d})
    for dom in domains if require_all_classes else ():
        missing = [c for c in classes if not tree[dom].get(c)]
        if missing:
            raise ValueError(f"domain {dom!r} has no images of class(es) {missing} (present in other domains)")
    label = {c: i for i, c in enumerate(classes)}
    fixes: list[str] = []
    split_of: dict[str, str] = {}
    if splits_dir is not None:
        splits_dir = Path(splits_dir)
        for dom in domains:
            files = {p for c in tree[dom].values() for p in c}
            for split, name in (("train", "train"), ("val", "crossval")):
                f = splits_dir / f"{dom}_{name}_kfold.txt"
                if not f.is_file():
                    raise FileNotFoundError(f"split file not found: {f}")
                for rel in read_split_file(f, root, fixes, classes):
                    if rel not in files:
                        raise FileNotFoundError(f"{f}: lists {rel}, which is not an image under {root}")
                    if rel in split_of:
                        fixes.append(f"{f.name}: {rel} already in {split_of[rel]}, kept there")
                        continue
                    split_of[rel] = split
            for rel in sorted(files - set(split_of)):
                split_of[rel] = "train"
                fixes.append(f"{rel}: in neither train nor crossval list, assigned to train")
    else:
        rng = random.Random(seed)
        for dom in domains:
            for c in classes:
                files = list(tree[dom].get(c, []))
                rng.shuffle(files)
                n_val = int(round(val_fraction * len(files))) if len(files) > 1 else 0
                for i, rel in enumerate(files):
                    split_of[rel] = "val" if i < n_val else "train"
    samples = [
        Sample(rel, dom, c, label[c], split_of[rel]) for dom in domains for c in classes for rel in tree[dom].get(c, [])
    ]
    return FolderDataset(root, domains, classes, samples, fixes)


def pixel_limit(max_pixels: int) -> str:
    """How errors name the limit."""
    return f"the maximum of {max_pixels} pixels (dataset.max_pixels)"


def check_pixels(width: int, height: int, where: str, max_pixels: int) -> None:
    """Refuse an image above ``max_pixels`` (width x height) before it is decoded."""
    if width * height > max_pixels:
        head = f"{where}: " if where else ""
        raise ValueError(f"{head}{width}x{height} = {width * height} pixels, above {pixel_limit(max_pixels)}")


def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """An image from its bytes, header read only; refused above ``max_pixels`` before any decoding.

    ``where`` names the file in errors. The caller closes it (``with``).
    """
    im = Image.open(io.BytesIO(data))
    try:
        check_pixels(im.width, im.height, where, max_pixels)
    except ValueError:
        im.close()
        raise
    return im


def decode_bytes(data: bytes, size: int, where: str, *, max_pixels: int) -> np.ndarray:
    """Decode an image's bytes to RGB resized to ``size`` x ``size`` (uint8 HWC). Errors are one line naming ``where``.

    Refused: a mode without a faithful RGB conversion (16-bit, float), more than ``max_pixels`` pixels.
    A JPEG above :data:`DRAFT_PIXELS` is decoded at the smallest DCT scale that still covers ``size``.
    """
    try:
        with open_image(data, where, max_pixels) as im:
            if im.mode not in RGB_MODES:
                raise ValueError(f"mode {im.mode} (16-bit or floating-point) has no faithful RGB conversion; save it as 8-bit")
            if im.format == "JPEG" and im.width * im.height > DRAFT_PIXELS:
                im.draft(None, (size, size))
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types; the caller needs the file name
        msg = str(e).removeprefix(f"{where}: ") if not isinstance(e, UnidentifiedImageError) else "not an image format Pillow reads"
        if isinstance(e, Image.DecompressionBombError):  # Pillow's own limit (2 x its MAX_IMAGE_PIXELS), above ours
            msg += f" (above {pixel_limit(max_pixels)} too)"
        raise ValueError(f"cannot decode image {where}: {msg}") from None


def decode_image(path: Path, size: int, *, max_pixels: int) -> np.ndarray:
    """Decode an image file to RGB and resize it to ``size`` x ``size`` (uint8 HWC). Errors name the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
    return decode_bytes(data, size, str(path), max_pixels=max_pixels)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _changed(where: str, recorded: str, actual: str) -> ValueError:
    return ValueError(f"{where}: content changed since ingest (sha256 {recorded[:16]}... in the manifest, {actual[:16]}... on disk); "
                      "rerun `bne ingest` and `bne validate`")


def content_keys(dataset: FolderDataset, workers: int = 4, progress: bool = True, verify: bool = False) -> dict[str, list[str]]:
    """``{domain: [sha256 per sample]}``: the manifest's; files are hashed where it has none, or all with ``verify``.

    With ``verify`` a file whose content differs from the manifest's hash raises, naming it (the first few).
    """
    todo = [s for s in dataset.samples if verify or not s.sha256]
    hashed: dict[str, str] = {}
    if todo:
        with ThreadPoolExecutor(workers) as pool:
            it = pool.map(lambda s: _sha256(dataset.root / s.path), todo)
            for s, h in zip(todo, progress_bar(it, total=len(todo), desc="hash sources", unit="img", enabled=progress)):
                hashed[s.path] = h
        bad = [(s, hashed[s.path]) for s in todo if s.sha256 and s.sha256 != hashed[s.path]]
        if bad:
            more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
            s, h = bad[0]
            raise ValueError(str(_changed(str(dataset.root / s.path), s.sha256, h)) + more)
    return {d: [hashed.get(s.path) or s.sha256 for s in dataset.of(d)] for d in dataset.domains}


def read_index(index_file: Path) -> dict | None:
    """A cache's ``index.json``, or None when missing or unreadable (the cache is then rebuilt)."""
    try:
        index = json.loads(Path(index_file).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _old_rows(out_dir: Path, old: dict | None, size: int) -> dict[str, tuple[np.ndarray, int]]:
    """``{sha256: (array, row)}`` of a previous cache with the same size and decoding (content-addressed reuse)."""
    if not old or old.get("size") != size or old.get("decode") != DECODE or not isinstance(old.get("domains"), dict):
        return {}
    rows: dict[str, tuple[np.ndarray, int]] = {}
    for d, entry in old["domains"].items():
        f = out_dir / f"{d}.npy"
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), list) and f.is_file()):
            continue
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError):
            continue
        if arr.shape == (len(entry["sha256"]), size, size, 3) and arr.dtype == np.uint8:
            for i, h in enumerate(entry["sha256"]):
                rows.setdefault(h, (arr, i))
    return rows


def build_cache(dataset: FolderDataset, size: int, out_dir: Path | str, workers: int = 4, progress: bool = True,
                verify: bool = False, *, max_pixels: int) -> Path:
    """Decode every image once into ``out_dir/<domain>.npy`` (N, size, size, 3) uint8, rows in sample order.

    Content-addressed: ``index.json`` keys each row on the image's SHA-256 (the manifest's) and the decoding
    (``size``, :data:`DECODE`). A row whose key is in the previous cache is copied from it, any other image is
    decoded (and its bytes checked against the manifest's hash); a complete cache with the same index is reused
    as it is. ``verify``: re-hash every source file first, refusing any that changed since ingest. ``max_pixels``:
    the decode rules' limit (:func:`decode_bytes`; it refuses, it never changes pixels, so it is not part of the key).
    Written atomically: the old index goes before the first array is replaced and the new one comes last, so a killed
    run leaves either the previous cache whole or no index (the next run decodes everything).
    """
    out_dir = Path(out_dir)
    index_file = out_dir / "index.json"
    keys = content_keys(dataset, workers, progress, verify)
    index = {
        "size": size,
        "decode": DECODE,
        "root": str(dataset.root),
        "domains": {d: {"paths": [s.path for s in dataset.of(d)], "sha256": keys[d]} for d in dataset.domains},
    }
    old = read_index(index_file)
    if old == index and all((out_dir / f"{d}.npy").is_file() for d in dataset.domains):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    reuse = _old_rows(out_dir, old, size)

    def decode(i_path_sha):
        _, path, sha = i_path_sha
        data = (dataset.root / path).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise _changed(str(dataset.root / path), sha, actual)
        return decode_bytes(data, size, str(dataset.root / path), max_pixels=max_pixels)

    with ThreadPoolExecutor(workers) as pool:
        for dom, entry in index["domains"].items():
            same = old is not None and old.get("size") == size and old.get("decode") == DECODE \
                and (old.get("domains") or {}).get(dom) == entry
            if same and (out_dir / f"{dom}.npy").is_file():
                try:
                    ok = np.load(out_dir / f"{dom}.npy", mmap_mode="r").shape == (len(entry["sha256"]), size, size, 3)
                except (OSError, ValueError):
                    ok = False
                if ok:
                    continue
            arr = np.empty((len(entry["paths"]), size, size, 3), dtype=np.uint8)
            todo = []
            for i, (path, sha) in enumerate(zip(entry["paths"], entry["sha256"])):
                if sha in reuse:
                    a, r = reuse[sha]
                    arr[i] = a[r]
                else:
                    todo.append((i, path, sha))
            it = pool.map(decode, todo)
            for (i, _, _), img in zip(todo, progress_bar(it, total=len(todo), desc=f"cache {dom} @{size}px", unit="img", enabled=progress)):
                arr[i] = img
            index_file.unlink(missing_ok=True)  # from the first array replaced until the new index: no index, no reuse
            save_npy(out_dir / f"{dom}.npy", arr)
    atomic_write(index_file, json.dumps(index))
    return out_dir


@dataclass
class DomainArrays:
    """One domain's cached images (uint8 NHWC, memory-mapped) with labels, split by train/val."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    train: np.ndarray  # row indices
    val: np.ndarray
    fingerprint: str = ""  # sha256 of the pixels, labels and split: keys checkpoints and results to the data


def arrays_fingerprint(images: np.ndarray, labels: np.ndarray, train: np.ndarray, chunk: int = 256) -> str:
    h = hashlib.sha256()
    for i in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[i : i + chunk]).data)
    for a in (labels, train):
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def load_cache(dataset: FolderDataset, cache_dir: Path | str, skip: Sequence[str] = ()) -> dict[str, DomainArrays]:
    """Memory-mapped arrays of every domain; the ``skip`` domains' files are not opened (a held-out domain)."""
    cache_dir = Path(cache_dir)
    index = read_index(cache_dir / "index.json")
    if index is None or index.get("decode") != DECODE:
        raise FileNotFoundError(f"{cache_dir / 'index.json'}: missing, unreadable or from an older cache format; "
                                "rebuild the cache (`bne cache`)")
    out = {}
    for d in [d for d in dataset.domains if d not in skip]:
        samples = dataset.of(d)
        entry = index["domains"].get(d) or {}
        stale = next((s.path for s, p, h in zip(samples, entry.get("paths", []), entry.get("sha256", []))
                      if s.path != p or (s.sha256 and s.sha256 != h)), None)
        if stale or len(entry.get("paths", [])) != len(samples):
            where = f" (first difference: {stale})" if stale else ""
            raise ValueError(f"{cache_dir}: domain {d}'s cache holds other images than the manifest{where}; rebuild the cache (`bne cache`)")
        images = load_npy(cache_dir / f"{d}.npy", "image cache", "cache", mmap_mode="r")
        if images.shape[0] != len(samples):
            raise ValueError(f"{cache_dir / (d + '.npy')}: {images.shape[0]} rows for {len(samples)} samples; rebuild the cache")
        split = np.array([s.split for s in samples])
        labels = np.array([s.label for s in samples], dtype=np.int64)
        train = np.flatnonzero(split == "train")
        out[d] = DomainArrays(d, images, labels, train, np.flatnonzero(split == "val"), arrays_fingerprint(images, labels, train))
    return out


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Training augmentation; no defaults: the values come from ``params.yaml`` (``train.augment:``)."""

    crop_scale: tuple[float, float]  # random resized crop: area fraction [low, high]
    hflip: float  # probability of a horizontal flip
    brightness: float  # colour jitter strengths
    contrast: float
    saturation: float
    hue: float
    grayscale: float  # probability of grayscale


class Augment:
    """Random resized crop, flip, colour jitter and grayscale on uint8 images; uses torch's global RNG."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        # imported here: torchvision (with the torch._dynamo it loads) doubles a process's start-up, and only the
        # stages that train augment (ingest, validate, cache, stats, embed, tune, evaluate, report do not)
        from torchvision.transforms import v2

        self.tf = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), antialias=True),
                v2.RandomHorizontalFlip(cfg.hflip),
                v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
                v2.RandomGrayscale(cfg.grayscale),
            ]
        )

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)
        return torch.stack([self.tf(img) for img in x]).float().div_(255)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], no augmentation."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255)


def domain_batches(
    train_rows: Sequence[np.ndarray], per_domain: int, steps: int, generator: torch.Generator
) -> Iterator[list[np.ndarray]]:
    """``steps`` lists of one index array per domain (``per_domain`` rows each), cycling seeded permutations."""
    perms = [torch.randperm(len(r), generator=generator).numpy() for r in train_rows]
    pos = [0] * len(train_rows)
    for _ in range(steps):
        batch = []
        for d, rows in enumerate(train_rows):
            if pos[d] + per_domain > len(rows):
                perms[d] = torch.randperm(len(rows), generator=generator).numpy()
                pos[d] = 0
            take = perms[d][pos[d] : pos[d] + per_domain]
            if len(take) < per_domain:  # a domain smaller than one sub-batch: sample with repetition
                take = np.resize(take, per_domain)
            batch.append(np.sort(rows[take]))
            pos[d] += per_domain
        yield batch
