"""bench/fanout.py's own failure paths (its full run on loopback is tests/test_scaleout.py): a bad source fails and
leaves no copy behind; a --work folder that is not empty is refused before anything is made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
