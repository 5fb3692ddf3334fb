"""The Prefect server on PostgreSQL (``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``): a server on a
free 127.0.0.1 port against a fresh database runs a flow, and the run is stored in that database. SQLite stays the
embedded default (``make serve`` sets no database URL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pg import fresh_database
from test_serve import free_port

from flows.serve import interrupt

ROOT = Path(__file__).resolve().parents[1]
FLOW = """
from prefect import flow

@flow(name="pg-probe")
def probe(x: int) -> int:
    return x + 1

assert probe(41) == 42
"""


def test_server_on_postgres_stores_the_run(tmp_path):
    from flows.serve import settings, wait_healthy

    assert not any("DATABASE" in k for k in settings(4200, tmp_path))  # make serve: SQLite under PREFECT_HOME
    with fresh_database("bne_prefect") as url:
        port = free_port()
        env = {**os.environ, **settings(port, tmp_path / "home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": url.replace("postgresql://", "postgresql+asyncpg://", 1)}
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(port, timeout=180, proc=server)
            run = subprocess.run([sys.executable, "-c", FLOW], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, run.stderr[-3000:]
            import psycopg

            with psycopg.connect(url) as c:
                rows = c.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id").fetchall()
            assert ("pg-probe", "COMPLETED") in rows
            assert not list((tmp_path / "home").glob("*.db"))  # no SQLite file was made
        finally:
            interrupt(server)
