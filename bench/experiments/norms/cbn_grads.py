"""CBN's gradient paths: training-step time with the source conv's per-chunk weight gradients vs autograd.

``CrossIterationBatchNorm2d`` needs d mu / d theta and d nu / d theta of every domain's chunk. Autograd
backpropagates through the feeding conv over the whole batch once per statistic and domain (2 S passes);
``fast_grads`` computes them with ``torch.nn.grad.conv2d_weight`` on each chunk's own input (2 passes over the
batch in all). Both give the same numbers (tests/test_norms.py); this measures the time of real training steps
(``bne.train.train_step`` on the params' model, Lite0 with packaged weights, ``train.freeze_stages``, 3 source
domains, random images), BN beside them for scale. Sides alternated step by step (``_harness.interleaved``),
medians. Prints a table, writes JSON.

    python bench/experiments/norms/cbn_grads.py [--threads 1] [--batches 2 16] [--reps 5] [--out reports/bench/cbn_grads.json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: the harness

import torch  # noqa: E402

import _harness as H  # noqa: E402
from tasks import params as P  # noqa: E402

DOMAINS = ("a", "b", "c")


def side(p: P.Params, method: str, norm: str, fast: bool, b: int, resolution: int, freeze: int):
    """One training step of ``method`` with ``norm`` on 3 x ``b`` random images (``bne.train.train_step``)."""
    spec = replace(p.model.spec(7), norm=norm, cbn_burnin=0)
    cfg = replace(p.train.config(seed=0), freeze_stages=freeze, ensemble_loss=0.0)
    t = H.trainer(spec, cfg, DOMAINS if method == "bne" else ())
    for layer in t.model.norm_layers():
        if hasattr(layer, "fast_grads"):
            layer.fast_grads = fast
    batch = H.random_minibatches(len(DOMAINS), b, resolution, 7)
    for _ in range(3):  # past CBN's first iterations, so the memory is full (window 4)
        t.step(batch)

    def run(_round: int) -> int:
        t.step(batch)
        return len(DOMAINS) * b

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=H.ROOT / "params.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 16], help="images per domain per step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--freeze", type=int, default=4, help="train.freeze_stages")
    ap.add_argument("--out", type=Path, default=H.ROOT / "reports" / "bench" / "cbn_grads.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = H.loadavg()
    p = P.load(args.params)
    rows = []
    for method in ("bne", "deepall"):
        for b in args.batches:
            sides = {
                "bn": side(p, method, "bn", True, b, args.resolution, args.freeze),
                "cbn_fast": side(p, method, "cbn", True, b, args.resolution, args.freeze),
                "cbn_autograd": side(p, method, "cbn", False, b, args.resolution, args.freeze),
            }
            runs = H.interleaved(sides, args.reps)
            ips = {k: H.median(H.per_second(v)) for k, v in runs.items()}
            rows.append({"method": method, "per_domain_batch": b, **{f"{k}_img_s": round(v, 2) for k, v in ips.items()},
                         "fast_vs_autograd": round(ips["cbn_fast"] / ips["cbn_autograd"], 2),
                         "cbn_fast_vs_bn": round(ips["cbn_fast"] / ips["bn"], 2)})
            print(rows[-1], flush=True)
    H.write_report(args.out, {
        "settings": {"threads": args.threads, "resolution": args.resolution, "freeze_stages": args.freeze, "reps": args.reps},
        "what": "training images/s, medians of interleaved steps; fast_vs_autograd: CBN with per-chunk conv weight gradients over CBN with autograd's",
        "rows": rows,
    }, load_before=load0)
    H.print_table(f"CBN gradient paths, training img/s ({args.threads} thread(s), {args.resolution} px, loadavg {load0})",
                  ("method", "b", "BN", "CBN fast", "CBN autograd", "fast / autograd", "CBN fast / BN"),
                  [(r["method"], r["per_domain_batch"], r["bn_img_s"], r["cbn_fast_img_s"], r["cbn_autograd_img_s"],
                    r["fast_vs_autograd"], r["cbn_fast_vs_bn"]) for r in rows])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
