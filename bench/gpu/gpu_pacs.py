"""The GPU protocol on PACS: 224 px, 30 epochs, every layer trained, all four held-out folds, DeepAll and BNE.

Meant for one GPU machine (``bench/gpu/gpu_pacs.sh`` installs the carried Lite0 wheels and calls this). It runs
the pipeline's own stage functions (``tasks.<stage>.run``, as ``bne lodo`` and ``dvc repro`` do) in a work
folder, without DVC or Prefect:

1. writes ``WORK/params.yaml``: ``--params`` with the protocol's overrides, ``dataset.root``/``dataset.splits``
   pointing at the compact copy made by ``bench/gpu/pack_pacs.py``, then the ``--set`` overrides;
2. ingest (which checks the copy against its ``SHA256SUMS``), validate and cache, once;
3. the folds as ``--parallel`` worker processes (``gpu_pacs.py --fold T``: train, stats, embed, tune, evaluate)
   sharing the GPU (one fold of this small network does not fill a large GPU: the per-step kernel launches
   dominate), each logged to ``WORK/logs/<fold>.log``;
4. the report of the finished folds, copied to ``--reports`` (metrics.json, metrics.md, details.json, figures),
   and ``run.json`` (device, versions, settings, per-fold and total wall time).

The stage modules need the project's dependencies but DVC and Prefect (validate: Great Expectations; tune: Optuna).
A dry run on the CPU with a tiny copy:
``python bench/gpu/gpu_pacs.py --data /tmp/tiny/pacs --set train.resolution=64 --set train.epochs=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's bne and tasks

import torch  # noqa: E402

from tasks import params as P  # noqa: E402

PROTOCOL = [  # the literature protocol (docs/method.md, docs/protocol.md) at one GPU's budget
    "train.resolution=224",
    "train.epochs=30",
    "train.per_domain_batch=32",
    "train.freeze_stages=0",
    "train.eval_batch=256",
    "train.seeds=[0]",
    "eval.batch=128",
    "eval.branch_chunk=auto",
]


def scoped(p: P.Params, module):
    """``p`` as the stage ``module`` sees it under DVC: only its declared keys."""
    return p.scoped(module.PARAMS, stage=module.__name__.split(".")[-1])


def prepare(p: P.Params, work: Path) -> None:
    """ingest -> validate -> cache in ``work`` (shared by every fold)."""
    from tasks import cache, ingest, validate
    from tasks.paths import Layout

    layout = Layout(work, p.dataset.name)
    print(ingest.summary(ingest.run(scoped(p, ingest), layout, work, progress=False)), flush=True)
    checked = validate.run(scoped(p, validate), layout, work / "reports")
    if not checked["success"]:
        raise SystemExit(validate.summary(checked))
    print(cache.run(scoped(p, cache), layout, progress=False), flush=True)


def run_fold(p: P.Params, work: Path, target: str) -> None:
    """One held-out fold's stages, in the pipeline's order (the work of one worker process)."""
    from tasks import embed, evaluate, stats, train, tune
    from tasks.paths import Layout

    layout = Layout(work, p.dataset.name)
    train.run(scoped(p, train), layout, target, progress=False)
    stats.run(scoped(p, stats), layout, target)
    embed.run(scoped(p, embed), layout, target, progress=False)
    tune.run(scoped(p, tune), layout, target)
    evaluate.run(scoped(p, evaluate), layout, target, progress=False)


def report(work: Path, done: list[str], out: Path) -> dict:
    """The report of the folds in ``done``, copied to ``out``."""
    from tasks import report as report_stage
    from tasks.paths import Layout

    p = P.load(work / P.PARAMS_FILE, [f"dataset.folds={json.dumps(done)}"])
    layout = Layout(work, p.dataset.name)
    metrics = report_stage.run(scoped(p, report_stage), layout)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(layout.reports, out, dirs_exist_ok=True)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "gpu_data" / "pacs", help="bench/gpu/pack_pacs.py's copy")
    ap.add_argument("--reports", type=Path, default=ROOT / "reports" / "pacs-gpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bne-gpu"), help="stage outputs, cache and logs")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="override (after the protocol's)")
    ap.add_argument("--parallel", type=int, default=4, help="folds run at once")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; stop unfinished folds then (0: none)")
    ap.add_argument("--fold", help=argparse.SUPPRESS)  # worker: run this fold's stages with WORK/params.yaml
    args = ap.parse_args()
    work = args.work.resolve()
    params_file = work / P.PARAMS_FILE

    if args.fold:
        run_fold(P.load(params_file), work, args.fold)
        return

    t0 = time.time()
    data = args.data.resolve()
    overrides = [f"dataset.root={data / 'images'}", f"dataset.splits={data / 'splits'}", *PROTOCOL, *args.set_]
    P.load(args.params, overrides)  # every override exists and is valid, before any work
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.params, params_file)
    P.write_overrides(params_file, overrides)
    p = P.load(params_file)
    prepare(p, work)
    t_prep = time.time() - t0
    targets = list(p.dataset.folds)
    print(f"data checked and cached in {t_prep:.1f} s; folds {targets}, {args.parallel} at a time", flush=True)

    threads = max(1, (os.cpu_count() or 1) // max(1, min(args.parallel, len(targets))))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, walls, codes = list(targets), {}, {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            t = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--fold", t]
            log = open(work / "logs" / f"{t}.log", "w")
            running[t] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), time.time(), log)
        for t, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                walls[t], codes[t] = round(time.time() - start, 1), proc.returncode
                log.close()
                del running[t]
                print(f"{t}: exit {proc.returncode} after {walls[t]:.0f} s", flush=True)
        if args.deadline and time.time() - t0 > args.deadline:
            for t, (proc, start, log) in running.items():
                proc.kill()
                proc.wait()
                log.close()
                walls[t], codes[t] = round(time.time() - start, 1), "killed at deadline"
                print(f"{t}: killed at the {args.deadline:.0f} s deadline", flush=True)
            running.clear()
            break
        time.sleep(1)

    done = [t for t in targets if codes.get(t) == 0]
    for t in targets:
        log_file = work / "logs" / f"{t}.log"
        if codes.get(t) != 0 and log_file.exists():
            print(f"--- {t} ({codes.get(t, 'not started')}): end of its log\n" + log_file.read_text(errors="replace")[-3000:])
    metrics = report(work, done, args.reports) if done else {}
    run = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "overrides": overrides[2:],
        "parallel": args.parallel,
        "threads_per_fold": threads,
        "prepare_seconds": round(t_prep, 1),
        "fold_wall_seconds": walls,
        "fold_exit": codes,
        "total_wall_seconds": round(time.time() - t0, 1),
        "pack": json.loads((data / "pack.json").read_text()) if (data / "pack.json").is_file() else None,
    }
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps(run, indent=2))
    if metrics and (args.reports / "metrics.md").is_file():
        print((args.reports / "metrics.md").read_text())
    sys.exit(0 if len(done) == len(targets) else 1)


if __name__ == "__main__":
    main()
