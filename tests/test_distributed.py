"""Data-parallel training (issue 17): 2 gloo ranks on the CPU equal one process holding the whole batch.

Ranks are started with ``torch.multiprocessing.spawn`` and meet through a file store; each writes what it saw to
a file that the tests (one process, no process group) compare with their own single-process runs. Two spawns in
all (starting ranks costs most of this file's time): the first runs the step equivalence (BNE and DeepAll,
domain-specific affine on and off, float64), the refusals, a training run to the end and one killed after epoch
1's checkpoint; the second resumes the killed run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bne.data import DomainArrays, build_cache, load_cache, load_folder_dataset
from bne.model import DGNet, convert_to_domain_specific
from bne.norm.dsbn import DomainBatchNorm2d, domain_route
from bne.train import build_optimizer, distribute, seed_everything, train, train_step
from conftest import make_dataset, train_cfg
from conftest import spec as make_spec

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)

WORLD = 2
STEPS = 3
B = 4  # per-domain batch of the step (each rank: B / WORLD)
RES = 16
CASES = [(method, affine) for method in ("bne", "deepall") for affine in (False, True)]
DOMAINS = ("a", "b", "c")


class TinyResNet(nn.Module):
    """A small conv net with the attribute names of torchvision's ResNet (what ``bne.model.stages`` and
    ``classifier`` read), so ``DGNet``, ``build_optimizer`` and ``freeze_stages`` treat it as a resnet18."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1, self.layer2, self.layer3, self.layer4 = block(8, 8, 1), block(8, 16, 2), block(16, 16, 2), block(16, 32, 2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def _cfg():
    return train_cfg(per_domain_batch=B, lr=0.05, freeze_stages=1, ensemble_loss=0.0)


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.rand(B, 3, RES, RES, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g))
            for _ in DOMAINS]


def _model(method: str, affine: bool) -> DGNet:
    """DGNet around :class:`TinyResNet`, domain-specific layers converted by ``bne.model`` for BNE; float64."""
    spec = make_spec(backbone="resnet18", weights="none", domain_affine=affine,
                     domains=DOMAINS if method == "bne" else ())
    model = DGNet(spec)
    seed_everything(0)
    model.net = TinyResNet()
    if method == "bne":
        convert_to_domain_specific(model.net, len(DOMAINS), spec)
    return model.double().train()


def _steps(model: DGNet, rank: int, world: int) -> tuple[list[torch.Tensor], dict, dict]:
    """3 steps of :func:`train_step` on this rank's share of every domain's rows: the step losses (mean over
    the ranks), the last step's gradients and the state dict."""
    cfg = _cfg()
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    step_model = distribute(model, torch.device("cpu")) if world > 1 else model
    lo, hi = rank * B // world, (rank + 1) * B // world
    losses = []
    for step in range(STEPS):
        loss = train_step(step_model, opt, [(x[lo:hi], y[lo:hi]) for x, y in _data(step)], cfg)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _bf16_layer(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """A DomainBatchNorm2d on bfloat16 activations (what CUDA's autocast feeds it): this rank's share of each of 2
    domains' rows; a loss weighting the outputs. Returns (output, input gradient, running mean, running var)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, B, 4, 3, 3, generator=g) * 3 + 1).bfloat16()
    w = torch.randn(2, B, 4, 3, 3, generator=g)
    lo, hi = rank * B // world, (rank + 1) * B // world
    share = x[:, lo:hi].reshape(-1, 4, 3, 3).clone().requires_grad_()
    layer = DomainBatchNorm2d(4, 2).train()
    with domain_route([0, 1], [hi - lo] * 2):
        y = layer(share)
    (y.float() * w[:, lo:hi].reshape(-1, 4, 3, 3)).sum().backward()
    return y.detach(), share.grad, layer.running_mean, layer.running_var


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _first_worker(rank: int, world: int, tmp: str) -> None:
    """Spawn 1: the step equivalence, the refusals, then a run to the end and a run killed after epoch 1."""
    _init(rank, world, f"{tmp}/store1")
    tmp = Path(tmp)
    out = {}
    for method, affine in CASES:
        model = _model(method, affine)
        out[(method, affine)] = _steps(model, rank, world)
        out[(method, affine, "types")] = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    out["bf16"] = _bf16_layer(rank, world)
    arrays = [DomainArrays(d, np.zeros((8, RES, RES, 3), np.uint8), np.zeros(8, np.int64), np.arange(8), np.arange(0)) for d in "ab"]
    for name, spec, cfg in (("batch", make_spec(backbone="resnet18", weights="none"), train_cfg(per_domain_batch=3)),
                            ("norm", make_spec(backbone="resnet18", weights="none", norm="bgn"), train_cfg(per_domain_batch=2))):
        try:
            train("bne", spec, arrays, cfg, RES, tmp / name, torch.device("cpu"), progress=False, log=lambda m: None)
            out[name] = "trained"
        except ValueError as e:
            out[name] = str(e)
    torch.save(out, tmp / f"rank{rank}.pt")

    seen = _record_steps()
    res = _train(tmp / "full", tmp / "data")
    torch.save({"state": {k: v.clone() for k, v in res.model.state_dict().items()}, "steps": seen},
               tmp / f"full_rank{rank}.pt")

    def kill_after_first_epoch(epoch: int, val: float) -> None:
        if epoch == 1 and rank == 0:  # the checkpoint is on disk (every rank passed the barrier after it)
            os.kill(os.getpid(), signal.SIGKILL)

    _train(tmp / "killed", tmp / "data", on_epoch=kill_after_first_epoch)


def _record_steps() -> list[tuple[list[torch.Tensor], list[torch.Tensor], float]]:
    """From now on, every :func:`train_step` of ``bne.train.train`` in this process appends its minibatches'
    images and labels and its loss to the returned list."""
    import bne.train

    seen, real = [], bne.train.train_step

    def spy(model, opt, minibatches, cfg, *args):
        loss = real(model, opt, minibatches, cfg, *args)
        seen.append(([x.clone() for x, _ in minibatches], [y.clone() for _, y in minibatches], float(loss)))
        return loss

    bne.train.train_step = spy
    return seen


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(WORLD, *args), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def first_spawn(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    make_dataset(tmp / "data", styles=("red_on_white", "yellow_on_blue"), per_class=6, size=32)
    _sources(tmp / "data")  # the cache, built once before the ranks read it
    with pytest.raises(Exception, match="signal|SIGKILL"):  # noqa: B017 - rank 0 killed: spawn stops rank 1, raises
        _spawn(_first_worker, str(tmp))
    return tmp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here too: the ranks have the 2 cores, and tiny float64 steps crawl with 2 threads under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_ranks_with_half_batches_equal_one_process_with_the_whole_batch(first_spawn):
    ranks = [torch.load(first_spawn / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for method, affine in CASES:
        model = _model(method, affine)
        losses, grads, state = _steps(model, 0, 1)
        for r, got in enumerate(ranks):
            case = f"{method}, domain_affine={affine}, rank {r}"
            g_losses, g_grads, g_state = got[(method, affine)]
            torch.testing.assert_close(torch.stack(g_losses), torch.stack(losses), atol=1e-10, rtol=0, msg=case)
            assert g_grads.keys() == grads.keys() and len(grads) > 0, case
            for n in grads:
                torch.testing.assert_close(g_grads[n], grads[n], atol=1e-10, rtol=0, msg=f"{case}: grad {n}")
            assert g_state.keys() == state.keys(), case
            for k in state:  # weights, every domain's running statistics and batch counts
                torch.testing.assert_close(g_state[k], state[k], atol=1e-10, rtol=0, msg=f"{case}: {k}")
                assert torch.equal(g_state[k], ranks[0][(method, affine)][2][k]), f"{case}: {k} differs between ranks"
        synced = ranks[0][(method, affine, "types")]
        assert synced == (["DomainBatchNorm2d"] if method == "bne" else ["SyncBatchNorm2d"]), synced
    # bfloat16 activations: statistics in float32, output and input gradient in bfloat16, equal to rounding
    y, grad, rm, rv = _bf16_layer(0, 1)
    for r, got in enumerate(ranks):
        gy, ggrad, grm, grv = got["bf16"]
        assert gy.dtype == ggrad.dtype == torch.bfloat16
        lo, hi = r * B // WORLD, (r + 1) * B // WORLD

        def mine(t: torch.Tensor, lo: int = lo, hi: int = hi) -> torch.Tensor:
            return t.view(2, B, 4, 3, 3)[:, lo:hi].reshape(-1, 4, 3, 3).float()

        torch.testing.assert_close(gy.float(), mine(y), atol=0.05, rtol=0.02)
        torch.testing.assert_close(ggrad.float(), mine(grad), atol=0.05, rtol=0.02)
        torch.testing.assert_close(grm, rm, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(grv, rv, atol=1e-2, rtol=1e-2)
    assert "per_domain_batch 3 does not divide over 2 processes" in ranks[0]["batch"]
    assert "BatchGroupNorm2d" in ranks[0]["norm"] and "does not synchronize" in ranks[0]["norm"]


# ----------------------------------------------------------------------------------------------- resume


def _sources(root: Path) -> list[DomainArrays]:
    ds = load_folder_dataset(root, val_fraction=0.25)
    arrays = load_cache(ds, build_cache(ds, 24, root.parent / "cache", workers=1, progress=False, max_pixels=MAX_PIXELS))
    return [arrays[d] for d in ds.domains]


def _train(out: Path, root: Path, on_epoch=None, log=lambda m: None):
    """BNE, resnet18 at 24 px, 2 epochs of 3 steps (2 domains x 4 images), the best epoch selected."""
    cfg = train_cfg(epochs=2, per_domain_batch=4, lr=0.005, freeze_stages=0, select="best", ensemble_loss=0.0)
    return train("bne", make_spec(backbone="resnet18", weights="none"), _sources(root), cfg, 24, out,
                 torch.device("cpu"), progress=False, log=log, on_epoch=on_epoch)


def _resume_worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, f"{tmp}/store2")
    tmp = Path(tmp)
    logs: list[str] = []
    res = _train(tmp / "killed", tmp / "data", log=logs.append)
    torch.save({"state": {k: v.clone() for k, v in res.model.state_dict().items()}, "history": res.history,
                "selected": res.selected_epoch, "logs": logs}, tmp / f"resumed_rank{rank}.pt")
    dist.destroy_process_group()


def test_a_killed_two_rank_run_resumes_and_refuses_another_world_size(first_spawn):
    tmp = first_spawn
    ckpt = torch.load(tmp / "killed" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["world_size"] == WORLD  # rank 0 was killed after epoch 1 of 2
    with pytest.raises(ValueError, match=r"written by a run on 2 process\(es\) and this run has 1: resume it with 2"):
        _train(tmp / "killed", tmp / "data")  # another world size is refused, naming both
    _spawn(_resume_worker, str(tmp))
    r0, r1 = (torch.load(tmp / f"resumed_rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert any("resuming" in m for m in r0["logs"]) and not r1["logs"]  # rank 0 alone logs
    assert [h["epoch"] for h in r0["history"]] == [1, 2]
    drop_time = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (r0, r1)]
    assert drop_time[0] == drop_time[1]  # the same curve on every rank (losses and accuracies pooled over ranks)
    full = torch.load(tmp / "full_rank0.pt", weights_only=False)["state"]
    for k, v in full.items():  # the resumed run ends where the uninterrupted one did, on both ranks
        assert torch.equal(r0["state"][k], v) and torch.equal(r1["state"][k], v), k
    assert sorted(p.name for p in (tmp / "killed").iterdir()) == ["best.pt", "last.pt"]
    # a finished run loads on one process without training again
    logs: list[str] = []
    done = _train(tmp / "killed", tmp / "data", log=logs.append)
    assert logs == ["bne: resuming from " + str(tmp / "killed" / "last.pt") + " after epoch 2"]
    assert all(torch.equal(v, full[k]) for k, v in done.model.state_dict().items())


def test_the_ranks_of_a_step_see_the_single_process_steps_images(first_spawn, monkeypatch):
    """Each rank's minibatches are its contiguous share of the single-process step's rows of every domain, augmented
    alike: together, the same images and labels, in the same order; the first step's losses agree."""
    import bne.train

    monkeypatch.setattr(bne.train, "train_step", bne.train.train_step)  # the real step is restored after the test
    seen = _record_steps()
    _train(first_spawn / "single", first_spawn / "data")
    ranks = [torch.load(first_spawn / f"full_rank{r}.pt", weights_only=False)["steps"] for r in range(WORLD)]
    assert len(seen) == len(ranks[0]) == len(ranks[1]) == 6  # 2 epochs of 3 steps
    for step, (xs, ys, _loss) in enumerate(seen):
        for d in range(len(xs)):
            assert all(len(r[step][0][d]) == len(xs[d]) // WORLD for r in ranks)
            assert torch.equal(torch.cat([r[step][0][d] for r in ranks]), xs[d]), (step, d)
            assert torch.equal(torch.cat([r[step][1][d] for r in ranks]), ys[d]), (step, d)
    # a rank's loss is its share's mean: their mean is the step's loss (float32 rounding)
    assert abs(sum(r[0][2] for r in ranks) / WORLD - seen[0][2]) < 1e-5


def test_one_process_does_not_synchronize():
    """No process group: the layers take the single-process path (no collective is attempted)."""
    from bne.norm.dsbn import SyncBatchNorm2d, convert_sync_batchnorm, world_size

    assert world_size() == 1
    net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))).train()
    assert isinstance(net[1], SyncBatchNorm2d)
    ref = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(2, 3, 8, 8)
    h = net[0](x)
    assert torch.equal(net[1](h), ref(h)) and torch.equal(net[1].running_var, ref.running_var)
