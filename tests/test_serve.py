"""End to end: a Prefect server and the serving process on loopback; `prefect deployment run dg-pipeline/smoke --watch`."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from flows.serve import registered, settings

    tmp_path = tmp_path_factory.mktemp("serve")
    port, home = free_port(), tmp_path / "prefect-home"
    env = {**os.environ, **settings(port, home)}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "flows" / "serve.py"), "--port", str(port), "--home", str(home)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not registered(port, ["dg-pipeline/pacs", "dg-pipeline/smoke", "dg-pipeline/retrain-new-domains"]):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "deployments not registered in 120 s"
            time.sleep(1)
        yield env, port
    finally:  # whatever the outcome: stop serving (SIGTERM), which stops its server; then make sure of both
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        with socket.socket() as s:  # the server's port is free again: it stopped too
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_smoke_deployment_runs_to_completion(served, tmp_path):
    env, port = served
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"
    data = make_dataset(tmp_path / "syn", styles=("red_on_white", "yellow_on_blue", "noisy_gray"), per_class=6, size=40)
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "dg-pipeline/smoke", "--watch",
         "--param", f"smoke_source={data}", "--param", 'overrides=["train.resolution=32", "train.freeze_stages=0", "tune.inference.n_trials=3"]'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout


def test_unknown_deployment_parameter_fails(served):
    env, _ = served
    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "dg-pipeline/smoke", "--param", "bogus=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
