"""Per-domain statistics of the normalization layers' inputs: running, population and instance statistics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from bne.norm.dsbn import DomainBatchNorm2d


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel spatial mean and standard deviation of ``x`` (N, C, H, W) -> two (N, C)."""
    x = x.float()
    mean = x.mean((2, 3))
    # E[x^2] - E[x]^2; on NCHW, E[x^2] from vector_norm (one read of x, no temporary) is about 2x faster than
    # mean(x * x) and 10x faster than torch.var_mean on the CPU. float32 error ~2e-6 at these scales.
    if x.is_contiguous():
        mean_sq = torch.linalg.vector_norm(x, 2, (2, 3)).square() / (x.shape[2] * x.shape[3])
    else:  # channels_last: vector_norm over strided H, W is slower than the temporary
        mean_sq = (x * x).mean((2, 3))
    var = (mean_sq - mean * mean).clamp_min(0)
    return mean, var.sqrt()


class InstanceRecorder:
    """Records the instance statistics of every domain-specific layer's input during one forward."""

    def __init__(self) -> None:
        self.mean: dict[int, torch.Tensor] = {}
        self.std: dict[int, torch.Tensor] = {}

    def __call__(self, layer: DomainBatchNorm2d, x: torch.Tensor) -> None:
        self.mean[layer.layer_index], self.std[layer.layer_index] = instance_stats(x.detach())


class PopulationAccumulator:
    """Exact per-channel sums of each layer's input over many batches (float64), plus instance averages."""

    def __init__(self) -> None:
        self.n: dict[int, int] = {}
        self.images: dict[int, int] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.sumsq: dict[int, torch.Tensor] = {}
        self.inst_mean: dict[int, torch.Tensor] = {}
        self.inst_std: dict[int, torch.Tensor] = {}

    def __call__(self, layer: DomainBatchNorm2d, x: torch.Tensor) -> None:
        i = layer.layer_index
        x = x.detach().float()
        mean, std = instance_stats(x)
        hw = x.shape[2] * x.shape[3]
        add = {  # per-batch sums in float32, accumulated across batches in float64
            "sum": (mean.sum(0) * hw).double(),
            "sumsq": ((std**2 + mean**2).sum(0) * hw).double(),
            "inst_mean": mean.sum(0).double(),
            "inst_std": std.sum(0).double(),
        }
        for name, value in add.items():
            store = getattr(self, name)
            store[i] = store[i] + value if i in store else value
        self.n[i] = self.n.get(i, 0) + x.shape[0] * x.shape[2] * x.shape[3]
        self.images[i] = self.images.get(i, 0) + x.shape[0]

    def population(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        mean = self.sum[i] / self.n[i]
        var = (self.sumsq[i] / self.n[i] - mean * mean).clamp_min(0)
        return mean.numpy(), var.numpy(), self.n[i]

    def instance_average(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean instance mean, and the square of the mean instance std (so sqrt(var) is the mean std)."""
        k = self.images[i]
        return (self.inst_mean[i] / k).numpy(), ((self.inst_std[i] / k) ** 2).numpy(), k


@dataclass
class DomainStats:
    """Statistics of one kind for all domains and layers: ``mean[l]`` and ``var[l]`` are (S, C) arrays."""

    kind: str
    layer_names: list[str]
    mean: list[np.ndarray]
    var: list[np.ndarray]
    count: list[np.ndarray]  # (S,) per layer


def running_stats(layers: list[DomainBatchNorm2d]) -> DomainStats:
    """The layers' running (EMA) statistics, as the network holds them."""
    return DomainStats(
        "running",
        [layer.layer_name for layer in layers],
        [layer.running_mean.detach().double().cpu().numpy() for layer in layers],
        [layer.running_var.detach().double().cpu().numpy() for layer in layers],
        [layer.num_batches_tracked.detach().cpu().numpy() for layer in layers],
    )


@torch.no_grad()
def population_stats(
    model: torch.nn.Module,
    batches_per_domain: Iterable[tuple[int, Iterable[torch.Tensor]]],
    device: torch.device | str = "cpu",
    partial: bool = False,
) -> tuple[DomainStats, DomainStats]:
    """Exact population and averaged instance statistics of every layer's input, per domain.

    One no-grad pass in eval mode: domain d's images go through branch d (earlier layers normalized
    with domain d's running statistics). Returns (population, instance_average). ``partial``: domains
    without images keep zero rows (for adding one new domain) instead of raising.
    """
    model.eval()
    layers = model.norm_layers()
    s = model.num_domains
    pop = {k: [np.zeros((s, layer.num_features)) for layer in layers] for k in ("mean", "var")}
    inst = {k: [np.zeros((s, layer.num_features)) for layer in layers] for k in ("mean", "var")}
    pop_n = [np.zeros(s, dtype=np.int64) for _ in layers]
    inst_n = [np.zeros(s, dtype=np.int64) for _ in layers]
    seen = set()
    for d, batches in batches_per_domain:
        acc = PopulationAccumulator()
        for x in batches:
            model(x.to(device), domains=d, recorder=acc)
        if not acc.n:
            raise ValueError(f"no images for domain index {d}: cannot compute its population statistics")
        seen.add(d)
        for i in range(len(layers)):
            pop["mean"][i][d], pop["var"][i][d], pop_n[i][d] = acc.population(i)
            inst["mean"][i][d], inst["var"][i][d], inst_n[i][d] = acc.instance_average(i)
    if seen != set(range(s)) and not partial:
        raise ValueError(f"population statistics need every domain; missing indices {sorted(set(range(s)) - seen)}")
    names = [layer.layer_name for layer in layers]
    return (
        DomainStats("population", names, pop["mean"], pop["var"], pop_n),
        DomainStats("instance_average", names, inst["mean"], inst["var"], inst_n),
    )


@torch.no_grad()
def precise_running_stats(
    model: torch.nn.Module,
    batches_per_domain: Iterable[tuple[int, Iterable[torch.Tensor]]],
    device: torch.device | str = "cpu",
) -> None:
    """Replace each domain's running statistics by the exact average of its batch statistics (PreciseBN).

    One no-grad pass over (unaugmented) images with the normalization layers in train mode, so every layer
    sees its input as in training; other modules (dropout) stay in eval mode. Self-consistent, unlike
    loading eval-mode population statistics into every layer at once, which shifts each later layer's input.
    """
    model.eval()
    layers = model.norm_layers()
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = None  # cumulative average: factor 1/n for the n-th batch
            layer.train()
        for d, batches in batches_per_domain:
            for layer in layers:
                layer.num_batches_tracked[d] = 0
            for x in batches:
                model(x.to(device), domains=d)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
        model.eval()


def stats_table(stats: Iterable[DomainStats], domains: list[str], **columns: str | int) -> dict[str, list]:
    """Long-format columns (domain, layer, layer_index, channel, mean, var, count, kind) for Parquet."""
    out: dict[str, list] = {k: [] for k in (*columns, "domain", "layer", "layer_index", "channel", "mean", "var", "count", "kind")}
    for st in stats:
        for li, name in enumerate(st.layer_names):
            for d, dom in enumerate(domains):
                c = st.mean[li].shape[1]
                for k, v in columns.items():
                    out[k].extend([v] * c)
                out["domain"].extend([dom] * c)
                out["layer"].extend([name] * c)
                out["layer_index"].extend([li] * c)
                out["channel"].extend(range(c))
                out["mean"].extend(st.mean[li][d].tolist())
                out["var"].extend(st.var[li][d].tolist())
                out["count"].extend([int(st.count[li][d])] * c)
                out["kind"].extend([st.kind] * c)
    return out


def read_stats_table(path, seed: int | None = None, *, stage: str) -> tuple[dict, dict[str, DomainStats], list[str]]:
    """A ``stats.parquet`` back as (schema metadata, {kind: DomainStats}, domains).

    Files with a ``seed`` column hold one model per seed: ``seed`` picks one (default: the first). ``stage``: the
    stage that writes the file; a torn file, or one without the statistics columns, is one line naming both.
    """
    from bne.io import one_line, read_parquet

    table = read_parquet(path, "statistics file", stage)
    missing = [c for c in STATS_COLUMNS if c not in table.column_names]
    if missing or table.num_rows == 0:
        problem = f"no column(s) {missing}" if missing else "no rows"
        raise ValueError(f"{path}: not a statistics file ({problem}); rerun the {stage} stage")
    try:
        return _stats_from(table, path, seed)
    except (KeyError, IndexError, ValueError, TypeError, UnicodeDecodeError) as e:
        if str(e).startswith(f"{path}: "):  # our own (a seed it does not hold)
            raise
        raise ValueError(f"{path}: not a statistics file ({one_line(e)}); rerun the {stage} stage") from None


STATS_COLUMNS = ("domain", "layer", "layer_index", "channel", "mean", "var", "count", "kind")


def _stats_from(table, path, seed: int | None) -> tuple[dict, dict[str, DomainStats], list[str]]:
    import pyarrow.compute as pc

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "seed" in table.column_names:
        seeds = list(dict.fromkeys(table.column("seed").to_pylist()))
        if seed is None:
            seed = seeds[0]
        if seed not in seeds:
            raise ValueError(f"{path}: no statistics for seed {seed} (seeds {seeds})")
        table = table.filter(pc.equal(table.column("seed"), seed))
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in STATS_COLUMNS}
    domains = list(dict.fromkeys(cols["domain"].tolist()))
    out = {}
    for kind in dict.fromkeys(cols["kind"].tolist()):
        sel = cols["kind"] == kind
        n_layers = int(cols["layer_index"][sel].max()) + 1
        names, means, vars_, counts = [], [], [], []
        for li in range(n_layers):
            rows = sel & (cols["layer_index"] == li)
            names.append(str(cols["layer"][rows][0]))
            c = int(cols["channel"][rows].max()) + 1
            m, v = np.zeros((len(domains), c)), np.zeros((len(domains), c))
            cnt = np.zeros(len(domains), dtype=np.int64)
            for d, dom in enumerate(domains):
                r = rows & (cols["domain"] == dom)
                m[d, cols["channel"][r]] = cols["mean"][r]
                v[d, cols["channel"][r]] = cols["var"][r]
                cnt[d] = int(cols["count"][r][0])
            means.append(m), vars_.append(v), counts.append(cnt)
        out[kind] = DomainStats(kind, names, means, vars_, counts)
    return meta, out, domains


def pairwise_w2(stats: DomainStats) -> np.ndarray:
    """(S, S) W2 distances between domains, per-channel normalised and averaged over layers (as BNE measures)."""
    from bne.embedding import gaussian_distance

    per_layer = []
    for m, v in zip(stats.mean, stats.var):
        m, sd = torch.from_numpy(m), torch.from_numpy(np.sqrt(v))
        per_layer.append(gaussian_distance(m[:, None], sd[:, None], m[None], sd[None], "w2"))
    return torch.stack(per_layer).mean(0).numpy()
