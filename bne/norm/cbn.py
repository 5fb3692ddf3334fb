"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), with a memory of past iterations per domain."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from torch import nn

from bne.norm.common import as_float, check_domain, copy_batchnorm_state, scale_shift, step_factor, update_running
from bne.norm.dsbn import DomainBatchNorm2d


class _Past(NamedTuple):
    """One past iteration: statistics, their gradients w.r.t. the source weights, and those weights."""

    mu: torch.Tensor  # (C,)
    nu: torch.Tensor  # (C,) = E[x^2]
    dmu: torch.Tensor  # like the source weight; row c is d mu_c / d theta_c
    dnu: torch.Tensor
    theta: torch.Tensor


class CrossIterationBatchNorm2d(DomainBatchNorm2d):
    """CBN (docs/NORMS.md): statistics averaged over the current and the last ``window - 1`` iterations of
    the same domain, old ones compensated to the current weights ``theta`` of the layer feeding the BN by
    ``mu_{t-tau}(theta_t) ~ mu_{t-tau} + dmu/dtheta . (theta_t - theta_{t-tau})`` (same for ``nu = E[x^2]``);
    each term uses ``max(nu, mu^2)``; ``var = nu_bar - mu_bar^2``.

    The feeding layer is ``source`` (a Conv2d, attached by :meth:`from_batchnorm`; not a submodule). Without
    it, without gradients (frozen source, no-grad passes), during the first ``burnin`` iterations of a domain
    or with ``window == 1`` the layer is exactly DomainBatchNorm2d. Running statistics (eval, embedding)
    follow the uncompensated current batch as in BN. The memory of past iterations is transient (not in the
    state dict): a resumed run refills it.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        domain_affine: bool = False,
        window: int = 4,
        burnin: int = 0,
    ) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        if window < 1 or burnin < 0:
            raise ValueError(f"CBN needs window >= 1 and burnin >= 0, got {window}, {burnin}")
        self.window = window
        self.burnin = burnin
        self.register_buffer("iterations", torch.zeros(num_domains, dtype=torch.long))  # for the burn-in
        self.memory: list[deque[_Past]] = [deque(maxlen=window - 1) for _ in range(num_domains)]
        self.set_source(None)

    def set_source(self, conv: nn.Module | None) -> None:
        """The layer whose ``weight`` feeds this one (kept out of the module tree and the state dict)."""
        object.__setattr__(self, "source", conv)

    @classmethod
    def from_batchnorm(
        cls,
        bn: nn.BatchNorm2d,
        num_domains: int,
        momentum: float | None = None,
        domain_affine: bool = False,
        window: int = 4,
        burnin: int = 0,
        source: nn.Module | None = None,
    ) -> CrossIterationBatchNorm2d:
        """Every domain starts from ``bn``'s running statistics and affine parameters, with an empty memory."""
        momentum = bn.momentum if momentum is None else momentum
        layer = cls(bn.num_features, num_domains, bn.eps, momentum, bn.affine, domain_affine, window, burnin)
        layer.set_source(source)
        return copy_batchnorm_state(layer, bn)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}"

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        check_domain(self, d)
        theta = getattr(self.source, "weight", None)
        if not (
            self.training and self.window > 1 and theta is not None and theta.requires_grad
            and torch.is_grad_enabled() and x.requires_grad
        ):
            return super()._chunk(x, d)
        self.iterations[d] += 1
        if self.iterations[d] <= self.burnin:
            return super()._chunk(x, d)
        xf = as_float(x)
        mu, nu = xf.mean((0, 2, 3)), (xf * xf).mean((0, 2, 3))
        # mu_c and nu_c depend on theta only through row c, so the gradient of their sums gives every row.
        dmu, dnu = (torch.autograd.grad(s.sum(), theta, retain_graph=True, allow_unused=True)[0] for s in (mu, nu))
        if dmu is None or dnu is None:  # x does not depend on the source weights: nothing to compensate
            return super()._chunk(x, d)
        now = theta.detach()
        mus, nus = [mu], [nu]
        for past in self.memory[d]:
            mus.append(past.mu + (past.dmu * (now - past.theta)).flatten(1).sum(1).to(mu.dtype))
            nus.append(past.nu + (past.dnu * (now - past.theta)).flatten(1).sum(1).to(nu.dtype))
        mus_t, nus_t = torch.stack(mus), torch.stack(nus)
        nus_t = torch.maximum(nus_t, mus_t**2)
        mean = mus_t.mean(0)
        var = (nus_t.mean(0) - mean**2).clamp_min(0)
        update_running(self, d, x, step_factor(self, d))
        self.memory[d].appendleft(_Past(mu.detach(), nu.detach(), dmu.detach(), dnu.detach(), now.clone()))
        weight, bias = self._affine(d)
        return scale_shift(x, mean, var, self.eps, weight, bias)
