"""Beyond one machine, on loopback: a Prefect server on PostgreSQL, 2 process workers in separate workspaces, a DVC
remote in a temporary folder, the tuning study on PostgreSQL; the tiny synthetic dataset with two folds.

The run is ``bench/fanout.py`` itself (the issue-16 benchmark, so the benchmark is tested by the same run): a
single-process ``dvc repro`` of one copy (the reference for ``dvc.lock`` and metrics), then ``dg-pipeline`` with
``mode=pool`` on another copy. One worker's fold is killed mid-training (the flow-run process and everything under
it, SIGKILL), so the run completes only through the retry of that fold. Every server, worker and database the
module starts is stopped or dropped at the end, also after a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import bench_module, descendants, make_dataset
from pg import fresh_database

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")
FOLDS = ["noisy_gray", "red_on_white"]
TINY = [
    "dataset.name=syn", "train.resolution=32", "train.epochs=1", "train.per_domain_batch=4", "train.freeze_stages=0",
    "train.eval_batch=16", "eval.batch=8", "tune.inference.n_trials=4", "dataset.val_fraction=0.25",
    f"dataset.folds={json.dumps(FOLDS)}",
]


def normalized_lock(root: Path) -> dict:
    """``dvc.lock`` without data hashes and the study's storage URL (each run has its own database). The hashes of
    outputs differ between two runs that computed the same things: outputs carry run records (training's wall times,
    the final model's and the statistics' creation times); the bench compares their content with those set aside
    (``outputs_differing_but_run_records``, asserted empty below)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    code = {s: {d["path"]: d["md5"] for d in e.get("deps", []) if d["path"].startswith(("bne", "tasks"))} for s, e in lock.items()}
    return {"stages": bench_module("fanout").lock_without_hashes(root), "code": code}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The benchmark's run on loopback, with one fold killed mid-training; its report and what the tests look at."""
    from flows.workers import stop as stop_workers

    tmp = tmp_path_factory.mktemp("scaleout")
    data = make_dataset(tmp / "syn", styles=STYLES, per_class=6, size=40)
    work, out = tmp / "bench", tmp / "fanout.json"
    with fresh_database("bne_prefect") as prefect_db, fresh_database("bne_study") as study_db, \
            fresh_database("bne_study_ref") as study_ref:
        env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace("postgresql://", "postgresql+asyncpg://", 1),
               "OMP_NUM_THREADS": "1"}
        killed: dict = {}
        done = threading.Event()

        def kill_one_fold_mid_training() -> None:
            while not done.is_set() and not killed:
                for pid_file in (work / "workers").glob("w*/worker.pid"):
                    if any(pid_file.parent.glob("syn-*/data/train/syn/*")):  # this worker's fold is training
                        victims = descendants(int(pid_file.read_text()))
                        for v in victims:
                            try:
                                os.kill(v, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                        killed.update(worker=pid_file.parent.name, pids=victims, at=time.time())
                        return
                time.sleep(0.5)

        killer = threading.Thread(target=kill_one_fold_mid_training, daemon=True)
        killer.start()
        try:
            bench = subprocess.run(
                [sys.executable, "bench/fanout.py", "--source", str(data), "--workers", "2", "--work", str(work), "--keep",
                 "--out", str(out), *[f"--set={s}" for s in TINY], f"--pool-set=tune.storage={study_db}",
                 f"--single-set=tune.storage={study_ref}"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
            done.set()
            killer.join(5)
            assert bench.returncode == 0, bench.stdout[-4000:] + bench.stderr[-6000:]
            report = json.loads(out.read_text())
            pool = work / "pool"
            noop = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=pool, env=env, capture_output=True, text=True, timeout=600)
            import psycopg

            with psycopg.connect(prefect_db) as c:
                runs = c.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id").fetchall()
            yield {"coord": pool, "ref": work / "single", "report": report, "result": report["pool_result"], "killed": killed,
                   "noop": noop, "runs": runs, "workers": ["bne-w1", "bne-w2"], "study_db": study_db}
        finally:
            done.set()
            stop_workers(work / "workers")  # the bench stops them itself; this is for a bench that was killed
            shutil.rmtree(work, ignore_errors=True)


def test_each_worker_ran_a_fold_and_the_killed_fold_was_retried(run):
    folds = run["result"]["folds"]
    assert sorted(folds) == sorted(FOLDS)
    assert {rec["worker"] for rec in folds.values()} == set(run["workers"]), folds
    assert run["killed"], "no fold was killed mid-training"
    states = [s for name, s in run["runs"] if name == "dg-fold"]
    assert sorted(states).count("COMPLETED") == 2 and "CRASHED" in states, states  # the killed run crashed, its retry completed
    assert {name for name, s in run["runs"] if s == "COMPLETED"} >= {"dg-pipeline", "dg-fold"}  # stored in PostgreSQL
    for rec in folds.values():
        assert Path(rec["workspace"]).is_relative_to(run["coord"].parent / "workers")  # each worker's own workspace
        assert not Path(rec["workspace"]).exists()  # removed afterwards


def test_lock_equals_the_single_process_run_and_repro_is_a_noop(run):
    assert run["noop"].returncode == 0 and "Running stage" not in run["noop"].stdout, run["noop"].stdout[-2000:]
    dist, single = normalized_lock(run["coord"]), normalized_lock(run["ref"])
    assert dist == single  # the same stages, commands, parameters, code hashes and output paths
    lock = yaml.safe_load((run["coord"] / "dvc.lock").read_text())["stages"]
    for t, rec in run["result"]["folds"].items():  # the folds' entries are the workers' own: nothing recomputed here
        assert all(lock[s] == e for s, e in rec["lock"].items()), t
    a = json.loads((run["coord"] / "reports" / "syn" / "metrics.json").read_text())
    b = json.loads((run["ref"] / "reports" / "syn" / "metrics.json").read_text())
    assert a == b
    assert run["result"]["stages"]["report"] is True


def test_the_benchmark_reports_both_runs(run):
    r = run["report"]
    assert r["single_s"] > 0 and r["pool_s"] > 0 and r["speedup"] == pytest.approx(r["single_s"] / r["pool_s"], abs=2e-3)
    assert r["workers"] == 2 and r["threads_per_worker"] == "1" and r["single_threads"] == "1"
    assert r["metrics_max_abs_diff"] == 0.0 and r["lock_equal_but_hashes"]  # one thread per training on both sides
    assert r["outputs_differing_but_run_records"] == []  # every output (weights, statistics, records) the same
    assert r["metrics_single"] == r["metrics_pool"] and set(r["folds"]) == set(FOLDS)
    assert r["overrides"]["pool"] == [f"tune.storage={run['study_db']}"] and r["overrides"]["both"][0] == TINY[0]
