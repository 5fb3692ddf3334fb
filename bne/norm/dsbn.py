"""Domain-specific batch normalization: one set of running statistics per source domain.

The domain of every sample is passed explicitly with each forward call of the network
(:func:`domain_route`, used by :class:`bne.model.DGNet`); nothing is remembered between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Domain index meaning "the average of all domains' running statistics" (a one-pass pseudo-branch).
MEAN_DOMAIN = -1

Recorder = Callable[["DomainBatchNorm2d", torch.Tensor], None]


@dataclass(frozen=True)
class DomainRoute:
    """Contiguous chunks of a batch: chunk i has ``sizes[i]`` samples of domain ``domains[i]``."""

    domains: tuple[int, ...]
    sizes: tuple[int, ...]
    recorder: Recorder | None = None


_ROUTE: ContextVar[DomainRoute | None] = ContextVar("bne_domain_route", default=None)


@contextmanager
def domain_route(
    domains: Sequence[int], sizes: Sequence[int], recorder: Recorder | None = None
) -> Iterator[DomainRoute]:
    """Route the chunks of the batches forwarded inside this block to their domains."""
    if len(domains) != len(sizes):
        raise ValueError(f"domains {list(domains)} and sizes {list(sizes)} differ in length")
    route = DomainRoute(tuple(int(d) for d in domains), tuple(int(s) for s in sizes), recorder)
    token = _ROUTE.set(route)
    try:
        yield route
    finally:
        _ROUTE.reset(token)


class DomainBatchNorm2d(nn.Module):
    """BatchNorm2d with ``num_domains`` sets of running statistics (and optionally of affine parameters).

    Train mode: each chunk normalizes with its own batch statistics and updates only its domain's
    running statistics. Eval mode: a chunk of domain d uses domain d's running statistics.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        domain_affine: bool = False,
    ) -> None:
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_features = num_features
        self.num_domains = num_domains
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.domain_affine = domain_affine
        shape = (num_domains, num_features) if domain_affine else (num_features,)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_domains, dtype=torch.long))
        self.layer_index = -1  # position among the network's normalization layers, set on conversion
        self.layer_name = ""

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_domains: int, momentum: float | None = None, domain_affine: bool = False
    ) -> DomainBatchNorm2d:
        """A domain-specific copy of ``bn``: every domain starts from its statistics and affine parameters."""
        layer = cls(
            bn.num_features,
            num_domains,
            eps=bn.eps,
            momentum=bn.momentum if momentum is None else momentum,
            affine=bn.affine,
            domain_affine=domain_affine,
        )
        layer = layer.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            layer.running_mean.copy_(bn.running_mean.expand_as(layer.running_mean))
            layer.running_var.copy_(bn.running_var.expand_as(layer.running_var))
            layer.num_batches_tracked.fill_(int(bn.num_batches_tracked))
            if bn.affine:
                layer.weight.copy_(bn.weight.expand_as(layer.weight))
                layer.bias.copy_(bn.bias.expand_as(layer.bias))
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, domains={self.num_domains}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, domain_affine={self.domain_affine}"
        )

    def _affine(self, d: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.affine or not self.domain_affine:
            return self.weight, self.bias
        if d == MEAN_DOMAIN:
            return self.weight.mean(0), self.bias.mean(0)
        return self.weight[d], self.bias[d]

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        weight, bias = self._affine(d)
        if d == MEAN_DOMAIN:
            if self.training:
                raise ValueError("the mean-statistics pseudo-domain exists only in eval mode")
            mean, var = self.running_mean.mean(0), self.running_var.mean(0)
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if not 0 <= d < self.num_domains:
            raise ValueError(f"{self.layer_name or 'DomainBatchNorm2d'}: domain {d} not in 0..{self.num_domains - 1}")
        factor = 0.0
        if self.training:
            self.num_batches_tracked[d] += 1
            factor = 1.0 / float(self.num_batches_tracked[d]) if self.momentum is None else self.momentum
        # Indexing a row gives a view, so batch_norm updates domain d's running statistics in place.
        return F.batch_norm(
            x, self.running_mean[d], self.running_var[d], weight, bias, self.training, factor, self.eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = _ROUTE.get()
        if route is None:
            raise RuntimeError(
                "DomainBatchNorm2d needs the samples' domains: call the network as model(x, domains=...)"
            )
        if sum(route.sizes) != x.shape[0]:
            raise ValueError(f"domain route covers {sum(route.sizes)} samples but the batch has {x.shape[0]}")
        if route.recorder is not None:
            route.recorder(self, x)
        if len(route.sizes) == 1:
            return self._chunk(x, route.domains[0])
        chunks = x.split(list(route.sizes))
        return torch.cat([self._chunk(c, d) for c, d in zip(chunks, route.domains)])


def domain_norm_layers(model: nn.Module) -> list[DomainBatchNorm2d]:
    """The domain-specific normalization layers of ``model`` in forward-definition order."""
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
