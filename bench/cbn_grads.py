"""CBN's gradient paths: training-step time with the source conv's per-chunk weight gradients vs autograd.

``CrossIterationBatchNorm2d`` needs d mu / d theta and d nu / d theta of every domain's chunk. Autograd
backpropagates through the feeding conv over the whole batch once per statistic and domain (2 S passes);
``fast_grads`` computes them with ``torch.nn.grad.conv2d_weight`` on each chunk's own input (2 passes over the
batch in all). Both give the same numbers (tests/test_norms.py); this measures the time of real training steps
(Lite0 with packaged weights, ``train.freeze_stages`` of the params, 3 source domains, random images), BN beside
them for scale. Sides alternated step by step (``speed.interleaved``), medians. Prints a table, writes JSON.

    python bench/cbn_grads.py [--threads 1] [--batches 2 16] [--reps 5] [--out reports/bench/cbn_grads.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from _util import train_step  # bench/ is on sys.path when run as a script
from speed import interleaved, median, per_second  # bench/ is on sys.path when run as a script


def trainer(method: str, norm: str, fast: bool, b: int, resolution: int, freeze: int):
    """One training step of ``method`` with ``norm`` on 3 x ``b`` random images, as ``bne.train`` takes it."""
    step = train_step(method, resolution, freeze, per_domain=b, norm=norm, fast_grads=fast)
    for _ in range(3):  # past CBN's first iterations, so the memory is full (window 4)
        step(0)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 16], help="images per domain per step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--freeze", type=int, default=4, help="train.freeze_stages")
    ap.add_argument("--out", default="reports/bench/cbn_grads.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    rows = []
    for method in ("bne", "deepall"):
        for b in args.batches:
            sides = {
                "bn": trainer(method, "bn", True, b, args.resolution, args.freeze),
                "cbn_fast": trainer(method, "cbn", True, b, args.resolution, args.freeze),
                "cbn_autograd": trainer(method, "cbn", False, b, args.resolution, args.freeze),
            }
            runs = interleaved(sides, args.reps, 1, lambda: None)
            ips = {k: median(per_second(v)) for k, v in runs.items()}
            rows.append({"method": method, "per_domain_batch": b, **{f"{k}_img_s": round(v, 2) for k, v in ips.items()},
                         "fast_vs_autograd": round(ips["cbn_fast"] / ips["cbn_autograd"], 2),
                         "cbn_fast_vs_bn": round(ips["cbn_fast"] / ips["bn"], 2)})
            print(rows[-1], flush=True)
    report = {
        "command": "python bench/cbn_grads.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"
        ),
        "torch": torch.__version__, "threads": args.threads, "resolution": args.resolution, "freeze_stages": args.freeze,
        "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "what": "training images/s, medians of interleaved steps; fast_vs_autograd: CBN with per-chunk conv weight gradients over CBN with autograd's",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CBN gradient paths, training img/s ({args.threads} thread(s), {args.resolution} px, loadavg {report['loadavg_before']})")
    for c in ("method", "b", "BN", "CBN fast", "CBN autograd", "fast / autograd", "CBN fast / BN"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["method"], str(r["per_domain_batch"]), f"{r['bn_img_s']:.1f}", f"{r['cbn_fast_img_s']:.1f}",
                      f"{r['cbn_autograd_img_s']:.1f}", f"{r['fast_vs_autograd']:.2f}", f"{r['cbn_fast_vs_bn']:.2f}")
    Console().print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
