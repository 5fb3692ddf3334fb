"""Statistics mixing at inference (issue 19, variants 2a-2c; definitions in docs/results/pacs-study.md).

Every normalization layer of a trained network normalizes its input with statistics other than one branch's:

- ``pooled``: the sources' mixture statistics, the same for every image (between-domain variance included);
- ``mixstats``: per image, the mixture weighted by the image's own distances to the domains, computed layer by
  layer in the one forward (the weights at layer l come from the mean W2 distance over layers 0..l);
- ``alpha``: one branch's statistics (or DeepAll's) with the image's instance statistics mixed in, in the early
  layers only.

A mixture of Gaussians with weights w: mean = sum_d w_d mu_d, var = sum_d w_d (var_d + mu_d^2) - mean^2.
Layers are switched by :func:`normalize_with`, for the duration of a ``with`` block, so the network and its
checkpoint stay as trained. Only plain BN layers (DomainBatchNorm2d with shared affine parameters, BatchNorm2d) mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from bne.data import to_tensor
from bne.embedding import EPS, channel_terms
from bne.norm.dsbn import DomainBatchNorm2d
from bne.norm.simplex import SimplexBatchNorm2d
from bne.stats import instance_stats

#: (layer index, input (N, C, H, W)) -> per-sample (mean, var), each (N, C), that layer normalizes with.
StatsFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def plain_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The network's normalization layers in forward-definition order; refuses a layer that cannot mix."""
    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, DomainBatchNorm2d))]
    for m in layers:
        if type(m) not in (nn.BatchNorm2d, DomainBatchNorm2d, SimplexBatchNorm2d):  # simplex: DSBN in eval mode
            raise ValueError(f"statistics mixing is defined for plain BN layers (model.norm: bn), not {type(m).__name__}")
        if getattr(m, "domain_affine", False):
            raise ValueError("statistics mixing needs shared affine parameters (model.domain_affine: false)")
    return layers


def branch_stats(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's running statistics as (S, C): one row per domain (DeepAll's BatchNorm2d: one row)."""
    mean, var = layer.running_mean, layer.running_var
    return (mean, var) if mean.dim() == 2 else (mean[None], var[None])


def mixture(mean: torch.Tensor, var: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the mixture of S Gaussians (S, C) with weights ``w`` (N, S) -> two (N, C)."""
    m = w @ mean
    return m, (w @ (var + mean * mean) - m * m).clamp_min(0)


@contextmanager
def normalize_with(model: nn.Module, stats_fn: StatsFn) -> Iterator[None]:
    """Inside the block every BN layer of ``model`` normalizes sample n with ``stats_fn``'s n-th rows and the
    layer's own affine parameters: (x - mean) / sqrt(var + eps) * weight + bias, as BatchNorm in eval mode does."""
    layers = plain_norm_layers(model)

    def forward_of(i: int, layer: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            mean, var = stats_fn(i, x)
            scale = torch.rsqrt(var.float() + layer.eps)
            shift = -mean.float() * scale
            if layer.weight is not None:
                scale, shift = scale * layer.weight, shift * layer.weight + layer.bias
            n, c = scale.shape
            return (x * scale.view(n, c, 1, 1).to(x.dtype) + shift.view(n, c, 1, 1).to(x.dtype))

        return forward

    for i, layer in enumerate(layers):
        layer.forward = forward_of(i, layer)  # an instance attribute: nn.Module.__call__ runs it
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def w2_terms(mu_x: torch.Tensor, sd_x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-image W2 distance (N, S) of instance statistics (N, C) to the domains' statistics (S, C), channel-normalised."""
    return channel_terms(mu_x[:, None], sd_x[:, None], mean[None], var.clamp_min(0).sqrt()[None], "w2").mean(-1).clamp_min(0).sqrt()


def masked_weights(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax over domains (dim 1) of ``logits`` (N, S); ``allowed`` (N, S) bool leaves domains out per image."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, 1)


def pooled_fn(layers: list[nn.Module], allowed: torch.Tensor | None = None) -> StatsFn:
    """Variant 2a: the mixture of the (allowed) domains' running statistics, equal weights."""

    def fn(i: int, x: torch.Tensor):
        mean, var = (t.float() for t in branch_stats(layers[i]))
        if mean.shape[0] == 1:  # a shared layer (model.domain_layers, or DeepAll): its own statistics
            return mean.expand(x.shape[0], -1), var.expand(x.shape[0], -1)
        w = masked_weights(torch.zeros(x.shape[0], mean.shape[0], device=x.device), allowed)
        return mixture(mean, var, w)

    return fn


def mixstats_fn(layers: list[nn.Module], power: float, allowed: torch.Tensor | None = None) -> StatsFn:
    """Variant 2b: per image, the mixture weighted by D^-power, D the mean W2 distance of the image's instance
    statistics to each domain's over the layers so far (this one included). One forward instead of S."""
    total: dict[str, torch.Tensor | int] = {}

    def fn(i: int, x: torch.Tensor):
        mean, var = (t.float() for t in branch_stats(layers[i]))
        if i == 0:
            total.clear()
        if mean.shape[0] == 1:  # a shared layer: its own statistics, no distance
            return mean.expand(x.shape[0], -1), var.expand(x.shape[0], -1)
        mu_x, sd_x = instance_stats(x)
        total["sum"] = w2_terms(mu_x, sd_x, mean, var) + total.get("sum", 0)
        total["n"] = total.get("n", 0) + 1
        w = masked_weights(-power * torch.log((total["sum"] / total["n"]).clamp_min(EPS)), allowed)
        return mixture(mean, var, w)

    return fn


def alpha_fn(layers: list[nn.Module], domain: int, alpha: float, early: int) -> StatsFn:
    """Variant 2c: branch ``domain``'s statistics, in layers ``< early`` mixed with weight ``alpha`` with the
    image's own instance statistics (as a two-component mixture); later layers use the branch's statistics."""

    def fn(i: int, x: torch.Tensor):
        mean, var = (t.float()[domain if t.dim() == 2 and t.shape[0] > 1 else 0] for t in branch_stats(layers[i]))
        n = x.shape[0]
        if i >= early or alpha == 0:
            return mean.expand(n, -1), var.expand(n, -1)
        mu_x, sd_x = instance_stats(x)
        m = (1 - alpha) * mean + alpha * mu_x
        v = (1 - alpha) * (var + mean * mean) + alpha * (sd_x * sd_x + mu_x * mu_x) - m * m
        return m, v.clamp_min(0)

    return fn


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The network's own forward (input scaling, layout); every BN layer is switched, so the route is unused.
    return model(x, domains=0) if getattr(model, "num_domains", 0) else model(x)


@torch.no_grad()
def mixed_probs(model: nn.Module, images: np.ndarray, batch: int, device: torch.device, make_fn,
                own: np.ndarray | None = None) -> torch.Tensor:
    """Class probabilities (N, K) of one forward per batch with the statistics of ``make_fn(layers, allowed)``.

    ``own`` (N,) domain indices: each image's own domain is left out of the mixture (the source-only criterion).
    """
    model.eval()
    layers = plain_norm_layers(model)
    s = max(branch_stats(m)[0].shape[0] for m in layers)
    out = []
    for start in range(0, len(images), batch):
        x = to_tensor(images[start : start + batch]).to(device)
        allowed = None
        if own is not None:
            allowed = torch.ones(x.shape[0], s, dtype=torch.bool, device=device)
            allowed[torch.arange(x.shape[0]), torch.as_tensor(own[start : start + batch], device=device)] = False
        with normalize_with(model, make_fn(layers, allowed)):
            out.append(torch.softmax(_forward(model, x).float(), -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def alpha_branch_probs(model: nn.Module, images: np.ndarray, batch: int, device: torch.device, alpha: float,
                       early: int) -> torch.Tensor:
    """Every branch's class probabilities (S, N, K) with :func:`alpha_fn` (DeepAll: S = 1)."""
    model.eval()
    layers = plain_norm_layers(model)
    s = max(branch_stats(m)[0].shape[0] for m in layers)
    per = []
    for d in range(s):
        out = []
        for start in range(0, len(images), batch):
            x = to_tensor(images[start : start + batch]).to(device)
            with normalize_with(model, alpha_fn(layers, d, alpha, early)):
                out.append(torch.softmax(_forward(model, x).float(), -1).cpu())
        per.append(torch.cat(out))
    return torch.stack(per)
