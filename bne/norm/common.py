"""Helpers shared by the domain-specific normalization layers (subclasses of DomainBatchNorm2d)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bne.norm.dsbn import (  # noqa: F401  (re-exported for cbn, mbn)
    MEAN_DOMAIN,
    DomainBatchNorm2d,
    scale_shift,
)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 precision (statistics of half-precision activations)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_domain(layer: DomainBatchNorm2d, d: int) -> None:
    """Raise as DomainBatchNorm2d does for a domain outside 0..S-1 (or the mean pseudo-domain in training)."""
    if d == MEAN_DOMAIN:
        if layer.training:
            raise ValueError("the mean-statistics pseudo-domain exists only in eval mode")
        return
    if not 0 <= d < layer.num_domains:
        name = layer.layer_name or type(layer).__name__
        raise ValueError(f"{name}: domain {d} not in 0..{layer.num_domains - 1}")


def step_factor(layer: DomainBatchNorm2d, d: int) -> float:
    """Count one training batch of domain ``d`` and return its running-average factor (as BatchNorm2d)."""
    layer.num_batches_tracked[d] += 1
    return 1.0 / float(layer.num_batches_tracked[d]) if layer.momentum is None else layer.momentum


@torch.no_grad()
def update_running(layer: DomainBatchNorm2d, d: int, x: torch.Tensor, factor: float) -> None:
    """Move domain ``d``'s per-channel running mean and (unbiased) variance of ``x`` towards the batch's."""
    x = as_float(x.detach())
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=x.numel() > x.shape[1])
    layer.running_mean[d].lerp_(mean.to(layer.running_mean.dtype), factor)
    layer.running_var[d].lerp_(var.to(layer.running_var.dtype), factor)


def normalize(layer: DomainBatchNorm2d, x: torch.Tensor, d: int) -> torch.Tensor:
    """BatchNorm without affine with domain ``d``'s state: batch statistics (updating d) in training."""
    check_domain(layer, d)
    if d == MEAN_DOMAIN:
        return F.batch_norm(x, layer.running_mean.mean(0), layer.running_var.mean(0), None, None, False, 0.0, layer.eps)
    factor = step_factor(layer, d) if layer.training else 0.0
    return F.batch_norm(x, layer.running_mean[d], layer.running_var[d], None, None, layer.training, factor, layer.eps)


def pick(param: torch.Tensor, d: int) -> torch.Tensor:
    """Domain ``d``'s row of a (S, C) parameter (MEAN_DOMAIN: their mean); (C,) or (1, C) is shared."""
    if param.ndim == 1:
        return param
    if param.shape[0] == 1:
        return param[0]
    return param.mean(0) if d == MEAN_DOMAIN else param[d]


def fit_groups(channels: int, groups: int) -> int:
    """``groups`` if it divides ``channels``, else their greatest common divisor (at least 1)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return math.gcd(channels, groups)


@torch.no_grad()
def copy_batchnorm_state(layer: DomainBatchNorm2d, bn: nn.BatchNorm2d) -> DomainBatchNorm2d:
    """Give every domain of ``layer`` the running statistics, batch count and affine parameters of ``bn``."""
    layer.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    layer.running_mean.copy_(bn.running_mean.expand_as(layer.running_mean))
    layer.running_var.copy_(bn.running_var.expand_as(layer.running_var))
    layer.num_batches_tracked.fill_(int(bn.num_batches_tracked))
    if bn.affine and layer.affine:
        layer.weight.copy_(bn.weight.expand_as(layer.weight))
        layer.bias.copy_(bn.bias.expand_as(layer.bias))
    return layer
