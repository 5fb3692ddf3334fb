"""Shared fixtures: a synthetic multi-domain image set (the same shapes drawn in different styles)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import tasks.params
from bne.data import AugmentConfig
from bne.embedding import InferenceOptions
from bne.model import ModelSpec
from bne.train import TrainConfig

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
#: ``make test`` runs the modules on pytest-xdist workers, one per core (pyproject's addopts): each worker gets its
#: share of the cores, and so do the processes its tests start (stage commands under DVC, the serving process), or
#: the workers' torch threads would outnumber the cores and tiny steps crawl. Without xdist: 2 threads as before.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

ROOT = Path(__file__).resolve().parents[1]
#: The project's parameters: the tests take every setting they do not change from ``params.yaml``.
PARAMS = tasks.params.load(ROOT / "params.yaml")


#: How long a test waits for Prefect's temporary server (``prefect_test_harness``; Prefect's default is 30 s): with
#: the cores busy (the study grid beside ``make test``) it took longer, and test_flow's six tests errored.
HARNESS_STARTUP_S = 180


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test of tiny tensors: on shared cores, two OpenMP threads made a 4 s training run
    take 60 s. The count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bench_module(name: str):
    """``bench/<name>.py`` imported as a module (bench/ is scripts, not a package)."""
    import importlib.util

    loader = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def spec(**changes) -> ModelSpec:
    """``params.yaml``'s model for 3 classes (DeepAll unless ``domains`` is given), with ``changes``."""
    return dataclasses.replace(PARAMS.model.spec(num_classes=3), **changes)


def train_cfg(**changes) -> TrainConfig:
    """``params.yaml``'s training recipe (seed 0), with ``changes``."""
    return dataclasses.replace(PARAMS.train.config(seed=0), **changes)


def options(**changes) -> InferenceOptions:
    """``params.yaml``'s BNE inference options (``eval.options``), with ``changes``."""
    return dataclasses.replace(PARAMS.eval.options.options(), **changes)


def augment_cfg(**changes) -> AugmentConfig:
    """``params.yaml``'s training augmentation (``train.augment``), with ``changes``."""
    return dataclasses.replace(PARAMS.train.augment.config(), **changes)

CLASSES = ("circle", "square", "triangle")
# style: background colour, foreground colour, texture noise amplitude
STYLES = {
    "red_on_white": ((235, 235, 235), (200, 30, 30), 0),
    "yellow_on_blue": ((20, 40, 150), (250, 220, 40), 10),
    "noisy_gray": ((110, 110, 110), (20, 20, 20), 60),
    "green_on_black": ((10, 10, 10), (40, 220, 90), 25),  # the unseen style
}


def draw(shape: str, style: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    bg, fg, noise = STYLES[style]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.integers(size // 5, size // 3)
    cx, cy = rng.integers(r + 2, size - r - 2, size=2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    arr = np.asarray(img).astype(np.int16)
    if noise:
        arr = arr + rng.integers(-noise, noise + 1, size=arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_dataset(root: Path, styles=tuple(STYLES), per_class: int = 24, seed: int = 0, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    for style in styles:
        for shape in CLASSES:
            folder = root / style / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw(shape, style, rng, size).save(folder / f"{shape}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic"), size=64)


def save_mode_variants(src: Path) -> None:
    """Beside ``src``: the same picture as grayscale, RGBA, CMYK and palette files (all convertible to RGB)."""
    rgb = Image.open(src).convert("RGB")
    rgb.convert("L").save(src.parent / "gray.png")
    rgb.convert("RGBA").save(src.parent / "rgba.png")
    rgb.convert("CMYK").save(src.parent / "cmyk.jpg")
    rgb.convert("P").save(src.parent / "palette.png")


#: The slowest modules, slowest first (measured with ``--durations``). ``--dist loadfile --no-loadscope-reorder``
#: (pyproject's addopts) hands whole modules to the workers in collection order, so these start at once rather
#: than last (xdist would otherwise order modules by their number of tests); without xdist the order is harmless.
SLOW_FIRST = ("test_scaleout.py", "test_lost_worker.py", "test_flow.py", "test_serve.py", "test_train.py", "test_gpu_bench.py",
              "test_inference.py", "test_lodo_synthetic.py", "test_distributed.py", "test_tune.py", "test_stats.py",
              "test_reliability.py")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker more than the cores. Several modules spend a good part of their
    time waiting (a Prefect server or worker starting, a crash being noticed, a single-process DVC run beside an
    idle core); the extra worker fills those gaps. Each worker's torch threads follow (``THREADS`` above)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order is kept
