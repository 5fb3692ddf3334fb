"""Simplex BN (bne/norm/simplex.py): each chunk normalized with a Dirichlet mixture of the step's domain statistics."""

import pytest
import torch
from torch import nn

from bne.norm.dsbn import DomainBatchNorm2d, domain_route
from bne.norm.simplex import SimplexBatchNorm2d


def pair(**kw):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return SimplexBatchNorm2d.from_batchnorm(bn, 3, **kw), DomainBatchNorm2d.from_batchnorm(bn, 3)


def chunks():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(4, 4, 5, 5, generator=g) * (1 + d) + 2 * d for d in range(3)])


def test_eval_is_dsbn_and_running_stats_are_each_domains_own():
    simplex, dsbn = pair(concentration=1.0, leave_out=0.5)
    x = chunks()
    for layer in (simplex, dsbn):
        layer.train()
        with domain_route([0, 1, 2], [4, 4, 4]):
            layer(x)
    torch.testing.assert_close(simplex.running_mean, dsbn.running_mean)
    torch.testing.assert_close(simplex.running_var, dsbn.running_var)
    assert simplex.num_batches_tracked.tolist() == [1, 1, 1]
    simplex.eval(), dsbn.eval()
    with domain_route([2, 0], [6, 6]):
        torch.testing.assert_close(simplex(x), dsbn(x))


def test_own_domain_left_out_normalizes_with_the_other_vertex():
    """Two chunks, own domain always left out: chunk 0 is normalized with chunk 1's batch statistics and vice versa."""
    layer, _ = pair(concentration=1.0, leave_out=1.0)
    layer.train()
    x = chunks()[:8]
    with domain_route([0, 1], [4, 4]):
        y = layer(x)
    a, b = x[:4], x[4:]
    for out, src, other in ((y[:4], a, b), (y[4:], b, a)):
        var, mean = torch.var_mean(other, (0, 2, 3), correction=0)
        want = (src - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
        torch.testing.assert_close(out, want * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))


def test_mixture_weights_are_dirichlet_rows_and_gradients_flow():
    layer, _ = pair(concentration=1.0, leave_out=0.5)
    torch.manual_seed(3)
    w = torch.stack([layer.mixing_weights(3, torch.device("cpu")) for _ in range(2000)])
    torch.testing.assert_close(w.sum(-1), torch.ones(2000, 3))
    own = w[:, torch.arange(3), torch.arange(3)]
    assert 0.4 < float((own == 0).float().mean()) < 0.6  # left out about half the time
    assert 0.2 < float(w.mean()) < 0.45 and float(own[own > 0].mean()) == pytest.approx(1 / 3, abs=0.05)
    layer.train()
    x = chunks().requires_grad_()
    with domain_route([0, 1, 2], [4, 4, 4]):
        layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and layer.weight.grad is not None


def test_one_chunk_is_ordinary_batchnorm():
    layer, _ = pair()
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach(), "running_mean": layer.running_mean[0],
                        "running_var": layer.running_var[0], "num_batches_tracked": torch.tensor(0)})
    layer.train(), bn.train()
    x = chunks()[:4]
    with domain_route([0], [4]):
        torch.testing.assert_close(layer(x), bn(x))
    with pytest.raises(ValueError, match="leave_out"):
        SimplexBatchNorm2d(4, 2, leave_out=1.5)
