"""``make serve`` / ``make stop``: a local Prefect server and the process serving the ``dg-pipeline`` deployments.

The server binds to 127.0.0.1 and keeps its SQLite database under ``PREFECT_HOME`` (default ``.prefect/`` in
the project). Deployments: ``dg-pipeline/<dataset>`` (the pipeline), ``dg-pipeline/smoke`` (every stage on a
tiny subset, in a temporary copy removed afterwards) and ``dg-pipeline/retrain-new-domains`` (on the cron schedule of
``schedule.retrain_cron``).

    python -m flows.serve            # foreground: Ctrl-C stops the serving process, then the server
    python -m flows.serve --detach   # background (make serve); returns once the deployments are registered
    python -m flows.serve --stop     # make stop: the serving process and its server; says what still listens
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks import params as P

ROOT = Path(__file__).resolve().parents[1]
SERVER_FILE = "server.json"  # the server's pid and port, written by the serving process


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


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server of its own (the scale-out bench, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:``port`` with ``env`` added to this environment, in a process group of its
    own, output to ``log`` (else inherited); returns at once (:func:`wait_healthy`, then :func:`interrupt` to stop)."""
    out = open(log, "wb") if log is not None else None  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out is not None:
            out.close()


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

    p = P.load(project / P.PARAMS_FILE)
    name = p.dataset.name
    return [
        dg_pipeline.to_deployment(name=name, parameters={"dataset": name, "root": str(project)},
                                  description="the DVC pipeline (dvc repro) through Prefect"),
        dg_pipeline.to_deployment(name="smoke", parameters={"dataset": name, "root": str(project), "smoke": True},
                                  description="every stage on a tiny subset, in a temporary copy of the project"),
        dg_pipeline.to_deployment(
            name="retrain-new-domains",
            parameters={"dataset": name, "root": str(project), "action": "retrain-new-domains"},
            schedules=[Cron(p.schedule.retrain_cron, timezone=p.schedule.timezone)],
            description="add domains that appear in dataset.root to the final model",
        ),
    ]


def run(port: int, home: Path, project: Path) -> None:
    """Server, then serve (blocking); on Ctrl-C or SIGTERM stop serving first, then the server."""
    env = settings(port, home)
    os.environ.update(env)
    home.mkdir(parents=True, exist_ok=True)
    server = start_server(port, env)
    (home / SERVER_FILE).write_text(json.dumps({"pid": server.pid, "port": port}))  # for --stop, should this process die

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
        interrupt(server)
        (home / SERVER_FILE).unlink(missing_ok=True)


def interrupt(proc: subprocess.Popen, wait: float = 30) -> None:
    """Stop a server or worker we started (in its own process group): SIGINT, then SIGKILL of its group after ``wait`` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def registered(port: int, names: list[str]) -> bool:
    """True when every ``flow/deployment`` name is known to the server."""
    for n in names:
        flow, dep = n.split("/")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/deployments/name/{flow}/{dep}", timeout=2) as r:
                json.load(r)
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    """True when process ``pid`` exists and has not exited (a zombie whose parent died has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ours(pid: int, *words: str) -> bool:
    """True when process ``pid`` is alive and its command line holds every word (a pid file may be stale and
    its number reused by another process)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc: trust the pid file
        return True
    return all(w in cmdline for w in words)


def _terminate(pid: int, sig: int, wait: float) -> bool:
    """Send ``sig`` to ``pid``, wait up to ``wait`` seconds, then kill its process group; True when it is gone."""
    try:
        os.kill(pid, sig)
        deadline = time.time() + wait
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.5)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            time.sleep(1)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return not _alive(pid)


def stop(home: Path, port: int) -> int:
    """Stop a detached serve and its Prefect server, even when the serving process died before its server;
    then check the port and say what still listens. Returns the exit status (1: something could not be stopped)."""
    pid_file, server_file = home / "serve.pid", home / SERVER_FILE
    said = []
    if pid_file.is_file():
        pid = int(pid_file.read_text())
        if _ours(pid, "flows"):
            said.append(f"stopped serve (pid {pid})" if _terminate(pid, signal.SIGTERM, 60) else f"could not stop serve (pid {pid})")
        else:
            said.append(f"serve (pid {pid}) was not running")
        pid_file.unlink(missing_ok=True)
    if server_file.is_file():  # left behind when serve died without stopping its server
        info = json.loads(server_file.read_text())
        port = int(info.get("port", port))
        if _ours(info["pid"], "prefect", "server"):
            ok = _terminate(info["pid"], signal.SIGINT, 30)
            said.append(f"stopped its Prefect server (pid {info['pid']})" if ok else f"could not stop the Prefect server (pid {info['pid']})")
        server_file.unlink(missing_ok=True)
    if not said:
        said.append(f"nothing to stop (no serve.pid in {home})")
    if listening(port):
        said.append(f"port {port} still accepts connections: not a server this command started, or one it could not stop "
                    f"(see `ss -ltnp 'sport = :{port}'`)")
        print("; ".join(said))
        return 1
    print("; ".join(said) + f"; port {port} is free")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("PREFECT_HOME") or ROOT / ".prefect"))
    ap.add_argument("--project", type=Path, default=ROOT)
    ap.add_argument("--detach", action="store_true", help="run in the background; pid and log in --home")
    ap.add_argument("--stop", action="store_true", help="stop a detached serve (and its server)")
    a = ap.parse_args()
    if a.stop:
        raise SystemExit(stop(a.home, a.port))
    if a.detach:
        pid_file, log_file = a.home / "serve.pid", a.home / "serve.log"
        a.home.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--port", str(a.port), "--home", str(a.home), "--project", str(a.project)],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
        name = P.load(a.project / P.PARAMS_FILE).dataset.name
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
