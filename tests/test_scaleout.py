"""Beyond one machine, on loopback: a Prefect server on PostgreSQL, 2 process workers in separate workspaces, a DVC
remote in a temporary folder, the tuning study on PostgreSQL; the tiny synthetic dataset with two folds.

One distributed run (``dg-pipeline`` with ``mode=pool``) is shared by the assertions; one worker's fold is killed
mid-training (the flow-run process and everything under it, SIGKILL), so the run completes only through the retry
of that fold. A single-process ``dvc repro`` of the same project is the reference for ``dvc.lock`` and metrics.
Every server, worker and database the module starts is stopped or dropped at the end, also after a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import tasks.params as P
from conftest import make_dataset
from pg import fresh_database
from test_serve import free_port

from flows.serve import interrupt

ROOT = Path(__file__).resolve().parents[1]
STYLES = ("red_on_white", "yellow_on_blue", "noisy_gray")
FOLDS = ["noisy_gray", "red_on_white"]
TINY = [
    "dataset.name=syn", "train.resolution=32", "train.epochs=1", "train.per_domain_batch=4", "train.freeze_stages=0",
    "train.eval_batch=16", "eval.batch=8", "tune.inference.n_trials=4", "dataset.val_fraction=0.25",
    f"dataset.folds={json.dumps(FOLDS)}",
]
POOL = "bne-test"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def project(dest: Path, data: Path, storage: str, remote: Path | None) -> Path:
    """A smoke project of ``data`` with two folds, its study on ``storage``, committed (the workers clone it)."""
    from flows.dvc import dvc
    from flows.smoke import build

    build(dest, source=data, per_class=6)
    P.write_overrides(dest / "params.yaml", [*TINY, f"tune.storage={storage}"])
    if remote is not None:
        dvc(dest, "remote", "add", "--default", "shared", str(remote))
    with open(dest / ".dvc" / ".gitignore", "a") as f:  # DVC's site cache of the copy (flows/smoke.py keeps it inside)
        f.write("/site-cache\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=dest, check=True, capture_output=True)
    return dest


def normalized_lock(root: Path) -> dict:
    """``dvc.lock`` without data hashes and the study's storage URL (each run has its own database). The hashes of
    data differ between two copies even when nothing else does: the manifest records the dataset's absolute path,
    and training records its times."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("md5", "hash", "size", "nfiles", "tune.storage")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    code = {s: {d["path"]: d["md5"] for d in e.get("deps", []) if d["path"].startswith(("bne", "tasks"))} for s, e in lock.items()}
    return {"stages": strip(lock), "code": code}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The distributed run, its reference, and what the tests look at."""
    tmp = tmp_path_factory.mktemp("scaleout")
    data = make_dataset(tmp / "syn", styles=STYLES, per_class=6, size=40)
    procs: list[subprocess.Popen] = []
    workers_base = tmp / "workers"
    from flows.serve import wait_healthy
    from flows.workers import stop as stop_workers

    with fresh_database("bne_prefect") as prefect_db, fresh_database("bne_study") as study_db, \
            fresh_database("bne_study_ref") as study_ref:
        port = free_port()
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
               "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
               "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace("postgresql://", "postgresql+asyncpg://", 1),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
               "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
               "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
        try:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(server)
            coord = project(tmp / "coord", data, study_db, tmp / "dvc-remote")
            ref = project(tmp / "ref", data, study_ref, None)  # now: the same code as coord's, whatever changes meanwhile
            wait_healthy(port, timeout=180, proc=server)
            reg = subprocess.run([sys.executable, "-c", f"from flows.workers import register; print(register({POOL!r}, 'bne'))"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            assert reg.returncode == 0, reg.stderr[-3000:]
            from flows.workers import start

            started = start(2, POOL, workers_base, env=env)
            killed: dict = {}

            def kill_one_fold_mid_training() -> None:
                deadline = time.time() + 600
                while time.time() < deadline and not killed:
                    for name, pid, ws in started:
                        if any(ws.glob("syn-*/data/train/syn/*")):  # this worker's fold is training
                            victims = descendants(pid)
                            for v in victims:
                                try:
                                    os.kill(v, signal.SIGKILL)
                                except ProcessLookupError:
                                    pass
                            killed.update(worker=name, pids=victims, at=time.time())
                            return
                    time.sleep(0.5)

            killer = threading.Thread(target=kill_one_fold_mid_training, daemon=True)
            killer.start()
            t0 = time.time()
            code = ("import json, sys; from flows.dg_pipeline import dg_pipeline; "
                    f"r = dg_pipeline(dataset='syn', root={str(coord)!r}, mode='pool'); print('RESULT ' + json.dumps(r))")
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
            seconds = time.time() - t0
            killer.join(5)
            assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
            result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
            noop = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=coord, env=env, capture_output=True, text=True, timeout=600)
            import psycopg

            with psycopg.connect(prefect_db) as c:
                runs = c.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id").fetchall()
            stop_workers(workers_base)
            single = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ref,
                                    env={**env, "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"],
                                         "PYTHONPATH": str(ref)},  # the copy's code, as the pool run's stages
                                    capture_output=True, text=True, timeout=1200)
            assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
            yield {"coord": coord, "ref": ref, "result": result, "killed": killed, "noop": noop, "runs": runs,
                   "workers": [w for w, _, _ in started], "seconds": seconds, "log": out.stdout + out.stderr}
        finally:
            stop_workers(workers_base)
            for p in procs:
                if p.poll() is None:
                    interrupt(p)


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
