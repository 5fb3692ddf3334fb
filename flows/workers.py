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


def register(pool: str, deployment: str, source: Path = ROOT) -> str:
    """The process work pool ``pool`` (created if missing) and the deployment ``dg-fold/<deployment>`` on it, loading
    the flow from ``source`` (this checkout; a git URL for machines that do not share the folder). Returns its name."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    fold = flow.from_source(source=str(source), entrypoint="flows/fold.py:dg_fold")
    fold.deploy(name=deployment, work_pool_name=pool, print_next_steps=False,
                description="one fold (train..evaluate) in a workspace of its own; submitted by dg-pipeline (fanout.mode pool)")
    return f"dg-fold/{deployment}"


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
    name = register(fan.pool, fan.deployment)
    started = start(a.start, fan.pool, a.base)
    time.sleep(1)
    for w, pid, ws in started:
        print(f"worker {w} (pid {pid}) on pool {fan.pool}, workspace {ws}, log {ws / 'worker.log'}")
    print(f"deployment {name}; run the pipeline with: prefect deployment run dg-pipeline/<dataset> --param mode=pool "
          f"(or fanout.mode: pool); stop with: make stop")


if __name__ == "__main__":
    main()
