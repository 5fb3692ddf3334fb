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
