"""Shared pieces of the benchmarks."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bne.model import DGNet, ModelSpec
from bne.train import TrainConfig, build_optimizer


def train_throughput(method: str, resolution: int, freeze: int, per_domain: int = 16, steps: int = 4, domains: int = 3) -> float:
    """Training-step images/s (forward, backward, SGD step) of DeepAll or BNE on random inputs."""
    spec = ModelSpec(domains=tuple("abcdefgh"[:domains]) if method == "bne" else ())
    model = DGNet(spec).train()
    opt = build_optimizer(model, replace(TrainConfig(), freeze_stages=freeze))
    x, y = torch.rand(domains * per_domain, 3, resolution, resolution), torch.randint(0, 7, (domains * per_domain,))
    kw = {"domains": list(range(domains))} if method == "bne" else {}
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x, **kw), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * x.shape[0] / (time.perf_counter() - t0)
