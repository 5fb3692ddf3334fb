"""``make serve`` / ``make stop``: a local Prefect server and the process serving the ``dg-pipeline`` deployments.

The server binds to 127.0.0.1 and keeps its SQLite database under ``PREFECT_HOME`` (default ``.prefect/`` in
the project). Deployments: ``dg-pipeline/<dataset>`` (the pipeline), ``dg-pipeline/smoke`` (every stage on a
tiny subset, in a temporary copy) and ``dg-pipeline/retrain-new-domains`` (on the cron schedule of
``schedule.retrain_cron``).

    python flows/serve.py            # foreground: Ctrl-C stops the serving process, then the server
    python flows/serve.py --detach   # background (make serve); returns once the deployments are registered
    python flows/serve.py --stop     # make stop
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def settings(port: int, home: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
    }


def wait_healthy(port: int, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode} (port {port} taken?)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy Prefect server on {url} after {timeout:.0f} s")


def deployments(project: Path):
    """The three deployments of ``dg-pipeline`` for the dataset that ``params.yaml`` configures."""
    from prefect.schedules import Cron

    from flows.dg_pipeline import dg_pipeline

    p = yaml.safe_load((project / "params.yaml").read_text())
    name = p["dataset"]["name"]
    sched = p.get("schedule") or {}
    return [
        dg_pipeline.to_deployment(name=name, parameters={"dataset": name, "root": str(project)},
                                  description="the DVC pipeline (dvc repro) through Prefect"),
        dg_pipeline.to_deployment(name="smoke", parameters={"dataset": name, "root": str(project), "smoke": True},
                                  description="every stage on a tiny subset, in a temporary copy of the project"),
        dg_pipeline.to_deployment(
            name="retrain-new-domains",
            parameters={"dataset": name, "root": str(project), "action": "retrain-new-domains"},
            schedules=[Cron(sched.get("retrain_cron", "0 3 * * *"), timezone=sched.get("timezone", "UTC"))],
            description="add domains that appear in dataset.root to the final model",
        ),
    ]


def run(port: int, home: Path, project: Path) -> None:
    """Server, then serve (blocking); on Ctrl-C or SIGTERM stop serving first, then the server."""
    env = settings(port, home)
    os.environ.update(env)
    home.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, start_new_session=True,
    )

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        wait_healthy(port, proc=server)
        from prefect import serve

        serve(*deployments(project), pause_on_shutdown=False)
    except KeyboardInterrupt:
        pass
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def registered(port: int, names: list[str]) -> bool:
    """True when every ``flow/deployment`` name is known to the server."""
    import json

    for n in names:
        flow, dep = n.split("/")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/deployments/name/{flow}/{dep}", timeout=2) as r:
                json.load(r)
        except OSError:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("PREFECT_HOME") or ROOT / ".prefect"))
    ap.add_argument("--project", type=Path, default=ROOT)
    ap.add_argument("--detach", action="store_true", help="run in the background; pid and log in --home")
    ap.add_argument("--stop", action="store_true", help="stop a detached serve (and its server)")
    a = ap.parse_args()
    pid_file, log_file = a.home / "serve.pid", a.home / "serve.log"
    if a.stop:
        if not pid_file.is_file():
            print("nothing to stop (no serve.pid)")
            return
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(120):
                os.kill(pid, 0)
                time.sleep(0.5)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
        print(f"stopped serve (pid {pid}) and its Prefect server")
        return
    if a.detach:
        a.home.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--port", str(a.port), "--home", str(a.home), "--project", str(a.project)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
        name = yaml.safe_load((a.project / "params.yaml").read_text())["dataset"]["name"]
        names = [f"dg-pipeline/{n}" for n in (name, "smoke", "retrain-new-domains")]
        deadline = time.time() + 180
        while not registered(a.port, names):
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"serve did not start; see {log_file}")
            time.sleep(1)
        print(f"serving {', '.join(names)} (pid {proc.pid}, log {log_file})\n"
              f"  export PREFECT_API_URL=http://127.0.0.1:{a.port}/api\n"
              f"  prefect deployment run dg-pipeline/{name} --watch\n"
              f"stop with: make stop")
        return
    run(a.port, a.home, a.project)


if __name__ == "__main__":
    main()
