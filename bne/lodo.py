"""Leave-one-domain-out experiments: train DeepAll and BNE per held-out domain, evaluate, write reports."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from bne.data import DomainArrays, FolderDataset, build_cache, load_cache, load_folder_dataset, to_tensor
from bne.embedding import InferenceOptions, aggregate_layers, layer_subset
from bne.evaluate import (
    BranchOutputs,
    accuracy,
    bne_predict,
    branch_chunk,
    branch_outputs,
    domain_id_accuracy,
    leave_own_out_accuracy,
    method_accuracies,
    options_dict,
    options_from_dict,
    plain_probs,
)
from bne.model import DGNet, ModelSpec
from bne.plots import accuracy_bars, confusion_matrices, embedding_maps, weight_histograms
from bne.stats import population_stats, precise_running_stats, read_stats_table, running_stats, stats_table
from bne.train import TrainConfig, config_hash, pick_device, train

METHOD_KEYS = ("deepall", "bne", "uniform", "nearest", "oracle", "bne_tuned")


@dataclass(frozen=True)
class EvalConfig:
    batch: int = 16
    options: InferenceOptions = field(default_factory=InferenceOptions)
    single_pass: bool = True  # also record one-pass instance statistics
    branch_chunk: int | str = "auto"  # images per forward over the S branches: auto (CPU: one branch; GPU: all S x B), 0 = all, n
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
        targets=tuple(ds["folds"]) if ds.get("folds") else None,
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


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}; run the earlier stage first")
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FoldPaths:
    """Where each stage of one held-out fold writes, under ``root`` (``data/`` in the pipeline)."""

    root: Path
    dataset: str
    target: str

    def train(self, seed: int | None = None) -> Path:
        d = self.root / "train" / self.dataset / self.target
        return d if seed is None else d / f"seed{seed}"

    @property
    def stats(self) -> Path:
        return self.root / "stats" / self.dataset / f"{self.target}.parquet"

    def embed(self, seed: int | None = None) -> Path:
        d = self.root / "embed" / self.dataset / self.target
        return d if seed is None else d / f"seed{seed}"

    @property
    def tune(self) -> Path:
        return self.root / "tune" / self.dataset / self.target

    def eval(self, seed: int | None = None) -> Path:
        d = self.root / "eval" / self.dataset / self.target
        return d if seed is None else d / f"seed{seed}"


def for_dataset(cfg: LodoConfig, dataset: FolderDataset) -> LodoConfig:
    """The configuration with the network's number of classes taken from the data."""
    return replace(cfg, model=replace(cfg.model, num_classes=len(dataset.classes)))


def _sources(dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str) -> list[DomainArrays]:
    if target not in dataset.domains:
        raise ValueError(f"held-out domain {target!r} is not a domain of the dataset ({dataset.domains})")
    return [arrays[d] for d in dataset.domains if d != target]


def load_model(cfg: LodoConfig, method: str, domains: list[str], path: Path, device: torch.device) -> DGNet:
    """A trained network from ``model.pt`` (a state dict, loaded with ``weights_only=True``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained {method} model; run the train stage first")
    spec = replace(cfg.model, domains=tuple(domains) if method == "bne" else ())
    model = DGNet(spec)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def train_fold(
    cfg: LodoConfig, dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str, root: Path,
    log: Callable[[str], None] = print, progress: bool = True, extra: dict | None = None,
) -> dict:
    """Train DeepAll and BNE on the source domains for every seed; ``train.json`` records what was made (and ``extra``)."""
    cfg = for_dataset(cfg, dataset)
    paths = FoldPaths(root, cfg.name, target)
    sources = _sources(dataset, arrays, target)
    device = pick_device(cfg.device)
    record: dict = {"target": target, "sources": [a.name for a in sources], "seeds": {}, **(extra or {})}
    for seed in cfg.seeds:
        tcfg = replace(cfg.train, seed=seed)
        entry = {}
        for method in ("deepall", "bne"):
            t0 = time.time()
            out = paths.train(seed) / method
            res = train(method, cfg.model, sources, tcfg, cfg.resolution, out, device, progress, log=log)
            tmp = out / ".model.pt.tmp"
            torch.save(res.model.state_dict(), tmp)
            os.replace(tmp, out / "model.pt")
            # Training time: the epochs' own times when recorded (a resumed run does not redo them), else this call's.
            epochs_s = [h["seconds"] for h in res.history if "seconds" in h]
            seconds = sum(epochs_s) if len(epochs_s) == len(res.history) else time.time() - t0
            entry[method] = {"history": res.history, "selected_epoch": res.selected_epoch,
                             "model_sha256": file_sha256(out / "model.pt"), "seconds": round(seconds, 1)}
        record["seeds"][str(seed)] = entry
    _write_json(paths.train() / "train.json", record)
    return record


def stats_fold(
    cfg: LodoConfig, dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str, root: Path,
    log: Callable[[str], None] = print,
) -> Path:
    """Per-domain statistics of the trained BNE model on its source domains, one Parquet file per fold.

    Kinds: ``running`` (what the branches normalize with: EMA, or PreciseBN with ``eval.branch_stats=precise``),
    ``population`` (exact, one no-grad pass) and ``instance_average``. The target is not read.
    """
    cfg = for_dataset(cfg, dataset)
    paths = FoldPaths(root, cfg.name, target)
    sources = _sources(dataset, arrays, target)
    names = [a.name for a in sources]
    trained = _read_json(paths.train() / "train.json", "training record")
    device = pick_device(cfg.device)
    tables, hashes = [], {}
    for seed in cfg.seeds:
        model = load_model(cfg, "bne", names, paths.train(seed) / "bne" / "model.pt", device)
        hashes[str(seed)] = trained["seeds"][str(seed)]["bne"]["model_sha256"]
        if cfg.eval.branch_stats == "precise":
            precise_running_stats(model, [(d, _source_batches(a, cfg.eval.batch)) for d, a in enumerate(sources)], device)
        elif cfg.eval.branch_stats != "running":
            raise ValueError(f"eval.branch_stats must be running or precise, got {cfg.eval.branch_stats!r}")
        run = running_stats(model.norm_layers())
        pop, inst = population_stats(model, [(d, _source_batches(a, cfg.eval.batch)) for d, a in enumerate(sources)], device)
        tables.append(pa.table(stats_table([run, pop, inst], names, dataset=cfg.name, held_out=target, seed=seed)))
    table = pa.concat_tables(tables)
    table = table.replace_schema_metadata({
        "dataset": cfg.name, "held_out": target, "sources": json.dumps(names), "seeds": json.dumps(list(cfg.seeds)),
        "checkpoint_sha256": json.dumps(hashes), "params_hash": config_hash(cfg.model, cfg.train, cfg.resolution, cfg.eval.branch_stats),
        "norm": getattr(cfg.model, "norm", "bn"), "branch_stats": cfg.eval.branch_stats, "backbone": cfg.model.backbone,
        "resolution": str(cfg.resolution), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    paths.stats.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.stats.with_name(f".{paths.stats.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, paths.stats)
    log(f"{target}: statistics of {len(names)} source domains x {len(cfg.seeds)} seed(s) -> {paths.stats}")
    return paths.stats


def model_with_stats(cfg: LodoConfig, paths: FoldPaths, names: list[str], seed: int, device: torch.device) -> tuple[DGNet, dict]:
    """The fold's BNE model whose branches normalize with the ``running`` statistics of the Parquet file.

    Returns the model and ``{kind: DomainStats}`` (the embeddings) read from the same file.
    """
    meta, kinds, domains = read_stats_table(str(paths.stats), seed=seed)
    if domains != names:
        raise ValueError(f"{paths.stats}: domains {domains} differ from the fold's sources {names}")
    model = load_model(cfg, "bne", names, paths.train(seed) / "bne" / "model.pt", device)
    run = kinds["running"]
    for layer, m, v in zip(model.norm_layers(), run.mean, run.var):
        layer.running_mean.copy_(torch.from_numpy(m))
        layer.running_var.copy_(torch.from_numpy(v))
    return model, kinds


def _source_val(sources: list[DomainArrays]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    images = np.concatenate([a.images[a.val] for a in sources])
    labels = np.concatenate([a.labels[a.val] for a in sources])
    domains = torch.as_tensor(np.concatenate([np.full(len(a.val), d) for d, a in enumerate(sources)]))
    return images, labels, domains


def distance_profile(out: BranchOutputs, opts: InferenceOptions) -> np.ndarray:
    """(N, S): each image's aggregated distance to every source domain, the space BNE weights in."""
    d = out.dists[(opts.instance_stats, opts.embedding, opts.distance)]
    layers = layer_subset(d.shape[-1], list(opts.layers) if isinstance(opts.layers, tuple) else opts.layers)
    return aggregate_layers(d, layers, opts.aggregate).T.numpy()


def embed_fold(
    cfg: LodoConfig, dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str, root: Path,
    log: Callable[[str], None] = print, progress: bool = True,
) -> Path:
    """Project the sources' validation images into the embedding: every branch's outputs and per-layer distances.

    Writes per seed ``val_outputs.npz``/``val_domains.npy``, the input of ``tune`` and of the source-side
    numbers of ``evaluate`` (domain identification, the 2-D map). The target is not read.
    """
    cfg = for_dataset(cfg, dataset)
    paths = FoldPaths(root, cfg.name, target)
    sources = _sources(dataset, arrays, target)
    names = [a.name for a in sources]
    device = pick_device(cfg.device)
    images, labels, domains = _source_val(sources)
    for seed in cfg.seeds:
        model, kinds = model_with_stats(cfg, paths, names, seed, device)
        val = branch_outputs(model, images, labels, kinds, cfg.eval.batch, device, cfg.eval.single_pass,
                             desc=f"{target}: source val" if progress else "",
                             chunk=branch_chunk(cfg.eval.branch_chunk, cfg.eval.batch, device))
        out = paths.embed(seed)
        out.mkdir(parents=True, exist_ok=True)
        val.save(out / "val_outputs.npz")
        np.save(out / "val_domains.npy", domains.numpy())
    log(f"{target}: {len(labels)} source validation images embedded x {len(cfg.seeds)} seed(s) -> {paths.embed()}")
    return paths.embed()


def load_val(paths: FoldPaths, seed: int) -> tuple[BranchOutputs, torch.Tensor]:
    """The source-validation outputs of ``embed`` and each image's domain index."""
    d = paths.embed(seed)
    if not (d / "val_outputs.npz").is_file():
        raise FileNotFoundError(f"{d}/val_outputs.npz: missing; run the embed stage first")
    return BranchOutputs.load(d / "val_outputs.npz"), torch.from_numpy(np.load(d / "val_domains.npy"))


def passthrough_tune(cfg: LodoConfig, target: str, root: Path) -> dict:
    """The tune stage when tuning is off: no options chosen (evaluation uses ``eval.options``)."""
    record = {"target": target, "tuned": False, "seeds": {}}
    _write_json(FoldPaths(root, cfg.name, target).tune / "best.json", record)
    return record


def evaluate_fold(
    cfg: LodoConfig, dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str, root: Path,
    log: Callable[[str], None] = print, progress: bool = True, map_sample: int = 300,
) -> list[dict]:
    """The only stage that reads the held-out domain: every image of it, for every method and seed.

    Also the source-side numbers that depend on the inference options: domain identification on source
    validation and the 2-D map (PCA of the source images' distance profiles).
    """
    cfg = for_dataset(cfg, dataset)
    paths = FoldPaths(root, cfg.name, target)
    sources = _sources(dataset, arrays, target)
    names = [a.name for a in sources]
    device = pick_device(cfg.device)
    trained = _read_json(paths.train() / "train.json", "training record")
    tuned = _read_json(paths.tune / "best.json", "tuning result")
    opts = cfg.eval.options
    results = []
    for seed in cfg.seeds:
        t0 = time.time()
        model, kinds = model_with_stats(cfg, paths, names, seed, device)
        deep = load_model(cfg, "deepall", names, paths.train(seed) / "deepall" / "model.pt", device)
        val, val_domains = load_val(paths, seed)
        best = tuned["seeds"].get(str(seed)) if tuned.get("tuned") else None
        tuned_opts = options_from_dict(best["options"]) if best else opts
        prof = distance_profile(val, opts)
        center = prof.mean(0)
        basis = np.linalg.svd(prof - center, full_matrices=False)[2][:2]
        val_xy = (prof - center) @ basis.T
        # Only now is the held-out domain read.
        tgt = arrays[target]
        out = branch_outputs(model, tgt.images, tgt.labels, kinds, cfg.eval.batch, device, cfg.eval.single_pass,
                             desc=f"{target}: target" if progress else "",
                             chunk=branch_chunk(cfg.eval.branch_chunk, cfg.eval.batch, device))
        deep_probs = plain_probs(deep, tgt.images, cfg.eval.batch, device, desc=f"{target}: deepall" if progress else "")
        d = paths.eval(seed)
        d.mkdir(parents=True, exist_ok=True)
        out.save(d / "target_outputs.npz")
        acc = method_accuracies(out, opts)
        bne_probs, weights = bne_predict(out, opts)
        pick = np.random.default_rng(seed).permutation(len(out.labels))[:map_sample]
        target_xy = (distance_profile(out, opts)[pick] - center) @ basis.T
        result = {
            "target": target,
            "seed": seed,
            "sources": names,
            "deepall": accuracy(deep_probs, out.labels),
            **{m: acc[m] for m in ("bne", "uniform", "nearest", "oracle")},
            "bne_tuned": method_accuracies(out, tuned_opts)["bne"],
            "bne_mean_max_weight": acc["mean_max_weight"],
            "domain_id_acc": domain_id_accuracy(val, val_domains, opts),
            "leave_own_out_val_acc": leave_own_out_accuracy(val, val_domains, opts),
            "tuned_options": options_dict(tuned_opts),
            "tuned_leave_own_out_val_acc": best["value"] if best else leave_own_out_accuracy(val, val_domains, opts),
            "confusion": {"deepall": confusion(deep_probs, out.labels, out.probs.shape[-1]),
                          "bne": confusion(bne_probs, out.labels, out.probs.shape[-1])},
            "mean_weights": weights.mean(1).tolist(),
            "map": {"domain_xy": [val_xy[val_domains.numpy() == k].mean(0).tolist() for k in range(len(names))],
                    "target_xy": target_xy.round(4).tolist(), "target_nearest": weights[:, pick].argmax(0).tolist()},
            "history": {m: trained["seeds"][str(seed)][m]["history"] for m in ("deepall", "bne")},
            "selected_epoch": {m: trained["seeds"][str(seed)][m]["selected_epoch"] for m in ("deepall", "bne")},
            "seconds": {"train": round(sum(trained["seeds"][str(seed)][m]["seconds"] for m in ("deepall", "bne")), 1),
                        "evaluate": round(time.time() - t0, 1)},
        }
        results.append(result)
        log(f"{target} seed {seed}: " + " ".join(f"{m} {result[m]:.4f}" for m in METHOD_KEYS))
    _write_json(paths.eval() / "fold.json", {"target": target, "folds": results})
    return results


def confusion(probs: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """(K, K) counts: row = true class, column = predicted class."""
    m = torch.zeros(k, k, dtype=torch.long)
    m.index_put_((labels.long(), probs.argmax(-1)), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    return m.tolist()


def run_fold(
    cfg: LodoConfig, dataset: FolderDataset, arrays: dict[str, DomainArrays], target: str, root: Path,
    log: Callable[[str], None] = print, progress: bool = True, tuner: Tuner | None = None,
) -> list[dict]:
    """Every stage of one held-out fold in order: train, stats, embed, tune, evaluate (the pipeline's stages)."""
    train_fold(cfg, dataset, arrays, target, root, log, progress)
    stats_fold(cfg, dataset, arrays, target, root, log)
    embed_fold(cfg, dataset, arrays, target, root, log, progress)
    if tuner is None:
        passthrough_tune(cfg, target, root)
    else:
        tuner(cfg, target, root)
    return evaluate_fold(cfg, dataset, arrays, target, root, log, progress)


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
    seeds = sorted({f["seed"] for f in folds})
    if len(seeds) > 1:  # the mean over targets, per seed, then its standard error over seeds
        for k in keys:
            per_seed = [100 * np.mean([f[k] for f in folds if f["seed"] == s]) for s in seeds]
            metrics["mean"][f"{k}_se"] = round(float(np.std(per_seed, ddof=1) / np.sqrt(len(seeds))), 2)
    return metrics


def markdown_table(metrics: dict, targets: list[str]) -> str:
    cols = [("deepall", "DeepAll"), ("bne", "BNE"), ("uniform", "uniform"), ("nearest", "nearest"),
            ("oracle", "oracle branch (ref.)"), ("bne_tuned", "BNE, options tuned on source val"),
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


def ablation(root: Path, cfg: LodoConfig, folds: list[dict]) -> list[dict]:
    """Inference options varied one at a time from the configured ones: mean target and leave-own-out source-val accuracy.

    An analysis of the trained models; the reported BNE number never uses the target to choose options.
    """
    base = cfg.eval.options
    variants: list[tuple[str, InferenceOptions]] = [("default", base)]
    variants += [(f"embedding={e}", replace(base, embedding=e)) for e in ("population", "instance_average")]
    variants += [(f"distance={d}", replace(base, distance=d)) for d in ("kl", "euclidean")]
    variants += [(f"layers={layer}", replace(base, layers=layer)) for layer in ("early", "middle", "late")]
    variants += [("instance_stats=single_pass", replace(base, instance_stats="single_pass"))]
    variants += [(f"power={p:g}", replace(base, power=p)) for p in (2.0, 4.0, 8.0, 16.0)]
    variants += [(f"population + power={p:g}", replace(base, embedding="population", power=p)) for p in (4.0, 16.0)]
    loaded = []
    for f in folds:
        paths = FoldPaths(root, cfg.name, f["target"])
        loaded.append((BranchOutputs.load(paths.eval(f["seed"]) / "target_outputs.npz"),
                       BranchOutputs.load(paths.embed(f["seed"]) / "val_outputs.npz"),
                       torch.from_numpy(np.load(paths.embed(f["seed"]) / "val_domains.npy"))))
    rows = []
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


def report(
    cfg: LodoConfig, targets: list[str], root: Path | str, reports: Path | str, classes: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Gather every fold's ``fold.json``: metrics.json, metrics.md, details.json, ablation.json and the figures."""
    root, reports = Path(root), Path(reports)
    folds = []
    for t in targets:
        folds += _read_json(FoldPaths(root, cfg.name, t).eval() / "fold.json", f"evaluation of {t}")["folds"]
    metrics = summarize(folds, targets)
    _write_json(reports / "metrics.json", metrics)
    abl = ablation(root, cfg, folds)
    _write_json(reports / "ablation.json", abl)
    train_s = sum(f["seconds"]["train"] for f in folds)
    eval_s = sum(f["seconds"]["evaluate"] for f in folds)
    keep = ("target", "seed", "sources", "tuned_options", "tuned_leave_own_out_val_acc", "history", "selected_epoch",
            "seconds", "bne_mean_max_weight", "mean_weights", "confusion")
    detail = {
        "train_seconds_total": round(train_s, 1),
        "evaluate_seconds_total": round(eval_s, 1),
        "classes": classes,
        "folds": [{k: f[k] for k in keep} for f in folds],
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    _write_json(reports / "details.json", detail)
    md = [f"# {cfg.name}: leave-one-domain-out accuracy (%)\n\n", markdown_table(metrics, targets)]
    md.append(f"\nBackbone {cfg.model.backbone}, normalization {getattr(cfg.model, 'norm', 'bn')}, {cfg.resolution} px, "
              f"{cfg.train.epochs} epochs, seeds {list(cfg.seeds)}; training of all folds {train_s / 60:.1f} min, "
              f"evaluation {eval_s / 60:.1f} min.\n")
    md.append("\n## Inference options, one at a time (target accuracy is analysis only; nothing is selected on it)\n\n")
    md.append("| variant | mean target acc. | mean source-val acc., own branch left out |\n|---|---|---|\n")
    md += [f"| {r['variant']} | {r['target_acc']:.1f} | {r['source_val_leave_own_out_acc']:.1f} |\n" for r in abl]
    md.append("\n## Tuned inference options (chosen on source validation, own branch left out)\n\n")
    md += [f"- {f['target']} seed {f['seed']}: {f['tuned_options']} (source score {100 * f['tuned_leave_own_out_val_acc']:.1f})\n" for f in folds]
    reports.mkdir(parents=True, exist_ok=True)
    tmp = reports / ".metrics.md.tmp"
    tmp.write_text("".join(md))
    os.replace(tmp, reports / "metrics.md")
    first = [f for f in folds if f["seed"] == cfg.seeds[0]]
    accuracy_bars(metrics, targets, ["deepall", "bne", "uniform", "nearest", "oracle", "bne_tuned"], reports / "accuracy.png",
                  f"{cfg.name}: leave-one-domain-out")
    weights = {}
    for f in first:
        out = BranchOutputs.load(FoldPaths(root, cfg.name, f["target"]).eval(f["seed"]) / "target_outputs.npz")
        weights[f["target"]] = bne_predict(out, cfg.eval.options)[1].numpy()
    weight_histograms(weights, {f["target"]: f["sources"] for f in first}, reports / "bne_weights.png")
    confusion_matrices({f["target"]: f["confusion"] for f in first}, classes, reports / "confusion.png")
    embedding_maps({f["target"]: (f["sources"], f["map"]) for f in first}, reports / "embedding_map.png")
    log("".join(md))
    return metrics


#: ``tuner(cfg, target, root)`` writes ``FoldPaths.tune/best.json`` (see ``passthrough_tune``); the Optuna one is in ``tasks.tune``.
Tuner = Callable[[LodoConfig, str, Path], dict]


def run_lodo(
    cfg: LodoConfig,
    work: Path | str,
    reports: Path | str,
    cache_root: Path | str,
    log: Callable[[str], None] = print,
    progress: bool = True,
    dataset: FolderDataset | None = None,
    tuner: Tuner | None = None,
) -> dict:
    """Every held-out target and seed, every stage, then the reports (what ``dvc repro`` does stage by stage).

    ``work``: the stage outputs' root (train/, stats/, embed/, tune/, eval/ under it); checkpoints resume.
    ``dataset``: the samples to use (for example from a validated manifest); default: scan ``cfg.root``.
    """
    if "OMP_NUM_THREADS" not in os.environ:  # several runs side by side (bench/gpu_pacs.py) set it
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(work)
    dataset, arrays = prepare(cfg, cache_root, dataset, progress, log)
    targets = fold_targets(cfg, dataset)
    for t in targets:
        run_fold(cfg, dataset, arrays, t, work, log, progress, tuner)
    return report(cfg, targets, work, reports, dataset.classes, log)


def prepare(
    cfg: LodoConfig, cache_root: Path | str, dataset: FolderDataset | None = None, progress: bool = True,
    log: Callable[[str], None] = print, held_out: str | None = None,
) -> tuple[FolderDataset, dict[str, DomainArrays]]:
    """The dataset (scanned from ``cfg.root`` unless given) and its decoded, memory-mapped arrays.

    ``held_out``: that domain's arrays are not opened (the stages before evaluation).
    """
    dataset = dataset or load_folder_dataset(cfg.root, cfg.splits, cfg.val_fraction, seed=0)
    for fix in dataset.fixes:
        log(f"split fix: {fix}")
    cache = build_cache(dataset, cfg.resolution, Path(cache_root) / cfg.name / str(cfg.resolution), progress=progress)
    if held_out is not None and held_out not in dataset.domains:
        raise ValueError(f"held-out domain {held_out!r} is not a domain of the dataset ({dataset.domains})")
    return dataset, load_cache(dataset, cache, skip=[held_out] if held_out else [])


def fold_targets(cfg: LodoConfig, dataset: FolderDataset) -> list[str]:
    targets = list(cfg.targets or dataset.domains)
    unknown = set(targets) - set(dataset.domains)
    if unknown:
        raise ValueError(f"held-out domain(s) {sorted(unknown)} are not domains of {cfg.root} ({dataset.domains})")
    return targets
