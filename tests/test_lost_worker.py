"""A worker machine lost mid-run, on loopback: the heartbeats and the automation that ``flows/workers.register``
sets up with the ``dg-fold`` deployment mark the silent run Crashed (the coordinator then resubmits the fold:
tests/test_fanout.py and tests/test_scaleout.py), and leave a healthy run alone.

A Prefect server (SQLite in a temporary folder), two process workers, two runs of a deployment registered by
``register()`` with a stand-in flow that sleeps (a real fold is tests/test_scaleout.py's). One worker is killed
with everything under it (the machine gone: nobody reports the run); the other keeps running its flow longer than
``fanout.lost_after``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import PARAMS, descendants

ROOT = Path(__file__).resolve().parents[1]
LOST_AFTER = 50  # > fanout.heartbeat (30, Prefect's minimum) with a margin for heartbeats late on busy cores

SLEEPY = '''
import time
from prefect import flow

@flow(name="dg-fold")
def sleepy(seconds: float):
    time.sleep(seconds)
'''


def test_a_run_whose_worker_is_gone_is_crashed_and_a_healthy_one_is_not(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import free_port, interrupt, settings, start_server, wait_healthy
    from flows.workers import register, start, stop

    fan = PARAMS.fanout.model_copy(update={"pool": "lost", "deployment": "lost", "lost_after": LOST_AFTER})
    assert fan.heartbeat == 30 and fan.lost_after > fan.heartbeat
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "sleepy.py").write_text(SLEEPY)
    port = free_port()
    env = {**settings(port, tmp_path / "home"), "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    url = env["PREFECT_API_URL"]
    server = start_server(port, env, tmp_path / "server.log")
    try:
        wait_healthy(port, timeout=180, proc=server)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            name = register(fan, source=tmp_path / "src", entrypoint="sleepy.py:sleepy")
            assert name == "dg-fold/lost"
            register(fan, source=tmp_path / "src", entrypoint="sleepy.py:sleepy")  # again: replaced, not doubled
            with get_client(sync_client=True) as client:
                autos = [a for a in client.read_automations() if a.name.startswith("dg-fold/lost: ")]
            assert len(autos) == 1 and f"{LOST_AFTER} s" in autos[0].name
            (_, pid1, _), (_, pid2, _) = start(2, fan.pool, tmp_path / "workers", env=env)
            doomed = run_deployment(name, parameters={"seconds": 600}, timeout=0)
            # outlives the doomed run's detection (at most LOST_AFTER + 60 s after the kill, asserted below)
            healthy = run_deployment(name, parameters={"seconds": LOST_AFTER + 90}, timeout=0)
            with get_client(sync_client=True) as client:
                def state(run):
                    return client.read_flow_run(run.id).state

                deadline = time.time() + 180
                while not all(state(r).type == StateType.RUNNING for r in (doomed, healthy)):
                    assert time.time() < deadline, (state(doomed), state(healthy))
                    time.sleep(1)
                time.sleep(5)  # the first heartbeats are out
                by_pid = {}
                for pid in (pid1, pid2):  # the worker running the doomed flow: its flow-run process has the run's id
                    for d in descendants(pid):
                        try:
                            if f"{doomed.id}" in Path(f"/proc/{d}/environ").read_bytes().decode(errors="replace"):
                                by_pid[pid] = d
                        except OSError:
                            pass
                assert len(by_pid) == 1, by_pid
                victim = next(iter(by_pid))
                for p in [victim, *descendants(victim)]:  # the machine is gone: the worker and everything under it
                    os.kill(p, signal.SIGKILL)
                killed = time.time()
                while state(doomed).type == StateType.RUNNING:
                    assert time.time() - killed < LOST_AFTER + 90, "the lost run was never marked Crashed"
                    time.sleep(2)
                lost = state(doomed)
                noticed = time.time() - killed
                assert lost.type == StateType.CRASHED and f"no heartbeat for {LOST_AFTER} s" in lost.message, lost
                assert noticed <= LOST_AFTER + 60, noticed
                assert state(healthy).type == StateType.RUNNING  # silent for none of its heartbeats: left alone
                while state(healthy).type == StateType.RUNNING:
                    assert time.time() - killed < LOST_AFTER + 180
                    time.sleep(2)
                assert state(healthy).type == StateType.COMPLETED, state(healthy)
    finally:
        stop(tmp_path / "workers")
        interrupt(server)
