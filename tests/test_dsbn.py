import pytest
import torch
from torch import nn

from bne.norm.dsbn import MEAN_DOMAIN, DomainBatchNorm2d, domain_route


def _pair(momentum=0.1, affine=True):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn, DomainBatchNorm2d.from_batchnorm(bn, 1).double()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_domain_equals_batchnorm2d(momentum):
    bn, dsbn = _pair(momentum)
    for step in range(3):
        x = torch.randn(5, 6, 4, 3, dtype=torch.float64) * (step + 1) + step
        bn.train(), dsbn.train()
        with domain_route([0], [5]):
            torch.testing.assert_close(dsbn(x), bn(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(dsbn.running_mean[0], bn.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(dsbn.running_var[0], bn.running_var, rtol=0, atol=1e-12)
    bn.eval(), dsbn.eval()
    x = torch.randn(4, 6, 4, 3, dtype=torch.float64)
    with domain_route([0], [4]):
        torch.testing.assert_close(dsbn(x), bn(x), rtol=0, atol=1e-12)
    assert int(dsbn.num_batches_tracked[0]) == int(bn.num_batches_tracked) == 3


def test_gradients_match_batchnorm2d():
    bn, dsbn = _pair()
    x1 = torch.randn(5, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    bn(x1).pow(2).sum().backward()
    with domain_route([0], [5]):
        dsbn(x2).pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(dsbn.weight.grad, bn.weight.grad)


def test_sub_batch_updates_only_its_domain():
    layer = DomainBatchNorm2d(4, 3).double().train()
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) + 3
    with domain_route([1], [6]):
        layer(x)
    changed = (layer.running_mean != before[0]).any(1) | (layer.running_var != before[1]).any(1)
    assert changed.tolist() == [False, True, False]
    assert layer.num_batches_tracked.tolist() == [0, 1, 0]


def test_chunks_normalize_with_their_own_batch_statistics():
    layer = DomainBatchNorm2d(3, 2).double().train()
    a = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 5
    b = torch.randn(4, 3, 5, 5, dtype=torch.float64) - 2
    with domain_route([0, 1], [4, 4]):
        y = layer(torch.cat([a, b]))
    for part in (y[:4], y[4:]):  # each chunk is standardised on its own
        torch.testing.assert_close(part.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_eval_uses_each_domains_statistics():
    layer = DomainBatchNorm2d(3, 3, domain_affine=True).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(3, 3))
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with domain_route([0, 1, 2], [2, 2, 2]):
        out = layer(x.repeat(3, 1, 1, 1))
    for d in range(3):
        ref = nn.functional.batch_norm(x, layer.running_mean[d], layer.running_var[d], layer.weight[d], layer.bias[d], False, 0, layer.eps)
        torch.testing.assert_close(out[2 * d : 2 * d + 2], ref)
    with domain_route([MEAN_DOMAIN], [2]):
        ref = nn.functional.batch_norm(x, layer.running_mean.mean(0), layer.running_var.mean(0), layer.weight.mean(0), layer.bias.mean(0), False, 0, layer.eps)
        torch.testing.assert_close(layer(x), ref)


def test_errors_without_or_with_wrong_route():
    layer = DomainBatchNorm2d(3, 2)
    with pytest.raises(RuntimeError, match="domains"):
        layer(torch.randn(2, 3, 2, 2))
    with domain_route([0], [3]), pytest.raises(ValueError, match="covers 3 samples but the batch has 2"):
        layer(torch.randn(2, 3, 2, 2))
    with domain_route([5], [2]), pytest.raises(ValueError, match="domain 5"):
        layer(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError):
        DomainBatchNorm2d(3, 0)
