"""Domain-specific normalization layers on PACS (issue 6): DeepAll and BNE per layer and per-domain batch size.

One held-out fold (``--target``, default sketch) under the CPU protocol. For every layer of ``bne.model.NORMS``
(bn, bgn, cbn, mbn, iebn, proxynorm) and every per-domain batch size b (2, 4, 8, 16), DeepAll and BNE are
trained by ``bne.train.train`` with the same budget: ``--images`` training images per method (default 3000,
i.e. ``steps = images // (3 * b)`` steps of b images from each of the 3 source domains), one epoch of exactly
that many steps (each source's train rows subsampled, seeded, to ``steps * b``; the same rows for both methods),
the params' cosine schedule with warm-up, freeze_stages, augmentation and seed, ``select=last``, at
``--resolution`` px (default 96; decoded-array cache under data/bench-cache, as the other benchmarks).

Only then is the held-out domain read: every image of it (``--eval-limit`` takes a seeded subset, for checks).
DeepAll: its plain prediction. BNE: ``bne.evaluate.branch_outputs`` + ``method_accuracies`` with the params'
``eval.options`` (the paper's: running-statistics embedding from ``bne.stats.running_stats``, W2, inverse distance,
all layers). Training throughput is images/s of the training loop (augmentation, forward, backward, SGD step,
MBN's double forward), from ``train``'s own epoch time.

Resumable: each (norm, batch, method) result is cached in data/bench-cache/norms/ under a key of every
setting that changes it, so a killed run continues where it stopped (a method whose training had finished
but was not yet evaluated resumes from its checkpoint, deleted once the result is stored; one killed mid-training
trains again). Thread count and machine load are recorded with each result, not part of the key. Writes
reports/norms/metrics.json, metrics.md and metrics.png (accuracy and throughput against b, one line per layer),
atomically, after every configuration, and prints the tables.

    python bench/experiments/norms/norms_pacs.py                      # full comparison (long: see --estimate)
    python bench/experiments/norms/norms_pacs.py --quick --threads 1  # a check: 2 norms x 1 batch x 60 images at
                                                    # 64 px, 500 target images; then probes and estimates the full run
    python bench/experiments/norms/norms_pacs.py --estimate           # only the duration estimate of the selected settings
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: the harness

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _harness import ROOT, loadavg, machine_info  # noqa: E402
from bne.data import Augment, DomainArrays, build_cache, load_cache, load_folder_dataset, to_tensor  # noqa: E402
from bne.embedding import InferenceOptions  # noqa: E402
from bne.evaluate import accuracy, branch_outputs, method_accuracies, options_dict, plain_probs  # noqa: E402
from bne.io import atomic_write  # noqa: E402
from bne.model import NORMS, DGNet, ModelSpec  # noqa: E402
from bne.stats import running_stats  # noqa: E402
from bne.train import METHODS, TrainConfig, _autocast, build_optimizer, config_hash, pick_device, seed_everything, spec_key, train, train_step  # noqa: E402
from tasks import params as P  # noqa: E402
VERSION = 1  # of the protocol: part of every cache key
FULL = {"norms": list(NORMS), "batches": [2, 4, 8, 16], "images": 3000, "resolution": 96, "eval_limit": 0}
QUICK = {"norms": ["bn", "mbn"], "batches": [4], "images": 60, "resolution": 64, "eval_limit": 500}
OVERHEAD_S = 3.0  # per trained method in the estimate: model build, checkpoint, reading the target


# ----------------------------------------------------------------------------------------------- helpers


class Config(NamedTuple):
    """What the study reads from the params: the dataset, the model and recipe, the evaluation's batch and options."""

    name: str
    root: Path
    splits: Path | None
    val_fraction: float
    max_pixels: int
    seeds: list[int]
    device: str
    model: ModelSpec  # num_classes set from the data by ``Fold``
    train: TrainConfig  # seed 0; every run replaces it
    eval_batch: int
    options: InferenceOptions


def config(params: Path, overrides: list[str]) -> Config:
    p = P.load(params, overrides)
    base = Path(params).resolve().parent
    return Config(p.dataset.name, P.resolve(base, p.dataset.root), P.resolve(base, p.dataset.splits), p.dataset.val_fraction,
                  p.dataset.max_pixels, list(p.train.seeds), p.train.device, p.model.spec(num_classes=1), p.train.config(seed=0), p.eval.batch,
                  p.eval.options.options())


def budget_sources(sources: list[DomainArrays], steps: int, b: int, seed: int) -> list[DomainArrays]:
    """Each source with exactly ``steps * b`` train rows (one epoch of ``train`` = the budget) and no val rows.

    Rows are a prefix of one seeded permutation per domain (nested across batch sizes; repeated if a domain has
    fewer rows). The fingerprint covers the subset, so ``train``'s checkpoints are keyed to it.
    """
    need = steps * b
    out = []
    for d, a in enumerate(sources):
        perm = np.random.default_rng([seed, d]).permutation(a.train)
        rows = np.sort(np.resize(perm, need))
        fp = hashlib.sha256(f"{a.fingerprint}:{need}:".encode() + rows.astype(np.int64).tobytes()).hexdigest()
        out.append(replace(a, train=rows, val=np.empty(0, dtype=np.int64), fingerprint=fp))
    return out


def fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


# ----------------------------------------------------------------------------------------------- one run


class Fold:
    """The dataset, the sources' arrays and (lazily, only for evaluation) the held-out domain's."""

    def __init__(self, cfg: Config, cache_root: Path, target: str, resolution: int, eval_limit: int, seed: int) -> None:
        self.ds = load_folder_dataset(cfg.root, cfg.splits, cfg.val_fraction, seed=0)
        if target not in self.ds.domains:
            raise SystemExit(f"--target {target!r} is not a domain of {cfg.root} ({self.ds.domains})")
        self.cfg = cfg._replace(model=replace(cfg.model, num_classes=len(self.ds.classes)))
        self.target, self.eval_limit, self.seed = target, eval_limit, seed
        self.cache = build_cache(self.ds, resolution, cache_root / cfg.name / str(resolution), progress=True,
                                 max_pixels=cfg.max_pixels)
        arrays = load_cache(self.ds, self.cache, skip=[target])  # the held-out domain's file is not opened
        self.sources = [arrays[d] for d in self.ds.domains if d != target]
        samples = self.ds.of(target)
        self.target_n = len(samples) if not eval_limit else min(eval_limit, len(samples))
        # The target's identity for the cache keys, from the file list (no pixels read before evaluation).
        self.target_id = hashlib.sha256(json.dumps([(s.path, s.label) for s in samples]).encode()).hexdigest()[:16]
        self._target: tuple[np.ndarray, np.ndarray] | None = None

    def target_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the held-out domain (a seeded subset with ``eval_limit``): evaluation only."""
        if self._target is None:
            others = [d for d in self.ds.domains if d != self.target]
            t = load_cache(self.ds, self.cache, skip=others)[self.target]
            if self.eval_limit and self.eval_limit < len(t.labels):
                rows = np.sort(np.random.default_rng(self.seed).choice(len(t.labels), self.eval_limit, replace=False))
                self._target = (np.asarray(t.images[rows]), t.labels[rows])
            else:
                self._target = (t.images, t.labels)
        return self._target


def run_key(fold: Fold, method: str, norm: str, b: int, images: int, resolution: int, sources: list[DomainArrays]) -> tuple[dict, str]:
    cfg = fold.cfg
    names = tuple(a.name for a in sources)
    spec = replace(cfg.model, norm=norm, domains=names if method == "bne" else ())
    tcfg = replace(cfg.train, epochs=1, per_domain_batch=b, select="last", seed=fold.seed)
    settings = {
        "version": VERSION, "method": method, "norm": norm, "batch": b, "images": images, "resolution": resolution,
        "dataset": cfg.name, "target": fold.target, "target_id": fold.target_id, "eval_limit": fold.eval_limit,
        "sources": list(names), "source_fingerprints": [a.fingerprint for a in sources],
        "spec": spec_key(spec), "train": asdict(tcfg), "eval_batch": cfg.eval_batch,
        "options": options_dict(cfg.options), "branch_stats": "running",
    }
    return settings, config_hash(settings)


def result_path(fold: Fold, method: str, norm: str, b: int, images: int, resolution: int, work: Path):
    """(result file, settings, key, budgeted sources) of one run."""
    sources = budget_sources(fold.sources, images // (3 * b), b, fold.seed)
    settings, key = run_key(fold, method, norm, b, images, resolution, sources)
    return work / f"{fold.target}-{norm}-b{b}-{method}-{key}.json", settings, key, sources


def run_method(fold: Fold, method: str, norm: str, b: int, images: int, resolution: int, work: Path,
               device: torch.device, bar: tqdm | None = None) -> dict:
    """Train (or resume) and evaluate one method; the result is cached in ``work`` under its settings' key."""
    cfg = fold.cfg
    steps = images // (3 * b)
    if steps < 1:
        raise SystemExit(f"--images {images} is less than one step of 3 x {b}")
    result_file, settings, key, sources = result_path(fold, method, norm, b, images, resolution, work)
    if result_file.is_file():
        return json.loads(result_file.read_text())["result"]

    def log(msg: str) -> None:
        if "source-val" not in msg:  # no validation rows here: train's epoch line would show 0
            (bar.write if bar else print)(msg)

    tcfg = replace(cfg.train, epochs=1, per_domain_batch=b, select="last", seed=fold.seed)
    ckpt_dir = work / "runs" / f"{fold.target}-{norm}-b{b}-{method}-{key}"
    load0, t0, c0 = loadavg(), time.perf_counter(), time.process_time()
    res = train(method, replace(cfg.model, norm=norm), sources, tcfg, resolution, ckpt_dir, device, progress=False, log=log)
    train_call_s, train_call_cpu = time.perf_counter() - t0, time.process_time() - c0
    hist = res.history[-1]
    seen = steps * 3 * b
    loop_s = max(float(hist["seconds"]), 0.1)

    # Only now is the held-out domain read.
    images_t, labels_t = fold.target_arrays()
    model = res.model.eval()
    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad(), _autocast(device):
        if method == "bne":
            out = branch_outputs(model, images_t, labels_t, {"running": running_stats(model.norm_layers())},
                                 cfg.eval_batch, device, single_pass=False)
            accs = method_accuracies(out, cfg.options)
            extra = {k: round(100 * accs[k], 2) for k in ("uniform", "nearest", "oracle")}
            extra["mean_max_weight"] = round(accs["mean_max_weight"], 4)
            acc = accs["bne"]
        else:
            acc, extra = accuracy(plain_probs(model, images_t, cfg.eval_batch, device), torch.as_tensor(labels_t)), {}
    eval_s, eval_cpu = time.perf_counter() - t1, time.process_time() - c1
    result = {
        "acc": round(100 * acc, 2),
        "train_img_s": round(seen / loop_s, 2),
        **extra,
        "steps": steps,
        "images_seen": seen,
        "train_loss": round(float(hist["train_loss"]), 4),
        "train_loop_s": round(loop_s, 1),
        "train_call_s": round(train_call_s, 1),  # includes model build and checkpoint; tiny when resumed
        "train_call_cpu_s": round(train_call_cpu, 1),
        "target_images": len(labels_t),
        "eval_s": round(eval_s, 1),
        "eval_cpu_s": round(eval_cpu, 1),
        "eval_img_s": round(len(labels_t) / max(eval_s, 1e-9), 1),
        "threads": torch.get_num_threads(),
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(result_file, json.dumps({"settings": settings, "result": result}, indent=2, default=str))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    (bar.write if bar else print)(
        f"{norm} b={b} {method}: {seen} images, {result['train_img_s']:.1f} img/s, loss {result['train_loss']:.3f}; "
        f"{fold.target} acc {result['acc']:.2f}% ({len(labels_t)} images, eval {eval_s:.0f} s)"
    )
    return result


# ----------------------------------------------------------------------------------------------- reports


def cpu_rate(r: dict) -> float:
    """Training images per CPU-second of the training call (process time, model build included): with one
    torch thread, the images/s of a core of its own, whatever else the machine runs or a pause."""
    return round(r["images_seen"] / max(r["train_call_cpu_s"], 1e-9), 2)


def entry(r: dict[str, dict]) -> dict:
    d, b = r.get("deepall"), r.get("bne")
    out = {}
    if d:
        out.update(deepall=d["acc"], deepall_img_s=d["train_img_s"], deepall_img_cpu_s=cpu_rate(d))
    if b:
        out.update(bne=b["acc"], bne_img_s=b["train_img_s"], bne_img_cpu_s=cpu_rate(b))
    out["details"] = r
    return out


def markdown(results: dict, norms: list[str], batches: list[int], settings: dict, machine: dict) -> str:
    def cell(norm: str, b: int, k: str, fmt: str, delta: bool = False) -> str:
        e = results.get(norm, {}).get(str(b), {})
        x, y = e.get("bne" + k), e.get("deepall" + k)
        if x is None and y is None:
            return "–"
        if x is None or y is None:  # one method done so far
            return " / ".join("–" if v is None else f"{v:{fmt}}" for v in (x, y))
        return f"{x:{fmt}} / {y:{fmt}}" + (f" ({x - y:+.1f})" if delta else "")

    head = "| norm | " + " | ".join(f"b={b}" for b in batches) + " |\n|---" + "|---" * len(batches) + "|\n"
    src = ", ".join(settings["sources"])
    n_eval = settings["target_images"]
    lines = [
        f"# Normalization layers on {settings['dataset']}: held-out {settings['target']}\n\n",
        f"Fold: held-out **{settings['target']}**, sources {src}. {settings['images']} training images per method "
        f"(steps = images // (3 b)), {settings['resolution']} px, seed {settings['seed']}, freeze_stages "
        f"{settings['freeze_stages']}, cosine schedule with {settings['warmup_frac']:g} warm-up, last step's model. "
        f"Evaluated on {'every' if not settings['eval_limit'] else 'a seeded subset of'} {n_eval} image(s) of "
        f"{settings['target']}. b = images per source domain per step.\n\n",
        "## Accuracy (%), BNE / DeepAll (BNE − DeepAll)\n\n",
        head,
        *[f"| {n} | " + " | ".join(cell(n, b, "", ".1f", True) for b in batches) + " |\n" for n in norms],
        "\nBNE: the params' eval.options (the paper's: running-statistics embedding, W2, inverse distance, all layers)."
        + (" –: not measured yet." if any("–" in cell(n, b, "", ".1f") for n in norms for b in batches) else "")
        + "\n\n",
        "## Training throughput (images per CPU-second), BNE / DeepAll\n\n",
        head,
        *[f"| {n} | " + " | ".join(cell(n, b, "_img_cpu_s", ".1f") for b in batches) + " |\n" for n in norms],
    ]
    threads = sorted({r["threads"] for n in results.values() if isinstance(n, dict) for e in n.values()
                      if isinstance(e, dict) for r in e.get("details", {}).values()})
    lines.append(
        f"\nImages of the training call (augmentation, forward, backward, step; model build included) per second of "
        f"its process CPU time, on {machine['device']} ({machine['cpu_model']}, {machine['cpu_count']} CPUs), torch "
        f"threads {threads or [machine['torch_threads']]}: with one thread, the rate of a core of its own, whatever "
        "else ran on the machine (wall-clock rates, which other processes lower, are in metrics.json as *_img_s).\n"
    )
    return "".join(lines)


def figure(results: dict, norms, batches, settings: dict, path: Path) -> None:
    """Accuracy of BNE and of DeepAll, and BNE's training throughput, against the per-domain batch size, one line
    per layer (cells not measured yet are left out). Written atomically (``atomic_write``)."""
    from bne.plots import plt  # pyplot on the Agg backend, as the pipeline's figures

    panels = [("bne", "BNE accuracy (%)"), ("deepall", "DeepAll accuracy (%)"),
              ("bne_img_cpu_s", "BNE training images / CPU-s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        for i, norm in enumerate(norms):
            pts = [(b, results[norm][str(b)][key]) for b in batches if key in results.get(norm, {}).get(str(b), {})]
            if pts:
                ax.plot(*zip(*pts), marker="os^vDP"[i % 6], label=norm)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("images per source domain per step (b)")
        ax.set_ylabel(label)
        if "accuracy" in label:
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{settings['dataset']}, held-out {settings['target']}: {settings['images']} training images per "
                 f"method, {settings['resolution']} px, seed {settings['seed']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_reports(out_json: Path, results: dict, norms, batches, settings, machine, extra: dict | None = None) -> str:
    md = markdown(results, norms, batches, settings, machine)
    atomic_write(out_json, json.dumps({**results, "settings": settings, "machine": machine, **(extra or {})}, indent=2, default=str))
    atomic_write(out_json.with_suffix(".md"), md)
    figure(results, norms, batches, settings, out_json.with_suffix(".png"))
    return md


# ----------------------------------------------------------------------------------------------- estimate


def probe_costs(fold: Fold, norms: list[str], batches: list[int], resolution: int, device: torch.device,
                eval_images: int = 48) -> dict:
    """Seconds per training step (real loop on augmented source images, random rows) at the smallest and
    largest batch, and target-side evaluation images/s (on source images: speed does not depend on pixels),
    per norm and method, at ``resolution``. CBN is probed past its burn-in (its costly regime)."""
    cfg = fold.cfg
    names = tuple(a.name for a in fold.sources)
    tcfg = replace(cfg.train, epochs=1)
    augment = Augment(tcfg.augment, resolution)
    rng = np.random.default_rng(0)
    pb = sorted({min(batches), max(batches)})
    probe_norms = list(dict.fromkeys((["bn"] if "cbn" in norms else []) + list(norms)))
    eval_x = np.concatenate([a.images[a.val[: eval_images // len(fold.sources) + 1]] for a in fold.sources])[:eval_images]
    if eval_x.shape[1] != resolution:  # the probe's resolution, not the cache's
        x = F.interpolate(to_tensor(eval_x), size=(resolution, resolution), mode="bilinear", antialias=True)
        eval_x = (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    eval_y = np.zeros(len(eval_x), dtype=np.int64)
    costs: dict = {"step_s": {}, "eval_img_s": {}, "probe_batches": pb, "resolution": resolution,
                   "threads": torch.get_num_threads(), "loadavg_before": loadavg()}
    t_all = time.perf_counter()
    for norm in tqdm(probe_norms, desc="probe (estimate)", leave=False):
        for method in METHODS:
            spec = replace(cfg.model, norm=norm, cbn_burnin=0, domains=names if method == "bne" else ())
            seed_everything(0)
            model = DGNet(spec).to(device)
            opt = build_optimizer(model, tcfg)
            model.train()

            def step(b: int) -> None:  # bne.train.train_step on b augmented images of each source, random labels
                minibatches = [(augment(a.images[np.sort(rng.choice(a.train, b))]).to(device),
                                torch.as_tensor(rng.integers(0, spec.num_classes, b)).to(device)) for a in fold.sources]
                for g in opt.param_groups:
                    g["lr"] = 0.1 * g["base_lr"]
                train_step(model, opt, minibatches, tcfg)

            step(pb[0])  # warm-up (and CBN's first memory)
            per_b = {}
            for b in pb:
                reps = max(1, math.ceil(24 / (3 * b)))
                t0 = time.perf_counter()
                for _ in range(reps):
                    step(b)
                per_b[str(b)] = (time.perf_counter() - t0) / reps
            costs["step_s"].setdefault(norm, {})[method] = per_b
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad(), _autocast(device):
                if method == "bne":
                    branch_outputs(model, eval_x, eval_y, {"running": running_stats(model.norm_layers())},
                                   cfg.eval_batch, device, single_pass=False)
                else:
                    plain_probs(model, eval_x, cfg.eval_batch, device)
            costs["eval_img_s"].setdefault(norm, {})[method] = len(eval_x) / (time.perf_counter() - t0)
    costs["probe_s"] = round(time.perf_counter() - t_all, 1)
    costs["loadavg_after"] = loadavg()
    return costs


def step_time(costs: dict, norm: str, method: str, b: int) -> float:
    """Seconds per step at batch b: linear in b between the probed batch sizes (proportional with one)."""
    per_b = {int(k): v for k, v in costs["step_s"][norm][method].items()}
    ks = sorted(per_b)
    if len(ks) == 1:
        return per_b[ks[0]] * b / ks[0]
    (b0, t0), (b1, t1) = (ks[0], per_b[ks[0]]), (ks[-1], per_b[ks[-1]])
    slope = (t1 - t0) / (b1 - b0)
    return max(0.2 * t0 * b / b0, t0 + slope * (b - b0))


def estimate(costs: dict, norms, batches, images: int, target_n: int, burnin: int, skip: set | None = None) -> dict:
    """Estimated seconds of every (norm, batch, method) run and their total (``skip``: results already cached)."""
    per, total = {}, 0.0
    for norm in norms:
        for b in batches:
            steps = images // (3 * b)
            for method in METHODS:
                if skip and (norm, b, method) in skip:
                    continue
                if norm == "cbn":  # plain BN statistics during the burn-in, cross-iteration ones after
                    active = max(0, steps - burnin)
                    tr = (steps - active) * step_time(costs, "bn", method, b) + active * step_time(costs, "cbn", method, b)
                else:
                    tr = steps * step_time(costs, norm, method, b)
                ev = target_n / costs["eval_img_s"][norm][method]
                per[f"{norm}/b{b}/{method}"] = {"train_s": round(tr, 1), "eval_s": round(ev, 1)}
                total += tr + ev + OVERHEAD_S
    return {"total_s": round(total), "runs": per}


def variants(args, fold: Fold, costs: dict) -> list[tuple[str, float]]:
    """Estimated durations of the full run and of smaller variants (same threads, same machine load)."""
    burnin = fold.cfg.model.cbn_burnin
    full_n = len(fold.ds.of(fold.target))
    base = f"python bench/experiments/norms/norms_pacs.py --target {fold.target}"
    norms, batches = FULL["norms"], FULL["batches"]
    smaller = [([2, 4, 16], 1500, 1500), ([2, 16], 2000, 2000), ([2, 16], 1500, 1500)]
    rows = [(base, estimate(costs, norms, batches, FULL["images"], full_n, burnin)["total_s"])]
    for bs, im, ev in smaller:
        cmd = f"{base} --batches {' '.join(map(str, bs))} --images {im} --eval-limit {ev}"
        rows.append((cmd, estimate(costs, norms, bs, im, min(ev, full_n), burnin)["total_s"]))
    return rows


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--norms", nargs="+", choices=NORMS, help=f"default: all ({' '.join(FULL['norms'])}); --quick: bn mbn")
    ap.add_argument("--batches", nargs="+", type=int, help="per-domain batch sizes (default 2 4 8 16; --quick: 4)")
    ap.add_argument("--target", default="sketch", help="held-out domain (default sketch)")
    ap.add_argument("--images", type=int, help="training images per method (default 3000; --quick: 60)")
    ap.add_argument("--resolution", type=int, help="px (default 96; --quick: 64)")
    ap.add_argument("--eval-limit", type=int, help="evaluate a seeded subset of this many target images (default 0: every image; --quick: 500)")
    ap.add_argument("--seed", type=int, help="default: the params' first seed")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch threads (default: all cores; 1 while the cores are shared)")
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench-cache"), help="decoded arrays; results under <cache>/norms/")
    ap.add_argument("--out", help="default reports/norms/metrics.json (--quick: reports/norms/metrics.quick.json)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="params overrides, e.g. model.cbn_burnin=10 (part of the cache keys)")
    ap.add_argument("--quick", action="store_true", help="a check of the script, then a probe and the full run's estimate")
    ap.add_argument("--estimate", action="store_true", help="only probe the speed and estimate the selected settings' duration")
    ap.add_argument("--no-estimate", action="store_true", help="--quick without the probe")
    ap.add_argument("--cached-only", action="store_true",
                    help="report the cached results of the selected settings only, training nothing (while a grid still runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode = QUICK if args.quick else FULL
    norms = list(dict.fromkeys(args.norms or mode["norms"]))
    batches = sorted(set(args.batches or mode["batches"]))
    images = args.images or mode["images"]
    resolution = args.resolution or mode["resolution"]
    eval_limit = mode["eval_limit"] if args.eval_limit is None else args.eval_limit
    out = Path(args.out or ROOT / "reports" / "norms" / ("metrics.quick.json" if args.quick else "metrics.json"))
    if min(batches) < 1 or images < 3 * max(batches):
        raise SystemExit(f"--images {images} must give at least one step of 3 x {max(batches)} and batches must be >= 1")

    cfg = config(Path(args.params), args.set)
    seed = cfg.seeds[0] if args.seed is None else args.seed
    device = pick_device(cfg.device)
    work = Path(args.cache) / "norms"
    load0 = loadavg()
    print(f"norms_pacs: held-out fold {args.target!r}; norms {norms}, per-domain batches {batches}, {images} images per "
          f"method, {resolution} px, seed {seed}, {torch.get_num_threads()} torch thread(s), {device}; loadavg {load0}", flush=True)
    fold = Fold(cfg, Path(args.cache), args.target, resolution, eval_limit, seed)
    machine = {**machine_info(device), "loadavg_start": load0}

    if args.estimate:
        costs = probe_costs(fold, norms, batches, resolution, device)
        cached = {(n, b, m) for n in norms for b in batches for m in METHODS
                  if result_path(fold, m, n, b, images, resolution, work)[0].is_file()}
        est = estimate(costs, norms, batches, images, fold.target_n, cfg.model.cbn_burnin, cached)
        print(json.dumps({k: v for k, v in costs.items() if k in ("step_s", "eval_img_s")}, indent=1))
        print(f"estimated duration: {fmt_s(est['total_s'])} for {len(norms) * len(batches) * 2 - len(cached)} pending "
              f"run(s) ({len(cached)} cached) at {torch.get_num_threads()} thread(s), loadavg {loadavg()}")
        return

    settings = {
        "dataset": cfg.name, "target": args.target, "sources": [a.name for a in fold.sources], "norms": norms,
        "batches": batches, "images": images, "steps": {str(b): images // (3 * b) for b in batches},
        "resolution": resolution, "seed": seed, "eval_limit": eval_limit, "target_images": fold.target_n,
        "freeze_stages": cfg.train.freeze_stages, "warmup_frac": cfg.train.warmup_frac, "lr": cfg.train.lr,
        "select": "last", "epochs": 1, "backbone": cfg.model.backbone, "eval_batch": cfg.eval_batch,
        "inference_options": options_dict(cfg.options), "branch_stats": "running", "accuracy_unit": "percent",
        "throughput": "training-loop images/s (augmentation, forward, backward, SGD step, MBN double forward)",
        "mode": "quick" if args.quick else "full", "cached_only": args.cached_only, "cache": str(fold.cache), "protocol_version": VERSION,
        "params": str(Path(args.params).resolve()), "overrides": args.set,
        "cbn_burnin": cfg.model.cbn_burnin, "cbn_window": cfg.model.cbn_window, "mbn_window": cfg.model.mbn_window,
        "norm_groups": cfg.model.norm_groups, "proxy_eps": cfg.model.proxy_eps,
    }
    results: dict = {}
    configs = [(n, b) for n in norms for b in batches]
    t_run = time.perf_counter()
    bar = tqdm(configs, desc="norms x batches", unit="config")
    for norm, b in bar:
        r = {}
        for method in METHODS:
            bar.set_postfix_str(f"{norm} b={b} {method}")
            if args.cached_only:
                done = result_path(fold, method, norm, b, images, resolution, work)[0]
                if done.is_file():
                    r[method] = json.loads(done.read_text())["result"]
            else:
                r[method] = run_method(fold, method, norm, b, images, resolution, work, device, bar)
        if r:
            results.setdefault(norm, {})[str(b)] = entry(r)
        machine["loadavg_end"] = loadavg()
        write_reports(out, results, norms, batches, settings, machine)
    bar.close()
    run_s = time.perf_counter() - t_run

    extra = {"run_seconds": round(run_s, 1)}
    if args.quick and not args.no_estimate:
        print(f"quick run: {fmt_s(run_s)}. Probing the full run's speed ({len(FULL['norms'])} norms, batches "
              f"{min(FULL['batches'])} and {max(FULL['batches'])}, {FULL['resolution']} px) ...", flush=True)
        costs = probe_costs(fold, FULL["norms"], FULL["batches"], FULL["resolution"], device)
        rows = variants(args, fold, costs)
        extra["estimate_full_run"] = {
            "note": ("from a probe of the real training step (augmented source images) per norm and method at the "
                     "smallest and largest batch, linear in b between them, and of evaluation images/s, at this "
                     "thread count and machine load; plus 3 s per trained method"),
            "costs": costs,
            "variants": [{"command": c, "seconds": s} for c, s in rows],
        }
        machine["loadavg_end"] = loadavg()
    md = write_reports(out, results, norms, batches, settings, machine, extra)
    print(md)
    if "estimate_full_run" in extra:
        c = extra["estimate_full_run"]["costs"]
        print(f"Estimated durations at {c['threads']} torch thread(s), loadavg during the probe {c['loadavg_before']} -> "
              f"{c['loadavg_after']} (probe {c['probe_s']} s):")
        for cmd, s in rows:
            print(f"  {fmt_s(s):>8}  {cmd}")
        if c["threads"] == 1 and (os.cpu_count() or 1) > 1:
            print(f"  (1 thread; with --threads {os.cpu_count()} on quiet cores the run is faster: measure with "
                  f"`python bench/experiments/norms/norms_pacs.py --estimate --threads {os.cpu_count()}` there, about 1 min)")
    print(f"wrote {out} and {out.with_suffix('.md')} ({fmt_s(run_s)})")


if __name__ == "__main__":
    main()
