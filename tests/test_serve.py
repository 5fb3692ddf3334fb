"""End to end: a Prefect server and the serving process on loopback (`make serve`), the smoke deployment run with
`prefect deployment run dg-pipeline/smoke --watch`, and `make stop`, also after the serving process died."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_dataset
from flows.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dg-pipeline/pacs", "dg-pipeline/smoke", "dg-pipeline/retrain-new-domains"]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(env: dict, home: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.serve", "--stop", "--home", str(home), "--port", str(port)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`make serve` on a free port: returns once the three deployments are registered."""
    from flows.serve import registered, settings

    tmp_path = tmp_path_factory.mktemp("serve")
    port, home = free_port(), tmp_path / "prefect-home"
    (tmp_path / "tmp").mkdir()  # the served processes' temporary folder: what a smoke run leaves there is its own
    env = {**os.environ, **settings(port, home), "TMPDIR": str(tmp_path / "tmp")}
    try:
        out = subprocess.run([sys.executable, "-m", "flows.serve", "--detach", "--port", str(port), "--home", str(home)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        log = (home / "serve.log").read_text()[-3000:] if (home / "serve.log").is_file() else ""
        assert out.returncode == 0, out.stdout + out.stderr + log
        assert all(n in out.stdout for n in NAMES) and registered(port, NAMES)
        yield env, port, home
    finally:  # whatever the outcome: `make stop`, then make sure nothing of ours listens
        res = stop(env, home, port)
        left = [int((home / "serve.pid").read_text())] if (home / "serve.pid").is_file() else []
        left += [json.loads((home / "server.json").read_text())["pid"]] if (home / "server.json").is_file() else []
        for pid in left:  # only when --stop itself broke
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert res.returncode == 0 and not listening(port), res.stdout + res.stderr


def test_smoke_deployment_runs_to_completion_and_leaves_nothing(served, tmp_path):
    env, port, _ = served
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"
    tmp = Path(env["TMPDIR"])  # the serving process's temporary folder, which no other test or run writes to
    assert not list(tmp.glob("bne-smoke-*"))
    data = make_dataset(tmp_path / "syn", styles=("red_on_white", "yellow_on_blue", "noisy_gray"), per_class=6, size=40)
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "dg-pipeline/smoke", "--watch",
         "--param", f"smoke_source={data}", "--param", 'overrides=["train.resolution=32", "train.freeze_stages=0", "tune.inference.n_trials=3"]'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    made = smoke_copy(port, re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1))
    assert made.parent == tmp and made.name.startswith("bne-smoke-")  # the run made its copy there...
    assert not made.exists() and not list(tmp.glob("bne-smoke-*"))  # ...and removed it


def smoke_copy(port: int, flow_run: str) -> Path:
    """The smoke project a flow run worked in, from its log line "smoke project in PATH (...)" on the server."""
    body = json.dumps({"logs": {"flow_run_id": {"any_": [flow_run]}}, "limit": 200}).encode()
    deadline = time.time() + 60
    while True:  # the run's logs reach the server in batches: the line may follow the Completed state
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/logs/filter", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            found = [m.group(1) for log in json.load(r) if (m := re.match(r"smoke project in (\S+) \(", log["message"]))]
        if found or time.time() > deadline:
            assert len(found) == 1, f"flow run {flow_run}: no single 'smoke project in' line in its logs"
            return Path(found[0])
        time.sleep(1)


def test_unknown_deployment_parameter_fails(served):
    env, _, _ = served
    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "dg-pipeline/smoke", "--param", "bogus=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0


def test_stop_after_the_serving_process_died(served):
    """The last test of the module: it ends the serving process the way a crash would."""
    from flows.serve import _ours

    env, port, home = served
    serve_pid, server_pid = int((home / "serve.pid").read_text()), json.loads((home / "server.json").read_text())["pid"]
    assert _ours(serve_pid, "flows") and _ours(server_pid, "prefect", "server")  # how --stop recognises them
    assert not _ours(serve_pid, "prefect", "server")
    os.kill(serve_pid, signal.SIGKILL)
    time.sleep(1)
    assert not _ours(serve_pid, "flows")
    assert listening(port)  # its server lives on
    res = stop(env, home, port)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopped its Prefect server" in res.stdout and f"port {port} is free" in res.stdout
    assert not listening(port)


def test_stop_says_what_it_could_not_stop(tmp_path):
    port = free_port()
    with socket.socket() as other:  # a listener that `make stop` did not start
        other.bind(("127.0.0.1", port))
        other.listen()
        res = stop({**os.environ}, tmp_path / "home", port)
    assert res.returncode == 1
    assert "nothing to stop" in res.stdout and f"port {port} still accepts connections" in res.stdout
