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
