"""Instance Enhancement Batch Normalization (Liang et al., AAAI 2020) with per-domain running statistics."""

from __future__ import annotations

import torch
from torch import nn

from bne.norm.common import copy_batchnorm_state, normalize, pick
from bne.norm.dsbn import DomainBatchNorm2d

#: The authors' initialisation of the recalibration: w = 0, b = -1 (so a = sigmoid(-1) ~ 0.269 everywhere).
INIT_WEIGHT, INIT_BIAS = 0.0, -1.0


class InstanceEnhancementBatchNorm2d(DomainBatchNorm2d):
    """IEBN (docs/NORMS.md): ``a_{n,c} = sigmoid(w_c * avgpool_hw(x)_{n,c} + b_c)``,
    ``y = BN_noaffine(x) * (gamma_c * a_{n,c}) + beta_c``, BN with domain d's statistics.

    ``ie_weight``/``ie_bias`` (w, b) are shared, or per domain like gamma/beta when ``domain_affine``.
    Fresh layers use the authors' init (w = 0, b = -1, gamma = 1, beta = 0): the recalibration is then
    the constant ``a = sigmoid(-1)``, i.e. BN with gamma = sigmoid(-1).
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
    ) -> None:
        super().__init__(num_features, num_domains, eps, momentum, affine, domain_affine)
        shape = (num_domains, num_features) if domain_affine else (num_features,)  # as gamma/beta
        self.ie_weight = nn.Parameter(torch.full(shape, INIT_WEIGHT))
        self.ie_bias = nn.Parameter(torch.full(shape, INIT_BIAS))

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_domains: int, momentum: float | None = None, domain_affine: bool = False
    ) -> InstanceEnhancementBatchNorm2d:
        """Every domain starts from ``bn``'s statistics and affine, keeping the pretrained function exactly:
        w = 0, b = -1 (the authors' init) and ``gamma = gamma_bn / sigmoid(-1)``, so ``gamma * a = gamma_bn``
        while the sigmoid works at the authors' operating point (not saturated, unlike a large b)."""
        if not bn.affine:
            raise ValueError("IEBN recalibrates gamma: it needs an affine BatchNorm2d")
        momentum = bn.momentum if momentum is None else momentum
        layer = copy_batchnorm_state(cls(bn.num_features, num_domains, bn.eps, momentum, True, domain_affine), bn)
        with torch.no_grad():
            layer.weight.div_(torch.sigmoid(torch.tensor(INIT_BIAS, dtype=layer.weight.dtype)))
        return layer

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        y = normalize(self, x, d)
        a = torch.sigmoid(pick(self.ie_weight, d) * x.mean((2, 3)) + pick(self.ie_bias, d))  # (N, C)
        weight, bias = self._affine(d)
        if weight is not None:
            a = a * weight
        y = y * a[:, :, None, None]
        return y if bias is None else y + bias.view(1, -1, 1, 1)
