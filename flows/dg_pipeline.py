"""Prefect flow ``dg-pipeline``: one task per DVC stage, each executed through DVC.

The flow adds no logic of its own: every task runs ``dvc repro --single-item <stage>`` in the project, so the
DVC cache and ``dvc.lock`` are exactly those of ``dvc repro``. Task names are stage names; the log says which
stages ran and which DVC found up to date; the results table becomes a markdown artifact.

    python flows/dg_pipeline.py            # one run, with a temporary local Prefect API
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "didn't change, skipping"


def dvc_stages(root: Path) -> list[str]:
    """Stage names of ``dvc.yaml``, in pipeline order."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


@task
def run_stage(stage: str, root: str) -> bool:
    """``dvc repro --single-item STAGE``; True when the stage ran, False when DVC found it up to date."""
    bin_dir = str(Path(sys.executable).parent)  # the stages' `bne` commands live beside this interpreter
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root, env=env, capture_output=True, text=True
    )
    logger = get_run_logger()
    if proc.returncode:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ran = SKIPPED not in proc.stdout
    logger.info("%s: %s", stage, "ran" if ran else "up to date (cached)")
    return ran


@flow(name="dg-pipeline")
def dg_pipeline(dataset: str = "pacs", root: str = str(ROOT)) -> dict[str, bool]:
    """Run every DVC stage in order for ``dataset`` (the dataset that ``params.yaml`` configures)."""
    project = Path(root)
    configured = yaml.safe_load((project / "params.yaml").read_text())["dataset"]["name"]
    if dataset != configured:
        raise ValueError(f"dataset {dataset!r} is not the one params.yaml configures ({configured!r})")
    ran = {stage: run_stage.with_options(name=stage)(stage, root) for stage in dvc_stages(project)}
    table = project / "reports" / dataset / "metrics.md"
    if table.is_file():
        create_markdown_artifact(table.read_text(), key=f"{dataset}-results", description="leave-one-domain-out results")
    get_run_logger().info("ran: %s; cached: %s", [s for s, r in ran.items() if r] or "none", [s for s, r in ran.items() if not r] or "none")
    return ran


if __name__ == "__main__":
    dg_pipeline()
