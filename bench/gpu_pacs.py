"""The GPU protocol on PACS: 224 px, 30 epochs, every layer trained, all four held-out folds, DeepAll and BNE.

Meant for one H100 (``bench/gpu_pacs.sh`` installs the carried wheels and calls this), where torch,
torchvision, numpy, pandas, pyarrow, pillow, typer, tqdm, pyyaml and matplotlib are installed but not prefect,
dvc, great-expectations or optuna: it uses only the ``bne`` library (no tuning; the configured BNE options).

1. checks the compact copy made by ``bench/pack_pacs.py`` against its SHA256SUMS (``bne.ingest``);
2. decodes it once into the memory-mapped cache (``bne.lodo.prepare``);
3. runs the folds as ``--parallel`` processes of ``bne lodo --target T`` sharing the GPU (one fold of this
   small network does not fill an H100: the per-step kernel launches dominate);
4. gathers the folds with ``bne.lodo.report`` into ``--reports`` (metrics.json, metrics.md, details.json,
   figures) and writes ``run.json`` (device, versions, settings, per-fold and total wall time).

Every setting is a ``--set`` override of params.yaml (the defaults below are the protocol); a dry run on the
CPU with a tiny copy: ``python bench/gpu_pacs.py --data /tmp/tiny/pacs --set train.resolution=64 --set train.epochs=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = [  # the literature protocol (METHOD.md / PROTOCOL.md) at one H100's budget
    "train.resolution=224",
    "train.epochs=30",
    "train.per_domain_batch=32",
    "train.freeze_stages=0",
    "train.eval_batch=256",
    "train.seeds=[0]",
    "eval.batch=128",
    "eval.branch_chunk=auto",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "gpu_data" / "pacs", help="bench/pack_pacs.py's copy")
    ap.add_argument("--reports", type=Path, default=ROOT / "reports" / "pacs-gpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bne-gpu"), help="stage outputs and cache")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="override (after the protocol's)")
    ap.add_argument("--parallel", type=int, default=4, help="folds run at once")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; stop unfinished folds then (0: none)")
    args = ap.parse_args()

    from bne.ingest import ingest
    from bne.lodo import fold_targets, load_params, prepare, report

    t0 = time.time()
    data = args.data.resolve()
    overrides = [f"dataset.root={data / 'images'}", f"dataset.splits={data / 'splits'}", *PROTOCOL, *args.set_]
    cfg = load_params(args.params, overrides=overrides)
    work = args.work.resolve()
    ingest(data / "images", work / "ingest", splits=data / "splits", sums=data / "SHA256SUMS", progress=False)
    dataset, _ = prepare(cfg, work / "cache", progress=False)
    t_prep = time.time() - t0
    targets = fold_targets(cfg, dataset)
    print(f"data checked and cached in {t_prep:.1f} s; folds {targets}, {args.parallel} at a time", flush=True)

    threads = max(1, (os.cpu_count() or 1) // max(1, min(args.parallel, len(targets))))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, walls, codes = list(targets), {}, {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            t = pending.pop(0)
            cmd = [sys.executable, "-m", "bne.cli", "lodo", "--params", str(args.params), "--work", str(work),
                   "--cache", str(work / "cache"), "--reports", str(work / "reports" / t), "--target", t,
                   "--no-tuned", "--no-progress", *[a for o in overrides for a in ("--set", o)]]
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
                walls[t], codes[t] = round(time.time() - start, 1), "killed at deadline"
                print(f"{t}: killed at the {args.deadline:.0f} s deadline", flush=True)
            running.clear()
            break
        time.sleep(1)

    done = [t for t in targets if codes.get(t) == 0]
    for t in targets:
        if codes.get(t) != 0:
            print(f"--- {t} ({codes.get(t, 'not started')}): end of its log\n" +
                  (work / "logs" / f"{t}.log").read_text(errors="replace")[-3000:] if (work / "logs" / f"{t}.log").exists() else "")
    metrics = report(cfg, done, work, args.reports, dataset.classes) if done else {}
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
    if metrics:
        print((args.reports / "metrics.md").read_text())
    sys.exit(0 if len(done) == len(targets) else 1)


if __name__ == "__main__":
    main()
