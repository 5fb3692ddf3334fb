"""Speed checks: the ratios the project promises, each measured within one run on this machine.

Every ratio compares sides timed in the same process, alternated call by call (one training step, one eval
batch, one pipeline run each; the order rotates every round, so drift in the machine's load affects every
side alike); its value is the median of the per-repetition ratios, and every raw time is kept in the JSON,
with the cores other processes kept busy meanwhile (details.*.load).

* ``bne_vs_deepall_train_throughput``: BNE training images/s over DeepAll's (goal >= 0.9). Real steps as the
  inner loop of ``bne.train.train``: the params' ModelSpec (Lite0 packaged weights), ``build_optimizer`` with the
  params' ``freeze_stages``, per-domain batch x 3 source domains, forward + cross-entropy + backward + SGD step,
  on augmented source images at the params' resolution.
* ``loader_vs_trainer_throughput``: images/s of the training loader (``bne.data.Augment`` over the cached uint8
  arrays, a step's batch as ``bne.train`` draws it) over the faster trainer's images/s (goal >= 3).
* ``bne_inference_vs_branch_forwards``: BNE inference time per image (``evaluate.bne_inference``, what
  ``bne predict`` runs: the S x B batched forward with the per-branch instance-statistics recorder, the distances
  for the configured options, the weights and the ensemble)
  over S plain forwards of one branch on the same B images (goal <= 1.1).
* ``single_pass_vs_deepall``: single-pass BNE as ``evaluate.bne_inference`` runs it (the
  S-branch forward still gives the probabilities; one more forward with the domains' mean statistics gives
  the instance statistics and the weights), over DeepAll's plain
  forward (``plain_probs``). No goal; ``bne_inference_vs_deepall`` is shown beside it for reference, and
  ``batched_forward_vs_branch_forwards`` (the S x B forward alone) says how much of BNE's cost is the batching.
* ``stats_extraction_images_per_s``: ``bne.stats.population_stats`` over source train images.
* ``noop_dvc_repro_seconds``: ``dvc repro`` on an up-to-date project. ``prefect_flow_overhead_seconds``: the
  ``dg-pipeline`` flow (flows/dg_pipeline.py, in process) on that fully cached project minus
  ``dvc repro --single-item`` of the same stages one after the other without Prefect (what the flow's tasks
  run): what Prefect adds. ``prefect_flow_cold_overhead_seconds``: the same with the flow in a new interpreter.
  Temporary ``PREFECT_HOME``, no server (Prefect's ephemeral API). The project is a tiny temporary git + DVC
  copy of this one on tests/conftest.py's synthetic images (as tests/test_flow.py builds it; ``--from-git REV``
  takes the files from a commit) unless ``--project PATH`` names an up-to-date one.

Real PACS (cached arrays under data/bench-cache) when available, else synthetic arrays (or ``--synthetic``).
Prints a table and writes reports/bench/speed.json (atomically). Telemetry off, nothing downloaded.

    python bench/speed.py                # full run
    python bench/speed.py --quick        # a few repetitions: checks that the script works (speed.quick.json)
    python bench/speed.py --threads 1    # while other processes share the cores (see the warning it prints)
"""

from __future__ import annotations

import os

# Telemetry off before anything that may send it is imported.
os.environ.update({"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from bne.data import Augment, DomainArrays, build_cache, domain_batches, load_cache, load_folder_dataset, to_tensor  # noqa: E402
from bne.evaluate import bne_inference, branch_chunk, plain_probs  # noqa: E402
from bne.lodo import LodoConfig, load_params  # noqa: E402
from bne.model import DGNet, ModelSpec  # noqa: E402
from bne.stats import instance_stats, population_stats, running_stats  # noqa: E402
from bne.train import _autocast, build_optimizer, lr_factor, pick_device, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "didn't change, skipping"  # what `dvc repro` prints for an up-to-date stage (as flows/dg_pipeline.py)
SECTIONS = ("train", "inference", "stats", "dvc")

FULL = {"reps": 7, "train_rounds": 4, "infer_images": 96, "stats_per_domain": 128, "stats_reps": 3, "dvc_reps": 3, "dvc_warmup": True, "dvc_all_folds": True, "syn_per_class": 12}
QUICK = {"reps": 2, "train_rounds": 2, "infer_images": 32, "stats_per_domain": 16, "stats_reps": 1, "dvc_reps": 1, "dvc_warmup": False, "dvc_all_folds": False, "syn_per_class": 12}

Runs = dict[str, list[tuple[float, float, float]]]  # side -> per repetition (wall seconds, process CPU seconds, units)


# ----------------------------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleaved(sides: dict[str, Callable[[int], float]], reps: int, rounds: int, sync: Callable[[], None], warmup: bool = True) -> Runs:
    """Alternate the sides call by call: ``rounds`` rounds per repetition, each round calls every side once.

    The order rotates from round to round (AB, BA, ... for two sides) so that drift in the machine's load
    affects every side alike; a side is called with the round index and returns the units it processed.
    One untimed warm-up call of each side first (``warmup``). Wall and process CPU time are summed per repetition.
    """
    names = list(sides)
    for name in names if warmup else ():
        sides[name](0)
        sync()
    out: Runs = {n: [] for n in names}
    turn = 0
    for _ in range(reps):
        acc = {n: [0.0, 0.0, 0.0] for n in names}
        for k in range(rounds):
            j = turn % len(names)
            turn += 1
            for name in names[j:] + names[:j]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                units = sides[name](k)
                sync()
                a = acc[name]
                a[0] += time.perf_counter() - t0
                a[1] += time.process_time() - c0
                a[2] += float(units)
        for n in names:
            out[n].append(tuple(acc[n]))
    return out


def per_second(runs: list[tuple[float, float, float]], cpu: bool = False) -> list[float]:
    """Units per wall (or process CPU) second, per repetition."""
    return [u / (c if cpu else w) for w, c, u in runs]


def per_unit(runs: list[tuple[float, float, float]], cpu: bool = False) -> list[float]:
    """Wall (or process CPU) seconds per unit, per repetition."""
    return [(c if cpu else w) / u for w, c, u in runs]


def side_summary(runs: list[tuple[float, float, float]], unit: str = "images_per_s") -> dict:
    rates = per_second(runs)
    return {
        f"median_{unit}": round(median(rates), 3),
        f"raw_{unit}": [round(v, 3) for v in rates],
        "raw_wall_seconds": [round(w, 4) for w, _, _ in runs],
        "raw_cpu_seconds": [round(c, 4) for _, c, _ in runs],
        "units_per_rep": runs[0][2],
    }


def ratio_entry(num: list[float], den: list[float], goal: str | None, what: str, cpu: tuple[list[float], list[float]] | None = None) -> dict:
    """Median of the per-repetition ratios num/den (paired within a repetition), with the raw ratios.

    ``cpu``: the same two sides from process CPU time (robust to other processes only with one torch thread).
    """
    ratios = [a / b for a, b in zip(num, den)]
    value = median(ratios)
    ok = None
    if goal:
        op, bound = goal.split()
        ok = value >= float(bound) if op == ">=" else value <= float(bound)
    entry = {
        "value": round(value, 3),
        "goal": goal,
        "met": ok,
        "what": what,
        "raw_ratios": [round(r, 4) for r in ratios],
        "ratio_of_medians": round(median(num) / median(den), 3),
    }
    if cpu:
        entry["cpu_time_ratio"] = round(median([a / b for a, b in zip(*cpu)]), 3)
    return entry


class LoadMeter:
    """How busy the machine was while a section ran: this process (and its children) and everything else."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return (user + nice + system + irq + softirq) / hz, steal / hz

    @staticmethod
    def _own() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own = (self._own() - self.own0) / wall
        out = {"wall_s": round(wall, 1), "own_cores": round(own, 2)}
        busy = self._busy()
        if busy and self.busy0:
            out["other_cores"] = round(max(0.0, (busy[0] - self.busy0[0]) / wall - own), 2)
            out["steal_cores"] = round((busy[1] - self.busy0[1]) / wall, 2)
        return out


# ----------------------------------------------------------------------------------------------- data


def synthetic_arrays(resolution: int, domains: int = 4, classes: int = 7, per_domain: int = 320, seed: int = 0) -> dict[str, DomainArrays]:
    """Random uint8 images in the shape of PACS' cached arrays (speed does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(domains):
        images = rng.integers(0, 256, (per_domain, resolution, resolution, 3), dtype=np.uint8)
        labels = (np.arange(per_domain) % classes).astype(np.int64)
        perm = rng.permutation(per_domain)
        val, train = np.sort(perm[: per_domain // 10]), np.sort(perm[per_domain // 10 :])
        out[f"synthetic{i}"] = DomainArrays(f"synthetic{i}", images, labels, train, val)
    return out


def load_data(cfg: LodoConfig, args) -> tuple[dict[str, DomainArrays], list[str], int, str]:
    """(arrays per domain, domains, number of classes, description of the data)."""
    if not args.synthetic:
        root = Path(cfg.root)
        if root.is_dir():
            ds = load_folder_dataset(cfg.root, cfg.splits, cfg.val_fraction, seed=0)
            cache = build_cache(ds, cfg.resolution, Path(args.cache) / cfg.name / str(cfg.resolution), progress=False)
            return load_cache(ds, cache), ds.domains, len(ds.classes), f"{cfg.name} cached arrays ({cache})"
        print(f"dataset root {root} not found: synthetic arrays instead", flush=True)
    arrays = synthetic_arrays(cfg.resolution)
    return arrays, list(arrays), 7, "synthetic random uint8 arrays"


# ----------------------------------------------------------------------------------------------- training


class Trainer:
    """One model and optimizer stepping exactly as the inner loop of ``bne.train.train``."""

    def __init__(self, method: str, cfg: LodoConfig, spec: ModelSpec, names: tuple[str, ...], device: torch.device) -> None:
        spec = ModelSpec(**{**asdict(spec), "domains": names if method == "bne" else ()})
        seed_everything(cfg.train.seed)
        self.method, self.s, self.device = method, len(names), device
        self.model = DGNet(spec).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, cfg.train)
        self.model.train()  # as bne.train at the start of an epoch
        self.i = 0
        self.running = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        f = lr_factor(self.i, 1000, 50)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        x, y = x.to(self.device, non_blocking=True), y.to(self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device):
            logits = self.model(x, domains=list(range(self.s))) if self.method == "bne" else self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.running += loss.item()
        self.i += 1


def measure_training(cfg, spec, sources, device, settings, sync) -> tuple[dict, dict, dict[str, Trainer]]:
    """DeepAll step, BNE step and the loader's batch for one step, alternated call by call."""
    b, s = cfg.train.per_domain_batch, len(sources)
    augment = Augment(cfg.train.augment, cfg.resolution)
    names = tuple(a.name for a in sources)
    trainers = {m: Trainer(m, cfg, spec, names, device) for m in ("deepall", "bne")}

    def load(rows):  # the batch of one step, as bne.train.train draws it
        x = torch.cat([augment(a.images[r]) for a, r in zip(sources, rows)])
        y = torch.cat([torch.as_tensor(a.labels[r]) for a, r in zip(sources, rows)])
        return x, y

    # Both trainers step on the same few augmented batches (the loader is timed as its own side).
    fixed = [load(rows) for rows in domain_batches([a.train for a in sources], b, 4, torch.Generator().manual_seed(0))]
    stream = domain_batches([a.train for a in sources], b, 10**9, torch.Generator().manual_seed(1))

    def train_side(m):
        def step(_k):
            t = trainers[m]
            t.step(*fixed[t.i % len(fixed)])
            return s * b

        return step

    def loader(_k):
        load(next(stream))
        return s * b

    runs = interleaved({"deepall": train_side("deepall"), "bne": train_side("bne"), "loader": loader}, settings["reps"], settings["train_rounds"], sync)
    ips = {k: per_second(v) for k, v in runs.items()}
    cpu = {k: per_second(v, cpu=True) for k, v in runs.items()}
    faster = [max(a, c) for a, c in zip(ips["deepall"], ips["bne"])]
    results = {
        "bne_vs_deepall_train_throughput": ratio_entry(
            ips["bne"], ips["deepall"], ">= 0.9",
            f"BNE training images/s over DeepAll's ({s} x {b} images a step, {cfg.resolution} px, freeze_stages {cfg.train.freeze_stages})",
            cpu=(cpu["bne"], cpu["deepall"]),
        ),
        "loader_vs_trainer_throughput": ratio_entry(
            ips["loader"], faster, ">= 3", "augmenting loader images/s over the faster trainer's images/s (same repetition)",
            cpu=(cpu["loader"], [max(a, c) for a, c in zip(cpu["deepall"], cpu["bne"])]),
        ),
    }
    med = {k: median(v) for k, v in ips.items()}
    results["bne_vs_deepall_train_throughput"]["sides"] = f"bne {med['bne']:.1f} / deepall {med['deepall']:.1f} img/s"
    results["loader_vs_trainer_throughput"]["sides"] = f"loader {med['loader']:.0f} img/s"
    detail = {k: side_summary(v) for k, v in runs.items()}
    for t in trainers.values():
        t.model.eval()
    return results, detail, trainers


class _StatsRecorder:
    """A recorder that applies ``fn`` to every layer input (the diagnostic recorder sides of the inference section)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.out = fn, {}

    def __call__(self, layer, x: torch.Tensor) -> None:
        self.out[layer.layer_index] = self.fn(x.detach())


def _mean_only(x: torch.Tensor) -> torch.Tensor:
    """One read of the layer input (its spatial mean): less than any implementation of the statistics can cost."""
    return x.float().mean((2, 3))


def _fused_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``instance_stats`` written for torch.compile, which fuses the mean and E[x^2] into one loop over ``x``."""
    x = x.float()
    mean, mean_sq = x.mean((2, 3)), (x * x).mean((2, 3))
    return mean, (mean_sq - mean * mean).clamp_min(0).sqrt()


def measure_inference(cfg, bne_model, deep_model, embeddings, images, labels, device, settings, sync) -> tuple[dict, dict]:
    """Per eval batch, alternated: BNE, S plain branch forwards, single-pass BNE, DeepAll, and diagnostic sides:
    the S x B forward alone, and the S branch forwards with three recorders (``instance_stats`` as BNE runs it,
    a mean-only one-read floor, and torch.compile's fused statistics where compiling works)."""
    batch, s = cfg.eval.batch, bne_model.num_domains
    opts = replace(cfg.eval.options, instance_stats="per_branch")
    opts_sp = replace(cfg.eval.options, instance_stats="single_pass")
    emb = {opts.embedding: embeddings[opts.embedding]}
    chunk = branch_chunk(cfg.eval.branch_chunk, batch, device)  # eval.branch_chunk (auto: one branch per forward on CPU)
    settings["branch_chunk"] = chunk
    chunks = [slice(i, min(len(images), i + batch)) for i in range(0, len(images), batch)]
    bne_model.eval(), deep_model.eval()

    def bne(k):  # the deployed path (bne predict): S x B forward with the recorder, one distance, weights, ensemble
        sl = chunks[k]
        bne_inference(bne_model, images[sl], emb[opts.embedding], opts, batch, device, chunk=chunk)
        return sl.stop - sl.start

    @torch.no_grad()
    def branch_forwards(k):  # S plain forwards of one branch each on the same batch, no recorder
        sl = chunks[k]
        x = to_tensor(images[sl]).to(device)
        for d in range(s):
            bne_model(x, domains=d)
        return sl.stop - sl.start

    @torch.no_grad()
    def batched_forward(k):  # diagnostic: the S x B batched forward alone (no recorder, no distances)
        sl = chunks[k]
        bne_model.branches(to_tensor(images[sl]).to(device))
        return sl.stop - sl.start

    def single_pass(k):  # one pass with the averaged statistics for the weights, then the S branches
        sl = chunks[k]
        bne_inference(bne_model, images[sl], emb[opts.embedding], opts_sp, batch, device, chunk=chunk)
        return sl.stop - sl.start

    def deepall(k):
        sl = chunks[k]
        plain_probs(deep_model, images[sl], batch, device)
        return sl.stop - sl.start

    def branches_with(fn: Callable):  # S one-branch forwards, every layer input handed to fn
        @torch.no_grad()
        def side(k):
            sl = chunks[k]
            x = to_tensor(images[sl]).to(device)
            for d in range(s):
                bne_model(x, domains=d, recorder=_StatsRecorder(fn))
            return sl.stop - sl.start
        return side

    sides = {"bne": bne, "branch_forwards": branch_forwards, "batched_forward": batched_forward, "single_pass": single_pass, "deepall": deepall,
             "recorder_eager": branches_with(instance_stats), "recorder_one_pass": branches_with(_mean_only)}
    t0 = time.perf_counter()
    try:  # inductor needs a C++ compiler (CPU) or Triton (GPU); compiled once per process, every layer shape
        fused = branches_with(torch.compile(_fused_stats, dynamic=True))
        fused(0)
        sides["recorder_fused"] = fused
        settings["fused_stats"] = f"torch.compile(dynamic=True), compiled in {time.perf_counter() - t0:.1f} s"
    except Exception as e:  # noqa: BLE001 - a diagnostic: report why and go on
        settings["fused_stats"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    runs = interleaved(sides, settings["reps"], len(chunks), sync)
    spi = {k: per_unit(v) for k, v in runs.items()}  # seconds per image
    cpi = {k: per_unit(v, cpu=True) for k, v in runs.items()}
    results = {
        "bne_inference_vs_branch_forwards": ratio_entry(
            spi["bne"], spi["branch_forwards"], "<= 1.1",
            f"BNE time/image (one {s} x {batch} batched forward with the instance-statistics recorder, distances, weighting) "
            f"over {s} plain forwards of one branch",
            cpu=(cpi["bne"], cpi["branch_forwards"]),
        ),
        "single_pass_vs_deepall": ratio_entry(
            spi["single_pass"], spi["deepall"], None,
            f"single-pass BNE time/image as evaluate runs it ({s}-branch forward for the probabilities plus one "
            "mean-statistics pass with the recorder for the distances) over DeepAll's plain forward",
            cpu=(cpi["single_pass"], cpi["deepall"]),
        ),
        "bne_inference_vs_deepall": ratio_entry(
            spi["bne"], spi["deepall"], None, f"reference: BNE time/image over DeepAll's ({s} branches)", cpu=(cpi["bne"], cpi["deepall"])
        ),
        "batched_forward_vs_branch_forwards": ratio_entry(
            spi["batched_forward"], spi["branch_forwards"], None,
            f"diagnostic: the {s} x {batch} batched forward alone (no recorder, no distances) over {s} plain branch forwards",
            cpu=(cpi["batched_forward"], cpi["branch_forwards"]),
        ),
    }
    recorders = {
        "recorder_eager": "bne.stats.instance_stats as BNE runs it (spatial mean, then mean(x * x))",
        "recorder_one_pass": "a recorder that reads every layer input once (spatial mean only): the least any implementation of the statistics can cost",
        "recorder_fused": "the statistics from torch.compile (mean and E[x^2] fused into one loop)",
    }
    for name, what in recorders.items():
        if name in spi:
            results[f"{name}_vs_branch_forwards"] = ratio_entry(
                spi[name], spi["branch_forwards"], None,
                f"diagnostic: {s} one-branch forwards with {what}, over the same forwards without a recorder",
                cpu=(cpi[name], cpi["branch_forwards"]),
            )
    ms = {k: 1000 * median(v) for k, v in spi.items()}
    for name in recorders:
        if name in spi:
            results[f"{name}_vs_branch_forwards"]["sides"] = f"{ms[name]:.1f} / {ms['branch_forwards']:.1f} ms/img"
    results["bne_inference_vs_branch_forwards"]["sides"] = f"bne {ms['bne']:.1f} / {s} branches {ms['branch_forwards']:.1f} ms/img"
    results["single_pass_vs_deepall"]["sides"] = f"single-pass {ms['single_pass']:.1f} / deepall {ms['deepall']:.1f} ms/img"
    results["bne_inference_vs_deepall"]["sides"] = f"bne {ms['bne']:.1f} / deepall {ms['deepall']:.1f} ms/img"
    results["batched_forward_vs_branch_forwards"]["sides"] = f"batched {ms['batched_forward']:.1f} / {s} branches {ms['branch_forwards']:.1f} ms/img"
    detail = {k: {**side_summary(v), "median_ms_per_image": round(ms[k], 2)} for k, v in runs.items()}
    return results, detail


def measure_stats(cfg, bne_model, sources, device, settings, sync) -> tuple[dict, dict, tuple]:
    """``population_stats`` over the first images of every source domain's train rows (batches of eval.batch)."""
    batch, k = cfg.eval.batch, settings["stats_per_domain"]
    subsets = [np.ascontiguousarray(a.images[a.train[:k]]) for a in sources]  # in memory: extraction, not disk
    n = sum(len(x) for x in subsets)
    last = {}

    def run(_k):
        batches = [(d, (to_tensor(imgs[i : i + batch]) for i in range(0, len(imgs), batch))) for d, imgs in enumerate(subsets)]
        last["stats"] = population_stats(bne_model, batches, device)
        return n

    runs = interleaved({"population_stats": run}, settings["stats_reps"], 1, sync)["population_stats"]
    ips = per_second(runs)
    results = {
        "stats_extraction_images_per_s": {
            "value": round(median(ips), 1),
            "goal": None,
            "what": f"bne.stats.population_stats images/s over {n} source images (batch {batch}, {len(sources)} domains)",
            "raw": [round(v, 2) for v in ips],
            "sides": f"{n} images in {median([w for w, _, _ in runs]):.2f} s",
        }
    }
    return results, side_summary(runs), last["stats"]


# ----------------------------------------------------------------------------------------------- DVC + Prefect


def _dvc_env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the stages' `bne` commands live beside this interpreter
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}


def _run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _dvc_env(), capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc




PROJECT_ITEMS = ("dvc.yaml", "params.yaml", "bne", "tasks", "flows", ".dvcignore")


def make_project(tmp: Path, per_class: int, params_file: Path, rev: str | None = None, all_folds: bool = True) -> tuple[Path, str]:
    """A tiny git + DVC copy of this project on synthetic images (tests/conftest.py draws them), as
    tests/test_flow.py builds one: dvc.yaml, bne/, tasks/, flows/ and params with small settings (only the keys
    the params file has are changed, so the copy follows the pipeline as it is). From the working tree (params
    from ``params_file``), or with ``rev`` from that commit (``git archive``; the working tree is not touched).
    Its stages import the copy's ``bne`` (PYTHONPATH), so edits made meanwhile in this tree do not leak in.
    The four synthetic styles stand for PACS' four domains; ``all_folds``: every one is held out once (as many
    stages as the real pipeline), else only the last (as tests/test_flow.py)."""
    import importlib.util

    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("_bne_test_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    torch.set_num_threads(threads)  # conftest sets its own
    styles = list(conftest.STYLES)
    images = conftest.make_dataset(tmp / "synthetic", styles=styles, per_class=per_class, size=48)
    repo = tmp / "project"
    repo.mkdir()
    if rev:
        listed = set(_run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev], ROOT).stdout.split())
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *[i for i in PROJECT_ITEMS if i in listed]], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(repo)], input=archive.stdout, check=True)
        params_file = repo / "params.yaml"
    else:
        for item in PROJECT_ITEMS:
            src = ROOT / item
            if src.is_dir():
                shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.is_file() and item != "params.yaml":
                shutil.copy(src, repo / item)
    p = yaml.safe_load(Path(params_file).read_text())

    def put(section: str, **values) -> None:
        node = p.setdefault(section, {})
        for key, value in values.items():
            *parents, leaf = key.split("__")
            n = node
            for k in parents:
                n = n.get(k) if isinstance(n.get(k), dict) else None
                if n is None:
                    break
            if n is not None and leaf in n:
                n[leaf] = value

    p["dataset"].update(name="syn", root=str(images), splits="", val_fraction=0.25)
    for key, value in p["dataset"].items():  # domain lists: every domain, or the held-out ones (targets, folds, ...)
        if isinstance(value, list):
            p["dataset"][key] = styles if key == "domains" or all_folds else styles[-1:]
    put("train", resolution=32, epochs=1, per_domain_batch=4, freeze_stages=0, eval_batch=16, seeds=[0])
    put("eval", batch=8)
    put("tune", inference__n_trials=3, inference__timeout=60, training__enabled=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    return repo, "syn"


def measure_dvc(args, settings) -> tuple[dict, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bne-speed-"))
    detail: dict = {"tmp": str(tmp)}
    saved_pythonpath = os.environ.get("PYTHONPATH")
    try:
        # Temporary Prefect home, no server: the flow starts Prefect's ephemeral API (set before prefect is imported).
        for k in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH"):
            os.environ.pop(k, None)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
        cold_env = {**_dvc_env(), "PREFECT_HOME": str(tmp / "prefect-home-cold")}
        t0 = time.perf_counter()
        if args.project:
            project = Path(args.project).resolve()
            name = yaml.safe_load((project / "params.yaml").read_text())["dataset"]["name"]
            status = _run([sys.executable, "-m", "dvc", "status"], project)
            if "up to date" not in status.stdout:
                raise RuntimeError(f"{project} is not up to date (`dvc status`):\n{status.stdout[-2000:]}\nrun `dvc repro` there first")
            flows_root = project if (project / "flows" / "dg_pipeline.py").is_file() else ROOT
        else:
            project, name = make_project(tmp, settings["syn_per_class"], Path(args.params), args.from_git, settings["dvc_all_folds"])
            flows_root = project
            # the stages' `bne` and the flow import the copy (the flow's subprocesses inherit this environment)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [os.environ.get("PYTHONPATH")])])
            cold_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        sys.path.insert(0, str(flows_root))
        try:
            from flows.dg_pipeline import dg_pipeline, dvc_stages
        finally:
            sys.path.remove(str(flows_root))
        first = dg_pipeline(dataset=name, root=str(project))  # builds a new project; starts the ephemeral API either way
        detail["setup"] = {"project": str(project), "first_flow_ran": first, "seconds": round(time.perf_counter() - t0, 1)}
        stages = dvc_stages(project)
        dvc = [sys.executable, "-m", "dvc", "repro"]

        def repro(_k):
            out = _run(dvc, project).stdout
            ran = [line for line in out.splitlines() if line.startswith("Running stage")]
            if ran:
                raise RuntimeError(f"`dvc repro` was not a no-op: {ran}")
            return 1

        def single_items(_k):
            for stage in stages:
                if SKIPPED not in _run([*dvc, "--single-item", stage], project).stdout:
                    raise RuntimeError(f"`dvc repro --single-item {stage}` was not a no-op")
            return 1

        def flow(_k):
            ran = dg_pipeline(dataset=name, root=str(project))
            if any(ran.values()):
                raise RuntimeError(f"the flow ran stages on a cached project: {ran}")
            return 1

        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); from flows.dg_pipeline import dg_pipeline; "
            "r = dg_pipeline(dataset=sys.argv[2], root=sys.argv[3]); assert not any(r.values()), r"
        )

        def flow_cold(_k):  # a new interpreter: import, ephemeral API start, the flow
            _run([sys.executable, "-c", code, str(flows_root), name, str(project)], project, env=cold_env)
            return 1

        # The setup run warmed dvc, the files and the in-process API; a warm-up call per side (not in --quick)
        # also keeps the cold Prefect home's database creation out of the timed runs.
        runs = interleaved(
            {"dvc_repro": repro, "dvc_single_items": single_items, "flow": flow, "flow_cold_process": flow_cold},
            settings["dvc_reps"], 1, lambda: None, warmup=settings["dvc_warmup"],
        )
        sec = {k: [w for w, _, _ in v] for k, v in runs.items()}
        overhead = [f - d for f, d in zip(sec["flow"], sec["dvc_single_items"])]
        cold = [f - d for f, d in zip(sec["flow_cold_process"], sec["dvc_single_items"])]
        vs_one = [f - d for f, d in zip(sec["flow"], sec["dvc_repro"])]
        results = {
            "noop_dvc_repro_seconds": {
                "value": round(median(sec["dvc_repro"]), 2), "goal": None,
                "what": f"`dvc repro` (all {len(stages)} stages) on an up-to-date project", "raw": [round(v, 3) for v in sec["dvc_repro"]],
            },
            "prefect_flow_overhead_seconds": {
                "value": round(median(overhead), 2), "goal": None,
                "what": f"dg-pipeline flow (warm, in-process) minus `dvc repro --single-item` of its {len(stages)} stages without Prefect",
                "raw": [round(v, 3) for v in overhead],
            },
            "prefect_flow_cold_overhead_seconds": {
                "value": round(median(cold), 2), "goal": None,
                "what": "the same in a new interpreter (import prefect, start the ephemeral API, run the flow) minus the same stages",
                "raw": [round(v, 3) for v in cold],
            },
            "flow_minus_one_dvc_repro_seconds": {
                "value": round(median(vs_one), 2), "goal": None,
                "what": "dg-pipeline flow (warm) minus one whole-pipeline `dvc repro`: Prefect plus one dvc start-up per stage",
                "raw": [round(v, 3) for v in vs_one],
            },
        }
        results["noop_dvc_repro_seconds"]["sides"] = f"{len(stages)} stages one by one: {median(sec['dvc_single_items']):.2f} s"
        results["prefect_flow_overhead_seconds"]["sides"] = f"flow {median(sec['flow']):.2f} s"
        results["prefect_flow_cold_overhead_seconds"]["sides"] = f"flow, new process {median(sec['flow_cold_process']):.2f} s"
        detail.update({k: {"median_seconds": round(median(v), 3), "raw_seconds": [round(x, 3) for x in v]} for k, v in sec.items()})
        detail["stages"] = stages
        detail["cold_prefect_home_warmed"] = settings["dvc_warmup"]
        return results, detail
    finally:
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
        if args.keep_project:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    for pkg in ("dvc", "prefect", "torchvision", "numpy"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            info[pkg] = None
    return info


def atomic_write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def print_table(report: dict) -> None:
    rows = []
    for name, m in report["measurements"].items():
        met = m.get("met")
        spread = m.get("raw_ratios") or m.get("raw") or []
        rng = f"{min(spread):.3g} .. {max(spread):.3g}" if len(spread) > 1 else ""
        cpu = m.get("cpu_time_ratio")
        rows.append((name, fmt(m["value"]), m.get("goal") or "", "" if met is None else ("yes" if met else "NO"), rng, fmt(cpu) if cpu else "", m.get("sides", "")))
    for name, err in report["errors"].items():
        rows.append((name, "error", "", "", "", "", err.strip().splitlines()[-1][:100]))
    head = ("measurement", "value", "goal", "met", "range over reps", "CPU-time ratio", "medians")
    mach, st = report["machine"], report["settings"]
    other = [d["load"].get("other_cores") for d in report["details"].values() if isinstance(d, dict) and "load" in d]
    other = [o for o in other if o is not None]
    title = (
        f"bench/speed.py {st['mode']}: {st['data']}; {mach['device']}, {mach['torch_threads']} torch threads, "
        f"{mach['cpu_count']} CPUs" + (f"; other processes used {max(other):.1f} cores at most (section average)" if other else "")
    )
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for h in head:
            t.add_column(h, no_wrap=h != "medians")
        for r in rows:
            t.add_row(*r)
        Console(width=max(150, shutil.get_terminal_size().columns)).print(t)
    except ImportError:
        widths = [max(len(str(r[i])) for r in (*rows, head)) for i in range(len(head))]
        print(title)
        for r in (head, tuple("-" * w for w in widths), *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench-cache"), help="decoded-array cache (PACS)")
    ap.add_argument("--out", help="default reports/bench/speed.json (--quick: reports/bench/speed.quick.json)")
    ap.add_argument("--quick", action="store_true", help="few repetitions: a check that the script works")
    ap.add_argument("--synthetic", action="store_true", help="random arrays instead of the dataset")
    ap.add_argument("--project", help="an up-to-date DVC project for the DVC/Prefect measurements (default: a temporary one)")
    ap.add_argument("--keep-project", action="store_true", help="keep the temporary DVC project")
    ap.add_argument("--from-git", metavar="REV", help="build the temporary DVC project from commit REV instead of the working tree")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch threads (default: all cores, as bne lodo)")
    ap.add_argument("--reps", type=int, help="repetitions of the train/inference comparisons")
    ap.add_argument("--dvc-reps", type=int)
    ap.add_argument("--target", help="held-out domain (default: the first of params' targets, else the first domain)")
    args = ap.parse_args()
    if args.out is None:  # a quick check must not overwrite the full run's numbers
        args.out = str(ROOT / "reports" / "bench" / ("speed.quick.json" if args.quick else "speed.json"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - set(SECTIONS):
        ap.error(f"unknown section(s) {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")

    settings = dict(QUICK if args.quick else FULL)
    if args.reps:
        settings["reps"] = args.reps
    if args.dvc_reps:
        settings["dvc_reps"] = args.dvc_reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    cfg = load_params(args.params)
    device = pick_device(cfg.device)
    machine = machine_info(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    measurements: dict = {}
    details: dict = {}
    errors: dict = {}

    def section(name: str, fn: Callable[[], tuple]) -> tuple | None:
        """Run one section, keep its results, time and load; an error is recorded and the others go on."""
        meter = LoadMeter()
        print(f"{name} ...", flush=True)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001  (the other measurements are still worth writing)
            errors[name] = "".join(traceback.format_exception_only(e))
            details[name] = {"traceback": traceback.format_exc(), "load": meter.stop()}
            print(details[name]["traceback"], file=sys.stderr, flush=True)
            return None
        res, det, *rest = out
        measurements.update(res)
        details[name] = {**det, "load": meter.stop()}
        print(f"{name}: {details[name]['load']}", flush=True)
        return tuple(rest)

    data_desc = ""
    if {"train", "inference", "stats"} & set(sections):
        arrays, domains, classes, data_desc = load_data(cfg, args)
        target = args.target or next((t for t in cfg.targets or () if t in domains), domains[0])
        if target not in domains:
            raise SystemExit(f"--target {target!r} is not a domain of the data ({domains})")
        sources = [arrays[d] for d in domains if d != target][:3]  # per-domain batch x 3 source domains
        spec = replace(cfg.model, num_classes=classes)
        settings.update(
            target=target, sources=[a.name for a in sources], resolution=cfg.resolution,
            per_domain_batch=cfg.train.per_domain_batch, freeze_stages=cfg.train.freeze_stages, eval_batch=cfg.eval.batch,
            model=asdict(spec), inference_options=asdict(cfg.eval.options),
        )
        print(f"data: {data_desc}; sources {settings['sources']}, target {target}", flush=True)
        got = section("train", lambda: measure_training(cfg, spec, sources, device, settings, sync)) if "train" in sections else None
        # Inference and statistics use the models the training comparison stepped (fresh ones without it).
        trainers = got[0] if got else {m: Trainer(m, cfg, spec, tuple(a.name for a in sources), device) for m in ("deepall", "bne")}
        bne_model, deep_model = trainers["bne"].model.eval(), trainers["deepall"].model.eval()
        embeddings = {"running": running_stats(bne_model.norm_layers())}
        if "stats" in sections or cfg.eval.options.embedding != "running":
            got = section("stats", lambda: measure_stats(cfg, bne_model, sources, device, settings, sync))
            if got:
                embeddings.update(population=got[0][0], instance_average=got[0][1])
            if "stats" not in sections:  # computed only for the inference embedding
                measurements.pop("stats_extraction_images_per_s", None)
        if "inference" in sections:
            tgt = arrays[target]
            n = min(settings["infer_images"], len(tgt.images))
            images, labels = np.ascontiguousarray(tgt.images[:n]), tgt.labels[:n]
            section("inference", lambda: measure_inference(cfg, bne_model, deep_model, embeddings, images, labels, device, settings, sync))
        del trainers, bne_model, deep_model
    if "dvc" in sections:  # last: Prefect's ephemeral API keeps running in the background once started
        section("dvc", lambda: measure_dvc(args, settings))

    settings.update(mode="quick" if args.quick else "full", data=data_desc or "-", sections=sections, project=args.project,
                    project_source=None if args.project else (f"git {args.from_git}" if args.from_git else "working tree"))
    other = {k: d["load"]["other_cores"] for k, d in details.items() if "other_cores" in d.get("load", {})}
    cpus = os.cpu_count() or 1
    warning = ""
    busy_torch = max((v for k, v in other.items() if k != "dvc"), default=0.0)
    if busy_torch > 0.25 * cpus:
        warning = f"other processes kept up to {busy_torch:.1f} of {cpus} cores busy during the torch sections; " + (
            "with more than one torch thread a descheduled thread stalls the others, so times can be several-fold off: "
            "rerun on a quiet machine, or with --threads 1 for stable ratios" if args.threads > 1 else "ratios stay comparable, absolute rates are low"
        )
    if other.get("dvc", 0.0) > 0.25 * cpus:
        warning += ("; " if warning else "") + f"other processes kept {other['dvc']:.1f} of {cpus} cores busy during the DVC/Prefect runs: their seconds are inflated"
    report = {
        "contention": {"other_cores_by_section": other, "warning": warning},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine, "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": settings,
        "method": (
            "sides alternated call by call (one training step, one eval batch, one pipeline run), the order rotated each "
            "round, one untimed warm-up call each; a ratio's value is the median of its per-repetition ratios; "
            "details.*.load: cores this process and other processes kept busy during each section"
        ),
        "measurements": measurements,
        "errors": errors,
        "details": details,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_json(Path(args.out), report)
    print_table(report)
    if report["contention"]["warning"]:
        print("warning: " + report["contention"]["warning"])
    print(f"wrote {args.out} ({report['seconds_total']} s)")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
