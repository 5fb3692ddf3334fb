"""Statistics mixing at inference (bne/mixing.py): each variant reduces to an ordinary forward where it should."""

import numpy as np
import pytest
import torch
from conftest import spec

from bne.mixing import (
    alpha_branch_probs,
    alpha_fn,
    mixed_probs,
    mixstats_fn,
    mixture,
    normalize_with,
    plain_norm_layers,
    pooled_fn,
)
from bne.model import DGNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bne_model():
    torch.manual_seed(0)
    model = DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b", "c")))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for d in (0, 1, 2):  # branches with clearly different statistics
                model(torch.rand(8, 3, 32, 32) * (0.3 + 0.5 * d) + 0.1 * d, domains=d)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return (np.random.default_rng(0).random((10, 32, 32, 3)) * 255).astype(np.uint8)


def to_x(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def branch_probs(model, images, d):
    with torch.no_grad():
        return torch.softmax(model(to_x(images), domains=d), -1)


def test_mixture_of_two_gaussians():
    m, v = mixture(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    torch.testing.assert_close(m, torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(v, torch.tensor([[2.0], [1.0]]))  # between-domain variance 1 added; a vertex is itself


def test_alpha_zero_is_the_branch_and_the_block_restores_the_layers(bne_model, images):
    for d in (0, 1, 2):
        got = alpha_branch_probs(bne_model, images, 4, CPU, alpha=0.0, early=5)[d]
        torch.testing.assert_close(got, branch_probs(bne_model, images, d), rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(m) for m in plain_norm_layers(bne_model))
    with pytest.raises(RuntimeError, match="boom"):
        with normalize_with(bne_model, alpha_fn(plain_norm_layers(bne_model), 0, 0.0, 0)):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in plain_norm_layers(bne_model))


def test_alpha_changes_only_what_it_should(bne_model, images):
    x = alpha_branch_probs(bne_model, images, 4, CPU, alpha=0.5, early=3)
    assert not torch.allclose(x[1], branch_probs(bne_model, images, 1), atol=1e-4)
    torch.testing.assert_close(x.sum(-1), torch.ones(3, len(images)))


def test_mixstats_and_pooled_with_one_allowed_domain_are_that_branch(bne_model, images):
    for d in (0, 2):  # all but domain d left out of the mixture, for every image
        own = np.full(len(images), d)
        only_d = lambda layers, allowed, f: f(layers, ~allowed)  # noqa: E731 - allowed = just d
        for fn in (lambda L, a: mixstats_fn(L, 1.0, a), pooled_fn):
            got = mixed_probs(bne_model, images, 4, CPU, lambda L, a, f=fn: only_d(L, a, f), own=own)
            torch.testing.assert_close(got, branch_probs(bne_model, images, d), rtol=1e-4, atol=1e-5)


def test_mixstats_weights_follow_the_nearest_domain(bne_model):
    """An image drawn like domain 2's training batches is normalized mostly with domain 2's statistics."""
    layers = plain_norm_layers(bne_model)
    seen = {}

    def spy(i, x, fn=mixstats_fn(layers, 4.0)):
        m, v = fn(i, x)
        seen[i] = m
        return m, v

    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32) * 1.3 + 0.2
    with torch.no_grad(), normalize_with(bne_model, spy):
        bne_model(x, domains=0)
    last = len(layers) - 1
    own = layers[last].running_mean.float()
    err = [(seen[last] - own[d]).abs().mean().item() for d in range(3)]
    assert err[2] < err[0] and err[2] < err[1]


def test_pooled_on_deepall_is_its_ordinary_forward(images):
    torch.manual_seed(0)
    deep = DGNet(spec(backbone="resnet18", weights="none", num_classes=3)).eval()
    got = mixed_probs(deep, images, 4, CPU, pooled_fn)
    with torch.no_grad():
        want = torch.softmax(deep(to_x(images)), -1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alpha_branch_probs(deep, images, 4, CPU, 0.0, 5)[0], want, rtol=1e-4, atol=1e-5)


def test_refuses_layers_that_cannot_mix():
    with pytest.raises(ValueError, match="plain BN layers"):
        plain_norm_layers(DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), norm="cbn")))
    with pytest.raises(ValueError, match="domain_affine"):
        plain_norm_layers(DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), domain_affine=True)))


def test_mixing_keeps_shared_layers_as_trained(images):
    """With model.domain_layers = k the shared layers keep their own statistics: one allowed domain is that branch."""
    torch.manual_seed(0)
    model = DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), domain_layers=2))
    model.train()
    with torch.no_grad():
        model(torch.cat([torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32) * 2]), domains=[0, 1])
    model.eval()
    own = np.zeros(len(images), dtype=np.int64)
    for fn in (lambda L, a: mixstats_fn(L, 1.0, ~a), lambda L, a: pooled_fn(L, ~a)):  # only domain 0 allowed
        torch.testing.assert_close(mixed_probs(model, images, 4, CPU, fn, own=own), branch_probs(model, images, 0),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alpha_branch_probs(model, images, 4, CPU, 0.0, 3)[1], branch_probs(model, images, 1),
                               rtol=1e-4, atol=1e-5)
