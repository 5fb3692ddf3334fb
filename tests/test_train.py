import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bne.data import build_cache, load_cache, load_folder_dataset
from bne.model import DGNet
from bne.train import ENSEMBLE_LOSS_OPTIONS, build_optimizer, ensemble_loss, lr_factor, train, train_step
from conftest import spec as make_spec
from conftest import train_cfg

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)

ROOT = Path(__file__).resolve().parents[1]


def _sources(root, tmp_path):
    ds = load_folder_dataset(root, val_fraction=0.25)
    arrays = load_cache(ds, build_cache(ds, 24, tmp_path / "cache", workers=2, max_pixels=MAX_PIXELS))
    return [arrays[d] for d in ds.domains[:2]]


def test_resumed_run_ends_with_the_same_weights(synthetic_root, tmp_path):
    sources = _sources(synthetic_root, tmp_path)
    spec = make_spec(backbone="resnet18", weights="none")
    cfg = train_cfg(epochs=2, per_domain_batch=6, lr=0.02, freeze_stages=0, select="last")
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
    train("bne", spec, sources, train_cfg(**{**cfg.__dict__, "lr": 0.01, "epochs": 1}), 24, tmp_path / "killed", torch.device("cpu"), progress=False, log=logs.append)
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
    spec = make_spec(backbone="resnet18", weights="none")
    cfg = train_cfg(epochs=1, per_domain_batch=4, freeze_stages=0)
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
    torch.manual_seed(0)
    model = DGNet(make_spec(backbone="resnet18", weights="none", domains=tuple("abc"[:domains])))
    model.train()
    with torch.no_grad():  # distinct running statistics per domain, as after training
        for layer in model.norm_layers():
            layer.running_mean.normal_(0, 0.3)
            layer.running_var.uniform_(0.5, 2.0)
    return model


def _reference_ensemble_nll(model, x, y, own_out):
    """The ensemble as evaluation computes it (bne.evaluate), on an eval-mode copy."""
    from bne.embedding import layer_mean_matrix, per_layer_distances
    from bne.evaluate import BranchOutputs, bne_predict, run_branches

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
    opts = ENSEMBLE_LOSS_OPTIONS
    d = per_layer_distances(mx, sx, md, sd, opts.distance, lm)
    out = BranchOutputs(torch.softmax(logits, -1), y, {(opts.instance_stats, opts.embedding, opts.distance): d})
    own = torch.arange(s).repeat_interleave(n // s)
    probs, w = bne_predict(out, opts, exclude=own if own_out else None)
    return torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-8)), y), w


def test_ensemble_loss_is_the_test_time_ensemble_and_leaves_statistics_alone():
    model = _bne_net()
    x, y = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2])
    before = [layer.running_mean.clone() for layer in model.norm_layers()]
    for own_out in (False, True):
        loss = ensemble_loss(model, x, y, ENSEMBLE_LOSS_OPTIONS, own_out)
        ref, w = _reference_ensemble_nll(model, x, y, own_out)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        if own_out:  # image i of sub-batch d never uses branch d
            assert (w[torch.arange(3).repeat_interleave(2), torch.arange(6)] == 0).all()
    assert all(layer.training for layer in model.norm_layers())  # modes restored
    assert all(torch.equal(a, layer.running_mean) for a, layer in zip(before, model.norm_layers()))
    loss.backward()  # the ensemble's gradient reaches the shared weights
    assert model.net.conv1.weight.grad is not None and model.net.conv1.weight.grad.abs().sum() > 0


def test_ensemble_loss_leaving_own_branch_out_needs_two_domains():
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="ensemble_own_out.*'a'"):
        ensemble_loss(_bne_net(domains=1), x, y, ENSEMBLE_LOSS_OPTIONS, own_out=True)
    assert torch.isfinite(ensemble_loss(_bne_net(domains=1), x, y, ENSEMBLE_LOSS_OPTIONS, own_out=False))  # one branch: its own NLL


def test_ensemble_loss_trains_and_only_bne_checkpoints_depend_on_it(synthetic_root, tmp_path):
    from bne.train import config_hash, train_key

    # lr 0.001: at params.yaml's 0.01 this from-scratch ResNet diverges (loss ~17) and which run logs more then
    # depends on the torch thread count; here the term adds ~0.9 to the epoch's loss with 1 thread and with 2
    base = train_cfg(epochs=1, per_domain_batch=4, freeze_stages=0, ensemble_loss=0.0, lr=0.001)
    ens = train_cfg(**{**base.__dict__, "ensemble_loss": 0.5})
    assert config_hash(train_key(base, "deepall")) == config_hash(train_key(ens, "deepall"))
    assert config_hash(train_key(base, "bne")) != config_hash(train_key(ens, "bne"))
    off = train_cfg(**{**base.__dict__, "ensemble_own_out": not base.ensemble_own_out})  # a knob of a disabled loss changes nothing
    assert config_hash(train_key(base, "bne")) == config_hash(train_key(off, "bne"))
    sources = _sources(synthetic_root, tmp_path)
    spec = make_spec(backbone="resnet18", weights="none")
    runs = {}
    for name, cfg in (("plain", base), ("ensemble", ens)):
        runs[name] = train("bne", spec, sources, cfg, 24, tmp_path / name, torch.device("cpu"), progress=False, log=lambda m: None)
    h_plain, h_ens = runs["plain"].history[0], runs["ensemble"].history[0]
    assert h_ens["train_loss"] > h_plain["train_loss"]  # the added NLL term is in the logged loss
    a, b = runs["plain"].model.state_dict(), runs["ensemble"].model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- train_step


def _stepper(domains=(), norm="bn", seed=0, **cfg_changes):
    """A small network and its optimizer as ``train`` builds them (every stage trainable)."""
    cfg = train_cfg(**{"freeze_stages": 0, "ensemble_loss": 0.0, **cfg_changes})
    torch.manual_seed(seed)
    model = DGNet(make_spec(backbone="resnet18", weights="none", norm=norm, domains=tuple(domains))).train()
    return model, build_optimizer(model, cfg), cfg


def _minibatches(domains, per_domain=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(per_domain, 3, size, size, generator=g), torch.randint(0, 3, (per_domain,), generator=g)) for _ in range(domains)]


def test_train_step_returns_the_mean_loss_as_a_tensor_without_reading_it_back(monkeypatch):
    model, opt, cfg = _stepper(domains="ab")
    batches = _minibatches(2)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        expected = F.cross_entropy(copy.deepcopy(model)(x, domains=[0, 1]), y)
    before = model.net.fc.weight.detach().clone()

    def no_item(self):
        raise AssertionError("train_step read a tensor back to the host (.item())")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    loss = train_step(model, opt, batches, cfg)
    monkeypatch.undo()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, expected)  # the mean over all S x b images
    assert not torch.equal(before, model.net.fc.weight)  # the optimizer stepped


def test_train_step_deepall_and_one_domain_bne_agree():
    """With one source domain BNE's single branch is an ordinary network: same loss, same updated weights."""
    deep, opt_d, cfg = _stepper(domains=())
    bne, opt_b, _ = _stepper(domains=("a",))
    for d, b in zip(deep.net.parameters(), bne.net.parameters()):
        assert torch.equal(d, b)  # same initialisation
    batches = _minibatches(1, per_domain=6)
    for _ in range(2):
        ld, lb = train_step(deep, opt_d, batches, cfg), train_step(bne, opt_b, batches, cfg)
        torch.testing.assert_close(ld, lb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deep.net.fc.weight, bne.net.fc.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deep.net.conv1.weight, bne.net.conv1.weight, rtol=1e-4, atol=1e-5)


def test_train_step_routes_bne_minibatches_and_checks_their_number():
    model, opt, cfg = _stepper(domains="abc")
    with pytest.raises(ValueError, match="2 minibatch"):
        train_step(model, opt, _minibatches(2), cfg)
    before = [layer.running_mean.clone() for layer in model.norm_layers()]
    batches = _minibatches(3)
    batches[1] = (batches[1][0] * 0 + 0.9, batches[1][1])  # a domain of bright images: its statistics move most
    train_step(model, opt, batches, cfg)
    moved = [(layer.running_mean - b).abs().sum(1) for layer, b in zip(model.norm_layers(), before)]  # (S,) per layer
    assert (moved[0] > 0).all() and moved[0].argmax() == 1  # every branch updated, each with its own sub-batch


@pytest.mark.parametrize("domains", [(), ("a", "b")])
def test_train_step_adds_the_ensemble_loss_for_bne_only(domains):
    model, opt, cfg = _stepper(domains=domains, ensemble_loss=0.5, ensemble_own_out=True)
    batches = _minibatches(2)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ref = copy.deepcopy(model)
    ce = F.cross_entropy(ref(x, domains=[0, 1]) if domains else ref(x), y)
    expected = ce + 0.5 * ensemble_loss(ref, x, y, ENSEMBLE_LOSS_OPTIONS, True) if domains else ce  # DeepAll: no ensemble
    loss = train_step(model, opt, batches, cfg)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("norm", "domains", "calls"), [("mbn", ("a", "b"), [[0, 1]]), ("mbn", (), [None]), ("bn", ("a", "b"), [])])
def test_train_step_runs_mbns_double_forward_after_the_step(monkeypatch, norm, domains, calls):
    import bne.train as tr

    model, opt, cfg = _stepper(domains=domains, norm=norm)
    seen = []

    def spy(m, x, domains=None):
        assert torch.is_grad_enabled() is False and m is model
        seen.append(domains)
        real(m, x, domains=domains)

    real = tr.double_forward
    monkeypatch.setattr(tr, "double_forward", spy)
    train_step(model, opt, _minibatches(2), cfg)
    assert seen == calls


def test_speed_benchmark_runs_quickly(tmp_path):
    """bench/speed.py in its quick mode on a tiny network and synthetic arrays: every ratio of the table, timed by
    the real training step, written with the machine's load."""
    out = tmp_path / "speed.json"
    sets = ["model.backbone=resnet18", "model.weights=none", "train.resolution=32", "train.per_domain_batch=2", "eval.batch=4"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--quick", "--synthetic", "--threads", "1",
                           "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["errors"]
    for key in ("bne_vs_deepall_train_throughput", "loader_vs_trainer_throughput", "bne_inference_vs_branch_forwards",
                "single_pass_vs_deepall", "mixstats_vs_deepall", "stats_extraction_images_per_s"):
        assert report["measurements"][key]["value"] > 0, key
    assert report["settings"]["train"]["per_domain_batch"] == 2 and report["settings"]["model"]["backbone"] == "resnet18"
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["loadavg_before"] is not None
    assert report["command"].startswith("python bench/speed.py --quick")
    assert time.perf_counter() - t0 < 120
