"""The PACS study of issue 19 (pre-registered in docs/results/pacs-study.md): variants x seeds x held-out domains.

Each cell runs the pipeline's stage commands (`bne ingest/validate/cache`, then `bne train/stats extract/embed/tune/
evaluate --target T`, with `--set train.seeds=[s] <variant overrides>`) in data/study/<variant>/seed<s>/, with one
torch thread per process and --workers processes side by side. Cells resume (training checkpoints) and a
finished cell (its fold.json, or its committed record) is never rerun. A finished cell then gets its record,
reports/study/cells/<variant>/seed<s>/<target>.json (committed): its own row and every inference-only variant
(power 2, statistics mixing: bne/mixing.py) on its checkpoints. `--cached-only` prints the table of the records at
any time, in a clone without data/.

    python bench/experiments/study/grid.py --workers 2              # run what is missing, then the table
    python bench/experiments/study/grid.py --post-only              # records of finished cells lacking one
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

from bne.evaluate import accuracy, leave_own_out_accuracy, method_accuracies
from bne.io import atomic_write, write_json
from tasks import params as P

ROOT = Path(__file__).resolve().parents[3]
#: Training variants: overrides of params.yaml (each trains DeepAll and BNE in its own cells).
TRAINING = {"paper": [], "ensemble0.1": ["train.ensemble_loss=0.1", "train.ensemble_own_out=true"],
            "domain_layers9": ["model.domain_layers=9"],  # the stem + the first 8 MBConv blocks of Lite0
            "simplex": ["model.norm=simplex"],  # model.simplex_*: Dirichlet(1) mixtures, own domain out w.p. 0.5
            "ema": ["train.ema=0.99"]}  # both methods: EMA of the weights, BN statistics recomputed (amendment 2)
#: Inference-only variants of every training variant (definitions fixed in docs/results/pacs-study.md):
#: options re-scored from the saved outputs, and statistics mixing (bne/mixing.py) on the saved checkpoints.
POWER2 = {"power": 2.0}
MIXSTATS_POWERS = {"mixstats": 1.0, "mixstats_p2": 2.0}
ALPHAS = (0.2, 0.5)
GPU = ["train.resolution=224", "train.epochs=30", "train.device=cuda"]


def cell_root(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def fold_file(out: Path, variant: str, seed: int, target: str) -> Path:
    return cell_root(out, variant, seed) / "data" / "eval" / "pacs" / target / "fold.json"


STAGES = (["train"], ["stats", "extract"], ["embed"], ["tune"], ["evaluate"])


def deepall_dir(out: Path, variant: str, seed: int, target: str) -> Path:
    from tasks.paths import Layout

    return Layout(cell_root(out, variant, seed), "pacs").fold(target).train(seed, "deepall")


def reuse_deepall(out: Path, variant: str, seed: int, target: str) -> str | None:
    """DeepAll of a finished cell of another variant with the same seed and held-out domain, copied into this cell.

    DeepAll does not see BNE's options (ensemble loss, domain_layers): the same seed trains the same network, so
    training it again would only cost time. Safe by construction: the copied ``last.pt`` carries its training key, and
    the train stage resumes from it only if the key equals this cell's (else it trains DeepAll from scratch, e.g.
    for ``model.norm=simplex``, whose DeepAll has one-domain simplex layers). Returns the source variant, if any.
    """
    import shutil

    mine = deepall_dir(out, variant, seed, target)
    if (mine / "last.pt").is_file():
        return None
    for other in sorted(p.parent.parent.name for p in out.glob(f"*/seed{seed}/data")):
        theirs = deepall_dir(out, other, seed, target)
        if other != variant and fold_file(out, other, seed, target).is_file() and (theirs / "last.pt").is_file():
            mine.mkdir(parents=True, exist_ok=True)
            for name in ("best.pt", "last.pt"):  # last.pt last: it is what makes the stage skip training
                if (theirs / name).is_file():
                    shutil.copyfile(theirs / name, mine / f".{name}.tmp")
                    os.replace(mine / f".{name}.tmp", mine / name)
            return other
    return None


def cell_overrides(variant: str, seed: int, extra: list[str]) -> list[str]:
    return [f"train.seeds=[{seed}]", *TRAINING[variant], *extra]


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
    try:  # two cells of one seed may start together: one of them makes the link
        (root / "data" / "cache").symlink_to(shared.resolve(), target_is_directory=True)
    except FileExistsError:
        pass
    sets = [a for o in cell_overrides(variant, seed, extra) for a in ("--set", o)]
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
        reused = reuse_deepall(out, variant, seed, target) if not rc else None
        if reused:
            f.write(f"\n=== DeepAll copied from {reused}/seed{seed}/{target} (trained again only if its key differs)\n")
        for stage in STAGES:
            if rc:
                break
            rc = run([*base, *stage, "--target", target, *common])
    return f"{variant}/seed{seed}/{target}", time.time() - t0, rc


def record_file(reports: Path, variant: str, seed: int, target: str) -> Path:
    """A finished cell's record, committed with the reports: every row it gives, so the table needs no data/."""
    return reports / "cells" / variant / f"seed{seed}" / f"{target}.json"


def per_domain_accuracy(probs, labels, domains) -> float:
    """The mean over source domains of the accuracy on that domain's validation images (as the criterion is)."""
    return float(np.mean([accuracy(probs[domains == d], labels[domains == d]) for d in domains.unique()]))


def post_cell(out: Path, reports: Path, variant: str, seed: int, target: str, p, log) -> None:
    """The cell's record: its trained rows plus every inference-only variant on its checkpoints and saved outputs.

    Rows: ``{name: {"deepall", "bne", "leave_own_out_val_acc"}}``: ``bne`` is the row's method on the held-out domain,
    ``deepall`` its pair partner (DeepAll of the same seed and fold), the criterion on source validation only.
    """
    import torch

    from bne.evaluate import BranchOutputs, bne_predict, ensemble, plain_probs
    from bne.mixing import alpha_branch_probs, mixed_probs, mixstats_fn, plain_norm_layers, pooled_fn
    from bne.model_io import load_model, model_with_stats
    from bne.embedding import layer_subset
    from tasks.inputs import fold_data, source_val, sources
    from tasks.paths import Layout

    torch.set_num_threads(1)
    fold = json.loads(fold_file(out, variant, seed, target).read_text())["folds"][0]
    layout = Layout(cell_root(out, variant, seed), p.dataset.name)
    paths = layout.fold(target)
    dataset, arrays = fold_data(layout, p.train.resolution)
    srcs = sources(dataset, arrays, target)
    names = [a.name for a in srcs]
    cpu, batch = torch.device("cpu"), p.eval.batch
    opts = p.eval.options.options()
    tgt_out = BranchOutputs.load(paths.eval(seed) / "target_outputs.npz", "evaluate")
    val_out = BranchOutputs.load(paths.embed(seed) / "val_outputs.npz", "embed")
    val_dom = torch.from_numpy(np.load(paths.embed(seed) / "val_domains.npy", allow_pickle=False))
    val_images, val_labels, _ = source_val(srcs)
    val_labels = torch.as_tensor(val_labels)
    tgt = arrays[target]
    tgt_labels = torch.as_tensor(tgt.labels)
    model, _ = model_with_stats(p.model.spec(len(dataset.classes), names), paths.train(seed, "bne") / "model.pt",
                                paths.stats, seed, cpu)
    deep = load_model(p.model.spec(len(dataset.classes)), paths.train(seed, "deepall") / "model.pt", cpu)
    early = len(layer_subset(len(plain_norm_layers(model)), "early"))
    rows, seconds = {variant: {k: fold[k] for k in ("deepall", "bne", "leave_own_out_val_acc")}}, {}
    opts2 = replace(opts, **POWER2)
    rows[f"{variant}+power2"] = {"deepall": fold["deepall"], "bne": method_accuracies(tgt_out, opts2)["bne"],
                                 "leave_own_out_val_acc": leave_own_out_accuracy(val_out, val_dom, opts2)}

    def timed(name, fn):
        t0 = time.process_time()
        r = fn()
        seconds[name] = time.process_time() - t0
        return r

    makers = {"pooled": pooled_fn, **{k: (lambda L, a, pw=pw: mixstats_fn(L, pw, a)) for k, pw in MIXSTATS_POWERS.items()}}
    for name, make in makers.items():
        log(f"{variant}/seed{seed}/{target}: {name}")
        t = timed(name, lambda: mixed_probs(model, tgt.images, batch, cpu, make))
        v = mixed_probs(model, val_images, batch, cpu, make, own=val_dom.numpy())
        rows[f"{variant}+{name}"] = {"deepall": fold["deepall"], "bne": accuracy(t, tgt_labels),
                                     "leave_own_out_val_acc": per_domain_accuracy(v, val_labels, val_dom)}
    timed("deepall_forward", lambda: plain_probs(deep, tgt.images, batch, cpu))  # mixstats' time reference
    _, w_t = bne_predict(tgt_out, opts)
    _, w_v = bne_predict(val_out, opts, exclude=val_dom)
    for a in ALPHAS:
        log(f"{variant}/seed{seed}/{target}: alpha {a}")
        bt = alpha_branch_probs(model, tgt.images, batch, cpu, a, early)
        bv = alpha_branch_probs(model, val_images, batch, cpu, a, early)
        dt = alpha_branch_probs(deep, tgt.images, batch, cpu, a, early)[0]
        rows[f"{variant}+alpha{a}"] = {"deepall": fold["deepall"], "bne": accuracy(ensemble(bt, w_t), tgt_labels),
                                       "leave_own_out_val_acc": per_domain_accuracy(ensemble(bv, w_v), val_labels, val_dom)}
        rows[f"deepall+alpha{a}"] = {"deepall": fold["deepall"], "bne": accuracy(dt, tgt_labels), "leave_own_out_val_acc": None}
    write_json(record_file(reports, variant, seed, target), {
        "variant": variant, "seed": seed, "target": target, "sources": names, "early_layers": early,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "fold": fold, "rows": rows,
        "cpu_seconds": seconds, "target_images": len(tgt_labels)})


def load_records(reports: Path, seeds: list[int], targets: list[str]) -> dict[str, dict[tuple[int, str], dict]]:
    """Every row of every finished cell record: {row name: {(seed, target): row}}."""
    rows: dict[str, dict[tuple[int, str], dict]] = {}
    for f in sorted((reports / "cells").glob("*/seed*/*.json")):
        r = json.loads(f.read_text())
        if r["seed"] in seeds and r["target"] in targets:
            for name, row in r["rows"].items():
                rows.setdefault(name, {})[(r["seed"], r["target"])] = row
    return rows


def mean_se(values: list[float]) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None)


def seeds_needed(sd: float | None, target_se: float = 0.7) -> int | None:
    """The pre-registered rule: n = ceil((sd_d / 0.7)^2) seeds, at least 3, for a paired SE below 0.7 points."""
    return None if sd is None else max(3, int(np.ceil((sd / target_se) ** 2)))


def fmt(m: float, se: float | None) -> str:
    return f"{m:.1f}" if se is None else f"{m:.1f} ± {se:.1f}"


def table(variants: dict[str, dict], seeds: list[int], targets: list[str]) -> tuple[str, dict]:
    """Per variant: per target and mean, DeepAll and BNE mean +- SE over seeds and the paired difference +- SE."""
    lines = ["| variant | held-out | seeds | DeepAll | variant | paired diff. | sd of diff. | seeds for SE < 0.7 | source-only criterion |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, folds in variants.items():
        summary[name] = {}
        for t in [*targets, "mean"]:
            if t == "mean":  # only seeds with every target done; the mean over targets first, then over seeds
                full = [s for s in seeds if all((s, u) in folds for u in targets)]
                per = {k: [100 * np.mean([folds[(s, u)][k] for u in targets]) if folds[(s, targets[0])][k] is not None
                           else None for s in full] for k in ("deepall", "bne", "leave_own_out_val_acc")}
                done = full
            else:
                done = [s for s in seeds if (s, t) in folds]
                per = {k: [100 * folds[(s, t)][k] if folds[(s, t)][k] is not None else None for s in done]
                       for k in ("deepall", "bne", "leave_own_out_val_acc")}
            if not done:
                continue
            diff = [b - d for b, d in zip(per["bne"], per["deepall"])]
            row = {"seeds": done, "deepall": mean_se(per["deepall"]), "variant": mean_se(per["bne"]), "diff": mean_se(diff),
                   "criterion": mean_se(per["leave_own_out_val_acc"]) if None not in per["leave_own_out_val_acc"] else None,
                   "diff_sd": float(np.std(diff, ddof=1)) if len(diff) > 1 else None}
            row["seeds_needed"] = seeds_needed(row["diff_sd"])
            summary[name][t] = row
            sd = "–" if row["diff_sd"] is None else f"{row['diff_sd']:.1f}"
            need = "–" if row["seeds_needed"] is None else f"{row['seeds_needed']}" + ("" if len(done) >= 3 else " (prelim.)")
            lines.append(f"| {name} | {t} | {len(done)} | {fmt(*row['deepall'])} | {fmt(*row['variant'])} | "
                         f"{row['diff'][0]:+.1f}" + (f" ± {row['diff'][1]:.1f}" if row["diff"][1] is not None else "") +
                         f" | {sd} | {need} | {fmt(*row['criterion']) if row['criterion'] else '–'} |")
    return "\n".join(lines) + "\n", summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "study")
    ap.add_argument("--reports", type=Path, default=ROOT / "reports" / "study")
    ap.add_argument("--variants", nargs="+", default=list(TRAINING))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="cells run side by side, one torch thread each")
    ap.add_argument("--cached-only", action="store_true", help="only the table of the finished cells' records")
    ap.add_argument("--post-only", action="store_true", help="only the records of finished cells that lack one, then the table")
    ap.add_argument("--gpu", action="store_true", help="the literature protocol (224 px, 30 epochs) on a GPU")
    a = ap.parse_args()
    p = P.load(ROOT / "params.yaml")
    targets = list(p.dataset.folds)
    extra = GPU if a.gpu else []
    out = a.out / "gpu" if a.gpu else a.out
    reports = a.reports / "gpu" if a.gpu else a.reports

    def post(v: str, s: int, t: str) -> None:
        if fold_file(out, v, s, t).is_file() and not record_file(reports, v, s, t).is_file():
            post_cell(out, reports, v, s, t, P.load(ROOT / "params.yaml", cell_overrides(v, s, extra)),
                      lambda m: print(m, flush=True))

    if not (a.cached_only or a.post_only):
        # a cell is done when its fold.json is here or its committed record is (a finished cell of an earlier machine)
        todo = [(v, s, t) for v in a.variants for s in a.seeds for t in targets
                if not (fold_file(out, v, s, t).is_file() or record_file(reports, v, s, t).is_file())]
        print(f"{len(todo)} cell(s) to run with {a.workers} worker(s); logs in {out}/<variant>/seed<s>/<target>.log", flush=True)

        def one(cell):
            """A cell and its record; an error is this cell's failure (reported below), never the end of the grid
            (Executor.map cancels every cell not yet started once one raises)."""
            v, s, t = cell
            t0 = time.time()
            try:
                (cell_root(out, v, s)).mkdir(parents=True, exist_ok=True)
                result = run_cell(out, v, s, t, extra, cell_root(out, v, s) / f"{t}.log")
                if result[2] == 0:
                    post(v, s, t)
                return result
            except Exception as e:  # noqa: BLE001
                print(f"{v}/seed{s}/{t}: {type(e).__name__}: {e}", flush=True)
                return f"{v}/seed{s}/{t}", time.time() - t0, -1

        with ThreadPoolExecutor(max(1, a.workers)) as pool:
            results = list(pool.map(one, todo))
        for name, seconds, rc in results:
            print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds / 60:.1f} min", flush=True)
    if not a.cached_only:  # records of cells finished earlier (by another run) that lack one
        for v, s, t in [(v, s, t) for v in a.variants for s in a.seeds for t in targets]:
            post(v, s, t)
    variants = load_records(reports, a.seeds, targets)
    md, summary = table(variants, a.seeds, targets)
    print(md)
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "metrics.json",
               {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seeds": a.seeds, "targets": targets,
                "variants": {v: {t: r for t, r in rows.items()} for v, rows in summary.items()}})
    atomic_write(reports / "metrics.md",
                 "# PACS study (issue 19): DeepAll vs BNE variants, paired by seed and held-out domain\n\n" + md +
                 "\n![paired differences](paired.png)\n")
    if summary:
        from bne.plots import paired_differences

        paired_differences(summary, [*targets, "mean"], reports / "paired.png",
                           "PACS study: variant - DeepAll, mean ± SE over seeds (dotted: the target, +2)")


if __name__ == "__main__":
    main()
