"""Leave-one-domain-out experiments: train DeepAll and BNE per held-out domain, evaluate, write reports."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from bne.data import DomainArrays, FolderDataset, build_cache, load_cache, load_folder_dataset, to_tensor
from bne.embedding import InferenceOptions
from bne.evaluate import (
    BranchOutputs,
    accuracy,
    bne_predict,
    branch_outputs,
    domain_id_accuracy,
    leave_own_out_accuracy,
    method_accuracies,
    option_grid,
    options_dict,
    plain_probs,
    select_options,
)
from bne.model import ModelSpec
from bne.plots import accuracy_bars, weight_histograms
from bne.stats import population_stats, precise_running_stats, running_stats, stats_table
from bne.train import TrainConfig, config_hash, pick_device, train

METHOD_KEYS = ("deepall", "bne", "uniform", "nearest", "oracle", "bne_selected")


@dataclass(frozen=True)
class EvalConfig:
    batch: int = 16
    options: InferenceOptions = field(default_factory=InferenceOptions)
    select_options: bool = True  # also report BNE with options chosen on source validation (leave own branch out)
    single_pass: bool = True  # also record one-pass instance statistics
    branch_stats: str = "running"  # branches normalize with: running (EMA) | precise (exact average of batch statistics)


@dataclass(frozen=True)
class LodoConfig:
    """Everything a leave-one-domain-out run depends on (the ``dataset``/``model``/``train``/``eval`` params)."""

    name: str
    root: str
    splits: str | None
    val_fraction: float
    resolution: int
    seeds: tuple[int, ...]
    targets: tuple[str, ...] | None
    device: str
    model: ModelSpec
    train: TrainConfig
    eval: EvalConfig


def _strict(cls, d: dict, where: str):
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {sorted(unknown)}")
    return cls(**d)


def apply_overrides(p: dict, overrides: list[str]) -> dict:
    """Set dotted keys (``train.epochs=1``, values parsed as YAML) in the parameters dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = p
        *parents, leaf = key.split(".")
        for k in parents:
            if not isinstance(node.get(k), dict):
                raise ValueError(f"override {item!r}: no parameter section {k!r}")
            node = node[k]
        node[leaf] = yaml.safe_load(value)
    return p


def load_params(path: Path | str, base: Path | str | None = None, overrides: list[str] = ()) -> LodoConfig:
    """Read ``params.yaml`` (safe_load); relative dataset paths are taken from ``base`` (default: its folder).

    ``overrides`` are ``dotted.key=value`` strings. ``BNE_DATA_ROOT`` / ``BNE_SPLITS`` override the dataset location.
    """
    path = Path(path)
    p = apply_overrides(yaml.safe_load(path.read_text()) or {}, list(overrides))
    base = Path(base) if base else path.parent
    ds, tr, ev = p.get("dataset", {}), dict(p.get("train", {})), dict(p.get("eval", {}))
    for key in ("dataset", "model", "train", "eval"):
        if key not in p:
            raise ValueError(f"{path}: missing section {key!r}")

    def resolve(v: str | None) -> str | None:
        return None if v in (None, "") else str((base / v).resolve()) if not Path(v).is_absolute() else v

    resolution = tr.pop("resolution")
    seeds = tuple(tr.pop("seeds", [0]))
    device = tr.pop("device", "auto")
    opts = _strict(InferenceOptions, {k: tuple(v) if isinstance(v, list) else v for k, v in ev.pop("options", {}).items()}, "eval.options")
    return LodoConfig(
        name=ds["name"],
        root=os.environ.get("BNE_DATA_ROOT") or resolve(ds["root"]),
        splits=os.environ.get("BNE_SPLITS") or resolve(ds.get("splits")),
        val_fraction=float(ds.get("val_fraction", 0.1)),
        resolution=int(resolution),
        seeds=seeds,
        targets=tuple(ds["targets"]) if ds.get("targets") else None,
        device=device,
        model=_strict(ModelSpec, p["model"], "model"),
        train=TrainConfig.from_dict(tr),
        eval=_strict(EvalConfig, {**ev, "options": opts}, "eval"),
    )


def _source_batches(arr: DomainArrays, batch: int):
    for i in range(0, len(arr.train), batch):
        yield to_tensor(arr.images[arr.train[i : i + batch]])


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def fold_key(cfg: LodoConfig, target: str, seed: int, arrays: dict[str, DomainArrays]) -> str:
    """What one fold's result depends on: the data and every setting but the lists of other targets and seeds."""
    data = sorted((d, a.fingerprint) for d, a in arrays.items())
    return config_hash(replace(cfg, seeds=(), targets=None), target, seed, data)


def run_fold(
    cfg: LodoConfig,
    dataset: FolderDataset,
    arrays: dict[str, DomainArrays],
    target: str,
    seed: int,
    work: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Train both methods without the target domain, then evaluate on every image of the target.

    The target's arrays are read only after training, statistics and option selection are done.
    """
    fold_dir = work / target / f"seed{seed}"  # training checkpoints: shared by every evaluation setting
    key = fold_key(cfg, target, seed, arrays)
    eval_dir = fold_dir / f"eval-{key}"
    result_file = eval_dir / "fold.json"
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done.get("key") == key:
            log(f"{target} seed {seed}: cached result in {result_file}")
            return done
    t0 = time.time()
    device = pick_device(cfg.device)
    sources = [arrays[d] for d in dataset.domains if d != target]
    tcfg = replace(cfg.train, seed=seed)
    deep = train("deepall", cfg.model, sources, tcfg, cfg.resolution, fold_dir / "deepall", device, progress, log=log)
    bne = train("bne", cfg.model, sources, tcfg, cfg.resolution, fold_dir / "bne", device, progress, log=log)
    t_train = time.time() - t0

    model = bne.model
    names = [a.name for a in sources]
    if cfg.eval.branch_stats == "precise":
        precise_running_stats(model, [(d, _source_batches(a, cfg.eval.batch)) for d, a in enumerate(sources)], device)
    elif cfg.eval.branch_stats != "running":
        raise ValueError(f"eval.branch_stats must be running or precise, got {cfg.eval.branch_stats!r}")
    run = running_stats(model.norm_layers())
    pop, inst = population_stats(model, [(d, _source_batches(a, cfg.eval.batch)) for d, a in enumerate(sources)], device)
    embeddings = {"running": run, "population": pop, "instance_average": inst}
    table = pa.table(stats_table(embeddings.values(), names, dataset=cfg.name, held_out=target))
    table = table.replace_schema_metadata({"seed": str(seed), "params_hash": key, "norm": "bn"})
    eval_dir.mkdir(parents=True, exist_ok=True)
    tmp = eval_dir / ".stats.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, eval_dir / "stats.parquet")

    val_images = np.concatenate([a.images[a.val] for a in sources])
    val_labels = np.concatenate([a.labels[a.val] for a in sources])
    val_domains = torch.as_tensor(np.concatenate([np.full(len(a.val), d) for d, a in enumerate(sources)]))
    val = branch_outputs(model, val_images, val_labels, embeddings, cfg.eval.batch, device, cfg.eval.single_pass, desc=f"{target}: source val" if progress else "")
    opts = cfg.eval.options
    if cfg.eval.select_options:
        selected, selected_score = select_options(val, val_domains, option_grid(opts))
    else:
        selected, selected_score = opts, leave_own_out_accuracy(val, val_domains, opts)
    val.save(eval_dir / "val_outputs.npz")
    np.save(eval_dir / "val_domains.npy", val_domains.numpy())

    # Only now is the held-out domain read.
    tgt = arrays[target]
    out = branch_outputs(model, tgt.images, tgt.labels, embeddings, cfg.eval.batch, device, cfg.eval.single_pass, desc=f"{target}: target" if progress else "")
    out.save(eval_dir / "target_outputs.npz")
    deep_probs = plain_probs(deep.model, tgt.images, cfg.eval.batch, device, desc=f"{target}: deepall" if progress else "")
    acc = method_accuracies(out, opts)
    result = {
        "key": key,
        "eval_dir": str(eval_dir),
        "target": target,
        "seed": seed,
        "sources": names,
        "deepall": accuracy(deep_probs, out.labels),
        **{k: acc[k] for k in ("bne", "uniform", "nearest", "oracle")},
        "bne_selected": method_accuracies(out, selected)["bne"],
        "bne_mean_max_weight": acc["mean_max_weight"],
        "domain_id_acc": domain_id_accuracy(val, val_domains, opts),
        "selected_options": options_dict(selected),
        "selected_leave_own_out_val_acc": selected_score,
        "history": {"deepall": deep.history, "bne": bne.history},
        "selected_epoch": {"deepall": deep.selected_epoch, "bne": bne.selected_epoch},
        "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }
    _write_json(result_file, result)
    log(
        f"{target} seed {seed}: deepall {result['deepall']:.4f} bne {result['bne']:.4f} uniform {result['uniform']:.4f} "
        f"nearest {result['nearest']:.4f} oracle {result['oracle']:.4f} selected {result['bne_selected']:.4f} "
        f"({result['seconds']['total']:.0f} s)"
    )
    return result


def summarize(folds: list[dict], targets: list[str]) -> dict:
    """Per target and mean, in percent; mean +- standard error over seeds when there are several."""
    metrics: dict[str, dict] = {}
    keys = (*METHOD_KEYS, "domain_id_acc")
    for t in targets:
        rows = [f for f in folds if f["target"] == t]
        m = {}
        for k in keys:
            v = 100 * np.array([r[k] for r in rows])
            m[k] = round(float(v.mean()), 2)
            if len(v) > 1:
                m[f"{k}_se"] = round(float(v.std(ddof=1) / np.sqrt(len(v))), 2)
        metrics[t] = m
    metrics["mean"] = {k: round(float(np.mean([metrics[t][k] for t in targets])), 2) for k in keys}
    return metrics


def markdown_table(metrics: dict, targets: list[str]) -> str:
    cols = [("deepall", "DeepAll"), ("bne", "BNE"), ("uniform", "uniform"), ("nearest", "nearest"),
            ("oracle", "oracle branch (ref.)"), ("bne_selected", "BNE, options chosen on source val"),
            ("domain_id_acc", "domain-id acc. (source val)")]
    lines = ["| held-out | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for t in [*targets, "mean"]:
        cells = []
        for k, _ in cols:
            v = metrics[t][k]
            se = metrics[t].get(f"{k}_se")
            cells.append(f"{v:.1f} ± {se:.1f}" if se is not None else f"{v:.1f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation(work: Path, folds: list[dict], base: InferenceOptions) -> list[dict]:
    """Inference options varied one at a time from ``base``: mean target and leave-own-out source-val accuracy.

    An analysis of the trained models; the reported BNE number never uses the target to choose options.
    """
    variants: list[tuple[str, InferenceOptions]] = [("default", base)]
    variants += [(f"embedding={e}", replace(base, embedding=e)) for e in ("population", "instance_average")]
    variants += [(f"distance={d}", replace(base, distance=d)) for d in ("kl", "euclidean")]
    variants += [(f"layers={layer}", replace(base, layers=layer)) for layer in ("early", "middle", "late")]
    variants += [("instance_stats=single_pass", replace(base, instance_stats="single_pass"))]
    variants += [(f"power={p:g}", replace(base, power=p)) for p in (2.0, 4.0, 8.0, 16.0)]
    variants += [(f"population + power={p:g}", replace(base, embedding="population", power=p)) for p in (4.0, 16.0)]
    rows = []
    loaded = []
    for f in folds:
        d = Path(f["eval_dir"])
        loaded.append((BranchOutputs.load(d / "target_outputs.npz"), BranchOutputs.load(d / "val_outputs.npz"),
                       torch.from_numpy(np.load(d / "val_domains.npy"))))
    for name, o in variants:
        tgt, loo = [], []
        for out, val, dom in loaded:
            if (o.instance_stats, o.embedding, o.distance) not in out.dists:
                break
            tgt.append(method_accuracies(out, o)["bne"])
            loo.append(leave_own_out_accuracy(val, dom, o))
        else:
            rows.append({"variant": name, "target_acc": round(100 * float(np.mean(tgt)), 2),
                         "source_val_leave_own_out_acc": round(100 * float(np.mean(loo)), 2)})
    return rows


def run_lodo(
    cfg: LodoConfig,
    work: Path | str,
    reports: Path | str,
    cache_root: Path | str,
    log: Callable[[str], None] = print,
    progress: bool = True,
    dataset: FolderDataset | None = None,
) -> dict:
    """Every held-out target x seed; writes ``metrics.json``, ``metrics.md`` and ``ablation.*`` to ``reports``.

    ``dataset``: the samples to use (for example from a validated manifest); default: scan ``cfg.root``.
    """
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work, reports = Path(work), Path(reports)
    dataset = dataset or load_folder_dataset(cfg.root, cfg.splits, cfg.val_fraction, seed=0)
    for fix in dataset.fixes:
        log(f"split fix: {fix}")
    cache = build_cache(dataset, cfg.resolution, Path(cache_root) / cfg.name / str(cfg.resolution), progress=progress)
    arrays = load_cache(dataset, cache)
    targets = list(cfg.targets or dataset.domains)
    unknown = set(targets) - set(dataset.domains)
    if unknown:
        raise ValueError(f"dataset.targets {sorted(unknown)} are not domains of {cfg.root} ({dataset.domains})")
    folds = [run_fold(cfg, dataset, arrays, t, s, work, log, progress) for t in targets for s in cfg.seeds]
    metrics = summarize(folds, targets)
    _write_json(reports / "metrics.json", metrics)
    abl = ablation(work, folds, cfg.eval.options)
    _write_json(reports / "ablation.json", abl)
    fold_seconds = sum(f["seconds"]["total"] for f in folds)
    detail = {
        "fold_seconds_total": round(fold_seconds, 1),
        "folds": [{k: f[k] for k in ("target", "seed", "selected_options", "selected_leave_own_out_val_acc", "history", "selected_epoch", "seconds", "bne_mean_max_weight")} for f in folds],
        "split_fixes": dataset.fixes,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    _write_json(reports / "details.json", detail)
    md = [f"# {cfg.name}: leave-one-domain-out accuracy (%)\n", markdown_table(metrics, targets)]
    md.append(f"\nBackbone {cfg.model.backbone}, {cfg.resolution} px, {cfg.train.epochs} epochs, seeds {list(cfg.seeds)}; "
              f"training + evaluation of all folds: {fold_seconds / 60:.1f} min.\n")
    md.append("\n## Inference options, one at a time (target accuracy is analysis only; nothing is selected on it)\n\n")
    md.append("| variant | mean target acc. | mean source-val acc., own branch left out |\n|---|---|---|\n")
    md += [f"| {r['variant']} | {r['target_acc']:.1f} | {r['source_val_leave_own_out_acc']:.1f} |\n" for r in abl]
    (reports / "metrics.md").write_text("".join(md))
    accuracy_bars(metrics, targets, ["deepall", "bne", "uniform", "nearest", "oracle"], reports / "accuracy.png", f"{cfg.name}: leave-one-domain-out")
    weights = {}
    for f in folds:
        if f["seed"] == cfg.seeds[0]:
            out = BranchOutputs.load(Path(f["eval_dir"]) / "target_outputs.npz")
            weights[f["target"]] = bne_predict(out, cfg.eval.options)[1].numpy()
    weight_histograms(weights, {f["target"]: f["sources"] for f in folds}, reports / "bne_weights.png")
    log("".join(md))
    return metrics
