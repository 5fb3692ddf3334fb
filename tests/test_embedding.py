import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from bne.embedding import (
    distance_weights,
    gaussian_distance,
    layer_mean_matrix,
    layer_subset,
    per_layer_distances,
)


def w2_reference(m1, s1, m2, s2):
    """General 2-Wasserstein between Gaussians (matrix square roots), float64."""
    c1, c2 = np.diag(s1**2), np.diag(s2**2)
    r = sqrtm(c2)
    cross = sqrtm(r @ c1 @ r).real
    return np.sqrt(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross))


def test_w2_closed_form_zero_and_symmetry():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.2, 2, 8), rng.uniform(0.2, 2, 8)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    d12 = gaussian_distance(t(m1), t(s1), t(m2), t(s2), "w2")
    # normalised per channel: sqrt(mean_c) = W2 / sqrt(C)
    assert float(d12) == pytest.approx(w2_reference(m1, s1, m2, s2) / np.sqrt(8), rel=1e-9)
    assert float(gaussian_distance(t(m2), t(s2), t(m1), t(s1), "w2")) == pytest.approx(float(d12), rel=1e-12)
    for kind in ("w2", "kl", "euclidean"):
        assert float(gaussian_distance(t(m1), t(s1), t(m1), t(s1), kind)) == pytest.approx(0, abs=1e-6)
        assert float(gaussian_distance(t(m1), t(s1), t(m2), t(s2), kind)) > 0


def test_kl_matches_closed_form():
    m1, s1, m2, s2 = 0.3, 0.5, -0.2, 1.5
    ref = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    d = gaussian_distance(torch.tensor([m1]), torch.tensor([s1]), torch.tensor([m2]), torch.tensor([s2]), "kl")
    assert float(d) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("kind", ["w2", "kl", "euclidean"])
def test_all_layers_at_once_equals_layer_by_layer(kind):
    torch.manual_seed(0)
    channels = [3, 5, 2]
    mx, sx = torch.randn(2, 4, 10), torch.rand(2, 4, 10) + 0.1
    md, sd = torch.randn(2, 1, 10), torch.rand(2, 1, 10) + 0.1
    fast = per_layer_distances(mx, sx, md, sd, kind, layer_mean_matrix(channels))
    start = 0
    for i, c in enumerate(channels):
        sl = slice(start, start + c)
        torch.testing.assert_close(fast[..., i], gaussian_distance(mx[..., sl], sx[..., sl], md[..., sl], sd[..., sl], kind), rtol=1e-5, atol=1e-5)
        start += c


@pytest.mark.parametrize("weighting,kw", [("inverse", {"power": 1}), ("inverse", {"power": 3}), ("softmax", {"temperature": 0.5})])
def test_weights_nonnegative_sum_to_one_largest_for_nearest(weighting, kw):
    d = torch.tensor([[2.0, 0.5], [1.0, 3.0], [4.0, 0.0]])  # (S=3, N=2)
    w = distance_weights(d, weighting, **kw)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    assert w.argmax(0).tolist() == d.argmin(0).tolist()


def test_inverse_distance_weights_formula():
    d = torch.tensor([[1.0], [2.0], [4.0]])
    w = distance_weights(d, "inverse")
    expected = torch.tensor([[1.0], [0.5], [0.25]]) / 1.75
    torch.testing.assert_close(w, expected)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="'manhattan'"):
        gaussian_distance(torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1), "manhattan")
    with pytest.raises(ValueError, match="'max'"):
        distance_weights(torch.ones(2, 1), "max")
    with pytest.raises(ValueError, match="temperature"):
        distance_weights(torch.ones(2, 1), "softmax", temperature=0)
    with pytest.raises(ValueError, match="outside"):
        layer_subset(4, [0, 7])
    assert layer_subset(9, "early") == [0, 1, 2] and layer_subset(9, "late") == [6, 7, 8]
