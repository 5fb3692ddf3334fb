import pytest
import torch

from bne.data import build_cache, load_cache, load_folder_dataset
from bne.model import ModelSpec
from bne.train import TrainConfig, lr_factor, train


def _sources(root, tmp_path):
    ds = load_folder_dataset(root, val_fraction=0.25)
    arrays = load_cache(ds, build_cache(ds, 24, tmp_path / "cache", workers=2))
    return [arrays[d] for d in ds.domains[:2]]


def test_resumed_run_ends_with_the_same_weights(synthetic_root, tmp_path):
    sources = _sources(synthetic_root, tmp_path)
    spec = ModelSpec(backbone="resnet18", weights="none", num_classes=3)
    cfg = TrainConfig(epochs=2, per_domain_batch=6, lr=0.02, freeze_stages=0, select="last")
    full = train("bne", spec, sources, cfg, 24, tmp_path / "full", torch.device("cpu"), progress=False, log=lambda m: None)
    train("bne", spec, sources, cfg, 24, tmp_path / "killed", torch.device("cpu"), progress=False, stop_after_epoch=1, log=lambda m: None)
    logs = []
    resumed = train("bne", spec, sources, cfg, 24, tmp_path / "killed", torch.device("cpu"), progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # a changed setting does not resume from a stale checkpoint
    logs.clear()
    train("bne", spec, sources, TrainConfig(**{**cfg.__dict__, "lr": 0.01, "epochs": 1}), 24, tmp_path / "killed", torch.device("cpu"), progress=False, log=logs.append)
    assert any("from scratch" in m for m in logs)


def test_bne_and_deepall_see_the_same_images_and_loss_scale(synthetic_root, tmp_path, monkeypatch):
    """Both methods take the same batches; each step's loss is a mean over all images (not a sum of means)."""
    import bne.train as tr

    sources = _sources(synthetic_root, tmp_path)
    seen = {"deepall": [], "bne": []}
    losses = {"deepall": [], "bne": []}
    real_ce = tr.F.cross_entropy

    def spy(logits, y, *a, **k):
        out = real_ce(logits, y, *a, **k)
        key = "bne" if spy.method == "bne" else "deepall"
        seen[key].append(y.clone())
        losses[key].append((out.item(), real_ce(logits, y, reduction="sum").item() / len(y)))
        return out

    monkeypatch.setattr(tr.F, "cross_entropy", spy)
    spec = ModelSpec(backbone="resnet18", weights="none", num_classes=3)
    cfg = TrainConfig(epochs=1, per_domain_batch=4, freeze_stages=0)
    for method in ("deepall", "bne"):
        spy.method = method
        train(method, spec, sources, cfg, 24, tmp_path / method, torch.device("cpu"), progress=False, log=lambda m: None)
    assert len(seen["bne"]) == len(seen["deepall"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["bne"], seen["deepall"]))
    for mean, per_image in losses["bne"]:
        assert abs(mean - per_image) < 1e-5


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


def _bne_net(domains=3):
    from bne.model import DGNet

    torch.manual_seed(0)
    model = DGNet(ModelSpec(backbone="resnet18", weights="none", num_classes=3, domains=tuple("abc"[:domains])))
    model.train()
    with torch.no_grad():  # distinct running statistics per domain, as after training
        for layer in model.norm_layers():
            layer.running_mean.normal_(0, 0.3)
            layer.running_var.uniform_(0.5, 2.0)
    return model


def _reference_ensemble_nll(model, x, y, own_out):
    """The ensemble as evaluation computes it (bne.evaluate), on an eval-mode copy."""
    import copy

    from bne.embedding import InferenceOptions, layer_mean_matrix
    from bne.evaluate import BranchOutputs, bne_predict, run_branches
    from bne.embedding import per_layer_distances

    m = copy.deepcopy(model).eval()
    s, n = m.num_domains, x.shape[0]
    with torch.no_grad():
        logits, rec = run_branches(m, x)
    layers = m.norm_layers()
    lm = layer_mean_matrix([layer.num_features for layer in layers])
    md = torch.cat([layer.running_mean for layer in layers], 1).unsqueeze(1)
    sd = torch.cat([layer.running_var for layer in layers], 1).sqrt().unsqueeze(1)
    mx = torch.cat([rec.mean[i] for i in range(len(layers))], -1).view(s, n, -1)
    sx = torch.cat([rec.std[i] for i in range(len(layers))], -1).view(s, n, -1)
    opts = InferenceOptions()
    d = per_layer_distances(mx, sx, md, sd, opts.distance, lm)
    out = BranchOutputs(torch.softmax(logits, -1), y, {(opts.instance_stats, opts.embedding, opts.distance): d})
    own = torch.arange(s).repeat_interleave(n // s)
    probs, w = bne_predict(out, opts, exclude=own if own_out else None)
    return torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-8)), y), w


def test_ensemble_loss_is_the_test_time_ensemble_and_leaves_statistics_alone():
    from bne.train import ensemble_loss

    model = _bne_net()
    x, y = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2])
    before = [layer.running_mean.clone() for layer in model.norm_layers()]
    for own_out in (False, True):
        loss = ensemble_loss(model, x, y, own_out)
        ref, w = _reference_ensemble_nll(model, x, y, own_out)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        if own_out:  # image i of sub-batch d never uses branch d
            assert (w[torch.arange(3).repeat_interleave(2), torch.arange(6)] == 0).all()
    assert all(layer.training for layer in model.norm_layers())  # modes restored
    assert all(torch.equal(a, layer.running_mean) for a, layer in zip(before, model.norm_layers()))
    loss.backward()  # the ensemble's gradient reaches the shared weights
    assert model.net.conv1.weight.grad is not None and model.net.conv1.weight.grad.abs().sum() > 0


def test_ensemble_loss_leaving_own_branch_out_needs_two_domains():
    from bne.train import ensemble_loss

    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="ensemble_own_out.*'a'"):
        ensemble_loss(_bne_net(domains=1), x, y, own_out=True)
    assert torch.isfinite(ensemble_loss(_bne_net(domains=1), x, y, own_out=False))  # one branch: its own NLL


def test_ensemble_loss_trains_and_only_bne_checkpoints_depend_on_it(synthetic_root, tmp_path):
    from bne.train import config_hash, train_key

    base = TrainConfig(epochs=1, per_domain_batch=4, freeze_stages=0)
    ens = TrainConfig(**{**base.__dict__, "ensemble_loss": 0.5})
    assert config_hash(train_key(base, "deepall")) == config_hash(train_key(ens, "deepall"))
    assert config_hash(train_key(base, "bne")) != config_hash(train_key(ens, "bne"))
    off = TrainConfig(**{**base.__dict__, "ensemble_own_out": False})  # a knob of a disabled loss changes nothing
    assert config_hash(train_key(base, "bne")) == config_hash(train_key(off, "bne"))
    sources = _sources(synthetic_root, tmp_path)
    spec = ModelSpec(backbone="resnet18", weights="none", num_classes=3)
    runs = {}
    for name, cfg in (("plain", base), ("ensemble", ens)):
        runs[name] = train("bne", spec, sources, cfg, 24, tmp_path / name, torch.device("cpu"), progress=False, log=lambda m: None)
    h_plain, h_ens = runs["plain"].history[0], runs["ensemble"].history[0]
    assert h_ens["train_loss"] > h_plain["train_loss"]  # the added NLL term is in the logged loss
    a, b = runs["plain"].model.state_dict(), runs["ensemble"].model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
