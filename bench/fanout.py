"""The full pipeline in one process vs its folds on N process workers with one torch thread each (issue 16).

    python bench/fanout.py                                  # PACS, the CPU protocol of params.yaml: NOT quick (hours)
    python bench/fanout.py --source DIR --set train.resolution=32 ...   # a small <domain>/<class>/<image> folder
    python bench/fanout.py --workers 2 --threads 1 --single-threads 1   # the defaults
    python bench/fanout.py ... --pool-set tune.storage=postgresql://... # a setting of one copy only (its study)

Two fresh copies of the project (``git clone`` of this checkout's ``HEAD`` with this ``params.yaml``, or with
``--source`` a smoke project of that folder, every image), identical parameters, each with its own DVC cache:

- ``single``: ``dvc repro`` (every stage in one process tree), ``OMP_NUM_THREADS=--single-threads`` (empty: torch's
  default; the issue compares against one thread per training, the same thread count as the workers, so the
  metrics can be compared bit for bit);
- ``pool``: a Prefect server on a free 127.0.0.1 port (SQLite in the run's folder), the ``dg-fold`` deployment, N
  process workers (``OMP_NUM_THREADS=--threads``) in workspaces of their own, a DVC remote in the run's folder, and
  ``dg-pipeline`` with ``mode=pool``.

The Prefect server uses ``PREFECT_API_DATABASE_CONNECTION_URL`` when the environment sets one (PostgreSQL), else
SQLite. Writes ``--out`` (default ``reports/bench/fanout.json``): both wall times, their ratio (single / pool; the
issue's goal is >= 1.4 with 2 workers on 2 cores), the metrics of both runs, the largest absolute difference between
their tables, whether the ``dvc.lock`` files match (outputs' hashes aside: outputs carry run records such as wall
times), which outputs differ in content once those run records are set aside (none, when the runs agree), and what the pool
run returned (each fold's worker, workspace and ``dvc.lock`` entries); storage URLs in it are redacted. Everything
it starts is stopped at the end, also after a failure; the copies (``--work``, default a new temporary folder) are
removed unless ``--keep``. ``tests/test_scaleout.py`` drives this script for the loopback end-to-end test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT)]

from bne.io import write_json  # noqa: E402
from flows.dvc import SMOKE_MARKER, dvc, env as stage_env  # noqa: E402
from flows.serve import free_port, interrupt, start_server, wait_healthy  # noqa: E402
from tasks import params as P  # noqa: E402

def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_copy(dest: Path, source: Path | None, overrides: list[str], remote: Path | None) -> Path:
    """A committed project copy in ``dest`` (the workers clone it), ``overrides`` applied, ``remote`` its default."""
    if source is not None:
        from flows.smoke import build

        build(dest, source=source, per_class=10**9)
        overrides = ["train.seeds=[0]", *overrides]
    else:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
        shutil.copy(ROOT / P.PARAMS_FILE, dest / P.PARAMS_FILE)
        raw = P.read_raw(ROOT / P.PARAMS_FILE)  # the data stays where it is: its paths made absolute
        overrides = [f"dataset.root={P.resolve(ROOT, raw['dataset']['root'])}",
                     *([f"dataset.splits={P.resolve(ROOT, raw['dataset']['splits'])}"] if raw["dataset"]["splits"] else []),
                     *overrides]
        site = dest / ".dvc" / "site-cache"
        dvc(dest, "config", "--local", "core.site_cache_dir", str(site), extra_env={"DVC_SITE_CACHE_DIR": str(site)})
        (dest / SMOKE_MARKER).write_text(json.dumps({"made_by": "bench/fanout.py", "project": str(ROOT)}) + "\n")
    if overrides:
        P.write_overrides(dest / P.PARAMS_FILE, overrides)
    if remote is not None:
        dvc(dest, "remote", "add", "--local", "--force", "--default", "bench", str(remote))
    with open(dest / ".dvc" / ".gitignore", "a") as f:
        f.write("/site-cache\n")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "bench copy", "--allow-empty")
    return dest


def threads_env(n: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n} if n else {}


def run_single(proj: Path, threads: str) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj,
                          env={**stage_env(), **threads_env(threads), "PYTHONPATH": str(proj)})  # the copy's code
    if proc.returncode:
        raise RuntimeError(f"dvc repro failed in {proj}")
    return time.time() - t0


def run_pool(proj: Path, work: Path, n: int, threads: str) -> tuple[float, dict]:
    from flows.workers import start, stop

    port = free_port()
    env = {**stage_env(), "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port), "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    server = start_server(port, env, work / "server.log")
    try:
        wait_healthy(port, timeout=180, proc=server)
        fan = P.load(proj / P.PARAMS_FILE).fanout  # the pool and deployment the coordinator submits to
        reg = subprocess.run([sys.executable, "-c", "from flows.workers import register; from tasks import params as P; "
                              f"register(P.load({str(proj / P.PARAMS_FILE)!r}).fanout)"],
                             cwd=ROOT, env=env, capture_output=True, text=True)  # a process of its own: the server's settings
        if reg.returncode:
            raise RuntimeError(f"registering dg-fold/{fan.deployment} failed:\n{reg.stderr[-3000:]}")
        start(n, fan.pool, work / "workers", env={**env, **threads_env(threads)})
        code = ("import json; from flows.dg_pipeline import dg_pipeline; "
                f"r = dg_pipeline(dataset={P.load(proj / P.PARAMS_FILE).dataset.name!r}, root={str(proj)!r}, mode='pool'); "
                "print('RESULT ' + json.dumps(r))")
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.time() - t0
        if out.returncode:
            raise RuntimeError(f"the pool run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        return seconds, result
    finally:
        stop(work / "workers")
        interrupt(server)


def redact_setting(text: str) -> str:
    """``text`` with every URL's password masked (``user:***@host``): settings and results go into the report."""
    import re

    from tasks.tune import redact

    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s\"',\]]+", lambda m: redact(m.group(0)), text)


def table_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two metrics tables (numbers at the same keys)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max([table_diff(a[k], b[k]) for k in a.keys() & b.keys()] or [0.0])
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0


def without_keys(x, keys: frozenset[str]):
    """``x`` (nested dicts and lists, as JSON or YAML give) with every entry whose key is in ``keys`` left out."""
    if isinstance(x, dict):
        return {k: without_keys(v, keys) for k, v in x.items() if k not in keys}
    if isinstance(x, (list, tuple)):
        return [without_keys(v, keys) for v in x]
    return x


#: What ``dvc.lock`` holds that differs between two copies computing the same things: hashes and sizes (outputs
#: carry run records) and the study's storage URL (each copy has its own database).
LOCK_RUN_KEYS = frozenset({"md5", "hash", "size", "nfiles", "tune.storage"})


def lock_without_hashes(proj: Path) -> dict:
    import yaml

    return without_keys(yaml.safe_load((proj / "dvc.lock").read_text())["stages"], LOCK_RUN_KEYS)


#: Fields that record how a run went rather than what it computed: wall times, creation times (training's
#: ``seconds``, ``created_at`` of the final model and of the statistics' Parquet), an Optuna journal's trial times
#: and writer ids (a random id per process).
RUN_RECORD_KEYS = frozenset({"seconds", "train_seconds", "train_seconds_total", "evaluate_seconds_total", "created_at",
                             "datetime_start", "datetime_complete", "worker_id"})


def _without_run_records(x):
    return without_keys(x, RUN_RECORD_KEYS)


def _same_content(a: Path, b: Path) -> bool:
    """``a`` and ``b`` hold the same results, run records (:data:`RUN_RECORD_KEYS`) aside: JSON and journals compared
    as data, checkpoints tensor by tensor, Parquet as tables with their metadata, Markdown reports with their durations
    ("... 12.5 min") masked; PNG plots by existence only (the
    order of tied bars in Optuna's importance plot follows Python's per-process string hashing); anything else byte
    for byte."""
    if a.read_bytes() == b.read_bytes():
        return True
    suffix = a.suffix
    if suffix == ".json":
        return _without_run_records(json.loads(a.read_text())) == _without_run_records(json.loads(b.read_text()))
    if suffix == ".journal":
        def lines(p: Path) -> list:
            return [_without_run_records(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]
        return lines(a) == lines(b)
    if suffix == ".pt":
        import torch

        def same(x, y) -> bool:
            if isinstance(x, torch.Tensor):
                return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
            if isinstance(x, dict):
                return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x if k not in RUN_RECORD_KEYS)
            if isinstance(x, (list, tuple)):
                return isinstance(y, (list, tuple)) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
            if isinstance(x, str) and x[:1] in "[{":  # a JSON record inside the checkpoint (its training history)
                try:
                    return _without_run_records(json.loads(x)) == _without_run_records(json.loads(y))
                except (TypeError, ValueError):
                    pass
            return x == y

        return same(torch.load(a, map_location="cpu", weights_only=True), torch.load(b, map_location="cpu", weights_only=True))
    if suffix == ".md":  # a report's durations ("training of all folds 12.5 min")
        import re

        def text(p: Path) -> str:
            return re.sub(r"\b\d+(\.\d+)? min\b", "<duration> min", p.read_text())
        return text(a) == text(b)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        meta = [{k: v for k, v in (t.schema.metadata or {}).items() if k.decode() not in RUN_RECORD_KEYS} for t in (ta, tb)]
        return ta.equals(tb) and meta[0] == meta[1]
    return suffix == ".png"


def outputs_differing(a: Path, b: Path) -> list[str]:
    """The outputs of ``a``'s ``dvc.lock`` (every stage's, files and folders) whose results differ in ``b`` or that
    ``b`` lacks, run records aside (:func:`_same_content`); ``[]``: the two runs computed the same things."""
    import yaml

    lock = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    paths = sorted({o["path"] for e in lock.values() for o in e.get("outs", [])})
    out = []
    for rel in paths:
        files = sorted(p.relative_to(a) for p in ((a / rel).rglob("*") if (a / rel).is_dir() else [a / rel]) if p.is_file())
        for f in files:
            if not (b / f).is_file() or not _same_content(a / f, b / f):
                out.append(f.as_posix())
        if (b / rel).is_dir():
            out += [p.relative_to(b).as_posix() for p in (b / rel).rglob("*") if p.is_file() and not (a / p.relative_to(b)).exists()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="a small <domain>/<class>/<image> folder instead of params.yaml's dataset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value for both copies")
    ap.add_argument("--single-set", action="append", default=[], help="dotted.key=value for the single-process copy only")
    ap.add_argument("--pool-set", action="append", default=[], help="dotted.key=value for the pool copy only")
    ap.add_argument("--work", type=Path, help="an empty or new folder for the copies, workers and server (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS of each worker")
    ap.add_argument("--single-threads", default="1", help="OMP_NUM_THREADS of the single process ('' : torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "fanout.json")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if a.work is not None and a.work.exists() and any(a.work.iterdir()):
        ap.error(f"--work {a.work}: not empty (the bench makes its copies there and removes the folder afterwards)")
    work = a.work or Path(tempfile.mkdtemp(prefix="bne-fanout-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        single = make_copy(work / "single", a.source, [*a.overrides, *a.single_set], None)
        pool = make_copy(work / "pool", a.source, [*a.overrides, *a.pool_set], work / "dvc-remote")
        s_single = run_single(single, a.single_threads)
        s_pool, result = run_pool(pool, work, a.workers, a.threads)
        name = P.load(single / P.PARAMS_FILE).dataset.name
        m_single = json.loads((single / "reports" / name / "metrics.json").read_text())
        m_pool = json.loads((pool / "reports" / name / "metrics.json").read_text())
        report = {
            "dataset": name, "source": str(a.source or "params.yaml"),
            "overrides": {k: [redact_setting(o) for o in v] for k, v in
                          (("both", a.overrides), ("single", a.single_set), ("pool", a.pool_set))},
            "workers": a.workers, "threads_per_worker": a.threads, "single_threads": a.single_threads or "torch default",
            "single_s": round(s_single, 1), "pool_s": round(s_pool, 1), "speedup": round(s_single / s_pool, 3),
            "folds": {t: {"worker": r["worker"]} for t, r in result["folds"].items()},
            "pool_result": json.loads(redact_setting(json.dumps(result))),
            "metrics_single": m_single, "metrics_pool": m_pool, "metrics_max_abs_diff": table_diff(m_single, m_pool),
            "lock_equal_but_hashes": lock_without_hashes(single) == lock_without_hashes(pool),
            "outputs_differing_but_run_records": outputs_differing(single, pool),
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, report)
        print(json.dumps({k: report[k] for k in ("single_s", "pool_s", "speedup", "metrics_max_abs_diff", "lock_equal_but_hashes",
                                                  "outputs_differing_but_run_records")}))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
