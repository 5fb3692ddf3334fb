"""Proxy Normalization after GroupNorm (Labatie et al., NeurIPS 2021): batch-independent, per-domain affine
optional, per-domain input statistics tracked for the BNE embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bne.norm.common import (
    check_domain,
    copy_batchnorm_state,
    fit_groups,
    pick,
    step_factor,
    update_running,
)
from bne.norm.dsbn import MEAN_DOMAIN, DomainBatchNorm2d

ACTIVATIONS = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6}
NUM_QUANTILES = 200


def normal_quantiles(n: int = NUM_QUANTILES) -> torch.Tensor:
    """The n fixed quantiles ``u_i = Phi^-1((i + 1/2) / n)`` of N(0, 1) (float64)."""
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)


class ProxyNorm2d(DomainBatchNorm2d):
    """GN without affine (``groups``, gcd with C) giving ``x_hat``, then Proxy Norm (docs/NORMS.md):
    ``z = (phi(gamma x_hat + beta) - E_Y[phi(gamma Y + beta)]) / sqrt(Var_Y[phi(gamma Y + beta)] + proxy_eps)``
    with the proxy ``Y_c = (1 + gamma~_c) u + beta~_c`` over the 200 fixed quantiles u of N(0, 1).

    ``phi`` is ``activation`` (identity, relu, relu6). No batch statistics are used: train and eval agree and
    ``running_mean``/``running_var`` only track the per-domain input statistics (as BN would, in training)
    for the BNE embedding. ``proxy_weight``/``proxy_bias`` (gamma~, beta~) have shape (1 or S, C): being
    2-D, the training loop's ``ndim > 1`` rule gives them weight decay, as the paper prescribes.
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
        activation: str = "relu",
        proxy_eps: float = 0.03,
    ) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}")
        self.groups = fit_groups(num_features, groups)
        self.activation = activation
        self.proxy_eps = proxy_eps
        rows = num_domains if domain_affine else 1
        self.proxy_weight = nn.Parameter(torch.zeros(rows, num_features))
        self.proxy_bias = nn.Parameter(torch.zeros(rows, num_features))
        self.register_buffer("quantiles", normal_quantiles(), persistent=False)  # fixed, not saved

    @classmethod
    def from_batchnorm(
        cls,
        bn: nn.BatchNorm2d,
        num_domains: int,
        momentum: float | None = None,
        domain_affine: bool = False,
        groups: int = 32,
        activation: str = "relu",
        proxy_eps: float = 0.03,
    ) -> ProxyNorm2d:
        """``bn``'s gamma/beta and running statistics (as the embedding's starting point) for every domain,
        gamma~ = beta~ = 0 (proxy N(0, 1)). The function is not BN's: GN normalises per sample."""
        momentum = bn.momentum if momentum is None else momentum
        layer = cls(bn.num_features, num_domains, bn.eps, momentum, bn.affine, domain_affine, groups, activation, proxy_eps)
        return copy_batchnorm_state(layer, bn)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, activation={self.activation}, proxy_eps={self.proxy_eps}"

    def _gamma_beta(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self._affine(d)
        ones = torch.ones(self.num_features, device=self.running_mean.device, dtype=self.proxy_weight.dtype)
        return (ones if weight is None else weight), (torch.zeros_like(ones) if bias is None else bias)

    def proxy_moments(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``E_Y[phi(gamma Y + beta)]`` and ``Var_Y[...]`` per channel, averaged over the quantiles of Y."""
        gamma, beta = self._gamma_beta(d)
        u = self.quantiles.to(self.proxy_weight.dtype)
        y = (1 + pick(self.proxy_weight, d))[:, None] * u + pick(self.proxy_bias, d)[:, None]  # (C, Q)
        z = ACTIVATIONS[self.activation](gamma[:, None] * y + beta[:, None])
        return z.mean(1), z.var(1, unbiased=False)

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        check_domain(self, d)
        if self.training and d != MEAN_DOMAIN:
            update_running(self, d, x, step_factor(self, d))
        gamma, beta = self._gamma_beta(d)
        x_hat = F.group_norm(x, self.groups, eps=self.eps)
        z = ACTIVATIONS[self.activation](x_hat * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))
        mean, var = self.proxy_moments(d)
        return ((z - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.proxy_eps).view(1, -1, 1, 1)).to(x.dtype)
