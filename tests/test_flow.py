"""The Prefect flow drives the real DVC pipeline on a tiny synthetic dataset, in a temporary git repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(synthetic_root, tmp_path_factory):
    repo = tmp_path_factory.mktemp("project")
    for item in ("dvc.yaml", "bne", "tasks", "flows"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"].update(name="syn", root=str(synthetic_root), splits="", val_fraction=0.25)
    params["train"].update(resolution=32, epochs=1, per_domain_batch=4, freeze_stages=0, eval_batch=16)
    params["dataset"]["targets"] = ["green_on_black"]
    params["eval"].update(batch=8, select_options=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run = lambda *a: subprocess.run(a, cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return repo


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def test_flow_runs_every_stage_through_dvc_then_nothing(project, harness):
    sys.path.insert(0, str(project))
    try:
        from flows.dg_pipeline import dg_pipeline
    finally:
        sys.path.pop(0)
    first = dg_pipeline(dataset="syn", root=str(project))
    assert first == {"ingest": True, "validate": True, "cache": True, "lodo": True}
    assert (project / "dvc.lock").is_file()
    metrics = (project / "reports" / "syn" / "metrics.json").read_text()
    assert "green_on_black" in metrics
    second = dg_pipeline(dataset="syn", root=str(project))
    assert second == {"ingest": False, "validate": False, "cache": False, "lodo": False}
    with pytest.raises(ValueError, match="'pacs' is not the one params.yaml configures"):
        dg_pipeline(dataset="pacs", root=str(project))
