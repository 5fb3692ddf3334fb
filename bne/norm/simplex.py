"""Simplex batch normalization (issue 19, variant 3): training with mixtures of the step's per-domain statistics.

Not in the literature as far as we know. The S per-domain statistics of a training step are the vertices of a
simplex: BNE normalizes each domain's chunk at its own vertex, DeepAll near the centre (the mixed batch). Here each
chunk is normalized with a random point of the simplex: the mixture of the step's per-domain batch statistics
with Dirichlet(concentration) weights, its own domain left out with probability ``leave_out``, so the network
learns to classify images normalized with statistics that are not their domain's, as an unseen domain's are.
The running statistics stay each domain's own (BNE's branches and embedding); at inference the per-image mixture
of :mod:`bne.mixing` (``mixstats``) is the matching use.
"""

from __future__ import annotations

import torch

from bne.norm.common import as_float, scale_shift, step_factor
from bne.norm.dsbn import _ROUTE, DomainBatchNorm2d, update_running_stats


def _check(concentration: float, leave_out: float) -> None:
    if concentration <= 0 or not 0 <= leave_out <= 1:
        raise ValueError(f"simplex BN: concentration {concentration} must be > 0 and leave_out {leave_out} in [0, 1]")


class SimplexBatchNorm2d(DomainBatchNorm2d):
    """DSBN whose training forward normalizes chunk k with ``sum_j w_kj N(mu_j, var_j)`` (mean sum w mu, variance
    sum w (var + mu^2) - mean^2) over the step's chunks j, ``w_k ~ Dirichlet(concentration)`` over the chunks,
    chunk k itself excluded with probability ``leave_out`` (with one chunk: ordinary BN). Eval mode: DSBN."""

    distributed_sync = False  # the mixture is drawn per process: refuses torchrun (dsbn)

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, domain_affine: bool = False, concentration: float = 1.0, leave_out: float = 0.5) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        _check(concentration, leave_out)
        self.concentration = concentration
        self.leave_out = leave_out

    @classmethod
    def from_batchnorm(cls, bn, num_domains: int, momentum: float | None = None, domain_affine: bool = False,
                       concentration: float = 1.0, leave_out: float = 0.5) -> SimplexBatchNorm2d:
        _check(concentration, leave_out)
        layer = super().from_batchnorm(bn, num_domains, momentum, domain_affine)
        layer.concentration, layer.leave_out = concentration, leave_out
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, concentration={self.concentration}, leave_out={self.leave_out}"

    def mixing_weights(self, k: int, device: torch.device) -> torch.Tensor:
        """(k, k) rows of Dirichlet weights over the step's chunks; row i's own entry dropped w.p. ``leave_out``."""
        # Dirichlet = Gammas normalized; dropping coordinates first gives the Dirichlet of the rest (global RNG: seeded)
        gam = torch.distributions.Gamma(torch.full((k, k), float(self.concentration)), torch.ones(k, k)).sample()
        drop = torch.arange(k)[torch.rand(k) < self.leave_out]
        gam[drop, drop] = 0
        return (gam / gam.sum(1, keepdim=True)).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = _ROUTE.get()
        if not self.training or route is None or len(route.sizes) < 2:
            return super().forward(x)
        if sum(route.sizes) != x.shape[0]:
            raise ValueError(f"domain route covers {sum(route.sizes)} samples but the batch has {x.shape[0]}")
        if route.recorder is not None:
            route.recorder(self, x)
        chunks = x.split(list(route.sizes))
        stats = [torch.var_mean(as_float(c), (0, 2, 3), correction=0) for c in chunks]
        var = torch.stack([v for v, _ in stats])  # (K, C), differentiable: the mixture's gradient flows as BN's
        mean = torch.stack([m for _, m in stats])
        with torch.no_grad():  # each domain's running statistics from its own chunk, as DSBN
            for c, d, m, v in zip(chunks, route.domains, mean, var):
                count = torch.tensor(float(c.numel() // c.shape[1]), device=x.device)
                update_running_stats(self.running_mean[d], self.running_var[d], m, v, count, step_factor(self, d))
        w = self.mixing_weights(len(chunks), x.device).to(mean.dtype)
        mix_mean = w @ mean
        mix_var = (w @ (var + mean * mean) - mix_mean * mix_mean).clamp_min(0)
        out = []
        for k, (c, d) in enumerate(zip(chunks, route.domains)):
            weight, bias = self._affine(d)
            out.append(scale_shift(c, mix_mean[k], mix_var[k], self.eps, weight, bias))
        return torch.cat(out)
