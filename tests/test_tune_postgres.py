"""Optuna on PostgreSQL (``tune.storage: postgresql://...``): the same results as the journal, several processes on one
study at once, and a killed process's trial marked FAIL, queued again and run by another process.

Each test gets its own database (tests/pg.py) and drops it; without a server they skip and say so
(``BNE_REQUIRE_POSTGRES=1`` makes that a failure, as in CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import tasks.tune as tune
from pg import fresh_database
from test_tune import outputs

from conftest import options

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: One process of a shared study: tune_inference on the test outputs, each trial slowed down (``SLEEP`` s), the trial
#: numbered ``HANG`` (if any) hanging after writing ``MARKER`` (the parent kills the process there).
WORKER = textwrap.dedent("""
    import json, os, sys, time
    import optuna
    import tasks.tune as tune
    from test_tune import outputs
    from conftest import options
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune.HEARTBEAT_INTERVAL, tune.GRACE_PERIOD = 1, 2
    url, name, n, sleep, hang, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    real = tune.leave_own_out_accuracy
    calls = []

    def slow(*a):
        calls.append(1)
        if len(calls) - 1 == hang:  # this process's hang-th objective call (0: the enqueued baseline is not one)
            open(marker, "w").write(str(os.getpid()))
            time.sleep(600)
        time.sleep(sleep)
        return real(*a)

    val, dom = outputs()
    base = options()
    real(val, dom, base)  # the baseline value, outside any trial
    tune.leave_own_out_accuracy = slow
    r = tune.tune_inference(val, dom, base, n_trials=n, seed=0, storage=url, study_name=name)
    print(json.dumps(r))
""")


def worker(url: str, name: str, n: int, sleep: float = 0.0, hang: int = -1, marker: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(n), str(sleep), str(hang), marker or "-"],
                            cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_postgres_study_is_of_the_journal_kind_and_reproducible(tmp_path):
    val, dom = outputs()
    with fresh_database() as url:
        kw = dict(n_trials=10, seed=0)
        journal = tune.tune_inference(val, dom, options(), storage=tmp_path / "s.journal", study_name="fold", **kw)
        pg = tune.tune_inference(val, dom, options(), storage=url, study_name="fold", **kw)
        assert isinstance(tune.open_storage(url), optuna.storages.RDBStorage)
        assert pg["storage"] == url and "://" in pg["storage"]
        assert pg.keys() == journal.keys() and pg["n_trials"] == journal["n_trials"] == 10
        a = optuna.load_study(study_name="fold", storage=tune.open_storage(tmp_path / "s.journal")).trials
        b = optuna.load_study(study_name="fold", storage=tune.open_storage(url)).trials
        assert (a[0].params, a[0].value) == (b[0].params, b[0].value)  # the enqueued configured options, scored alike
        assert [t.state for t in a] == [t.state for t in b]
        # seeded per trial number: the same study run again draws the same trials
        twin = tune.tune_inference(val, dom, options(), storage=url, study_name="fold-again", **kw)
        c = optuna.load_study(study_name="fold-again", storage=tune.open_storage(url)).trials
        assert [(t.params, t.value) for t in c] == [(t.params, t.value) for t in b]
        assert {k: v for k, v in twin.items() if k != "study_name"} == {k: v for k, v in pg.items() if k != "study_name"}
        again = tune.tune_inference(val, dom, options(), storage=url, study_name="fold", **kw)  # complete: nothing to run
        assert again["n_trials"] == 10 and len(optuna.load_study(study_name="fold", storage=tune.open_storage(url)).trials) == 10


def test_storage_url_password_is_never_recorded():
    assert tune.redact("postgresql://bne:s3cret@127.0.0.1:5432/studies") == "postgresql://bne:***@127.0.0.1:5432/studies"


def test_two_processes_run_one_study_at_once():
    with fresh_database() as url:
        tune.open_storage(url)  # the schema, once (concurrent creation is retried too, but this keeps the test short)
        procs = [worker(url, "shared", 12, sleep=0.2) for _ in range(2)]
        results = [finish(p) for p in procs]
        study = optuna.load_study(study_name="shared", storage=tune.open_storage(url))
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        # Each process stops once the study holds 12 finished trials; a trial still running elsewhere at that moment
        # also finishes, so at most one more than asked.
        assert 12 <= len(done) <= 13 and all(r["n_trials"] >= 12 for r in results)
        spans = sorted((t.datetime_start, t.datetime_complete) for t in done)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials ran at the same time"
        drawn = [t for t in done if "fixed_params" not in t.system_attrs]  # each process may enqueue the configured options
        assert len({json.dumps(t.params, sort_keys=True) for t in drawn}) == len(drawn) >= 10  # no draw repeated


def test_killed_process_trial_fails_is_retried_and_the_study_goes_on(tmp_path):
    marker = tmp_path / "hanging"
    with fresh_database() as url:
        tune.open_storage(url)
        a = worker(url, "killed", 8, hang=2, marker=str(marker))
        try:
            deadline = time.time() + 120
            while not marker.exists():
                assert a.poll() is None and time.time() < deadline, a.stderr.read() if a.poll() is not None else "no hang"
                time.sleep(0.2)
            a.send_signal(signal.SIGKILL)  # the process dies inside a running trial: no one marks it finished
        finally:
            a.kill()
            a.communicate()
        study = optuna.load_study(study_name="killed", storage=tune.open_storage(url))
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        assert len(running) == 1
        time.sleep(3)  # past the grace period (2 s in the workers) without a heartbeat
        r = finish(worker(url, "killed", 8))
        study = optuna.load_study(study_name="killed", storage=tune.open_storage(url))
        by_number = {t.number: t for t in study.trials}
        failed = [t for t in study.trials if t.state == TrialState.FAIL]
        assert [t.number for t in failed] == [running[0].number]
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
        assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
        assert retried[0].params == by_number[failed[0].number].params
        assert r["n_trials"] == 8 == len([t for t in study.trials if t.state == TrialState.COMPLETE])
