"""Memory layout (NCHW vs channels-last) and instance-statistics probes on the CPU.

Why the network runs channels-last on every device and how ``bne.stats.instance_stats`` computes E[x^2]:
* forward: S = 3 plain branch forwards of B images, NCHW vs channels-last input (the layout propagates);
* training step: DeepAll and BNE (3 x B images, ``train.freeze_stages``), NCHW vs channels-last;
* recorder: the same 3 branch forwards (channels-last) with the instance-statistics recorder vs a no-op one;
* instance statistics on Lite0-sized activations: mean(x * x), vector_norm and var_mean, in both layouts.
Medians of interleaved repetitions (random weights and inputs: speed only). Prints a table, writes JSON.

    python bench/layout_probe.py [--threads 2] [--reps 7] [--out reports/bench/layout.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bne.model import DGNet, ModelSpec
from bne.norm.dsbn import domain_route
from bne.stats import InstanceRecorder
from bne.train import TrainConfig, build_optimizer
from speed import interleaved, median, per_unit  # bench/ is on sys.path when run as a script

CL = torch.channels_last


def timed(sides: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each side: ``speed.interleaved`` (order rotated each repetition, one warm-up call)."""
    def one_call(f):
        def side(_round: int) -> int:
            f()
            return 1
        return side

    runs = interleaved({k: one_call(f) for k, f in sides.items()}, reps, 1, lambda: None)
    return {k: median(per_unit(v)) for k, v in runs.items()}


def net_forward(model: DGNet, x: torch.Tensor, domains: list[int], recorder=None) -> torch.Tensor:
    """The backbone on ``x`` as given (``DGNet.forward`` would make it channels-last)."""
    with domain_route(domains, [x.shape[0] // len(domains)] * len(domains), recorder):
        return model.net((x - model.mean) / model.std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16, help="images per domain")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--freeze", type=int, default=4)
    ap.add_argument("--out", default="reports/bench/layout.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, r = args.batch, args.resolution
    bne = DGNet(ModelSpec(domains=("a", "b", "c"), weights="none")).eval()
    x = torch.rand(b, 3, r, r)
    xs = {"nchw": x, "channels_last": x.contiguous(memory_format=CL)}
    rows = []

    with torch.no_grad():
        t = timed({k: (lambda v=v: [net_forward(bne, v, [d]) for d in range(3)]) for k, v in xs.items()}, args.reps)
        rows.append(("3 branch forwards, ms", t["nchw"] * 1e3, t["channels_last"] * 1e3))
        noop = lambda layer, h: None  # noqa: E731
        t = timed({
            "noop": lambda: [net_forward(bne, xs["channels_last"], [d], noop) for d in range(3)],
            "rec": lambda: [net_forward(bne, xs["channels_last"], [d], InstanceRecorder()) for d in range(3)],
        }, args.reps)
        recorder = {"no-op recorder ms": t["noop"] * 1e3, "instance recorder ms": t["rec"] * 1e3, "ratio": t["rec"] / t["noop"]}

    def step_fn(method: str, layout: str):
        spec = ModelSpec(domains=("a", "b", "c") if method == "bne" else ())
        model = DGNet(spec).train()
        opt = build_optimizer(model, replace(TrainConfig(), freeze_stages=args.freeze))
        xb = torch.rand(3 * b, 3, r, r)
        xb = xb.contiguous(memory_format=CL) if layout == "channels_last" else xb
        y = torch.randint(0, 7, (3 * b,))
        doms = [0, 1, 2] if method == "bne" else [0]

        def step():
            loss = F.cross_entropy(net_forward(model, xb, doms), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    for method in ("deepall", "bne"):
        t = timed({k: step_fn(method, k) for k in xs}, max(3, args.reps // 2))
        rows.append((f"{method} training img/s", 3 * b / t["nchw"], 3 * b / t["channels_last"]))

    stats_rows = []
    for shape in [(b, 96, r // 2, r // 2), (b, 144, r // 4, r // 4), (b, 672, r // 16, r // 16)]:
        a = torch.randn(shape)
        for layout, v in (("nchw", a), ("channels_last", a.contiguous(memory_format=CL))):
            hw = shape[2] * shape[3]
            t = timed({
                "mean(x*x)": lambda v=v: (v * v).mean((2, 3)),
                "vector_norm": lambda v=v: torch.linalg.vector_norm(v, 2, (2, 3)).square() / hw,
                "var_mean": lambda v=v: torch.var_mean(v, (2, 3), correction=0),
            }, 3 * args.reps)
            stats_rows.append({"shape": list(shape), "layout": layout, **{k: round(s * 1e3, 3) for k, s in t.items()}})

    report = {
        "command": "python bench/layout_probe.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "torch": torch.__version__, "threads": args.threads,
        "layout": [{"what": w, "nchw": round(n, 2), "channels_last": round(c, 2)} for w, n, c in rows],
        "recorder_channels_last": {k: round(v, 3) for k, v in recorder.items()},
        "instance_stats_ms": stats_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"layout probe ({args.threads} threads, {r} px, {b} images per domain)")
    for c in ("measurement", "NCHW", "channels-last"):
        table.add_column(c)
    for w, n, c in rows:
        table.add_row(w, f"{n:.1f}", f"{c:.1f}")
    table.add_row("3 branch forwards + recorder / no-op recorder", "", f"{recorder['ratio']:.2f}")
    stats_table = Table(title="E(x^2) per sample and channel, ms")
    for c in ("activation", "layout", "mean(x*x)", "vector_norm", "var_mean"):
        stats_table.add_column(c)
    for s in stats_rows:
        stats_table.add_row("x".join(map(str, s["shape"])), s["layout"], *(str(s[k]) for k in ("mean(x*x)", "vector_norm", "var_mean")))
    Console().print(table, stats_table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
