"""Folder datasets (``<domain>/<class>/<image>``), official split files, a decoded uint8 cache, augmentation."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from bne.progress import progress as progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, POSIX separators
    domain: str
    cls: str
    label: int
    split: str  # train | val


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


def scan_folder(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{domain: {class: [relative image paths]}}`` of a folder tree; hidden files are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    tree: dict[str, dict[str, list[str]]] = {}
    for dom in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes = {}
        for cdir in sorted(p for p in dom.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                f"{dom.name}/{cdir.name}/{f.name}"
                for f in cdir.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            classes[cdir.name] = [safe_relpath(root, f, str(root)) for f in files]
        if not any(classes.values()):
            raise ValueError(f"domain {dom.name!r} in {root} has no images")
        tree[dom.name] = classes
    if not tree:
        raise ValueError(f"no <domain>/<class>/<image> folders under {root}")
    return tree


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


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode an image to RGB and resize it to ``size`` x ``size`` (uint8 HWC). Errors name the file."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types; the caller needs the file name
        raise ValueError(f"cannot decode image {path}: {e}") from e


def build_cache(dataset: FolderDataset, size: int, out_dir: Path | str, workers: int = 4, progress: bool = True) -> Path:
    """Decode every image once into ``out_dir/<domain>.npy`` (N, size, size, 3) uint8, rows in sample order.

    Written atomically; an existing complete cache with the same index is reused.
    """
    out_dir = Path(out_dir)
    index_file = out_dir / "index.json"
    index = {
        "size": size,
        "root": str(dataset.root),
        "domains": {d: [s.path for s in dataset.of(d)] for d in dataset.domains},
    }
    if index_file.is_file() and json.loads(index_file.read_text()) == index:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        for dom, paths in index["domains"].items():
            arr = np.empty((len(paths), size, size, 3), dtype=np.uint8)
            it = pool.map(lambda p: decode_image(dataset.root / p, size), paths)
            for i, img in enumerate(progress_bar(it, total=len(paths), desc=f"cache {dom} @{size}px", unit="img", enabled=progress)):
                arr[i] = img
            tmp = out_dir / f".{dom}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, out_dir / f"{dom}.npy")
    tmp = out_dir / ".index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_file)
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
    out = {}
    for d in [d for d in dataset.domains if d not in skip]:
        samples = dataset.of(d)
        images = np.load(cache_dir / f"{d}.npy", mmap_mode="r")
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
