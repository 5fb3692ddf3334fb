"""The benchmarks' one timing harness: interleaved repetitions, medians, rates, the machine and the JSON report.

Every ratio a benchmark reports compares sides timed in the same process, alternated call by call with the order
rotated each round, so drift in the machine's load affects every side alike (:func:`interleaved`); its value is
the median of the per-repetition ratios (:func:`ratio_entry`). :func:`write_report` adds the date, the host, the
torch version and threads and the load average to whatever a benchmark measured, and writes it atomically.
:func:`trainer` is a training side: ``bne.train.train_step``, the step ``bne.train.train`` runs, on a fixed batch.

Import it from a script in ``bench/`` (or below) as ``import _harness`` after putting ``bench/`` on ``sys.path``
(:data:`BENCH`); the scripts do that in their first lines.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bne.io import write_json
from bne.model import DGNet, ModelSpec
from bne.train import TrainConfig, build_optimizer, seed_everything, train_step

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

#: side -> per repetition (wall seconds, process CPU seconds, units processed)
Runs = dict[str, list[tuple[float, float, float]]]


# ----------------------------------------------------------------------------------------------- timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved(sides: dict[str, Callable[[int], float]], reps: int, rounds: int = 1,
                sync: Callable[[], None] = lambda: None, warmup: bool = True) -> Runs:
    """Alternate the sides call by call: ``rounds`` rounds per repetition, each round calls every side once.

    The order rotates from round to round (AB, BA, ... for two sides) so that drift in the machine's load
    affects every side alike; a side is called with the round index and returns the units it processed.
    One untimed warm-up call of each side first (``warmup``). Wall and process CPU time are summed per
    repetition; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after every timed call.
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


def ratio_entry(num: list[float], den: list[float], goal: str | None, what: str,
                cpu: tuple[list[float], list[float]] | None = None) -> dict:
    """Median of the per-repetition ratios num/den (paired within a repetition), with the raw ratios.

    ``goal``: ``">= 0.9"`` or ``"<= 1.1"`` (or None). ``cpu``: the same two sides from process CPU time
    (robust to other processes only with one torch thread).
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
        self.t0, self.busy0, self.own0, self.load0 = time.perf_counter(), self._busy(), self._own(), loadavg()

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
        out = {"wall_s": round(wall, 1), "own_cores": round(own, 2), "loadavg_before": self.load0, "loadavg_after": loadavg()}
        busy = self._busy()
        if busy and self.busy0:
            out["other_cores"] = round(max(0.0, (busy[0] - self.busy0[0]) / wall - own), 2)
            out["steal_cores"] = round((busy[1] - self.busy0[1]) / wall, 2)
        return out


# ----------------------------------------------------------------------------------------------- training side


@dataclass
class Trainer:
    """A model and its optimizer, stepped by ``bne.train.train_step`` (the step ``bne.train.train`` runs)."""

    model: DGNet
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    steps: int = 0

    def step(self, minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        loss = train_step(self.model, self.opt, minibatches, self.cfg)
        self.steps += 1
        return loss


def trainer(spec: ModelSpec, cfg: TrainConfig, domains: Sequence[str], device: torch.device | str = "cpu") -> Trainer:
    """``spec`` as ``bne.train.train`` builds it for BNE (``domains`` given) or DeepAll (``domains`` empty):
    seeded with ``cfg.seed``, channels-last on CUDA, ``build_optimizer``, training mode, learning rates at
    ``base_lr`` (the schedule's plateau)."""
    device = torch.device(device)
    seed_everything(cfg.seed)
    model = DGNet(replace(spec, domains=tuple(domains))).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    return Trainer(model.train(), opt, cfg)


def random_minibatches(domains: int, per_domain: int, resolution: int, classes: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``domains`` minibatches of ``per_domain`` random images in [0, 1] and labels (speed only)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(per_domain, 3, resolution, resolution, generator=g).to(device),
             torch.randint(0, classes, (per_domain,), generator=g).to(device)) for _ in range(domains)]


# ----------------------------------------------------------------------------------------------- report


def loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Host, CPU, torch version and threads, the device and the package versions that matter here."""
    device = torch.device(device)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torchvision", "numpy"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def command() -> str:
    """This process's command line, the script relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    return " ".join(["python", script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]])


def write_report(path: Path | str, measured: dict, device: torch.device | str = "cpu", started: float | None = None,
                 load_before: list[float] | None = None) -> dict:
    """``measured`` with the date, the command, the machine (host, torch version, threads) and the load average
    before and after, written atomically as JSON to ``path``; returns what was written."""
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "machine": {**machine_info(device), "loadavg_before": load_before, "loadavg_after": loadavg()},
        **measured,
    }
    if started is not None:
        report["seconds_total"] = round(time.perf_counter() - started, 1)
    write_json(Path(path), report)
    return report


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def print_table(title: str, head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table (no extra dependency)."""
    rows = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in (*rows, head)) for i in range(len(head))]
    print(title)
    for r in (head, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
