"""The normalization layers of docs/NORMS.md against plain float64 references, their reduction cases, and
their use as the domain-specific layer of a DGNet."""

import copy
from statistics import NormalDist

import numpy as np
import pytest
import torch
from conftest import spec as make_spec
from torch import nn

import bne.model
from bne.model import NORMS, DGNet, build_backbone
from bne.norm import (
    MEAN_DOMAIN,
    BatchGroupNorm2d,
    CrossIterationBatchNorm2d,
    DomainBatchNorm2d,
    InstanceEnhancementBatchNorm2d,
    MemorizedBatchNorm2d,
    ProxyNorm2d,
    SimplexBatchNorm2d,
    domain_norm_layers,
    domain_route,
    double_forward,
)
from bne.stats import population_stats, precise_running_stats, running_stats

F64 = torch.float64
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning on shared cores (up to 50x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(n=4, c=6, h=3, w=5, scale=2.0, shift=1.0, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(n, c, h, w, dtype=F64) * scale + shift


def _bn(c=6, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _run(layer, x, domains, sizes=None):
    sizes = sizes or [x.shape[0] // len(domains)] * len(domains)
    with domain_route(domains, sizes):
        return layer(x)


def _affine(y, g, b):
    return y * g.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)


def _norm(x, mean, var, eps=EPS):
    return (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + eps)


def _close(a, b, atol=1e-10):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def _bn_equal(layer, bn, steps=3):
    """``layer`` (one domain) behaves as ``bn`` over a few training steps and in eval."""
    for step in range(steps):
        x = _x(scale=step + 1, shift=step, seed=10 + step)
        layer.train(), bn.train()
        _close(_run(layer, x, [0]), bn(x))
        _close(layer.running_mean[0], bn.running_mean)
        _close(layer.running_var[0], bn.running_var)
    layer.eval(), bn.eval()
    x = _x(seed=99)
    _close(_run(layer, x, [0]), bn(x))


def _untouched(layer, before, d):
    """Every buffer row of domains other than ``d`` equals its value in ``before``."""
    for name, buf in layer.named_buffers():
        if buf.ndim and buf.shape[0] == layer.num_domains:
            for e in range(layer.num_domains):
                if e != d:
                    assert torch.equal(buf[e], before[name][e]), f"{name}[{e}] changed by a chunk of domain {d}"


def _buffers(layer):
    return {n: b.clone() for n, b in layer.named_buffers()}


# ---------------------------------------------------------------- Batch Group Normalization


def _bgn_ref(x, groups, g, b):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean, var = xg.mean((0, 2)), xg.var((0, 2))
    y = ((xg - mean[None, :, None]) / np.sqrt(var[None, :, None] + EPS)).reshape(x.shape)
    return _affine(y, g, b), mean, xg.var((0, 2), ddof=1)


def test_bgn_against_reference_with_domain_routing():
    layer = BatchGroupNorm2d(6, 3, groups=2, domain_affine=True).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    a, b = _x(seed=1), _x(scale=0.5, shift=-2, seed=2)
    before = _buffers(layer)
    y = _run(layer.train(), torch.cat([a, b]), [2, 0])
    for part, x, d in ((y[:4], a, 2), (y[4:], b, 0)):
        xn = x.numpy()
        ref, gmean, gvar = _bgn_ref(xn, 2, layer.weight[d].detach().numpy(), layer.bias[d].detach().numpy())
        _close(part, ref)
        _close(layer.group_mean[d], 0.1 * gmean)
        _close(layer.group_var[d], 0.9 + 0.1 * gvar)
        _close(layer.running_mean[d], 0.1 * xn.mean((0, 2, 3)))  # per-channel input statistics
        _close(layer.running_var[d], 0.9 + 0.1 * xn.var((0, 2, 3), ddof=1))
    for name, buf in layer.named_buffers():  # domain 1 had no chunk
        assert torch.equal(buf[1], before[name][1]), name
    layer.eval()
    x = _x(seed=3).numpy()
    out = _run(layer, torch.from_numpy(x), [2])
    gm, gv = layer.group_mean[2].numpy(), layer.group_var[2].numpy()
    ref = ((x.reshape(4, 2, -1) - gm[None, :, None]) / np.sqrt(gv[None, :, None] + EPS)).reshape(x.shape)
    _close(out, _affine(ref, layer.weight[2].detach().numpy(), layer.bias[2].detach().numpy()))
    gm, gv = layer.group_mean.mean(0).numpy(), layer.group_var.mean(0).numpy()  # the mean pseudo-domain
    ref = ((x.reshape(4, 2, -1) - gm[None, :, None]) / np.sqrt(gv[None, :, None] + EPS)).reshape(x.shape)
    _close(_run(layer, torch.from_numpy(x), [MEAN_DOMAIN]), _affine(ref, layer.weight.mean(0).detach().numpy(), layer.bias.mean(0).detach().numpy()))


def test_bgn_with_one_group_per_channel_is_batchnorm():
    bn = _bn()
    layer = BatchGroupNorm2d.from_batchnorm(bn, 1, groups=6)
    assert layer.groups == 6
    _bn_equal(layer, bn)


def test_bgn_from_batchnorm_pools_channel_statistics_into_groups():
    bn = _bn()
    layer = BatchGroupNorm2d.from_batchnorm(bn, 2, groups=3)
    m, v = bn.running_mean.view(3, 2), bn.running_var.view(3, 2)
    _close(layer.group_mean[1], m.mean(1))
    _close(layer.group_var[1], (v + m**2).mean(1) - m.mean(1) ** 2)
    assert BatchGroupNorm2d(6, 1, groups=4).groups == 2  # gcd(6, 4)


# ---------------------------------------------------------------- Cross-Iteration BN


def _cbn_ref(history, x, w, g, b, window):
    """CBN for a 1x1 bias-free conv ``w`` (C, Cin) on input ``x``; ``history`` holds earlier (x_i, w_i)."""
    def stats(xi, wi):
        y = np.einsum("oc,nchw->nohw", wi, xi)
        mu, nu = y.mean((0, 2, 3)), (y**2).mean((0, 2, 3))
        dmu = np.broadcast_to(xi.mean((0, 2, 3)), wi.shape)  # d mu_o / d w_o = E[x]
        dnu = 2 * np.einsum("nohw,nchw->oc", y, xi) / (y.size / y.shape[1])  # 2 E[y_o x]
        return y, mu, nu, dmu, dnu

    y, mu, nu, _, _ = stats(x, w)
    mus, nus = [mu], [nu]
    for xi, wi in history[-(window - 1):][::-1] if window > 1 else []:
        _, m, n, dm, dn = stats(xi, wi)
        mus.append(m + (dm * (w - wi)).sum(1))
        nus.append(n + (dn * (w - wi)).sum(1))
    mus, nus = np.array(mus), np.array(nus)
    nus = np.maximum(nus, mus**2)
    mean = mus.mean(0)
    return _affine(_norm(y, mean, nus.mean(0) - mean**2), g, b)


def _conv_cbn(num_domains=2, window=3, burnin=0):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1, bias=False).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return conv, CrossIterationBatchNorm2d.from_batchnorm(bn, num_domains, window=window, burnin=burnin, source=conv)


def test_cbn_against_reference_with_compensation_and_routing():
    conv, layer = _conv_cbn(window=3)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()

    def weights():
        return conv.weight.detach()[:, :, 0, 0].numpy().copy()

    def step():  # an optimizer step on the feeding conv
        with torch.no_grad():
            conv.weight.add_(torch.randn_like(conv.weight) * 0.3)

    seen = {0: [], 1: []}  # (input, conv weights) of each domain's past iterations
    x, o = _x(c=3, seed=20), _x(c=3, scale=0.5, seed=21)
    out = _run(layer, conv(torch.cat([x, o])), [0, 1])  # first iteration of both domains: BN
    _close(out[:4], _cbn_ref([], x.numpy(), weights(), g, b, 3))
    _close(out[4:], _cbn_ref([], o.numpy(), weights(), g, b, 3))
    seen[0].append((x.numpy(), weights())), seen[1].append((o.numpy(), weights()))
    for it in range(3):  # domain 0 only; its window keeps the 2 latest past iterations
        step()
        x = _x(c=3, scale=1 + it, shift=it, seed=22 + it)
        _close(_run(layer, conv(x), [0]), _cbn_ref(seen[0], x.numpy(), weights(), g, b, 3))
        seen[0].append((x.numpy(), weights()))
    step()
    o = _x(c=3, seed=30)  # domain 1 again: compensated from its own single past iteration only
    before = _buffers(layer)
    _close(_run(layer, conv(o), [1]), _cbn_ref(seen[1], o.numpy(), weights(), g, b, 3))
    _untouched(layer, before, 1)
    assert layer.iterations.tolist() == [4, 2] and [len(m) for m in layer.memory] == [2, 2]


@pytest.fixture
def conv2d_weight_calls(monkeypatch):
    """A list that grows by one at each call of torch.nn.grad.conv2d_weight (CBN's fast gradient path)."""
    calls = []
    real = torch.nn.grad.conv2d_weight
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _same_padding_conv(cin, cout, k, stride, groups=1):
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    return Conv2dStaticSamePadding(cin, cout, k, stride, image_size=9, groups=groups, bias=False)


@pytest.mark.parametrize(
    "make_conv",
    [
        lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False),
        lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, bias=True),
        lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise
        lambda: _same_padding_conv(3, 6, 5, 2),  # Lite0's TF-style padding, asymmetric for k=5, s=2
        lambda: _same_padding_conv(6, 6, 3, 1, groups=6),
    ],
    ids=["conv3x3s2", "dilated_bias", "depthwise", "lite0_same_k5s2", "lite0_same_depthwise"],
)
def test_cbn_conv_weight_gradients_equal_autograd(make_conv, conv2d_weight_calls):
    """The per-chunk weight gradients of the source conv (fast path) give what autograd gives, for 3 domains
    (one of them in two chunks of a batch) over several iterations with the conv's weights moving; and the
    fast path is the one taken."""
    torch.manual_seed(1)
    conv = make_conv().double()
    bn = _bn(6)
    layers = {}
    for fast in (True, False):
        layers[fast] = CrossIterationBatchNorm2d.from_batchnorm(bn, 3, window=3, source=conv)
        layers[fast].fast_grads = fast
    for it in range(4):
        x = _x(n=6, c=conv.in_channels, h=9, w=9, scale=1 + it, shift=it, seed=50 + it)
        outs = {}
        for fast, layer in layers.items():
            outs[fast] = _run(layer, conv(x), [0, 1, 0, 2], [1, 2, 1, 2])  # unequal chunks: offsets matter
        _close(outs[True], outs[False], atol=1e-9)
        with torch.no_grad():
            conv.weight.add_(torch.randn_like(conv.weight) * 0.2)
    for a, b in zip(layers[True].memory, layers[False].memory):
        assert len(a) == len(b) == 2
        for pa, pb in zip(a, b):
            _close(pa.dmu, pb.dmu, atol=1e-9), _close(pa.dnu, pb.dnu, atol=1e-9)
    assert len(conv2d_weight_calls) == 2 * 4 * 4  # dmu and dnu per chunk per iteration, all from the fast path


def test_cbn_fast_path_needs_the_source_output_itself(conv2d_weight_calls):
    """If something sits between the conv and the layer, the gradients come from autograd (still correct)."""
    conv, layer = _conv_cbn(num_domains=1)
    ref = CrossIterationBatchNorm2d.from_batchnorm(_bn(4), 1, window=3, source=conv)
    ref.load_state_dict(layer.state_dict())
    ref.fast_grads = False
    for it in range(3):
        y = conv(_x(c=3, seed=60 + it))
        _close(_run(layer, y * 1.0, [0]), _run(ref, y, [0]))  # y * 1.0: not the conv's output object
        with torch.no_grad():
            conv.weight.add_(0.1)
    assert not conv2d_weight_calls and len(layer.memory[0]) == 2


def test_cbn_keeps_no_activations_and_copies_cleanly(conv2d_weight_calls):
    """One hook per source however often it is set; nothing kept after a forward, in eval or without grad;
    an in-place change of the conv's input is refused (autograd's error), not used; a deep copy hooks its own conv."""
    conv, layer = _conv_cbn(window=3)
    layer.set_source(conv)
    assert len(conv._forward_hooks) == 1
    x = _x(c=3, seed=70)
    _run(layer, conv(x), [0, 1])
    assert layer._source_io is None and layer._chunk_io is None
    with torch.no_grad():
        conv(x)
    assert layer._source_io is None
    layer.eval()
    conv(x.requires_grad_())
    assert layer._source_io is None
    layer.train()
    n = len(conv2d_weight_calls)
    xin = _x(c=3, seed=71)
    y = conv(xin)
    xin.add_(1.0)  # in place, after the conv and before the layer: not used silently, autograd refuses
    with pytest.raises(RuntimeError, match="inplace"):
        _run(layer, y, [0, 1])
    assert len(conv2d_weight_calls) == n and layer._source_io is None
    conv(xin)  # the hook keeps this forward's tensors, never run through the layer ...
    twin = copy.deepcopy(nn.Sequential(conv, layer))  # ... and a copy does not carry them
    assert twin[1]._source_io is None and twin[1].source is twin[0] and len(twin[0]._forward_hooks) == 1
    _run(twin[1], twin[0](x), [0, 1])
    assert len(conv2d_weight_calls) == n + 4  # dmu, dnu of both chunks, from the copy's own conv


def test_cbn_on_lite0_takes_the_fast_path_and_matches_autograd(conv2d_weight_calls):
    """Every CBN layer of Lite0 (static-same-padding convs, depthwise and pointwise) gets its gradients from
    the source conv's input; two BNE steps end with the same network as with autograd's gradients."""
    spec = make_spec(backbone="efficientnet_lite0", norm="cbn", cbn_burnin=0, cbn_window=2, domains=("a", "b"), weights="none",
                     num_classes=3)
    x, y = torch.rand(4, 3, 32, 32, dtype=F64), torch.tensor([0, 1, 2, 0])
    logits = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = DGNet(spec).double().train()
        for layer in model.norm_layers():
            layer.fast_grads = fast
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x, domains=[0, 1]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits[fast] = model.eval()(x, domains=[0, 1])
        if fast:
            assert len(conv2d_weight_calls) == 2 * 2 * 2 * len(model.norm_layers())  # dmu, dnu x 2 domains x 2 steps x layers
    _close(logits[True], logits[False], atol=1e-8)


def test_cbn_running_statistics_follow_the_uncompensated_batch():
    conv, layer = _conv_cbn(num_domains=1)
    bn = nn.BatchNorm2d(4).double()
    for it in range(3):
        x = _x(c=3, seed=30 + it)
        y = conv(x)
        _run(layer, y, [0])
        bn(y.detach())
        with torch.no_grad():
            conv.weight.mul_(1.1)
        _close(layer.running_mean[0], bn.running_mean)
        _close(layer.running_var[0], bn.running_var)


def test_cbn_without_past_iterations_is_batchnorm():
    bn = _bn(4)
    conv = nn.Conv2d(3, 4, 1, bias=False).double()
    for window, burnin in ((1, 0), (4, 10)):  # window 1, or still in the burn-in
        layer = CrossIterationBatchNorm2d.from_batchnorm(bn, 1, window=window, burnin=burnin, source=conv)
        ref = nn.BatchNorm2d(4).double().train()
        ref.load_state_dict(bn.state_dict())
        for it in range(3):
            y = conv(_x(c=3, seed=40 + it))
            _close(_run(layer.train(), y, [0]), ref(y))
            with torch.no_grad():
                conv.weight.add_(0.1)
        _close(layer.running_var[0], ref.running_var)
        assert all(len(m) == 0 for m in layer.memory)
    # first iteration after burn-in: the memory is empty
    conv, layer = _conv_cbn(num_domains=1, window=4)
    y = conv(_x(c=3, seed=41))
    ref = nn.BatchNorm2d(4).double().train()
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}, strict=False)
    _close(_run(layer, y, [0]), ref(y))
    assert len(layer.memory[0]) == 1


def test_cbn_eval_and_no_grad_are_batchnorm():
    conv, layer = _conv_cbn(window=3)
    for it in range(2):
        _run(layer, conv(_x(c=3, seed=it)), [0])
    layer.eval()
    x = _x(c=4, seed=7)
    ref = nn.functional.batch_norm(x, layer.running_mean[0], layer.running_var[0], layer.weight, layer.bias, False, 0, EPS)
    _close(_run(layer, x, [0]), ref)
    layer.train()
    with torch.no_grad():  # e.g. precise_running_stats: plain BN, memory untouched
        _close(_run(layer, x, [0]), nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0, EPS))
    assert len(layer.memory[0]) == 2


# ---------------------------------------------------------------- Memorized BN


def _mbn_ref(batches, g, b):
    """Normalise the last batch with the equally weighted pool of all ``batches``' biased statistics."""
    mus = np.array([x.mean((0, 2, 3)) for x in batches])
    vs = np.array([x.var((0, 2, 3)) for x in batches])
    mu = mus.mean(0)
    var = (vs + (mus - mu) ** 2).mean(0)
    return _affine(_norm(batches[-1], mu, var), g, b), mu, var


def test_mbn_against_reference_with_domain_routing():
    layer = MemorizedBatchNorm2d.from_batchnorm(_bn(), 2, window=3)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    seen = {0: [], 1: []}
    for it, d in enumerate([0, 0, 1, 0, 0, 1]):
        x = _x(scale=1 + it, shift=it, seed=60 + it)
        before = _buffers(layer)
        out = _run(layer.train(), x, [d])
        seen[d].append(x.numpy())
        ref, mu, var = _mbn_ref(seen[d][-3:], g, b)
        _close(out, ref)
        _close(layer.running_mean[d], mu)  # the pool of the last 3 batches
        _close(layer.running_var[d], var)
        _untouched(layer, before, d)
    assert layer.num_batches_tracked.tolist() == [4, 2]
    layer.eval()
    x = _x(seed=70)
    for d in (0, 1):
        _, mu, var = _mbn_ref(seen[d][-3:], g, b)
        _close(_run(layer, x, [d]), _affine(_norm(x.numpy(), mu, var), g, b))


def test_mbn_double_forward_refreshes_the_newest_batch():
    layer = MemorizedBatchNorm2d.from_batchnorm(_bn(), 1, window=3)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    xs = [_x(seed=80 + i) for i in range(3)]
    for x in xs[:2]:
        _run(layer, x, [0])
    refreshed = xs[1] * 1.5 - 0.3  # the same batch seen by updated weights
    with domain_route([0], [4]):
        double_forward(layer, refreshed)
    assert int(layer.num_batches_tracked[0]) == 2 and not layer.refresh
    _, mu, var = _mbn_ref([xs[0].numpy(), refreshed.numpy()], g, b)
    _close(layer.running_mean[0], mu)
    _close(layer.running_var[0], var)
    ref, _, _ = _mbn_ref([xs[0].numpy(), refreshed.numpy(), xs[2].numpy()], g, b)
    _close(_run(layer, xs[2], [0]), ref)


def test_mbn_with_a_memory_of_one_batch_is_batchnorm_in_training():
    bn = _bn()
    layer = MemorizedBatchNorm2d.from_batchnorm(bn, 1, window=1)
    bn.eval()
    x = _x(seed=90)
    _close(_run(layer.eval(), x, [0]), bn(x))  # before training: the pretrained BN
    bn.train(), layer.train()
    for it in range(3):
        x = _x(scale=it + 1, seed=91 + it)
        _close(_run(layer, x, [0]), bn(x))
    # eval normalises with the last batch's (biased) statistics, not BN's running average
    _close(layer.running_var[0], x.var((0, 2, 3), unbiased=False))


# ---------------------------------------------------------------- Instance-Enhancement BN


def test_iebn_against_reference_with_domain_routing():
    layer = InstanceEnhancementBatchNorm2d(6, 2, domain_affine=True).double()
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.ie_weight, layer.ie_bias):
            p.uniform_(-1, 1.5)
    a, b = _x(seed=100), _x(scale=3, shift=-1, seed=101)
    before = _buffers(layer)
    out = _run(layer.train(), torch.cat([a, b]), [1, 0])
    P = {n: p.detach().numpy() for n, p in layer.named_parameters()}

    def ref(x, d, mean, var):
        att = 1 / (1 + np.exp(-(P["ie_weight"][d] * x.mean((2, 3)) + P["ie_bias"][d])))  # (N, C)
        return _norm(x, mean, var) * (P["weight"][d] * att)[:, :, None, None] + P["bias"][d].reshape(1, -1, 1, 1)

    for part, x, d in ((out[:4], a.numpy(), 1), (out[4:], b.numpy(), 0)):
        _close(part, ref(x, d, x.mean((0, 2, 3)), x.var((0, 2, 3))))
        _close(layer.running_mean[d], 0.1 * x.mean((0, 2, 3)))
        _close(layer.running_var[d], 0.9 + 0.1 * x.var((0, 2, 3), ddof=1))
    assert layer.num_batches_tracked.tolist() == [1, 1]
    layer.eval()
    x = _x(seed=102).numpy()
    _close(_run(layer, torch.from_numpy(x), [1]), ref(x, 1, layer.running_mean[1].numpy(), layer.running_var[1].numpy()))
    before = _buffers(layer)
    _run(layer.train(), _x(seed=103), [0])
    _untouched(layer, before, 0)


def test_iebn_initialisations():
    # from a pretrained BN: w = 0, b = -1, gamma = gamma_bn / sigmoid(-1), so gamma * a = gamma_bn: exactly BN
    bn = _bn()
    layer = InstanceEnhancementBatchNorm2d.from_batchnorm(bn, 1)
    assert torch.all(layer.ie_weight == 0) and torch.all(layer.ie_bias == -1)
    _bn_equal(layer, bn)
    # the authors' fresh init (w = 0, b = -1, gamma = 1, beta = 0): BN with gamma = sigmoid(-1)
    layer = InstanceEnhancementBatchNorm2d(6, 1).double()
    x = _x(seed=104)
    ref = nn.functional.batch_norm(x, None, None, torch.full((6,), torch.sigmoid(torch.tensor(-1.0)).item(), dtype=F64), None, True)
    _close(_run(layer, x, [0]), ref, atol=1e-7)


# ---------------------------------------------------------------- Proxy Norm


def test_proxy_moments_match_numerical_integration():
    grid = np.linspace(-12, 12, 240001)
    density = np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi)
    acts = {"identity": lambda t: t, "relu": lambda t: np.maximum(t, 0), "relu6": lambda t: np.clip(t, 0, 6)}
    for activation, phi in acts.items():
        layer = ProxyNorm2d(5, 1, activation=activation).double()
        with torch.no_grad():
            layer.weight.uniform_(0.8, 1.5), layer.bias.uniform_(-0.3, 0.3)
            layer.proxy_weight.uniform_(-0.2, 0.2), layer.proxy_bias.uniform_(-0.3, 0.3)
        mean, var = layer.proxy_moments(0)
        P = {n: p.detach().numpy().reshape(5) for n, p in layer.named_parameters()}
        for c in range(5):
            y = (1 + P["proxy_weight"][c]) * grid + P["proxy_bias"][c]
            z = phi(P["weight"][c] * y + P["bias"][c])
            e = np.trapezoid(z * density, grid)
            v = np.trapezoid(z**2 * density, grid) - e**2
            np.testing.assert_allclose(mean[c].item(), e, atol=3e-3)
            np.testing.assert_allclose(var[c].item(), v, rtol=3e-2)


def test_proxynorm_against_reference_and_tracks_input_statistics():
    layer = ProxyNorm2d(6, 2, groups=3, activation="relu", domain_affine=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 1.2)
    P = {n: p.detach().numpy() for n, p in layer.named_parameters()}
    u = np.array([NormalDist().inv_cdf((i + 0.5) / 200) for i in range(200)])  # the 200 fixed quantiles

    def ref(x, d):
        xg = x.reshape(x.shape[0], 3, -1)  # GroupNorm, 3 groups, no affine
        xh = ((xg - xg.mean(2, keepdims=True)) / np.sqrt(xg.var(2, keepdims=True) + EPS)).reshape(x.shape)
        g, b = P["weight"][d], P["bias"][d]
        z = np.maximum(_affine(xh, g, b), 0)
        proxy = np.maximum(g[:, None] * ((1 + P["proxy_weight"][d])[:, None] * u + P["proxy_bias"][d][:, None]) + b[:, None], 0)
        return (z - proxy.mean(1).reshape(1, -1, 1, 1)) / np.sqrt(proxy.var(1).reshape(1, -1, 1, 1) + 0.03)

    a, b = _x(seed=110), _x(scale=0.3, shift=2, seed=111)
    before = _buffers(layer)
    out = _run(layer.train(), torch.cat([a, b]), [0, 1])
    for part, x, d in ((out[:4], a.numpy(), 0), (out[4:], b.numpy(), 1)):
        _close(part, ref(x, d), atol=1e-8)
        _close(layer.running_mean[d], 0.1 * x.mean((0, 2, 3)))
        _close(layer.running_var[d], 0.9 + 0.1 * x.var((0, 2, 3), ddof=1))
    layer.eval()  # batch-independent: eval is the same function, and leaves the statistics alone
    before = _buffers(layer)
    _close(_run(layer, a, [0]), ref(a.numpy(), 0), atol=1e-8)
    _close(_run(layer, a[:1], [1]), ref(a[:1].numpy(), 1), atol=1e-8)
    assert all(torch.equal(before[n], b) for n, b in layer.named_buffers())
    layer.train()
    _run(layer, b, [1])
    _untouched(layer, before, 1)


# ---------------------------------------------------------------- in the network


@pytest.fixture(scope="module")
def resnet18():
    """A random ResNet-18 whose BNs look pretrained (random statistics and affine parameters)."""
    torch.manual_seed(0)
    net = build_backbone(_spec("bn"))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return net


@pytest.fixture
def fast_build(resnet18, monkeypatch):
    """DGNet builds (and converts) a copy of one random ResNet-18 instead of initialising a new one."""
    monkeypatch.setattr(bne.model, "build_backbone", lambda spec: copy.deepcopy(resnet18))


def _spec(norm, domains=("a", "b"), **kw):
    return make_spec(backbone="resnet18", weights="none", num_classes=3, domains=domains, norm=norm, **kw)


LAYER = {
    "bn": DomainBatchNorm2d,
    "bgn": BatchGroupNorm2d,
    "cbn": CrossIterationBatchNorm2d,
    "mbn": MemorizedBatchNorm2d,
    "iebn": InstanceEnhancementBatchNorm2d,
    "proxynorm": ProxyNorm2d,
    "simplex": SimplexBatchNorm2d,
}


@pytest.mark.parametrize("norm", NORMS)
def test_dgnet_trains_and_exports_statistics_with_each_norm(norm, fast_build):
    torch.manual_seed(0)
    model = DGNet(_spec(norm, cbn_burnin=0, cbn_window=2))
    layers = model.norm_layers()
    assert len(layers) == 20 and all(type(m) is LAYER[norm] and m.num_domains == 2 for m in layers)
    assert domain_norm_layers(model) == layers and layers[-1].layer_index == 19
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    model.train()
    for _ in range(2):  # the second step exercises CBN's compensated memory
        loss = nn.functional.cross_entropy(model(x, domains=[0, 1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    if norm == "cbn":
        assert len(layers[1].memory[0]) == 1
    model.eval()
    with torch.no_grad():
        assert model.branches(x[:2]).shape == (2, 2, 3)
        assert model(x[:2], domains=MEAN_DOMAIN).shape == (2, 3)
    run = running_stats(layers)
    assert run.mean[0].shape == (2, 64) and np.isfinite(run.var[-1]).all()
    pop, inst = population_stats(model, [(0, [x[:2]]), (1, [x[2:]])])
    assert pop.mean[5].shape == (2, layers[5].num_features) and np.isfinite(pop.var[5]).all()
    assert pop.count[0].tolist() == [2 * 16 * 16] * 2  # stem BN after a stride-2 conv
    DGNet(_spec(norm)).load_state_dict(model.state_dict())  # a checkpoint loads into a fresh network
    precise_running_stats(model, [(0, [x[:2]]), (1, [x[2:]])])
    assert all(np.isfinite(v).all() for v in running_stats(layers).var) and layers[3].momentum == 0.1
    # the stem's input is the same in train and eval mode: its precise statistics are the population's
    np.testing.assert_allclose(layers[0].running_mean.numpy(), pop.mean[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["cbn", "mbn", "iebn"])
def test_converted_network_keeps_the_pretrained_function(norm, fast_build):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = DGNet(_spec("bn")).eval()(x, domains=1)
        torch.testing.assert_close(DGNet(_spec(norm)).eval()(x, domains=1), ref)


@pytest.mark.parametrize("norm", NORMS)
def test_deepall_uses_the_same_layer_type(norm, fast_build):
    model = DGNet(_spec(norm, domains=()))
    layers = model.norm_layers()
    if norm == "bn":  # unchanged: an ordinary torchvision network
        assert not layers and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    else:
        assert len(layers) == 20 and all(type(m) is LAYER[norm] and m.num_domains == 1 for m in layers)
    model.train()
    loss = model(torch.rand(4, 3, 32, 32)).sum()
    loss.backward()
    with pytest.raises(ValueError, match="not domain-specific"):
        model(torch.rand(2, 3, 32, 32), domains=0)


def test_unknown_norm_raises():
    with pytest.raises(ValueError, match=r"'layernorm'.*bn.*proxynorm"):
        make_spec(norm="layernorm")
