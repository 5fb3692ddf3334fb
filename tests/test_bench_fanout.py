"""bench/fanout.py (single process vs folds on process workers) runs end to end on a tiny synthetic folder: one
worker, one fold, 32 px, one epoch; its report has both times, the ratio and equal metrics. Not a timing test."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_fanout_bench_runs_on_tiny_data(tmp_path):
    data = make_dataset(tmp_path / "syn", styles=("red_on_white", "yellow_on_blue", "noisy_gray"), per_class=5, size=40)
    out = tmp_path / "fanout.json"
    before = set(Path(tempfile.gettempdir()).glob("bne-fanout-bench-*"))
    sets = ["dataset.name=syn", "train.resolution=32", "train.freeze_stages=0", "train.per_domain_batch=4",
            "tune.inference.n_trials=3", "dataset.folds=[noisy_gray]"]
    run = subprocess.run([sys.executable, "bench/fanout.py", "--source", str(data), "--workers", "1", "--out", str(out),
                          *[f"--set={s}" for s in sets]], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["single_s"] > 0 and report["pool_s"] > 0 and report["speedup"] > 0
    assert list(report["folds"]) == ["noisy_gray"] and report["folds"]["noisy_gray"]["worker"] == "bne-w1"
    assert report["metrics_max_abs_diff"] == 0.0 and report["lock_equal_but_hashes"]  # one thread on both sides
    assert set(Path(tempfile.gettempdir()).glob("bne-fanout-bench-*")) <= before  # the copies were removed
