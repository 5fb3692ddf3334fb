"""Is the training-time ensemble loss stable? Per-step cross-entropy and ensemble NLL of BNE on a PACS fold.

The first ``--steps`` steps of the CPU protocol's BNE training (params.yaml: resolution, batch, lr with its
warm-up and cosine schedule, augmentation) on the sources of ``--target``, minimising CE + lambda x ensemble NLL
(``bne.train.ensemble_loss``, own branch left out); the NLL is computed and printed for lambda = 0 too.
Prints every 5th step and writes ``reports/bench/ensemble_loss_lambda<lambda>.json``.

    python bench/ensemble_loss_diag.py --lam 1.0 --steps 40
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bne.data import Augment, domain_batches
from bne.lodo import for_dataset, load_params, prepare
from bne.model import DGNet
from bne.train import build_optimizer, ensemble_loss, lr_factor, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--target", default="sketch")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--cache", type=Path, default=ROOT / "data" / "cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    ds, arrays = prepare(cfg, args.cache, progress=False, held_out=args.target)
    cfg = for_dataset(cfg, ds)
    src = [arrays[d] for d in ds.domains if d != args.target]
    tc, b, s = cfg.train, cfg.train.per_domain_batch, len(src)
    seed_everything(tc.seed)
    model = DGNet(replace(cfg.model, domains=tuple(a.name for a in src))).train()
    opt = build_optimizer(model, tc)
    aug = Augment(tc.augment, cfg.resolution)
    total = tc.epochs * (sum(len(a.train) for a in src) // (s * b))
    warmup = int(tc.warmup_frac * total)
    rows = []
    gen = torch.Generator().manual_seed(tc.seed * 1000)
    for i, batch in enumerate(domain_batches([a.train for a in src], b, args.steps, gen)):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(i, total, warmup)
        x = torch.cat([aug(a.images[r]) for a, r in zip(src, batch)])
        y = torch.cat([torch.as_tensor(a.labels[r]) for a, r in zip(src, batch)])
        ce = F.cross_entropy(model(x, domains=list(range(s))), y)
        nll = ensemble_loss(model, x, y, tc.ensemble_own_out)
        opt.zero_grad()
        (ce + args.lam * nll).backward()
        opt.step()
        rows.append({"step": i, "ce": round(ce.item(), 4), "ensemble_nll": round(nll.item(), 4)})
        if i % 5 == 0 or i == args.steps - 1:
            print(f"lambda {args.lam} step {i}: ce {ce.item():.3f} ensemble nll {nll.item():.3f}", flush=True)
    out = args.out or ROOT / "reports" / "bench" / f"ensemble_loss_lambda{args.lam:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"lambda": args.lam, "target": args.target, "steps": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
