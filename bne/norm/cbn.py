"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), with a memory of past iterations per domain."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from torch import nn

from bne.norm.common import (
    as_float,
    check_domain,
    copy_batchnorm_state,
    scale_shift,
    step_factor,
    update_running,
)
from bne.norm.dsbn import DomainBatchNorm2d


def _conv_padding(conv: nn.Module) -> nn.Module | None:
    """The padding ``conv`` applies before ``F.conv2d`` with its own stride, padding, dilation and groups, for a
    zero-padded ``nn.Conv2d`` or Lite0's ``Conv2dStaticSamePadding`` (``static_padding`` then ``F.conv2d``);
    None for anything else (whose weight gradient is left to autograd)."""
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if type(conv).forward is nn.Conv2d.forward:
        return nn.Identity()
    pad = getattr(conv, "static_padding", None)
    if type(conv).__name__ == "Conv2dStaticSamePadding" and (
        isinstance(pad, (nn.ZeroPad2d, nn.Identity)) or type(pad).__name__ == "Identity"  # the package's own
    ):
        return pad
    return None


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

    The gradients ``dmu``, ``dnu`` of a domain's chunk: when this layer's input is the very output of
    ``source`` (a zero-padded Conv2d, or Lite0's static-same-padding one) they are the conv's weight gradient
    on that chunk's own input (``torch.nn.grad.conv2d_weight``), so S domains cost one batch of weight
    gradients; otherwise (and with ``fast_grads = False``) autograd, which backpropagates through the whole
    batch once per domain. The two agree to rounding (tests/test_norms.py).
    """

    distributed_sync = False  # its statistics are not synchronized across processes: refuses torchrun (dsbn)

    fast_grads: bool = True

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
        """The layer whose ``weight`` feeds this one (kept out of the module tree and the state dict).

        A forward hook on it keeps its last input and output while training with gradients (references to
        tensors autograd keeps anyway; dropped when this layer's forward ends)."""
        hook = self.__dict__.get("_source_hook")
        if hook is not None:
            hook.remove()
        object.__setattr__(self, "source", conv)
        object.__setattr__(self, "_source_io", None)
        object.__setattr__(self, "_source_hook", None if conv is None else conv.register_forward_hook(self._keep_source_io))

    def _keep_source_io(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        keep = (
            self.training and torch.is_grad_enabled() and bool(inputs) and isinstance(output, torch.Tensor)
            and output.requires_grad and _conv_padding(module) is not None
        )
        # the input's version counter: after an in-place change the gradients are autograd's (which refuses it)
        object.__setattr__(self, "_source_io", (inputs[0], output, inputs[0]._version) if keep else None)

    def __getstate__(self) -> dict:
        """Copies and pickles hold no activations (the kept conv input and output belong to one forward)."""
        return {**super().__getstate__(), "_source_io": None, "_chunk_io": None}

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        io = self._source_io
        # the chunks' offsets into the source's input, valid only if x is the source's output itself
        valid = io is not None and io[1] is x and io[0]._version == io[2]
        object.__setattr__(self, "_chunk_io", (io[0], 0) if valid else None)
        try:
            return super().forward(x)
        finally:
            object.__setattr__(self, "_source_io", None)
            object.__setattr__(self, "_chunk_io", None)

    def _next_chunk_input(self, n: int) -> torch.Tensor | None:
        """The source's input rows of the next ``n``-sample chunk (chunks come in batch order), if known."""
        io = self._chunk_io
        if io is None:
            return None
        src_in, start = io
        object.__setattr__(self, "_chunk_io", (src_in, start + n))
        return src_in[start : start + n]

    def _stat_grads(self, xf: torch.Tensor, src_in: torch.Tensor | None, theta: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor):
        """d mu / d theta and d nu / d theta of this chunk (row c: output channel c); None if x ignores theta."""
        if self.fast_grads and src_in is not None:
            src = self.source
            with torch.no_grad():
                xin = as_float(_conv_padding(src)(src_in.detach()))
                y = xf.detach()
                m = y.numel() // y.shape[1]
                args = (src.stride, src.padding, src.dilation, src.groups)
                dmu = torch.nn.grad.conv2d_weight(xin, theta.shape, torch.full_like(y, 1.0 / m), *args)
                dnu = torch.nn.grad.conv2d_weight(xin, theta.shape, y * (2.0 / m), *args)
            return dmu, dnu
        # mu_c and nu_c depend on theta only through row c, so the gradient of their sums gives every row.
        dmu, dnu = (torch.autograd.grad(s.sum(), theta, retain_graph=True, allow_unused=True)[0] for s in (mu, nu))
        return (None, None) if dmu is None or dnu is None else (dmu, dnu)

    def _chunk(self, x: torch.Tensor, d: int) -> torch.Tensor:
        check_domain(self, d)
        src_in = self._next_chunk_input(x.shape[0])
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
        dmu, dnu = self._stat_grads(xf, src_in, theta, mu, nu)
        if dmu is None:  # x does not depend on the source weights: nothing to compensate
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
