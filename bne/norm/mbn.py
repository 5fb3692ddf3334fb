"""Memorized Batch Normalization with Double-Forward (Guo et al., AAAI 2018), one memory per domain."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bne.norm.common import as_float, check_domain, copy_batchnorm_state, scale_shift
from bne.norm.dsbn import DomainBatchNorm2d


def pool(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled statistics of k equally weighted batches (alpha_i = 1/k), ``mean``/``var`` of shape (k, C):
    ``mu = sum_i alpha_i mu_i``, ``var = sum_i alpha_i (var_i + (mu_i - mu)^2)``."""
    mu = mean.mean(0)
    return mu, (var + (mean - mu) ** 2).mean(0)


class MemorizedBatchNorm2d(DomainBatchNorm2d):
    """MBN (docs/NORMS.md): training normalises with the statistics pooled over the current batch and the
    last ``window - 1`` batches of the same domain; ``running_mean``/``running_var`` of domain d always hold
    the pool of its last ``window`` memorised batches, which eval uses (train and test rules agree) and the
    BNE embedding reads. Variances are the biased batch variances, as BatchNorm2d normalises with.

    ``memory_mean``/``memory_var`` (S, window, C) hold the newest batch at index 0; ``num_batches_tracked[d]``
    counts the batches memorised for domain d (``momentum`` is unused). Double-Forward: see
    :func:`double_forward`.
    """

    distributed_sync = False  # its statistics are not synchronized across processes: refuses torchrun (dsbn)

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        domain_affine: bool = False,
        window: int = 4,
    ) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        if window < 1:
            raise ValueError(f"MBN needs window >= 1, got {window}")
        self.window = window
        self.refresh = False  # set by double_forward
        self.register_buffer("memory_mean", torch.zeros(num_domains, window, num_features))
        self.register_buffer("memory_var", torch.ones(num_domains, window, num_features))

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_domains: int, momentum: float | None = None, domain_affine: bool = False, window: int = 4
    ) -> MemorizedBatchNorm2d:
        """Every domain starts with ``bn``'s affine and running statistics (so eval is ``bn`` until the first
        training batch) and an empty memory (``num_batches_tracked`` 0)."""
        momentum = bn.momentum if momentum is None else momentum
        layer = cls(bn.num_features, num_domains, bn.eps, momentum, bn.affine, domain_affine, window)
        copy_batchnorm_state(layer, bn)
        layer.num_batches_tracked.zero_()
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        if not self.training:
            return super()._chunk(x, d)  # normalises with running_*, the memorised pool
        check_domain(self, d)
        xf = as_float(x)
        mu, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3), unbiased=False)
        stored = min(int(self.num_batches_tracked[d]), self.window)
        refresh = self.refresh and stored > 0  # slot 0 holds this very batch, seen before the optimizer step
        start = 1 if refresh else 0
        past = slice(start, start + min(stored - start, self.window - 1))
        mean_all = torch.cat([mu[None], self.memory_mean[d, past].to(mu.dtype)])
        var_all = torch.cat([var[None], self.memory_var[d, past].to(var.dtype)])
        mean, pooled_var = pool(mean_all, var_all)
        with torch.no_grad():
            if not refresh:
                self.memory_mean[d] = self.memory_mean[d].roll(1, 0)
                self.memory_var[d] = self.memory_var[d].roll(1, 0)
                self.num_batches_tracked[d] += 1
            self.memory_mean[d, 0] = mu.detach()
            self.memory_var[d, 0] = var.detach()
            n = min(int(self.num_batches_tracked[d]), self.window)
            m, v = pool(self.memory_mean[d, :n], self.memory_var[d, :n])
            self.running_mean[d], self.running_var[d] = m, v
        weight, bias = self._affine(d)
        return scale_shift(x, mean, pooled_var, self.eps, weight, bias)


@torch.no_grad()
def double_forward(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """MBN's Double-Forward: after the optimizer step, forward the same batch (same routing arguments) again
    without gradient, in training mode; each MBN layer replaces its newest memorised statistics by those
    computed with the updated weights."""
    layers = [m for m in model.modules() if isinstance(m, MemorizedBatchNorm2d)]
    for layer in layers:
        layer.refresh = True
    try:
        model(*args, **kwargs)
    finally:
        for layer in layers:
            layer.refresh = False
