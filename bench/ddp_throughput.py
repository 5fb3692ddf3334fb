"""Data-parallel training throughput on this machine: 2 processes x 1 thread (torchrun, gloo) vs 1 process x 2 threads.

Both sides run ``bne.train.train_step`` (the step ``bne.train.train`` runs) on the params' model and recipe
(``model:``, ``train:``: Lite0 at ``train.resolution``, ``per_domain_batch`` x 3 source domains, the frozen stages)
on random images (speed does not depend on the pixels; augmentation is not timed). The single-process side runs in
this process with ``--threads`` torch threads; the data-parallel side is ``torchrun --standalone --nproc-per-node
--procs`` of this script, each rank with one thread, its share of every domain's sub-batch (``bne.train.distribute``:
DistributedDataParallel, the normalization statistics pooled over the ranks). The two stay alive side by side and
take turns, ``--steps`` training steps a turn, the order rotated every repetition (``_harness.interleaved``); the
waiting side sleeps. Each side's rate is images of the whole step (both ranks' shares) per wall second; the
ratio is the median of the per-repetition ratios. The JSON keeps every raw time, the load average and the cores
other processes kept busy meanwhile.

    python bench/ddp_throughput.py                      # BNE; reports/bench/ddp.json
    python bench/ddp_throughput.py --method deepall     # DeepAll (its BatchNorm2d become SyncBatchNorm2d)
    python bench/ddp_throughput.py --steps 1 --reps 2 --set train.resolution=64 --out /tmp/ddp.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the harness

import torch  # noqa: E402

import _harness as H  # noqa: E402
from tasks import params as P  # noqa: E402

DOMAINS = ("synthetic0", "synthetic1", "synthetic2")


def setup(args: argparse.Namespace, world: int = 1, rank: int = 0):
    """(trainer, this rank's minibatches, step model, images per step) for ``args.method``."""
    p = P.load(args.params, args.overrides)
    spec, cfg = p.model.spec(args.classes), p.train.config(0)
    t = H.trainer(spec, cfg, DOMAINS if args.method == "bne" else (), "cpu")
    b = cfg.per_domain_batch
    if b % world:
        raise SystemExit(f"train.per_domain_batch {b} does not divide over {world} processes")
    mbs = H.random_minibatches(len(DOMAINS), b, p.train.resolution, args.classes)
    lo, hi = rank * b // world, (rank + 1) * b // world
    mbs = [(x[lo:hi], y[lo:hi]) for x, y in mbs]
    step_model = t.model
    if world > 1:
        from bne.train import distribute

        step_model = distribute(t.model, torch.device("cpu"))
    return t, mbs, step_model, len(DOMAINS) * b, (spec, cfg, p.train.resolution)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: build, warm up, then run ``--steps`` steps each time the parent writes ``go<k>``."""
    import torch.distributed as dist

    from bne.train import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t, mbs, step_model, _, _ = setup(args, world, rank)
    train_step(step_model, t.opt, mbs, t.cfg)  # warm-up
    dist.barrier()
    box = Path(args.worker)
    if rank == 0:
        (box / "ready").write_text("1")
    k = 0
    while True:
        go, stop = box / f"go{k}", box / "stop"
        while not (go.exists() or stop.exists()):
            time.sleep(0.005)
        if stop.exists() and not go.exists():
            break
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            train_step(step_model, t.opt, mbs, t.cfg)
        dist.barrier()
        out = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
        (box / f".done{k}.{rank}").write_text(json.dumps(out))
        os.replace(box / f".done{k}.{rank}", box / f"done{k}.{rank}")
        k += 1
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=H.ROOT / "params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    ap.add_argument("--method", choices=("bne", "deepall"), default="bne")
    ap.add_argument("--procs", type=int, default=2, help="processes of the data-parallel side (1 thread each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single-process side")
    ap.add_argument("--steps", type=int, default=3, help="training steps per turn")
    ap.add_argument("--reps", type=int, default=5, help="turns of each side")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--out", type=Path, default=H.ROOT / "reports" / "bench" / "ddp.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # set by the parent for the torchrun ranks
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import tempfile

    t_start, load_before = time.perf_counter(), H.loadavg()
    meter = H.LoadMeter()
    torch.set_num_threads(args.threads)
    t, mbs, _, per_step, (spec, cfg, resolution) = setup(args)
    box = Path(tempfile.mkdtemp(prefix="bne-ddp-bench-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}",
           str(Path(__file__).resolve()), "--worker", str(box), "--method", args.method, "--steps", str(args.steps),
           "--classes", str(args.classes), "--params", str(args.params), *[f"--set={o}" for o in args.overrides]]
    ranks = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    worker_cpu: list[float] = []
    try:
        t.step(mbs)  # warm-up of this side while the ranks start
        while not (box / "ready").exists():
            if ranks.poll() is not None:
                raise SystemExit(f"the torchrun ranks exited ({ranks.returncode}) before they were ready")
            time.sleep(0.05)
        turn = {"k": 0}

        def single(_round: int) -> float:
            for _ in range(args.steps):
                t.step(mbs)
            return args.steps * per_step

        def parallel(_round: int) -> float:
            k = turn["k"]
            (box / f"go{k}").write_text("1")
            done = [box / f"done{k}.{r}" for r in range(args.procs)]
            while not all(d.exists() for d in done):
                if ranks.poll() is not None:
                    raise SystemExit(f"the torchrun ranks exited ({ranks.returncode})")
                time.sleep(0.002)
            worker_cpu.append(sum(json.loads(d.read_text())["cpu"] for d in done))
            turn["k"] = k + 1
            return args.steps * per_step

        names = {"single": f"1 process x {args.threads} threads", "ddp": f"{args.procs} processes x 1 thread (torchrun, gloo)"}
        runs = H.interleaved({names["single"]: single, names["ddp"]: parallel}, args.reps, warmup=False)
    finally:
        (box / "stop").write_text("1")
        try:
            ranks.wait(timeout=120)
        except subprocess.TimeoutExpired:
            ranks.kill()
        shutil.rmtree(box, ignore_errors=True)
    load = meter.stop()
    single_s, ddp_s = H.side_summary(runs[names["single"]]), H.side_summary(runs[names["ddp"]])
    ddp_s["raw_cpu_seconds"] = [round(c, 4) for c in worker_cpu]  # the ranks' own CPU time (the parent only waits)
    ratio = H.ratio_entry(H.per_second(runs[names["ddp"]]), H.per_second(runs[names["single"]]), None,
                          f"training images/s, {names['ddp']} over {names['single']}")
    measured = {
        "what": (f"bne.train.train_step, {args.method}, {spec.backbone} ({spec.weights}) at {resolution} px, "
                 f"{cfg.per_domain_batch} x {len(DOMAINS)} images per step (each of {args.procs} ranks: "
                 f"{cfg.per_domain_batch // args.procs} per domain), freeze_stages {cfg.freeze_stages}, random images, "
                 f"{args.steps} steps per turn, {args.reps} turns per side, interleaved"),
        "sides": {names["single"]: single_s, names["ddp"]: ddp_s},
        "ddp_over_single": ratio,
        "load": load,
    }
    report = H.write_report(args.out, measured, started=t_start, load_before=load_before)
    H.print_table(
        f"Training throughput, {args.method}, {spec.backbone} at {resolution} px ({report['seconds_total']} s, "
        f"load average {load_before} -> {H.loadavg()}, other processes ~{load.get('other_cores', '?')} cores)",
        ["side", "median img/s", "raw img/s"],
        [[n, s["median_images_per_s"], " ".join(f"{v:.1f}" for v in s["raw_images_per_s"])]
         for n, s in measured["sides"].items()]
        + [["ratio (ddp / single)", ratio["value"], " ".join(f"{v:.2f}" for v in ratio["raw_ratios"])]],
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
