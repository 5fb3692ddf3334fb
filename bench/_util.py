"""Shared pieces of the benchmarks."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bne.model import DGNet, ModelSpec
from bne.train import TrainConfig, build_optimizer


def train_step(method: str, resolution: int, freeze: int, per_domain: int = 16, domains: int = 3, norm: str = "bn",
               fast_grads: bool | None = None):
    """One training step (forward, backward, SGD step) of DeepAll or BNE with ``norm`` on a fixed random batch of
    ``domains`` x ``per_domain`` images, as ``bne.train`` takes it; returns a callable that runs it and returns the
    batch size. ``fast_grads`` sets CBN's gradient path (None: the layer's default)."""
    torch.manual_seed(0)
    spec = ModelSpec(domains=tuple("abcdefgh"[:domains]) if method == "bne" else (), norm=norm, cbn_burnin=0)
    model = DGNet(spec).train()
    if fast_grads is not None:
        for layer in model.norm_layers():
            layer.fast_grads = fast_grads
    opt = build_optimizer(model, replace(TrainConfig(), freeze_stages=freeze))
    x, y = torch.rand(domains * per_domain, 3, resolution, resolution), torch.randint(0, 7, (domains * per_domain,))
    kw = {"domains": list(range(domains))} if method == "bne" else {}

    def step(_round: int = 0) -> int:
        loss = F.cross_entropy(model(x, **kw), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return x.shape[0]

    return step


def train_throughput(method: str, resolution: int, freeze: int, per_domain: int = 16, steps: int = 4, domains: int = 3) -> float:
    """Training-step images/s (forward, backward, SGD step) of DeepAll or BNE on random inputs."""
    step = train_step(method, resolution, freeze, per_domain, domains)
    step()  # warm-up
    t0 = time.perf_counter()
    n = sum(step() for _ in range(steps))
    return n / (time.perf_counter() - t0)
