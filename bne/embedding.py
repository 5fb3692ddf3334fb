"""The BNE embedding: distances between instance and domain statistics, weights, and the ensemble."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISTANCES = ("w2", "kl", "euclidean")
WEIGHTINGS = ("inverse", "softmax")
LAYER_SETS = ("all", "early", "middle", "late")
EPS = 1e-6


def gaussian_distance(
    mu_x: torch.Tensor, std_x: torch.Tensor, mu_d: torch.Tensor, std_d: torch.Tensor, kind: str = "w2"
) -> torch.Tensor:
    """Distance between diagonal Gaussians, normalised per channel (mean over the last dimension).

    ``w2``: 2-Wasserstein, sqrt(mean_c (mu_x - mu_d)^2 + (std_x - std_d)^2).
    ``kl``: KL(x || d), mean over channels. ``euclidean``: on [mu; var], sqrt of the mean square.
    Arguments broadcast against each other.
    """
    d = channel_terms(mu_x, std_x, mu_d, std_d, kind).mean(-1)
    return d if kind == "kl" else d.sqrt()


def channel_terms(
    mu_x: torch.Tensor, std_x: torch.Tensor, mu_d: torch.Tensor, std_d: torch.Tensor, kind: str
) -> torch.Tensor:
    """The per-channel summands of :func:`gaussian_distance` (before the mean over channels)."""
    if kind == "w2":
        return (mu_x - mu_d) ** 2 + (std_x - std_d) ** 2
    if kind == "euclidean":
        return (mu_x - mu_d) ** 2 + (std_x**2 - std_d**2) ** 2
    if kind == "kl":
        var_x, var_d = std_x**2 + EPS, std_d**2 + EPS
        return 0.5 * (torch.log(var_d / var_x) + (var_x + (mu_x - mu_d) ** 2) / var_d - 1)
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


def per_layer_distances(
    mu_x: torch.Tensor, std_x: torch.Tensor, mu_d: torch.Tensor, std_d: torch.Tensor, kind: str, layer_mean: torch.Tensor
) -> torch.Tensor:
    """Distances at every layer at once: channels of all layers concatenated on the last dimension.

    ``layer_mean`` (C_total, L) averages each layer's channels; the result has L on the last dimension.
    Equal to :func:`gaussian_distance` applied layer by layer.
    """
    d = channel_terms(mu_x, std_x, mu_d, std_d, kind) @ layer_mean
    return d if kind == "kl" else d.clamp_min(0).sqrt()


def layer_mean_matrix(channels: list[int]) -> torch.Tensor:
    """(sum(channels), len(channels)) matrix whose column l averages layer l's channels."""
    m = torch.zeros(sum(channels), len(channels))
    start = 0
    for i, c in enumerate(channels):
        m[start : start + c, i] = 1.0 / c
        start += c
    return m


def layer_subset(num_layers: int, layers: str | list[int]) -> list[int]:
    """Indices of the layers that embed: all, the early/middle/late third, or an explicit list."""
    if isinstance(layers, str):
        third = max(1, num_layers // 3)
        sets = {
            "all": range(num_layers),
            "early": range(third),
            "middle": range(third, num_layers - third),
            "late": range(num_layers - third, num_layers),
        }
        if layers not in sets:
            raise ValueError(f"unknown layer set {layers!r}; choose one of {LAYER_SETS} or a list of indices")
        return list(sets[layers])
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"layer indices {bad or layers} outside 0..{num_layers - 1}")
    return list(layers)


def distance_weights(distances: torch.Tensor, weighting: str = "inverse", power: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Weights over domains (dim 0) from distances: D^-p normalised, or softmax(-D / T). Sum to 1, >= 0."""
    if weighting == "inverse":
        logits = -power * torch.log(distances.clamp_min(EPS))
    elif weighting == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        logits = -distances / temperature
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    return torch.softmax(logits, dim=0)


@dataclass(frozen=True, kw_only=True)
class InferenceOptions:
    """How BNE turns per-layer distances into weights. No defaults: ``params.yaml``'s ``eval.options`` (the paper's)."""

    embedding: str  # running | population | instance_average
    distance: str  # one of DISTANCES
    layers: str | tuple[int, ...]  # one of LAYER_SETS, or layer indices
    aggregate: str  # mean | sum over layers
    weighting: str  # one of WEIGHTINGS
    power: float  # inverse weighting: D^-power
    temperature: float  # softmax weighting: softmax(-D / temperature)
    instance_stats: str  # per_branch | single_pass


def aggregate_layers(layer_dists: torch.Tensor, layers: list[int], how: str = "mean") -> torch.Tensor:
    """(S, N, L) per-layer distances -> (S, N) over the chosen layers."""
    sel = layer_dists[..., layers]
    if how == "mean":
        return sel.mean(-1)
    if how == "sum":
        return sel.sum(-1)
    raise ValueError(f"unknown layer aggregation {how!r}; choose mean or sum")


def ensemble(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the branches' class probabilities: (S, N, K), (S, N) -> (N, K)."""
    return (weights.unsqueeze(-1) * probs).sum(0)


def bne_weights(layer_dists: torch.Tensor, opts: InferenceOptions) -> torch.Tensor:
    """(S, N, L) per-layer distances -> (S, N) weights for the options' layers, aggregation and weighting."""
    layers = layer_subset(layer_dists.shape[-1], list(opts.layers) if isinstance(opts.layers, tuple) else opts.layers)
    d = aggregate_layers(layer_dists, layers, opts.aggregate)
    return distance_weights(d, opts.weighting, opts.power, opts.temperature)
