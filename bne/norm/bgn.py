"""Batch Group Normalization (Zhou et al., arXiv 2012.02782), one set of running statistics per domain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bne.norm.common import (
    check_domain,
    copy_batchnorm_state,
    fit_groups,
    step_factor,
    update_running,
)
from bne.norm.dsbn import MEAN_DOMAIN, DomainBatchNorm2d


class BatchGroupNorm2d(DomainBatchNorm2d):
    """BGN (docs/NORMS.md): ``x (N,C,H,W) -> (N, G, C*H*W/G)``; ``mu_g = mean_{n,m} x[n,g,m]``, ``var_g``
    likewise; normalise, reshape back, per-channel affine. With ``G = C`` it is BatchNorm2d.

    ``group_mean``/``group_var`` (S, G) are the running group statistics used in eval; ``running_mean``/
    ``running_var`` (S, C) track the per-channel statistics of the input for the BNE embedding.
    ``groups`` that does not divide C is replaced by gcd(C, groups).
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
        groups: int = 32,
    ) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        self.groups = fit_groups(num_features, groups)
        self.register_buffer("group_mean", torch.zeros(num_domains, self.groups))
        self.register_buffer("group_var", torch.ones(num_domains, self.groups))

    @classmethod
    def from_batchnorm(
        cls,
        bn: nn.BatchNorm2d,
        num_domains: int,
        momentum: float | None = None,
        domain_affine: bool = False,
        groups: int = 32,
    ) -> BatchGroupNorm2d:
        """Every domain starts from ``bn``'s affine and channel statistics; the group statistics are pooled
        from them (``mu_g = mean_c mu_c``, ``var_g = mean_c (var_c + mu_c^2) - mu_g^2`` over the group's channels).
        """
        momentum = bn.momentum if momentum is None else momentum
        layer = cls(bn.num_features, num_domains, bn.eps, momentum, bn.affine, domain_affine, groups)
        copy_batchnorm_state(layer, bn)
        with torch.no_grad():
            mu = layer.running_mean.view(num_domains, layer.groups, -1)
            sq = layer.running_var.view(num_domains, layer.groups, -1) + mu**2
            layer.group_mean.copy_(mu.mean(2))
            layer.group_var.copy_(sq.mean(2) - mu.mean(2) ** 2)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        check_domain(self, d)
        weight, bias = self._affine(d)
        if d == MEAN_DOMAIN:
            mean, var, factor = self.group_mean.mean(0), self.group_var.mean(0), 0.0
        else:
            mean, var = self.group_mean[d], self.group_var[d]  # views: batch_norm updates domain d in place
            factor = step_factor(self, d) if self.training else 0.0
            if self.training:
                update_running(self, d, x, factor)
        n, c, h, w = x.shape
        # (N, G, C*H*W/G): batch_norm's per-"channel" statistics over (N, L) are the group statistics.
        y = F.batch_norm(x.reshape(n, self.groups, -1), mean, var, None, None, self.training, factor, self.eps)
        y = y.view(n, c, h, w)
        if weight is not None:
            y = y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        return y
