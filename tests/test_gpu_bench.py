"""The GPU protocol's tooling (bench/gpu/), dry-run on the CPU as subprocesses: the compact re-encoded copy and the
parallel-fold driver."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import CLASSES, make_dataset

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")


def pack(source: Path, out: Path, size: int, quality: int, per_class: int | None = None, workers: int = 1) -> dict:
    """``bench/gpu/pack_pacs.py`` as a user runs it; returns the copy's pack.json."""
    cmd = [sys.executable, str(GPU / "pack_pacs.py"), "--source", str(source), "--out", str(out), "--size", str(size),
           "--quality", str(quality), "--workers", str(workers), *(["--per-class", str(per_class)] if per_class else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "pack.json").read_text())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A PACS-shaped folder: images/<domain>/<class>/*.png, splits/<domain>_{train,crossval}_kfold.txt, 1-based labels."""
    src = tmp_path_factory.mktemp("src")
    make_dataset(src / "images", styles=STYLES, per_class=10, size=40)
    (src / "splits").mkdir()
    for dom in STYLES:
        for split, keep in (("train", lambda i: i % 5 != 0), ("crossval", lambda i: i % 5 == 0)):
            lines = [f"{dom}/{c}/{c}_{i:03d}.png {k + 1}" for k, c in enumerate(CLASSES) for i in range(10) if keep(i)]
            (src / "splits" / f"{dom}_{split}_kfold.txt").write_text("\n".join(lines) + "\n")
    return src


def test_pack_keeps_layout_splits_and_checksums(source, tmp_path):
    out = tmp_path / "packed"
    info = pack(source, out, size=32, quality=50, per_class=6, workers=2)
    files = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert len(files) == info["images"] == 3 * 3 * 6 and all(f.endswith(".webp") for f in files)
    with Image.open(out / "images" / files[0]) as im:
        assert im.format == "WEBP" and im.size == (32, 32)
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == files
    assert sums[files[0]] == hashlib.sha256((out / "images" / files[0]).read_bytes()).hexdigest()
    train = (out / "splits" / "red_on_white_train_kfold.txt").read_text().split("\n")
    # only packed images are listed (the first 6 per class), renamed, labels kept
    assert "red_on_white/circle/circle_001.webp 1" in train and not any("circle_007" in line for line in train)
    assert info["bytes"] == sum((out / "images" / f).stat().st_size for f in files)
    assert not (tmp_path / "packed.tmp").exists()


def test_gpu_driver_runs_folds_in_parallel_and_merges(source, tmp_path):
    data = tmp_path / "packed"
    pack(source, data, size=32, quality=80, workers=2)
    reports, work = tmp_path / "reports", tmp_path / "work"
    sets = ["model.backbone=resnet18", "model.weights=none", "train.resolution=32", "train.epochs=1",
            "train.per_domain_batch=4", "train.eval_batch=16", "eval.batch=8", "tune.inference.n_trials=3",
            f"dataset.domains={json.dumps(list(STYLES))}", f"dataset.folds=[{STYLES[0]}, {STYLES[2]}]"]
    cmd = [sys.executable, str(GPU / "gpu_pacs.py"), "--data", str(data), "--reports", str(reports),
           "--work", str(work), "--parallel", "2", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert {STYLES[0], STYLES[2], "mean"} <= set(metrics) and STYLES[1] not in metrics
    run = json.loads((reports / "run.json").read_text())
    assert run["fold_exit"] == {STYLES[0]: 0, STYLES[2]: 0} and run["parallel"] == 2
    assert "train.resolution=32" in run["overrides"] and run["pack"]["images"] == 90
    for fold in (STYLES[0], STYLES[2]):  # each fold ran as its own process, logged apart
        log = (work / "logs" / f"{fold}.log").read_text()
        assert "deepall epoch 1/1" in log and "bne epoch 1/1" in log
    assert (work / "data" / "ingest").is_dir()  # the pipeline's stages ran in the work folder, not in the project


def test_pack_refuses_a_tampered_copy(source, tmp_path):
    from bne.ingest import ingest

    out = tmp_path / "packed"
    pack(source, out, size=32, quality=50, per_class=3)
    victim = next((out / "images").rglob("*.webp"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ValueError, match="checksum mismatch"):
        ingest(out / "images", tmp_path / "ing", splits=out / "splits", sums=out / "SHA256SUMS", progress=False, max_pixels=MAX_PIXELS)
