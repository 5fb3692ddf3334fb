"""Weight averaging (``train.ema``, issue 19 variant 6): an EMA of the weights for DeepAll and BNE alike, the
normalization statistics of the averaged network recomputed at each epoch end (bne/train.py)."""

import dataclasses
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn

import bne.train as tr
from bne.data import build_cache, load_cache, load_folder_dataset
from bne.model import DGNet
from bne.norm.dsbn import DomainBatchNorm2d
from bne.train import config_hash, recompute_norm_stats, train, train_key
from conftest import spec as make_spec
from conftest import train_cfg

MAX_PIXELS = 8192 * 8192
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster, above all on busy cores


def _sources(root, tmp_path):
    """Two synthetic domains (24 px), 16 training and 8 validation images each: 4 steps of 2 x 4 images an epoch."""
    ds = load_folder_dataset(root, val_fraction=0.25)
    arrays = load_cache(ds, build_cache(ds, 24, tmp_path / "cache", workers=2, max_pixels=MAX_PIXELS))
    return [dataclasses.replace(arrays[d], train=arrays[d].train[:16], val=arrays[d].val[:8], fingerprint=f"{d}-small")
            for d in ds.domains[:2]]


def _cfg(**changes):
    """A short run: 1 epoch of 4 steps of 2 x 4 images, every stage trainable."""
    return train_cfg(**{"epochs": 1, "per_domain_batch": 4, "lr": 0.02, "freeze_stages": 0, "select": "last",
                        "ensemble_loss": 0.0, "ema": 0.0, "ema_bn_batches": 2, **changes})


def _train(method, sources, cfg, out, spec=None, **kw):
    spec = spec or make_spec(backbone="resnet18", weights="none")
    return train(method, spec, sources, cfg, 24, out, CPU, progress=False, log=kw.pop("log", lambda m: None), **kw)


def _images(seed, n=4, size=24):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- the key


def test_ema_off_keeps_the_old_key_and_on_changes_both_methods_keys():
    off = _cfg()
    for method in tr.METHODS:
        old = {k: v for k, v in asdict(off).items() if k not in ("ema", "ema_bn_batches")}  # the key before the option
        if method == "deepall" or not off.ensemble_loss:
            old = {k: v for k, v in old.items() if not k.startswith("ensemble_")}
        assert train_key(off, method) == {**old, "layout": "channels_last"}
        assert config_hash(train_key(off, method)) == config_hash(train_key(replace(off, ema_bn_batches=7), method))
        on = replace(off, ema=0.99)
        assert config_hash(train_key(on, method)) != config_hash(train_key(off, method))
        assert train_key(on, method)["ema"] == 0.99 and train_key(on, method)["ema_bn_batches"] == 2
        assert config_hash(train_key(on, method)) != config_hash(train_key(replace(on, ema_bn_batches=7), method))


# --------------------------------------------------------------------------------------------------- training


def test_ema_off_leaves_the_training_path_untouched(synthetic_root, tmp_path, monkeypatch):
    """ema 0: no average is built, no statistics recomputed; the run equals one with ema_bn_batches changed."""
    sources = _sources(synthetic_root, tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("the weight average ran with train.ema 0")

    monkeypatch.setattr(tr, "AveragedModel", forbidden)
    monkeypatch.setattr(tr, "recompute_norm_stats", forbidden)
    a = _train("bne", sources, _cfg(), tmp_path / "a")
    b = _train("bne", sources, _cfg(ema_bn_batches=9), tmp_path / "b")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("method", tr.METHODS)
def test_returned_weights_are_the_ema_of_the_step_weights(synthetic_root, tmp_path, monkeypatch, method):
    sources = _sources(synthetic_root, tmp_path)
    decay = 0.7
    steps = []
    real_step = tr.train_step

    def spy(model, opt, minibatches, cfg, *a, **k):
        loss = real_step(model, opt, minibatches, cfg, *a, **k)
        steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss

    monkeypatch.setattr(tr, "train_step", spy)
    res = _train(method, sources, _cfg(ema=decay), tmp_path / method)
    assert len(steps) == 4
    ema = dict(steps[0])  # averaged from the first step
    for w in steps[1:]:
        ema = {n: decay * ema[n] + (1 - decay) * w[n] for n in ema}
    got = dict(res.model.named_parameters())
    for n, p in ema.items():
        torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(got["net.fc.weight"], steps[-1]["net.fc.weight"])  # not the last step's weights


def test_resumed_ema_run_ends_with_the_same_weights(synthetic_root, tmp_path):
    sources = _sources(synthetic_root, tmp_path)
    cfg = _cfg(epochs=2, ema=0.9, select="best")
    full = _train("bne", sources, cfg, tmp_path / "full")
    _train("bne", sources, cfg, tmp_path / "killed", stop_after_epoch=1)
    logs = []
    resumed = _train("bne", sources, cfg, tmp_path / "killed", log=logs.append)
    assert any("resuming" in m for m in logs)
    assert full.history[0]["source_val_acc"] == resumed.history[0]["source_val_acc"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    best = torch.load(tmp_path / "killed" / "best.pt", weights_only=True)  # the selected averaged network
    assert all(torch.equal(best[k], v) for k, v in resumed.model.state_dict().items())
    assert "ema" in torch.load(tmp_path / "killed" / "last.pt", weights_only=True)


# ---------------------------------------------------------------------------------------- statistics recomputed


def test_deepall_statistics_are_the_average_of_the_recomputation_batches():
    torch.manual_seed(0)
    model = DGNet(make_spec(backbone="resnet18", weights="none")).eval()
    batches = [[_images(10 * i + d) for d in range(2)] for i in range(3)]  # 3 steps of 2 domains x 4 images
    momenta = {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert recompute_norm_stats(model, batches) == 3
    means, variances = [], []
    with torch.no_grad():
        for xs in batches:  # the first BN layer's input, by hand: the conv of the normalized mixed batch
            x = torch.cat(xs)
            a = model.net.conv1((x - model.mean) / model.std)
            means.append(a.mean((0, 2, 3)))
            variances.append(a.var((0, 2, 3), unbiased=True))
    bn = model.net.bn1
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    assert {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)} == momenta  # restored
    assert not model.training and not any(m.training for m in model.modules())  # mode restored


def test_bne_statistics_are_recomputed_per_domain_and_shared_layers_see_the_mixed_batch():
    """Domain 0's statistics depend only on domain 0's images; the shared layers (domain_layers) on both domains'."""
    spec = make_spec(backbone="resnet18", weights="none", domains=("a", "b"), domain_layers=2)
    torch.manual_seed(0)
    base = DGNet(spec)
    models = []
    for other in (100, 200):  # domain 1's images differ between the two recomputations, domain 0's do not
        model = DGNet(spec)
        model.load_state_dict(base.state_dict())
        recompute_norm_stats(model, [[_images(i), _images(other + i)] for i in range(3)])
        models.append(model)
    specific = [(n, m) for n, m in models[0].named_modules() if isinstance(m, DomainBatchNorm2d)]
    shared = [n for n, m in models[0].named_modules() if type(m) is nn.BatchNorm2d]
    assert specific and shared
    layers = [dict(m.named_modules()) for m in models]
    for name, _ in specific:
        a, b = layers[0][name], layers[1][name]
        torch.testing.assert_close(a.running_mean[0], b.running_mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var[0], b.running_var[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.running_mean[1], b.running_mean[1])
        assert a.num_batches_tracked.tolist() == [3, 3]
    for name in shared:
        assert not torch.allclose(layers[0][name].running_mean, layers[1][name].running_mean)
    # domain 0's first layer by hand: the conv of its own images only
    with torch.no_grad():
        acts = [models[0].net.conv1((_images(i) - base.mean) / base.std) for i in range(3)]
    bn1 = layers[0]["net.bn1"]
    torch.testing.assert_close(bn1.running_mean[0], torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn1.running_var[0], torch.stack([a.var((0, 2, 3)) for a in acts]).mean(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("norm", ["mbn", "cbn", "simplex"])
def test_norms_without_plain_running_statistics_are_refused(norm, tmp_path):
    spec = make_spec(backbone="resnet18", weights="none", norm=norm)
    with pytest.raises(ValueError, match=rf"train\.ema = 0\.9 with model\.norm = '{norm}'"):
        train("bne", spec, [], _cfg(ema=0.9), 24, tmp_path, CPU, progress=False)


def test_several_processes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "world_size", lambda: 2)
    monkeypatch.setattr(tr, "rank", lambda: 0)
    with pytest.raises(ValueError, match=r"train\.ema = 0\.9 under 2 processes"):
        train("bne", make_spec(backbone="resnet18", weights="none"), [], _cfg(ema=0.9), 24, tmp_path, CPU, progress=False)
