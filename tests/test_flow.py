"""The Prefect flow drives the real DVC pipeline on a tiny synthetic dataset, in a temporary git repository."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")
NEW_STYLE = "green_on_black"
TINY = [
    "train.resolution=32", "train.epochs=1", "train.per_domain_batch=4", "train.freeze_stages=0", "train.eval_batch=16",
    "eval.batch=8", "tune.inference.n_trials=4", "dataset.splits=''", "dataset.val_fraction=0.25",
]


def make_project(repo: Path, data: Path, folds=("noisy_gray",)) -> Path:
    from flows.dg_pipeline import PROJECT_FILES, apply_overrides

    for item in PROJECT_FILES:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    apply_overrides(repo, [*TINY, "dataset.name=syn", f"dataset.root={data}", f"dataset.domains={list(STYLES)}".replace("'", ""),
                           f"dataset.folds={list(folds)}".replace("'", "")])
    run = lambda *a: subprocess.run(a, cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return repo


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn3"), styles=STYLES, per_class=8, size=48)


@pytest.fixture(scope="module")
def project(data, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), data)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def first_run(project, harness):
    from flows.dg_pipeline import dg_pipeline

    return dg_pipeline(dataset="syn", root=str(project))


def test_stage_names_expand_foreach(project):
    from flows.dg_pipeline import dvc_stages

    stages = dvc_stages(project)
    assert stages[:3] == ["ingest", "validate", "cache"]
    for s in ("train", "stats", "embed", "tune", "evaluate"):
        assert f"{s}@noisy_gray" in stages and s not in stages
    assert stages[-3:] == ["final", "extend", "report"]


def test_flow_runs_every_stage_through_dvc_then_nothing(project, first_run):
    from flows.dg_pipeline import dg_pipeline

    assert all(first_run.values()) and len(first_run) == 11
    assert (project / "dvc.lock").is_file()
    metrics = json.loads((project / "reports" / "syn" / "metrics.json").read_text())
    assert set(metrics) == {"noisy_gray", "mean"}
    tuned = json.loads((project / "data" / "tune" / "syn" / "noisy_gray" / "best.json").read_text())
    assert tuned["tuned"] and tuned["seeds"]["0"]["trials"] == 4
    second = dg_pipeline(dataset="syn", root=str(project))
    assert not any(second.values())
    with pytest.raises(ValueError, match="'pacs' is not the one params.yaml configures"):
        dg_pipeline(dataset="pacs", root=str(project))


def test_eval_only_change_reruns_only_evaluate_and_report(project, first_run):
    from flows.dg_pipeline import dg_pipeline

    ran = dg_pipeline(dataset="syn", root=str(project), overrides=["eval.options.power=2.0"])
    assert {s for s, r in ran.items() if r} == {"evaluate@noisy_gray", "report"}
    assert "power: 2.0" in (project / "params.yaml").read_text()


def test_predict_with_the_final_model(project, first_run, data, tmp_path):
    from bne.final import Predictor

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((data / "red_on_white" / "circle").iterdir())[:3]
    pred = Predictor(project / "data" / "final" / "syn")
    rows, errors = pred.predict_files([*good, bad])
    assert [r["file"] for r in rows] == [str(p) for p in good]
    assert errors and errors[0]["file"] == str(bad)
    for r in rows:
        assert r["class"] in ("circle", "square", "triangle") and 0 < r["probability"] <= 1
        assert abs(sum(r[f"w_{d}"] for d in STYLES) - 1) < 1e-3
    out = subprocess.run([sys.executable, "-m", "bne.cli", "predict", str(good[0]), str(bad), "--model", str(project / "data" / "final" / "syn"),
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 1


def test_retrain_new_domains(project, first_run, data):
    from flows.dg_pipeline import dg_pipeline

    t0 = time.time()
    none = dg_pipeline(dataset="syn", root=str(project), action="retrain-new-domains")
    assert none == {"new_domains": [], "ran": False} and time.time() - t0 < 20
    make_dataset(data, styles=(NEW_STYLE,), per_class=8, size=48)  # a new domain arrives in the source
    before = torch.load(project / "data" / "final" / "syn" / "model.pt", weights_only=True)
    res = dg_pipeline(dataset="syn", root=str(project), action="retrain-new-domains")
    assert res["new_domains"] == [NEW_STYLE] and res["ran"]
    r = res["results"][0]
    assert 0 <= r["unseen_bne_acc"] <= 100 and 0 <= r["own_branch_bne_acc"] <= 100
    model_dir = project / "data" / "extend" / "syn" / "model"
    after = torch.load(model_dir / "model.pt", weights_only=True)
    for k, v in before.items():  # earlier branches bit-identical; every layer has one more domain row
        w = after[k]
        assert torch.equal(w[: v.shape[0]] if w.shape != v.shape else w, v), k
    import pyarrow.parquet as pq

    doms = set(pq.read_table(model_dir / "stats.parquet").column("domain").to_pylist())
    assert doms == {*STYLES, NEW_STYLE}
    assert NEW_STYLE in yaml.safe_load((project / "params.yaml").read_text())["extend"]["domains"]
    again = dg_pipeline(dataset="syn", root=str(project), action="retrain-new-domains")
    assert again["new_domains"] == []
