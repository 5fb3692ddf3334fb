"""The PostgreSQL server the tests use: 127.0.0.1:5432, trust auth, user root or postgres, database ``test``.

:func:`fresh_database` makes a uniquely named database for one test and drops it afterwards (also after a
failure). Without a server a test skips and says why; with ``BNE_REQUIRE_POSTGRES=1`` (CI, where the server
is present) it fails instead, so CI never skips it silently. No password is ever written: the server trusts
loopback connections, and a URL with a password would come from the environment (``BNE_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

HOST, PORT = "127.0.0.1", 5432
USERS = ("root", "postgres")


def _admin():
    """(psycopg connection to the ``test`` database, admin URL prefix) or a reason why there is none."""
    import psycopg

    url = os.environ.get("BNE_TEST_POSTGRES_URL")  # e.g. postgresql://user:pw@127.0.0.1:5432/test, from the environment
    reasons = []
    candidates = [url] if url else [f"postgresql://{u}@{HOST}:{PORT}/test" for u in USERS]
    for c in candidates:
        try:
            conn = psycopg.connect(c, connect_timeout=3, autocommit=True)
            return conn, c.rsplit("/", 1)[0]
        except psycopg.OperationalError as e:
            reasons.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return None, "; ".join(reasons)


def require() -> tuple:
    conn, info = _admin()
    if conn is None:
        msg = f"needs the PostgreSQL server on {HOST}:{PORT} (trust auth, database 'test'): {info}"
        if os.environ.get("BNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg + " (BNE_REQUIRE_POSTGRES=1: no skip)")
        pytest.skip(msg)
    return conn, info


@contextmanager
def fresh_database(prefix: str = "bne_test") -> Iterator[str]:
    """A new database (``<prefix>_<hex>``) for one test: yields its URL (``postgresql://user@127.0.0.1:5432/name``,
    SQLAlchemy 2.1's default driver for it is psycopg 3); dropped afterwards with every connection to it closed."""
    conn, base = require()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
