"""The coordinator of fanout.mode pool without a cluster: every fold is waited for, a failing fold is submitted again
fanout.retries times (the only retries), and the folds that fail for good are named together in one error.
DVC, git and the submissions are stand-ins here; tests/test_scaleout.py runs the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest

import tasks.params as P
from conftest import HARNESS_STARTUP_S

ROOT = Path(__file__).resolve().parents[1]
FOLDS = ["art_painting", "cartoon", "photo", "sketch"]


def test_folds_that_fail_for_good_are_named_together(monkeypatch, tmp_path):
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    import flows.fanout as F

    attempts: dict[str, int] = {}
    stages: list[str] = []
    monkeypatch.setattr(F, "coordinator_commit", lambda root: "0" * 40)
    monkeypatch.setattr(F, "remote_url", lambda root: str(tmp_path / "remote"))
    monkeypatch.setattr(F, "dvc", lambda *a, **k: None)

    @task
    def stage(name, root, upstream=False, extra_env=None):
        stages.append(name)
        return True

    @task
    def submit(deployment, parameters, poll):
        t = parameters["target"]
        attempts[t] = attempts.get(t, 0) + 1
        if t in ("cartoon", "sketch"):
            raise RuntimeError(f"fold {t}: dg-fold run 'x-{t}' ended CRASHED: process killed")
        return {"worker": "w", "flow_run_name": t, "lock": {}, "ran": {}, "files": ""}

    monkeypatch.setattr(F, "run_stage", stage)
    monkeypatch.setattr(F, "submit_fold", submit)
    params = P.load(ROOT / "params.yaml", [f"dataset.folds={FOLDS}", "fanout.retries=2"])
    (tmp_path / "params.yaml").write_text("params\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")

    @flow
    def coordinator():
        return F.run_pool(tmp_path, params, ["ingest", "validate", "cache", "train@art_painting", "final", "report"])

    with prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_S):
        with pytest.raises(RuntimeError) as e:
            coordinator()
    msg = str(e.value)
    assert "2 of 4 fold(s) failed for good after 2 retries: cartoon, sketch" in msg and "process killed" in msg
    assert attempts == {"art_painting": 1, "cartoon": 3, "photo": 1, "sketch": 3}  # 1 + fanout.retries for a failure
    assert stages == ["ingest", "validate", "cache"]  # nothing after the folds once one failed for good
