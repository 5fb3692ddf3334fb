"""flows/: stage order, one stage run (streamed), the smoke project, the root check, overrides, retraining; and the
Prefect flow driving the real DVC pipeline on a tiny synthetic dataset in a smoke project (the end-to-end tests)."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import tasks.params as P
from conftest import HARNESS_STARTUP_S, PARAMS, make_dataset

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")
NEW_STYLE = "green_on_black"
TINY = [
    "dataset.name=syn", "train.resolution=32", "train.epochs=1", "train.per_domain_batch=4", "train.freeze_stages=0",
    "train.eval_batch=16", "eval.batch=8", "tune.inference.n_trials=4", "dataset.val_fraction=0.25",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn3"), styles=STYLES, per_class=8, size=48)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_S):
        yield


def small_project(dest: Path, data: Path) -> Path:
    """A smoke project of the synthetic data (every image), made tiny and named ``syn``."""
    from flows.smoke import build

    build(dest, source=data, per_class=8)
    P.write_overrides(dest / "params.yaml", TINY)
    return dest


# ------------------------------------------------------------------------------------------------ no DVC run


def flows_imports() -> dict[str, set[str]]:
    """The static import graph of flows/ (every ``import``, function-level ones included): module -> modules."""
    graph = {}
    for f in sorted((ROOT / "flows").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        graph[f"flows.{f.stem}"] = names
    return graph


def test_flows_import_only_downward_and_without_cycles():
    graph = flows_imports()
    assert {"flows.dvc", "flows.smoke", "flows.retrain", "flows.dg_pipeline", "flows.serve"} <= set(graph)
    for mod, names in graph.items():
        assert not any(n.split(".")[0] in ("tests", "bench", "conftest") for n in names), (mod, names)
        assert "dvc" not in {n.split(".")[0] for n in names}, f"{mod} imports DVC in-process (flows run it as a subprocess)"
    inner = {m: {n for n in names if n in graph} for m, names in graph.items()}
    assert "flows.dg_pipeline" not in inner["flows.retrain"]  # retraining is its own flow, called by dg-pipeline
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) != "done":
            state[m] = "open"
            for n in inner[m]:
                visit(n, path + [m])
            state[m] = "done"

    for m in inner:
        visit(m, [])


def test_stages_in_pipeline_order():
    from dvc.repo import Repo

    from flows.dvc import stages

    names = stages(ROOT)
    folds = PARAMS.dataset.folds
    assert names[:3] == ["ingest", "validate", "cache"] and names[-3:] == ["final", "extend", "report"]
    for s in ("train", "stats", "embed", "tune", "evaluate"):
        assert [n for n in names if n.split("@")[0] == s] == [f"{s}@{f}" for f in folds]
    with Repo(str(ROOT)) as repo:  # every stage comes after the stages it depends on
        index = repo.index
        graph = index.graph
        by_name = {st.name: st for st in index.stages}
        assert sorted(by_name) == sorted(names)
        for i, n in enumerate(names):
            needs = {d.name for d in graph.successors(by_name[n])}
            assert needs <= set(names[:i]), f"{n} runs before {needs - set(names[:i])}"


def test_smoke_project_is_small_complete_and_removed(data, tmp_path):
    from dvc.repo import Repo

    from flows.dvc import SMOKE_MARKER
    from flows.smoke import smoke_project

    with smoke_project(source=data, per_class=2) as p:
        made = p
        assert p.name.startswith("bne-smoke-") and (p / SMOKE_MARKER).is_file()
        assert sorted(x.name for x in (p / "subset").iterdir()) == sorted(STYLES)
        assert all(len(list(c.iterdir())) == 2 for d in (p / "subset").iterdir() for c in d.iterdir())
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        assert size < 5e6, f"the smoke copy holds {size / 1e6:.1f} MB"
        text = (p / "params.yaml").read_text()
        assert "# Every knob of the pipeline" in text and "# held-out domains to run" in text  # comments kept
        params = P.load(p / "params.yaml")
        assert params.dataset.root == "subset" and params.dataset.splits == "" and params.train.epochs == 1
        assert params.dataset.domains == sorted(STYLES) and params.dataset.folds == ["noisy_gray"]
        with Repo(str(p)) as repo:  # every dependency of a stage that the project holds and no stage makes is copied
            index = repo.index
            outs = {str(o.fs_path) for st in index.stages for o in st.outs}
            for st in index.stages:
                for d in st.deps:
                    if not any(str(d.fs_path).startswith(o) for o in outs) and (ROOT / d.def_path).exists():
                        assert Path(d.fs_path).exists(), f"{st.name}: dependency {d.def_path} missing from the smoke copy"
            assert Path(repo.site_cache_dir).is_relative_to(p)  # nothing left in /var/tmp/dvc
    assert not made.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with smoke_project(source=data, per_class=1) as p:
            made = p
            raise RuntimeError("boom")
    assert not made.exists()  # removed after a failure too
    with smoke_project(source=data, per_class=1, keep=True) as p:
        made = p
    try:
        assert (made / "params.yaml").is_file()
    finally:
        import shutil

        shutil.rmtree(made)


def test_only_this_project_or_a_smoke_project(data, tmp_path):
    from flows.dvc import ROOT as FLOWS_ROOT
    from flows.dvc import project
    from flows.smoke import build

    assert FLOWS_ROOT == ROOT and project(str(ROOT), PARAMS.dataset.name)[0] == ROOT
    other = tmp_path / "other"
    other.mkdir()
    for f in ("dvc.yaml", "params.yaml"):
        (other / f).write_text((ROOT / f).read_text())
    with pytest.raises(ValueError, match="neither this project"):
        project(str(other), PARAMS.dataset.name)
    smoke = build(tmp_path / "smoke", source=data, per_class=1)
    assert project(str(smoke), PARAMS.dataset.name)[0] == smoke.resolve()
    with pytest.raises(ValueError, match="'nope' is not the one params.yaml configures"):
        project(str(smoke), "nope")
    (smoke / "dvc.yaml").unlink()
    with pytest.raises(ValueError, match="has no dvc.yaml"):
        project(str(smoke), PARAMS.dataset.name)


def test_run_stage_streams_output_and_reports_cached(tmp_path, monkeypatch):
    import flows.dvc as fd

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {
        "cmd": "python -c \"import time; print('first', flush=True); time.sleep(3); print('second'); open('out', 'w').write('x')\"",
        "outs": ["out"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    fd.dvc(repo, "init", "-q")
    seen = []

    class Log:
        def info(self, msg, *args):
            seen.append((time.time(), msg % args))

    monkeypatch.setattr(fd, "get_run_logger", lambda: Log())
    assert fd.run_stage.fn("slow", str(repo)) is True
    at = {line: t for t, line in seen}
    assert at["first"] < at["second"] - 2  # logged while the stage was still running
    assert "slow: ran" in at
    seen.clear()
    assert fd.run_stage.fn("slow", str(repo)) is False
    assert any("didn't change" in line for _, line in seen) and "slow: up to date (cached)" in {line for _, line in seen}
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace("sleep(3)", "sleep(0); raise SystemExit(3)"))
    with pytest.raises(RuntimeError, match="stage 'slow' failed") as e:
        fd.run_stage.fn("slow", str(repo))
    assert "first" in str(e.value)


def test_overrides_checked_before_any_work(data, tmp_path, harness):
    from flows.dg_pipeline import dg_pipeline

    p = small_project(tmp_path / "p", data)
    before = (p / "params.yaml").read_text()
    for bad, key in (["train.nope=1"], "train.nope"), (["train.epochs=-1"], "train.epochs"), (["train.lr"], "train.lr"):
        with pytest.raises(P.ParamsError, match=key.replace(".", r"\.")):
            dg_pipeline(dataset="syn", root=str(p), overrides=bad)
    with pytest.raises(ValueError, match="neither this project"):
        dg_pipeline(dataset="syn", root=str(tmp_path))
    with pytest.raises(ValueError, match="action must be"):
        dg_pipeline(dataset="syn", root=str(p), action="nope")
    assert (p / "params.yaml").read_text() == before
    assert not (p / "dvc.lock").exists() and not (p / "data").exists()  # no stage ran


def test_retrain_without_new_domains_returns_quickly(data, tmp_path, harness):
    from flows.dg_pipeline import dg_pipeline
    from flows.retrain import retrain_new_domains

    p = small_project(tmp_path / "p", data)
    with pytest.raises(FileNotFoundError, match="no final model"):
        retrain_new_domains(dataset="syn", root=str(p))
    final = p / "data" / "final" / "syn"
    final.mkdir(parents=True)
    (final / "model.json").write_text(json.dumps({"domains": sorted(STYLES)}))
    t0 = time.time()
    assert retrain_new_domains(dataset="syn", root=str(p)) == {"new_domains": [], "ran": False}
    assert dg_pipeline(dataset="syn", root=str(p), action="retrain-new-domains") == {"new_domains": [], "ran": False}
    assert time.time() - t0 < 30
    assert not (p / "dvc.lock").exists()


# ------------------------------------------------------------------------------ end to end (real dvc repro)


@pytest.fixture(scope="module")
def project(data, tmp_path_factory):
    return small_project(tmp_path_factory.mktemp("project") / "p", data)


@pytest.fixture(scope="module")
def first_run(project, harness):
    from flows.dg_pipeline import dg_pipeline

    return dg_pipeline(dataset="syn", root=str(project))


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


def affected(root: Path, key: str) -> set[str]:
    """The stages that declare ``key`` in dvc.yaml, and every stage downstream of them."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        direct = [st for st in repo.index.stages for d in st.deps if isinstance(d, ParamsDependency)
                  and any(key == k or key.startswith(k + ".") for k in d.params)]
        return {st.name for s in direct for st in (s, *nx.ancestors(graph, s))}  # edges point at dependencies


def test_eval_only_change_reruns_only_the_stages_that_declare_it(project, first_run):
    from flows.dg_pipeline import dg_pipeline

    ran = dg_pipeline(dataset="syn", root=str(project), overrides=["eval.options.power=2.0"])
    expected = affected(project, "eval.options.power")
    assert {"evaluate@noisy_gray", "report"} <= expected
    assert not expected & {"ingest", "validate", "cache", "train@noisy_gray", "stats@noisy_gray", "embed@noisy_gray"}
    assert {s for s, r in ran.items() if r} == expected
    assert "power: 2.0" in (project / "params.yaml").read_text()


def test_predict_with_the_final_model(project, first_run, tmp_path):
    from bne.predict import Predictor

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((project / "subset" / "red_on_white" / "circle").iterdir())[:3]
    pred = Predictor(project / "data" / "final" / "syn", batch=8)
    rows, errors = pred.predict_files([*good, bad], max_pixels=P.load(project / "params.yaml").dataset.max_pixels)
    assert [r["file"] for r in rows] == [str(p) for p in good]
    assert errors and errors[0]["file"] == str(bad)
    for r in rows:
        assert r["class"] in ("circle", "square", "triangle") and 0 < r["probability"] <= 1
        assert abs(sum(r[f"w_{d}"] for d in STYLES) - 1) < 1e-3
    bne = Path(sys.executable).parent / "bne"
    out = subprocess.run([str(bne), "predict", str(good[0]), str(bad), "--model", str(project / "data" / "final" / "syn"),
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 1


def test_retrain_new_domains(project, first_run):
    from flows.dg_pipeline import dg_pipeline

    t0 = time.time()
    none = dg_pipeline(dataset="syn", root=str(project), action="retrain-new-domains")
    assert none == {"new_domains": [], "ran": False} and time.time() - t0 < 20
    make_dataset(project / "subset", styles=(NEW_STYLE,), per_class=8, size=48)  # a new domain arrives in dataset.root
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
    assert NEW_STYLE in P.load(project / "params.yaml").extend.domains
    again = dg_pipeline(dataset="syn", root=str(project), action="retrain-new-domains")
    assert again["new_domains"] == []
