"""tools/relock.py: new dependency hashes recorded in dvc.lock while an absent output keeps its locked hash."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_relock_records_new_deps_and_keeps_absent_outputs(tmp_path):
    (tmp_path / "make.py").write_text("import pathlib\npathlib.Path('out.txt').write_text('made')\n")
    (tmp_path / "params.yaml").write_text("k: 1\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f"{sys.executable} make.py", "deps": ["make.py"], "params": ["k"], "outs": ["out.txt"]}}}))
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    sh(tmp_path, sys.executable, "-m", "dvc", "repro", "-q")
    before = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["make"]
    (tmp_path / "out.txt").unlink()  # the output is not in this workspace
    with open(tmp_path / "make.py", "a") as f:
        f.write("# a comment: the output cannot change\n")
    run = [sys.executable, str(ROOT / "tools" / "relock.py"), "--root", str(tmp_path)]
    out = subprocess.run([*run, "make"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "relocked make" in out.stdout, out.stdout + out.stderr
    after = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["make"]
    assert after["outs"] == before["outs"]  # the locked output hash is kept
    assert after["deps"][0]["md5"] != before["deps"][0]["md5"] and after["params"] == before["params"]
    status = sh(tmp_path, sys.executable, "-m", "dvc", "status")
    assert "modified: make.py" not in status and "deleted:" in status and "out.txt" in status  # only the absent output
    bad = subprocess.run([*run, "nosuch"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not locked stages" in bad.stderr and "nosuch" in bad.stderr
