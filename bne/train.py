"""Training of DeepAll (ERM) and BNE by the same loop and budget, with resumable per-epoch checkpoints.

One process, or data-parallel under ``torchrun`` (:func:`init_distributed`; DistributedDataParallel, gloo on CPU,
NCCL on CUDA): every rank takes a contiguous share of every domain's sub-batch of the step, the normalization
layers pool their batch statistics over the ranks (:mod:`bne.norm.dsbn`), and rank 0 alone writes checkpoints and
logs. With one process the code path is the single-process one, operation for operation.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bne.augment import BatchAugment
from bne.data import Augment, AugmentConfig, DomainArrays, domain_batches, to_tensor
from bne.embedding import (
    InferenceOptions,
    bne_weights,
    ensemble,
    layer_mean_matrix,
    per_layer_distances,
)
from bne.io import atomic_torch_save, one_line
from bne.model import DGNet, ModelSpec, classifier, stages
from bne.norm.dsbn import DomainBatchNorm2d, convert_sync_batchnorm, distributed_refusal, world_size
from bne.norm.mbn import double_forward
from bne.progress import progress as report_progress
from bne.stats import InstanceRecorder

METHODS = ("deepall", "bne")
#: The options of the training-time ensemble loss: the paper's BNE (running statistics, W2, every layer, mean,
#: inverse distance). Fixed here on purpose, not ``eval.options``: changing how the pipeline evaluates must not
#: change (and retrain) the models, and ``train_key`` does not record the options.
ENSEMBLE_LOSS_OPTIONS = InferenceOptions(
    embedding="running", distance="w2", layers="all", aggregate="mean", weighting="inverse", power=1.0,
    temperature=1.0, instance_stats="per_branch",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation budget and recipe; identical for DeepAll and BNE.

    No defaults but ``seed`` (set per run): the values come from ``params.yaml`` (``train:``, through ``tasks.params``).
    """

    epochs: int
    per_domain_batch: int
    lr: float
    head_lr_mult: float
    weight_decay: float
    momentum: float
    warmup_frac: float
    freeze_stages: int
    select: str  # best (source-validation accuracy) | last
    seed: int = 0
    augment: AugmentConfig
    eval_batch: int
    # BNE only (METHOD.md "same mapping at training time"): weight of the ensemble loss, the NLL of the
    # test-time ensemble on the step's images (every branch with frozen statistics); 0 = off.
    ensemble_loss: float
    ensemble_own_out: bool  # leave each image's own branch out of that ensemble (an unseen domain)
    # Both methods: decay per step of an exponential moving average of the weights, 0 = off; the averaged network
    # (its normalization statistics recomputed on ``ema_bn_batches`` training batches at each epoch end) is the
    # one validated, selected and returned (:func:`train`).
    ema: float
    ema_bn_batches: int


#: Normalization layers (``model.norm``) whose statistics the weight average cannot recompute: why, per norm.
EMA_REFUSED_NORMS = {
    "cbn": "its training normalizes with statistics compensated along the weights' trajectory, which the averaged "
           "weights do not have",
    "mbn": "its running statistics are the pool of a window of memorized batches (Double-Forward), not a running average",
    "simplex": "its training forward normalizes with random mixtures of the step's domain statistics: recomputing "
               "with them or with each domain's own would define the statistics anew",
}


def ema_refusal(cfg: TrainConfig, norm: str, world: int = 1) -> str | None:
    """Why ``cfg.ema`` cannot train here (a message naming the keys), or None."""
    if not cfg.ema:
        return None
    if norm in EMA_REFUSED_NORMS:
        return (f"train.ema = {cfg.ema} with model.norm = {norm!r}: {EMA_REFUSED_NORMS[norm]}; use train.ema: 0 "
                f"or a norm whose running statistics are plain (bn, bgn, iebn, proxynorm)")
    if world > 1:
        return (f"train.ema = {cfg.ema} under {world} processes: the weight average trains on one process only; "
                "set train.ema: 0 under torchrun, or train without torchrun")
    return None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device: str = "auto") -> torch.device:
    """This process's training device; under ``torchrun`` with several processes, join the process group first.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address. On CUDA each process takes
    ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. Without ``torchrun`` (or with one process) it is :func:`pick_device`.
    """
    dev = pick_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return dev


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if world_size() > 1 else 0


def _rank_seed(*parts: int) -> int:
    """A seed for one rank's step (dropout, drop-connect): distinct per rank, reproducible on resume."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") % 2**63


def _broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (its tensors on the CPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_hash(*parts: object) -> str:
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_key(cfg: TrainConfig, method: str) -> dict:
    """The settings of ``cfg`` that change ``method``'s training: the ensemble loss's only when it is on for BNE,
    the weight average's only when it is on (both methods; checkpoints of before it stay valid)."""
    d = asdict(cfg)
    if method != "bne" or not cfg.ensemble_loss:
        d = {k: v for k, v in d.items() if not k.startswith("ensemble_")}
    if not cfg.ema:
        d = {k: v for k, v in d.items() if k != "ema" and not k.startswith("ema_")}
    d["layout"] = "channels_last"  # the network's memory layout on every device (NCHW-trained CPU runs differ)
    return d


def spec_key(spec: ModelSpec) -> dict:
    """The settings of ``spec`` that change the network: with ``norm: bn`` the other layers' knobs drop out, and so
    does ``domain_layers`` when it is ``all`` or the network has no domains (checkpoints of before it stay valid)."""
    d = asdict(spec)
    if d.get("norm", "bn") == "bn":
        d = {k: v for k, v in d.items() if k != "norm" and not k.startswith(("norm_", "bgn_", "cbn_", "mbn_", "iebn_", "proxy_", "simplex_"))}
    if d.get("domain_layers") == "all" or not spec.domains:
        d.pop("domain_layers", None)
    return d


def ensemble_loss(model: DGNet, x: torch.Tensor, y: torch.Tensor, opts: InferenceOptions, own_out: bool) -> torch.Tensor:
    """NLL of BNE's test-time ensemble on a training step's images (S equal sub-batches, domain-major).

    Every branch sees every image with its normalization layers in eval mode (the domains' running statistics,
    not updated by this pass); the weights come from the images' instance statistics as at inference with
    ``opts`` (the training loop passes :data:`ENSEMBLE_LOSS_OPTIONS`) and carry no gradient; ``own_out`` drops
    each image's own branch.
    """
    s, n = model.num_domains, x.shape[0]
    if own_out and s < 2:
        raise ValueError(
            f"the ensemble loss with ensemble_own_out leaves no branch with only {s} source domain(s) {list(model.spec.domains)}: "
            "set train.ensemble_own_out: false or train.ensemble_loss: 0"
        )
    layers = model.norm_layers()
    frozen = [*layers, *(m for m in model.modules() if type(m) is nn.BatchNorm2d)]  # shared layers too (domain_layers)
    modes = [layer.training for layer in frozen]
    rec = InstanceRecorder()
    try:
        for layer in frozen:
            layer.eval()
        logits = model(x.repeat(s, 1, 1, 1), domains=list(range(s)), recorder=rec).view(s, n, -1)
    finally:
        for layer, mode in zip(frozen, modes):
            layer.train(mode)
    with torch.no_grad():
        layer_mean = layer_mean_matrix([layer.num_features for layer in layers]).to(x.device)
        md = torch.cat([layer.running_mean for layer in layers], 1).float().unsqueeze(1)
        sd = torch.cat([layer.running_var for layer in layers], 1).float().sqrt().unsqueeze(1)
        mx = torch.cat([rec.mean[layer.layer_index] for layer in layers], -1).float().view(s, n, -1)
        sx = torch.cat([rec.std[layer.layer_index] for layer in layers], -1).float().view(s, n, -1)
        w = bne_weights(per_layer_distances(mx, sx, md, sd, opts.distance, layer_mean), opts)  # (S, n)
        if own_out:
            w[torch.arange(s, device=w.device).repeat_interleave(n // s), torch.arange(n, device=w.device)] = 0
            w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    probs = ensemble(torch.softmax(logits.float(), -1), w)
    return F.nll_loss(torch.log(probs.clamp_min(1e-8)), y)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: DGNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    for stage in stages(model.net, model.spec.backbone)[: cfg.freeze_stages]:
        for module in stage:
            module.requires_grad_(False)
    head = {id(p) for p in classifier(model.net, model.spec.backbone).parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim > 1), []).append(p)
    return torch.optim.SGD(
        [
            {
                "params": ps,
                "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
                "base_lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (is_head, decay), ps in sorted(groups.items())
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )


def distribute(model: DGNet, device: torch.device) -> DistributedDataParallel:
    """``model`` (its optimizer built) for a step on several processes: DistributedDataParallel around it.

    Refuses normalization layers that do not synchronize their statistics (a ValueError naming the layer); an
    ordinary network's BatchNorm2d (DeepAll) become :class:`bne.norm.dsbn.SyncBatchNorm2d` sharing their parameters
    and buffers, so the optimizer's parameters are unchanged. Buffers are not broadcast: the running statistics
    are equal on every rank by construction. Step through the returned wrapper (:func:`train_step`).
    """
    unsynced = [layer for layer in model.norm_layers() if not layer.distributed_sync]
    if unsynced:
        raise ValueError(f"model.norm {model.spec.norm!r} under {world_size()} processes: {distributed_refusal(unsynced[0])}")
    convert_sync_batchnorm(model)
    # parameters in the layout of their gradients (the input is channels_last on every device): DDP's buckets follow it
    model.to(memory_format=torch.channels_last)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train_step(
    model: DGNet | DistributedDataParallel,
    opt: torch.optim.Optimizer,
    minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    ensemble_options: InferenceOptions = ENSEMBLE_LOSS_OPTIONS,
) -> torch.Tensor:
    """One optimisation step on one minibatch per source domain: DomainBed's ``update(minibatches)``.

    ``minibatches``: an (images, labels) pair per source domain, equal sizes, on the model's device; for BNE in
    the order of ``model.spec.domains``. A domain-specific model (BNE) forwards the concatenated batch once,
    sub-batch d through branch d; an ordinary one (DeepAll) forwards the same images as one mixed batch. Both
    minimise the mean cross-entropy over all S x b images; BNE adds ``cfg.ensemble_loss`` x :func:`ensemble_loss`
    when that weight is not 0. Then backward, ``opt.step()`` (at the learning rates the caller set), and, with
    ``norm: mbn``, Memorized BN's double forward of the same batch with the updated weights. bfloat16 autocast on
    CUDA. Returns the loss, detached, on the device: nothing is read back to the host (no sync per step).

    ``model`` may be a DistributedDataParallel of the network (several processes): the minibatches are then this
    rank's shares, the forward goes through the wrapper (gradients averaged over the ranks) and the returned loss
    is this rank's mean.
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    domain_specific = net.num_domains > 0
    s = len(minibatches)
    if domain_specific and s != net.num_domains:
        raise ValueError(f"{s} minibatch(es) for a network of {net.num_domains} domain branches {list(net.spec.domains)}")
    x = torch.cat([xb for xb, _ in minibatches])
    y = torch.cat([yb for _, yb in minibatches])
    domains = list(range(s)) if domain_specific else None
    with _autocast(x.device):
        logits = model(x, domains=domains) if domain_specific else model(x)
        # mean over all S x b images, both methods; at least float32 (float64 stays float64, for exactness tests)
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
        if domain_specific and cfg.ensemble_loss:
            loss = loss + cfg.ensemble_loss * ensemble_loss(net, x, y, ensemble_options, cfg.ensemble_own_out)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if net.spec.norm == "mbn":  # Memorized BN's Double-Forward: re-memorise this batch's statistics with the new weights
        with torch.no_grad(), _autocast(x.device):
            double_forward(net, x, domains=domains)
    return loss.detach()


@torch.no_grad()
def source_val_accuracy(model: DGNet, sources: list[DomainArrays], batch: int, device: torch.device) -> float:
    """Accuracy on the sources' validation rows: BNE uses each image's own-domain branch.

    Several processes: each rank evaluates a contiguous share of every domain's rows and the counts are summed.
    """
    model.eval()
    correct = total = 0
    world = world_size()
    for d, arr in enumerate(sources):
        val = arr.val if world == 1 else np.array_split(arr.val, world)[rank()]
        for i in range(0, len(val), batch):
            rows = val[i : i + batch]
            x = to_tensor(arr.images[np.sort(rows)]).to(device)
            y = torch.as_tensor(arr.labels[np.sort(rows)], device=device)
            with _autocast(device):
                logits = model(x, domains=d) if model.num_domains else model(x)
            correct += int((logits.argmax(1) == y).sum())
            total += len(rows)
    if world > 1:
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])
    return correct / max(1, total)


@torch.no_grad()
def recompute_norm_stats(model: DGNet, batches: Iterable[Sequence[torch.Tensor]]) -> int:
    """Replace the running statistics of every normalization layer of ``model`` by the cumulative average of its
    batch statistics over ``batches`` (each: one image tensor per source domain, equal sizes, on the device).

    Each batch is forwarded as a training step forwards it (:func:`train_step`): a domain-specific network (BNE)
    takes the concatenated batch with chunk d through branch d, so every domain's statistics come from its own
    images and the shared (non-domain) layers (``model.domain_layers``) see the mixed batch; an ordinary network
    (DeepAll) the same images as one mixed batch. The normalization layers run in train mode with momentum None
    (factor 1/n for the n-th batch, their counts reset first); every other module stays in eval mode (no
    dropout or drop-connect: the statistics of the network that is evaluated; no random number is drawn). No
    gradient. The momenta and the model's mode are restored. Returns the number of batches forwarded.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, DomainBatchNorm2d))]
    if model.spec.norm in EMA_REFUSED_NORMS:
        raise ValueError(f"model.norm {model.spec.norm!r}: cannot recompute its statistics: {EMA_REFUSED_NORMS[model.spec.norm]}")
    mode, momenta = model.training, [layer.momentum for layer in layers]
    n = 0
    try:
        model.eval()
        for layer in layers:
            layer.momentum = None
            layer.num_batches_tracked.zero_()
            layer.train()
        for xs in batches:
            x = torch.cat(list(xs))
            with _autocast(x.device):
                model(x, domains=list(range(len(xs)))) if model.num_domains else model(x)
            n += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(mode)
    return n


def _ema_seed(seed: int, epoch: int) -> int:
    """The seed of the batches an epoch's weight average recomputes its statistics on (not training's stream)."""
    return int.from_bytes(hashlib.sha256(f"ema/{seed}/{epoch}".encode()).digest()[:8], "little") % 2**63


@dataclass
class TrainResult:
    model: DGNet
    history: list[dict]
    selected_epoch: int


def train(
    method: str,
    spec: ModelSpec,
    sources: list[DomainArrays],
    cfg: TrainConfig,
    resolution: int,
    out_dir: Path | str,
    device: torch.device | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``method`` on the source domains; ``out_dir/last.pt`` is written each epoch and resumed from.

    Each step draws ``per_domain_batch`` images from every source domain and hands them to :func:`train_step`:
    BNE routes each sub-batch through its domain's branch; DeepAll forwards the same images as one mixed batch
    through an ordinary network. Both minimise the mean cross-entropy over all images of the step.
    ``progress``: a bar on a terminal, else a log line at least every 30 s (:mod:`bne.progress`).
    ``on_epoch(epoch, source_val_acc)`` is called after each epoch's checkpoint (a tuner may raise there to prune).

    Several processes (the default process group initialized, e.g. by :func:`init_distributed` under ``torchrun``):
    the model is wrapped in DistributedDataParallel and every rank takes the contiguous share ``rank`` of each
    domain's ``per_domain_batch`` rows (which must divide by the world size), augmented as one process would
    augment the whole step (the same seeded stream on every rank) before slicing, so the ranks together see the
    single-process step's images. The normalization layers pool their statistics over the ranks (DeepAll's
    BatchNorm2d become :class:`bne.norm.dsbn.SyncBatchNorm2d`; layers that cannot, refuse). Rank 0 alone reads
    and writes ``out_dir`` and logs; ``last.pt`` records the world size and resuming an unfinished run with another one is refused.
    Every rank returns the same selected model.

    ``cfg.ema`` > 0 (one process; norms of :data:`EMA_REFUSED_NORMS` refused): an exponential moving average of the
    weights (:class:`torch.optim.swa_utils.AveragedModel`, decay ``cfg.ema`` per step, from the first step; the
    parameters only) is updated after every step; at each epoch end its normalization statistics are recomputed on
    ``cfg.ema_bn_batches`` un-augmented training batches drawn as training draws them, from a stream of their own
    (:func:`recompute_norm_stats`); source validation, ``best.pt`` and the returned model are the averaged
    network's, and ``last.pt`` holds the average too, so a resumed run ends as an uninterrupted one.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    world, me = world_size(), rank()
    refusal = ema_refusal(cfg, spec.norm, world)
    if refusal:
        raise ValueError(refusal)
    if world > 1:
        if cfg.per_domain_batch % world:
            raise ValueError(
                f"train.per_domain_batch {cfg.per_domain_batch} does not divide over {world} processes: each process takes an "
                f"equal share of every domain's sub-batch; use a multiple of {world} or another number of processes"
            )
        if me != 0:  # rank 0 alone logs
            progress, log = False, (lambda m: None)
    device = device or pick_device()
    out_dir = Path(out_dir)
    if me == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    names = tuple(a.name for a in sources)
    spec = ModelSpec(**{**asdict(spec), "domains": names if method == "bne" else ()})
    key = config_hash(method, spec_key(spec), train_key(cfg, method), resolution, names, [a.fingerprint or len(a.train) for a in sources])

    seed_everything(cfg.seed)
    model = DGNet(spec).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    # the weight average: a copy of the network whose parameters follow the EMA (its step count on the CPU: no sync)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=False) if cfg.ema else None
    step_model = distribute(model, device) if world > 1 else model
    s, b = len(sources), cfg.per_domain_batch
    steps = sum(len(a.train) for a in sources) // (s * b)
    if steps < 1:
        raise ValueError(f"too few training images ({sum(len(a.train) for a in sources)}) for one step of {s} x {b}")
    total, warmup = steps * cfg.epochs, int(cfg.warmup_frac * steps * cfg.epochs)
    # CPU: torchvision per image (fast enough beside a CPU trainer); GPU: the whole batch on the device
    augment = BatchAugment(cfg.augment, resolution) if device.type == "cuda" else Augment(cfg.augment, resolution)

    history: list[dict] = []
    start = 0
    ckpt = out_dir / "last.pt"
    state = None
    if me == 0 and ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location=device if world == 1 else "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: name it, no traceback
            raise ValueError(f"{ckpt}: not a loadable checkpoint ({one_line(e)}); delete it to train this model from "
                             "scratch (rerun the train stage)") from None
    if world > 1:  # rank 0's checkpoint: the other ranks' machines need not see out_dir
        state = _broadcast_object(state)
    if state is not None:
        if state["key"] == key:
            saved_world = int(state.get("world_size", 1))
            if saved_world != world and int(state["epoch"]) + 1 < cfg.epochs:  # a finished run loads on any number
                raise ValueError(
                    f"{ckpt} was written by a run on {saved_world} process(es) and this run has {world}: resume it with "
                    f"{saved_world} process(es) (torchrun --nproc-per-node/--nnodes), or delete {ckpt} to start over"
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if averaged is not None:
                averaged.load_state_dict(state["ema"])
            history = json.loads(state["history"])
            start = int(state["epoch"]) + 1
            torch.set_rng_state(state["torch_rng"])
            log(f"{method}: resuming from {ckpt} after epoch {start}")
        else:
            log(f"{method}: {ckpt} was made with other settings; training from scratch")
    del state
    if start == 0 and me == 0:
        (out_dir / "best.pt").unlink(missing_ok=True)
    lo, hi = me * b // world, (me + 1) * b // world  # this rank's share of each domain's rows

    for epoch in range(start, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        step_model.train()
        t_epoch = time.time()
        running = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no .item() per step
        batches = report_progress(
            domain_batches([a.train for a in sources], b, steps, gen),
            total=steps,
            desc=f"{method} epoch {epoch + 1}/{cfg.epochs}",
            unit="img",
            items_per_step=s * b,
            enabled=progress,
        )
        for i, rows in enumerate(batches):
            f = lr_factor(epoch * steps + i, total, warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            if device.type == "cuda":  # one augmentation call over the whole step's batch on the device
                xs = augment(torch.from_numpy(np.concatenate([a.images[r] for a, r in zip(sources, rows)])).to(device)).split(b)
            else:
                xs = [augment(a.images[r]) for a, r in zip(sources, rows)]
            minibatches = [(x, torch.as_tensor(a.labels[r]).to(device)) for x, a, r in zip(xs, sources, rows)]
            if world == 1:
                running += train_step(model, opt, minibatches, cfg)
                if averaged is not None:
                    averaged.update_parameters(model)
                continue
            # this rank's share; its own random stream inside the step (dropout), the shared one kept for augmentation
            minibatches = [(x[lo:hi], y[lo:hi]) for x, y in minibatches]
            with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
                torch.manual_seed(_rank_seed(cfg.seed, epoch, i, me))
                running += train_step(step_model, opt, minibatches, cfg)
        if world > 1:
            dist.all_reduce(running)  # the ranks' mean losses: equal shares, so their mean is the step's
            running /= world
        running = float(running)
        selectable = model  # the network validated, selected and returned: the weight average when on
        if averaged is not None:
            selectable = averaged.module
            rows = domain_batches([a.train for a in sources], b, cfg.ema_bn_batches,
                                  torch.Generator().manual_seed(_ema_seed(cfg.seed, epoch)))
            recompute_norm_stats(selectable, ([to_tensor(a.images[r]).to(device) for a, r in zip(sources, rs)] for rs in rows))
        val = source_val_accuracy(selectable, sources, cfg.eval_batch, device)
        history.append({"epoch": epoch + 1, "train_loss": running / steps, "source_val_acc": val, "seconds": round(time.time() - t_epoch, 1)})
        log(f"{method} epoch {epoch + 1}/{cfg.epochs}: loss {running / steps:.4f}, source-val acc {val:.4f}")
        if me == 0:
            if cfg.select == "best" and val >= max(h["source_val_acc"] for h in history):
                atomic_torch_save(selectable.state_dict(), out_dir / "best.pt")
            checkpoint = {
                "key": key,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "history": json.dumps(history),
                "torch_rng": torch.get_rng_state(),
            }
            if averaged is not None:
                checkpoint["ema"] = averaged.state_dict()
            if world > 1:
                checkpoint["world_size"] = world  # a resume needs the same number of processes
            atomic_torch_save(checkpoint, ckpt)
        if world > 1:
            dist.barrier()  # the checkpoint exists before any rank goes on (or is killed)
        if on_epoch is not None:
            on_epoch(epoch + 1, val)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break

    del step_model  # DistributedDataParallel's gradient hooks go with it
    if averaged is not None:  # the averaged network is the result (best.pt holds its weights too)
        model.load_state_dict(averaged.module.state_dict())
        del averaged
    selected = len(history)
    has_best = cfg.select == "best" and history and me == 0 and (out_dir / "best.pt").is_file()
    if world > 1:
        has_best = _broadcast_object(has_best)
    if has_best:
        selected = max(history, key=lambda h: h["source_val_acc"])["epoch"]
        if me == 0:
            model.load_state_dict(torch.load(out_dir / "best.pt", map_location=device, weights_only=True))
        if world > 1:  # rank 0's selected weights on every rank
            for t in model.state_dict().values():
                buf = t.contiguous()
                dist.broadcast(buf, 0)
                if buf is not t:
                    t.copy_(buf)
    model.eval()
    return TrainResult(model, history, selected)
