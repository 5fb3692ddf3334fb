import pytest
import torch
from conftest import spec

from bne.model import DGNet, build_backbone, convert_to_domain_specific
from bne.norm.dsbn import DomainBatchNorm2d

LITE0 = dict(backbone="efficientnet_lite0", weights="pretrained", norm="bn")


def test_converted_lite0_keeps_eval_outputs():
    torch.manual_seed(0)
    plain = DGNet(spec(**LITE0)).eval()
    torch.manual_seed(0)  # same random head
    dsbn = DGNet(spec(**LITE0, domains=("a", "b", "c"))).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dsbn.modules())
    assert len(dsbn.norm_layers()) == 49
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = plain(x)
        out = dsbn.branches(x)
        for d in range(3):
            torch.testing.assert_close(out[d], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dsbn(x, domains=d), ref, rtol=1e-5, atol=1e-5)


def test_lite0_pretrained_weights_are_loaded():
    a = build_backbone(spec(backbone="efficientnet_lite0", weights="pretrained", bn_momentum=0.1))
    b = build_backbone(spec(backbone="efficientnet_lite0", weights="none"))
    assert not torch.equal(a._conv_stem.weight, b._conv_stem.weight)
    assert a._bn0.momentum == 0.1


def test_resnet_from_local_weights_file(tmp_path):
    torch.manual_seed(1)
    src = build_backbone(spec(backbone="resnet18", weights="none", num_classes=5))
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    local = spec(backbone="resnet18", weights=str(tmp_path / "r18.pt"), num_classes=5, norm="bn", domain_affine=False)
    net = build_backbone(local)
    assert torch.equal(net.conv1.weight, src.conv1.weight)
    convert_to_domain_specific(net, 2, local)
    layers = [m for m in net.modules() if isinstance(m, DomainBatchNorm2d)]
    assert len(layers) == 20 and layers[0].layer_name == "bn1" and layers[-1].layer_index == 19
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone(spec(backbone="resnet18", weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="no packaged weights"):
        build_backbone(spec(backbone="resnet50", weights="pretrained"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(spec(backbone="vgg"))


def test_domain_argument_is_explicit():
    net = DGNet(spec(backbone="resnet18", weights="none", num_classes=7, domains=("a", "b"))).eval()
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="needs domains"):
        net(x)
    with pytest.raises(ValueError, match="does not split evenly"):
        net(torch.rand(3, 3, 32, 32), domains=[0, 1])
    assert net(x, domains=[0, 1]).shape == (4, 7)
    plain = DGNet(spec(backbone="resnet18", weights="none", norm="bn"))
    with pytest.raises(ValueError, match="not domain-specific"):
        plain(x, domains=0)


def test_domain_layers_keeps_later_stages_shared():
    """model.domain_layers = k: the BN layers of the first k stages are domain-specific, the rest shared BatchNorm2d
    that see the whole mixed batch in training (one update per step), as DeepAll's do."""
    from bne.train import train_step

    torch.manual_seed(0)
    net = DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), domain_layers=2))
    shared = [m for m in net.modules() if type(m) is torch.nn.BatchNorm2d]
    assert len(net.norm_layers()) == 5 and len(shared) == 15  # stem bn1 + layer1's 4; layers 2-4 (and downsamples)
    assert [layer.layer_index for layer in net.norm_layers()] == list(range(5))
    from conftest import train_cfg

    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    batches = [(torch.rand(4, 3, 32, 32) * (1 + d), torch.randint(0, 3, (4,))) for d in range(2)]
    seen = []
    hook = shared[0].register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape[0], out.detach().mean((0, 2, 3)))))
    train_step(net, opt, batches, train_cfg())
    hook.remove()
    assert all(int(m.num_batches_tracked) == 1 for m in shared)
    assert all(m.num_batches_tracked.tolist() == [1, 1] for m in net.norm_layers())
    (n, out_mean), = seen  # one call on both domains' 8 images, normalized with their joint statistics (mean 0)
    assert n == 8 and float(out_mean.abs().max()) < 1e-4  # (weight 1, bias 0 at the first step)
    net.eval()
    with torch.no_grad():
        x = torch.rand(3, 3, 32, 32)
        assert not torch.allclose(net(x, domains=0), net(x, domains=1))  # the branches still differ (early layers)
    with pytest.raises(ValueError, match="model.domain_layers = 6: resnet18 has 5 stages"):
        DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), domain_layers=6))
    with pytest.raises(ValueError, match="model.domain_layers = 0"):
        spec(domain_layers=0)
    every = DGNet(spec(backbone="resnet18", weights="none", num_classes=3, domains=("a", "b"), domain_layers=5))
    assert len(every.norm_layers()) == 20 and not any(type(m) is torch.nn.BatchNorm2d for m in every.modules())


def test_domain_layers_all_leaves_the_training_key_as_before():
    """The checkpoint key ignores domain_layers when it is `all` or the network has no domains (resume stays valid)."""
    from bne.train import spec_key

    assert "domain_layers" not in spec_key(spec(domains=("a", "b")))
    assert "domain_layers" not in spec_key(spec(domain_layers=3))  # DeepAll: no domains, nothing domain-specific
    assert spec_key(spec(domains=("a", "b"), domain_layers=3))["domain_layers"] == 3
