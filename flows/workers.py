"""``make workers N=2`` / ``make stop``: the work pool, the ``dg-fold`` deployment and N process workers.

Each worker is ``prefect worker start --pool <fanout.pool> --type process --limit 1`` in a workspace of its own
(``.workers/w<i>/``, git-ignored; its folds are cloned there, ``BNE_WORKSPACE``), its pid and log beside it. They
need a Prefect server (``make serve``, or ``PREFECT_API_URL``); settings and secrets come from the environment
only (``PREFECT_API_URL``, ``PREFECT_API_KEY`` where a server wants one), nothing is written into the repository.

    python -m flows.workers --start 2    # the pool and deployment (idempotent), then 2 workers in the background
    python -m flows.workers --stop       # stops every worker started from here
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.serve import _ours, _terminate
from tasks import params as P

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / ".workers"
PID = "worker.pid"


def register(fan: P.Fanout, source: Path | str = ROOT, entrypoint: str = "flows/fold.py:dg_fold") -> str:
    """The process work pool ``fan.pool`` (created if missing), the deployment ``dg-fold/<fan.deployment>`` on it,
    loading the flow ``entrypoint`` from ``source`` (this checkout; a git URL for machines that do not share the
    folder), and the automation that notices a lost worker machine. Returns the deployment's name.

    A worker killed with its flow run (a machine lost, an evicted container) reports nothing, and the run would stay
    Running for ever. So the deployment's runs send a heartbeat every ``fan.heartbeat`` seconds
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in its job variables: any worker type passes it on), and an automation on
    the server (Prefect's zombie-flow recipe) marks a run of this deployment Crashed when ``fan.lost_after`` seconds
    pass without one; the coordinator then submits the fold again (``fan.retries``). Runs of other deployments are
    not watched (their heartbeats keep Prefect's default period). Registering again replaces both."""
    from datetime import timedelta

    from prefect import flow
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=fan.pool, type="process"))
        except ObjectAlreadyExists:
            pass
    fold = flow.from_source(source=str(source), entrypoint=entrypoint)
    deployment_id = fold.deploy(
        name=fan.deployment, work_pool_name=fan.pool, print_next_steps=False,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(fan.heartbeat)}},
        description="one fold (train..evaluate) in a workspace of its own; submitted by dg-pipeline (fanout.mode pool)")
    name = f"dg-fold/{fan.deployment}: crash runs without a heartbeat for {fan.lost_after} s"
    with get_client(sync_client=True) as client:  # an earlier registration's (its settings may differ)
        for stale in client.read_automations():
            if stale.name.startswith(f"dg-fold/{fan.deployment}: "):
                try:
                    client.delete_automation(stale.id)
                except ObjectNotFound:
                    pass
    Automation(
        name=name,
        description="a dg-fold run whose worker machine is gone stops sending heartbeats: mark it Crashed, so the "
                    "coordinator (dg-pipeline, fanout.mode pool) submits the fold again",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}", "prefect.resource.role": "deployment"},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=fan.lost_after)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {fan.lost_after} s: its worker is gone (fanout.lost_after)")],
    ).create()
    return f"{fold.name}/{fan.deployment}"


def start(n: int, pool: str, base: Path = BASE, env: dict | None = None, names: str = "bne-w") -> list[tuple[str, int, Path]]:
    """Start ``n`` process workers on ``pool``, each in ``base/w<i>`` (its folds' workspace); returns (name, pid, folder)."""
    out = []
    for i in range(1, n + 1):
        ws = base / f"w{i}"
        ws.mkdir(parents=True, exist_ok=True)
        name = f"{names}{i}"
        pid_file = ws / PID
        if pid_file.is_file() and _ours(int(pid_file.read_text()), "prefect", "worker"):
            raise RuntimeError(f"worker {name} already runs (pid {pid_file.read_text()}); make stop first")
        wenv = {**os.environ, **(env or {}), "BNE_WORKSPACE": str(ws), "BNE_WORKER": name, "BNE_WORKSPACE_EXCLUSIVE": "1",
                "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        with open(ws / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                                     "--name", name, "--limit", "1"],
                                    cwd=ws, env=wenv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
        out.append((name, proc.pid, ws))
    return out


def stop(base: Path = BASE) -> list[str]:
    """Stop every worker with a pid file under ``base`` (and the flow runs it started: its process group)."""
    said = []
    for pid_file in sorted(base.glob(f"*/{PID}")):
        pid = int(pid_file.read_text())
        if _ours(pid, "prefect", "worker"):
            ok = _terminate(pid, signal.SIGTERM, 30)
            try:  # the flow runs it started live in its process group
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            said.append(f"{'stopped' if ok else 'could not stop'} worker {pid_file.parent.name} (pid {pid})")
        pid_file.unlink(missing_ok=True)
    return said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, metavar="N", help="register the pool and deployment, start N workers")
    ap.add_argument("--stop", action="store_true")
    ap.add_argument("--base", type=Path, default=BASE)
    a = ap.parse_args()
    if a.stop:
        print("; ".join(stop(a.base)) or f"no workers under {a.base}")
        return
    if not a.start or a.start < 1:
        ap.error("--start N (N >= 1) or --stop")
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("PREFECT_API_URL is not set: start a server first (make serve; export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    fan = P.load(ROOT / P.PARAMS_FILE).fanout
    name = register(fan)
    started = start(a.start, fan.pool, a.base)
    time.sleep(1)
    for w, pid, ws in started:
        print(f"worker {w} (pid {pid}) on pool {fan.pool}, workspace {ws}, log {ws / 'worker.log'}")
    print(f"deployment {name}; run the pipeline with: prefect deployment run dg-pipeline/<dataset> --param mode=pool "
          f"(or fanout.mode: pool); stop with: make stop")


if __name__ == "__main__":
    main()
