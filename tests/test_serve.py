"""End to end: a Prefect server and the serving process on loopback (`make serve`), the smoke deployment run with
`prefect deployment run dg-pipeline/smoke --watch`, and `make stop`, also after the serving process died."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dg-pipeline/pacs", "dg-pipeline/smoke", "dg-pipeline/retrain-new-domains"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    env = {**os.environ, **settings(port, home)}
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
    before = set(Path(tempfile.gettempdir()).glob("bne-smoke-*"))
    data = make_dataset(tmp_path / "syn", styles=("red_on_white", "yellow_on_blue", "noisy_gray"), per_class=6, size=40)
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "dg-pipeline/smoke", "--watch",
         "--param", f"smoke_source={data}", "--param", 'overrides=["train.resolution=32", "train.freeze_stages=0", "tune.inference.n_trials=3"]'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    assert set(Path(tempfile.gettempdir()).glob("bne-smoke-*")) <= before  # the smoke copy was removed


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
