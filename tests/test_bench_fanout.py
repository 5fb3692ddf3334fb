"""bench/fanout.py's own failure paths (its full run on loopback is tests/test_scaleout.py): a bad source fails and
leaves no copy behind; a --work folder that is not empty is refused before anything is made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/fanout.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})


def test_a_failed_run_removes_its_copies(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = bench("--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.json"), tmp=tmp)
    assert run.returncode != 0 and "nowhere" in run.stderr
    assert not list(tmp.glob("bne-fanout-bench-*")) and not (tmp_path / "f.json").exists()


def test_work_folder_must_be_empty(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    run = bench("--source", str(tmp_path), "--work", str(work), tmp=tmp_path)
    assert run.returncode == 2 and "not empty" in run.stderr
    assert [p.name for p in work.iterdir()] == ["keep.txt"]


def test_outputs_compared_as_results_with_run_records_aside(tmp_path):
    """The bench's content comparison of two runs: wall times, creation times and journal writer ids aside, any other
    difference (a weight, a number, a Parquet row, a missing or extra file) is named."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    fanout = bench_module("fanout")

    def project(root: Path, seconds: float, created: str, weight: float, acc: float, extra: bool = False) -> Path:
        (root / "out" / "m").mkdir(parents=True)
        (root / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {
            "a": {"cmd": "x", "outs": [{"path": "out/m", "md5": "1.dir"}, {"path": "out/t.parquet", "md5": "2"}]}}}))
        (root / "out" / "m" / "train.json").write_text(json.dumps({"acc": acc, "history": [{"epoch": 1, "seconds": seconds}]}))
        torch.save({"state": {"w": torch.tensor([weight])}, "history": json.dumps([{"seconds": seconds}])}, root / "out" / "m" / "last.pt")
        table = pa.table({"x": [1.0, 2.0]}).replace_schema_metadata({"created_at": created, "seed": "0"})
        pq.write_table(table, root / "out" / "t.parquet")
        (root / "out" / "m" / "metrics.md").write_text(f"accuracy {acc}; training of all folds {seconds / 60:.1f} min\n")
        (root / "out" / "m" / "s.journal").write_text(json.dumps({"op_code": 6, "worker_id": created, "datetime_start": created}) + "\n")
        if extra:
            (root / "out" / "m" / "extra.txt").write_text("x")
        return root

    a = project(tmp_path / "a", 1.5, "2026-01-01", 0.5, 0.9)
    assert fanout.outputs_differing(a, project(tmp_path / "b", 9.0, "2026-02-02", 0.5, 0.9)) == []
    assert fanout.outputs_differing(a, project(tmp_path / "c", 1.5, "2026-01-01", 0.25, 0.9)) == ["out/m/last.pt"]
    assert fanout.outputs_differing(a, project(tmp_path / "d", 1.5, "2026-01-01", 0.5, 0.8)) == ["out/m/metrics.md", "out/m/train.json"]
    assert fanout.outputs_differing(a, project(tmp_path / "e", 1.5, "2026-01-01", 0.5, 0.9, extra=True)) == ["out/m/extra.txt"]
    (tmp_path / "d" / "out" / "t.parquet").unlink()
    assert fanout.outputs_differing(a, tmp_path / "d") == ["out/m/metrics.md", "out/m/train.json", "out/t.parquet"]
