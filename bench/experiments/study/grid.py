"""The PACS study of issue 19 (pre-registered in docs/results/pacs-study.md): variants x seeds x held-out domains.

Each cell runs the pipeline's stage commands (`bne ingest/validate/cache`, then `bne train/stats extract/embed/tune/
evaluate --target T`, with `--set train.seeds=[s] <variant overrides>`) in data/study/<variant>/seed<s>/, with one
torch thread per process and --workers processes side by side. Cells resume (training checkpoints) and a
finished cell (its fold.json) is never rerun. `--cached-only` prints the table from finished cells at any time.

    python bench/experiments/study/grid.py --workers 2              # run what is missing, then the table
    python bench/experiments/study/grid.py --cached-only            # the table so far
    python bench/experiments/study/grid.py --gpu                    # the literature protocol (224 px, 30 epochs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bne.evaluate import BranchOutputs, leave_own_out_accuracy, method_accuracies
from bne.io import atomic_write, write_json
from tasks import params as P

ROOT = Path(__file__).resolve().parents[3]
#: Training variants: overrides of params.yaml (each trains DeepAll and BNE in its own cells).
TRAINING = {"paper": [], "ensemble0.1": ["train.ensemble_loss=0.1", "train.ensemble_own_out=true"]}
#: Inference-only variants: eval.options changes applied to the saved outputs of a training variant.
INFERENCE = {"power2": ("paper", {"power": 2.0})}
GPU = ["train.resolution=224", "train.epochs=30", "train.device=cuda"]


def cell_root(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def fold_file(out: Path, variant: str, seed: int, target: str) -> Path:
    return cell_root(out, variant, seed) / "data" / "eval" / "pacs" / target / "fold.json"


STAGES = (["train"], ["stats", "extract"], ["embed"], ["tune"], ["evaluate"])


def run_cell(out: Path, variant: str, seed: int, target: str, extra: list[str], log: Path) -> tuple[str, float, int]:
    """One (variant, seed, held-out domain): the fold's stages in the cell's folder, sharing the decoded image cache.

    Cells of one (variant, seed) share a folder: its input stages (ingest, validate, cache) run under a file lock,
    and the fold stages write only the fold's own paths, so two cells of one seed can run side by side.
    """
    import fcntl

    root = cell_root(out, variant, seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    shared = out / "_cache"
    shared.mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "cache").exists():
        (root / "data" / "cache").symlink_to(shared.resolve(), target_is_directory=True)
    sets = [a for o in [f"train.seeds=[{seed}]", *TRAINING[variant], *extra] for a in ("--set", o)]
    base = [sys.executable, "-m", "tasks.cli"]
    common = ["--root", str(root), "--params", str(ROOT / "params.yaml"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "a") as f:
        def run(cmd: list[str]) -> int:
            f.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(cmd)}\n")
            f.flush()
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode

        with open(root / ".inputs.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rc = next((r for r in (run([*base, s, *common]) for s in ("ingest", "validate", "cache")) if r), 0)
        for stage in STAGES:
            if rc:
                break
            rc = run([*base, *stage, "--target", target, *common])
    return f"{variant}/seed{seed}/{target}", time.time() - t0, rc


def load_folds(out: Path, variant: str, seeds: list[int], targets: list[str]) -> dict[tuple[int, str], dict]:
    found = {}
    for s in seeds:
        for t in targets:
            f = fold_file(out, variant, s, t)
            if f.is_file():
                found[(s, t)] = json.loads(f.read_text())["folds"][0]
    return found


def inference_variant(out: Path, base: str, change: dict, seeds: list[int], targets: list[str], p) -> dict[tuple[int, str], dict]:
    """The base variant's folds re-scored with other inference options from their saved outputs (no retraining)."""
    opts = replace(p.eval.options.options(), **change)
    rows = {}
    for (s, t), f in load_folds(out, base, seeds, targets).items():
        data = cell_root(out, base, s) / "data"
        target_out = BranchOutputs.load(data / "eval" / "pacs" / t / f"seed{s}" / "target_outputs.npz")
        val = BranchOutputs.load(data / "embed" / "pacs" / t / f"seed{s}" / "val_outputs.npz")
        import torch

        dom = torch.from_numpy(np.load(data / "embed" / "pacs" / t / f"seed{s}" / "val_domains.npy", allow_pickle=False))
        rows[(s, t)] = {"deepall": f["deepall"], "bne": method_accuracies(target_out, opts)["bne"],
                        "leave_own_out_val_acc": leave_own_out_accuracy(val, dom, opts)}
    return rows


def mean_se(values: list[float]) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def fmt(m: float, se: float | None) -> str:
    return f"{m:.1f}" if se is None else f"{m:.1f} ± {se:.1f}"


def table(variants: dict[str, dict], seeds: list[int], targets: list[str]) -> tuple[str, dict]:
    """Per variant: per target and mean, DeepAll and BNE mean +- SE over seeds and the paired difference +- SE."""
    lines = ["| variant | held-out | seeds | DeepAll | variant | paired diff. | source-only criterion |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, folds in variants.items():
        summary[name] = {}
        for t in [*targets, "mean"]:
            if t == "mean":  # only seeds with every target done; the mean over targets first, then over seeds
                full = [s for s in seeds if all((s, u) in folds for u in targets)]
                per = {k: [100 * np.mean([folds[(s, u)][k] for u in targets]) for s in full]
                       for k in ("deepall", "bne", "leave_own_out_val_acc")}
                done = full
            else:
                done = [s for s in seeds if (s, t) in folds]
                per = {k: [100 * folds[(s, t)][k] for s in done] for k in ("deepall", "bne", "leave_own_out_val_acc")}
            if not done:
                continue
            diff = [b - d for b, d in zip(per["bne"], per["deepall"])]
            row = {"seeds": done, "deepall": mean_se(per["deepall"]), "variant": mean_se(per["bne"]), "diff": mean_se(diff),
                   "criterion": mean_se(per["leave_own_out_val_acc"]), "diff_sd": float(np.std(diff, ddof=1)) if len(diff) > 1 else None}
            summary[name][t] = row
            lines.append(f"| {name} | {t} | {len(done)} | {fmt(*row['deepall'])} | {fmt(*row['variant'])} | "
                         f"{row['diff'][0]:+.1f}" + (f" ± {row['diff'][1]:.1f}" if row["diff"][1] is not None else "") +
                         f" | {fmt(*row['criterion'])} |")
    return "\n".join(lines) + "\n", summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "study")
    ap.add_argument("--reports", type=Path, default=ROOT / "reports" / "study")
    ap.add_argument("--variants", nargs="+", default=list(TRAINING))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="cells run side by side, one torch thread each")
    ap.add_argument("--cached-only", action="store_true", help="only the table of the finished cells")
    ap.add_argument("--gpu", action="store_true", help="the literature protocol (224 px, 30 epochs) on a GPU")
    a = ap.parse_args()
    p = P.load(ROOT / "params.yaml")
    targets = list(p.dataset.folds)
    extra = GPU if a.gpu else []
    out = a.out / "gpu" if a.gpu else a.out
    if not a.cached_only:
        todo = [(v, s, t) for v in a.variants for s in a.seeds for t in targets if not fold_file(out, v, s, t).is_file()]
        print(f"{len(todo)} cell(s) to run with {a.workers} worker(s); logs in {out}/<variant>/seed<s>/<target>.log", flush=True)

        def one(cell):
            v, s, t = cell
            (cell_root(out, v, s)).mkdir(parents=True, exist_ok=True)
            return run_cell(out, v, s, t, extra, cell_root(out, v, s) / f"{t}.log")

        with ThreadPoolExecutor(max(1, a.workers)) as pool:
            results = list(pool.map(one, todo))
        for name, seconds, rc in results:
            print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds / 60:.1f} min", flush=True)
    variants = {v: load_folds(out, v, a.seeds, targets) for v in a.variants}
    for name, (base, change) in INFERENCE.items():
        if base in variants:
            variants[name] = inference_variant(out, base, change, a.seeds, targets, p)
    md, summary = table(variants, a.seeds, targets)
    print(md)
    a.reports.mkdir(parents=True, exist_ok=True)
    write_json(a.reports / ("gpu.json" if a.gpu else "metrics.json"),
               {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seeds": a.seeds, "targets": targets,
                "variants": {v: {t: r for t, r in rows.items()} for v, rows in summary.items()}})
    atomic_write(a.reports / ("gpu.md" if a.gpu else "metrics.md"),
                 "# PACS study (issue 19): DeepAll vs BNE variants, paired by seed and held-out domain\n\n" + md)


if __name__ == "__main__":
    main()
