"""Domain-specific batch normalization: one set of running statistics per source domain.

The domain of every sample is passed explicitly with each forward call of the network
(:func:`domain_route`, used by :class:`bne.model.DGNet`); nothing is remembered between calls.

Under ``torch.distributed`` with more than one process (``torchrun``), training mode synchronizes each chunk's
batch statistics across the processes (:func:`sync_chunk_stats`): every rank holds its share of every domain's
sub-batch, and each chunk is normalized with the mean and variance of the union of the ranks' chunks, as one
process holding the whole batch would. :class:`SyncBatchNorm2d` does the same for an ordinary BatchNorm2d
(DeepAll), so both methods use the same synchronization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


def world_size() -> int:
    """Processes of the default ``torch.distributed`` group; 1 when it is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SyncChunkStats(torch.autograd.Function):
    """Per-chunk batch mean and biased variance over the union of every rank's chunk of the same position.

    Forward: each rank's count, mean and sum of squared deviations per chunk and channel (two-pass, at least
    float32) are gathered, and every rank combines them in rank order (Chan et al.'s pairwise formula), so the
    results are bitwise the same on every rank. Backward: the ranks' gradients with respect to the shared mean
    and variance are summed (one all-reduce per layer), and each rank applies d mean/dx = 1/N and
    d var/dx = 2 (x - mean)/N to its own samples: the gradient one process with the whole batch would compute.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]):  # noqa: ANN205
        xf = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        c = x.shape[1]
        local = []
        for part in xf.split(sizes):
            n = part.numel() // c
            if n:
                var, mean = torch.var_mean(part, (0, 2, 3), correction=0)
            else:  # an empty share: no weight in the pooled statistics
                var = mean = xf.new_zeros(c)
            local.append(torch.cat([mean.new_full((1,), n), mean, var * n]))
        local = torch.stack(local)  # (K, 1 + 2C): count, mean, M2
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.contiguous())
        g = torch.stack(gathered)  # (W, K, 1 + 2C), rank order on every rank
        n, means, m2s = g[..., :1], g[..., 1 : c + 1], g[..., c + 1 :]
        count = n.sum(0)  # (K, 1)
        mean = (n * means).sum(0) / count
        var = (m2s + n * (means - mean).square()).sum(0) / count
        ctx.sizes = sizes
        ctx.save_for_backward(x, mean, count)
        ctx.mark_non_differentiable(count)
        return mean, var, count

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None, _grad_count):  # noqa: ANN205
        x, mean, count = ctx.saved_tensors
        xf = x.detach().to(mean.dtype)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        total = torch.cat([grad_mean, grad_var], 1).contiguous()
        dist.all_reduce(total)  # sum over ranks: every rank's loss depends on the shared statistics
        c = mean.shape[1]
        gm, gv = (total[:, :c] / count), (total[:, c:] * (2 / count))
        parts = [
            gm[k].view(1, -1, 1, 1) + gv[k].view(1, -1, 1, 1) * (p - mean[k].view(1, -1, 1, 1))
            for k, p in enumerate(xf.split(ctx.sizes))
        ]
        dx = parts[0] if len(parts) == 1 else torch.cat(parts)
        return dx.to(x.dtype), None


def sync_chunk_stats(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, count), each (K, C) / (K, 1), of the K chunks of ``x`` (``sizes`` along the batch)
    pooled over every rank of the default process group, differentiable in ``x`` (see :class:`_SyncChunkStats`).
    Every rank must call it with the same number of chunks, in the same order."""
    return _SyncChunkStats.apply(x, [int(s) for s in sizes])


def scale_shift(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, differentiable in mean and var, in ``x``'s dtype."""
    out = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + eps).view(1, -1, 1, 1)
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.to(x.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor,
    factor: float,
) -> None:
    """BatchNorm's running update (in place) from synchronized statistics: the variance made unbiased with the
    pooled count, as BatchNorm2d does with its batch."""
    unbiased = var * (count / (count - 1).clamp_min(1))  # no host sync: count is a tensor
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


class DomainBatchNorm2d(nn.Module):
    """BatchNorm2d with ``num_domains`` sets of running statistics (and optionally of affine parameters).

    Train mode: each chunk normalizes with its own batch statistics and updates only its domain's
    running statistics. Eval mode: a chunk of domain d uses domain d's running statistics.

    Under ``torch.distributed`` (world size > 1), train mode normalizes each chunk with the statistics of that
    chunk pooled over every rank (:func:`sync_chunk_stats`); the running statistics are updated from the pooled
    statistics, identically on every rank. Subclasses that do not synchronize set ``distributed_sync = False``
    and refuse to train under several processes.
    """

    #: Whether this layer synchronizes its training statistics across processes (subclasses: False).
    distributed_sync = True

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
        if self.training and world_size() > 1:
            return self._sync_forward(x, route)
        if len(route.sizes) == 1:
            return self._chunk(x, route.domains[0])
        chunks = x.split(list(route.sizes))
        return torch.cat([self._chunk(c, d) for c, d in zip(chunks, route.domains)])


    def _sync_forward(self, x: torch.Tensor, route: DomainRoute) -> torch.Tensor:
        """Train mode under several processes: every chunk normalized with its statistics pooled over the ranks."""
        if not self.distributed_sync:
            raise RuntimeError(distributed_refusal(self))
        for d in route.domains:
            if d == MEAN_DOMAIN:
                raise ValueError("the mean-statistics pseudo-domain exists only in eval mode")
            if not 0 <= d < self.num_domains:
                raise ValueError(f"{self.layer_name or 'DomainBatchNorm2d'}: domain {d} not in 0..{self.num_domains - 1}")
        mean, var, count = sync_chunk_stats(x, route.sizes)
        out = []
        for k, (chunk, d) in enumerate(zip(x.split(list(route.sizes)), route.domains)):
            self.num_batches_tracked[d] += 1
            factor = 1.0 / float(self.num_batches_tracked[d]) if self.momentum is None else self.momentum
            update_running_stats(self.running_mean[d], self.running_var[d], mean[k], var[k], count[k], factor)
            weight, bias = self._affine(d)
            out.append(scale_shift(chunk, mean[k], var[k], self.eps, weight, bias))
        return out[0] if len(out) == 1 else torch.cat(out)


def distributed_refusal(layer: nn.Module) -> str:
    """Why ``layer`` cannot train under several processes (a layer whose statistics are not synchronized)."""
    name = getattr(layer, "layer_name", "") or ""
    return (
        f"{type(layer).__name__}{f' ({name})' if name else ''} does not synchronize its statistics across processes: "
        "train this norm on one process, or use model.norm: bn (DomainBatchNorm2d, synchronized) under torchrun"
    )


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are pooled over every rank (:func:`sync_chunk_stats`, one chunk).

    DeepAll's layers under several processes, on CPU (gloo) and CUDA alike: ``torch.nn.SyncBatchNorm`` refuses CPU
    input, and this keeps DeepAll's synchronization the same code as BNE's. One process, or eval mode: BatchNorm2d.
    The state dict is BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        mean, var, count = sync_chunk_stats(x, [x.shape[0]])
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            update_running_stats(self.running_mean, self.running_var, mean[0], var[0], count[0], factor)
        return scale_shift(x, mean[0], var[0], self.eps, self.weight, self.bias)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` (in place) by a :class:`SyncBatchNorm2d` sharing its
    parameters and buffers (the optimizer's parameters stay the same objects); returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d.__new__(SyncBatchNorm2d)
            sync.__dict__.update(child.__dict__)  # the same Parameter and buffer objects, hooks and flags
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def domain_norm_layers(model: nn.Module) -> list[DomainBatchNorm2d]:
    """The domain-specific normalization layers of ``model`` in forward-definition order."""
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
