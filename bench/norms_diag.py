"""Why BGN and Proxy Norm collapse from the pretrained Lite0 (reports/norms/short-budget.md): a diagnosis.

(1) What the conversion keeps: each layer replaces Lite0's BatchNorm2d (one domain, as DeepAll uses it); the
network's pooled features on real PACS images are compared (cosine similarity per image, mean) with the
pretrained BN network's: both in eval mode (running statistics), and both with their normalization layers
(only) in training mode on batches of ``--batch`` images of one domain (what a training step normalizes with).
A layer that keeps the function scores ~1; one far from it starts fine-tuning from a different, untrained
network.
(2) What fine-tuning does next: ``--steps`` DeepAll steps (the training loop's optimizer and lr, augmentation
off) on the sketch fold's sources, then how many different classes it predicts on held-out sketch images and
its accuracy there, for the configured lr and a 10x smaller one.

    python bench/norms_diag.py --threads 2        # table + reports/norms/diagnosis.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bne.data import decode_image, load_folder_dataset
from bne.lodo import load_params
from bne.model import DGNet, ModelSpec, classifier
from bne.norm.dsbn import DomainBatchNorm2d
from bne.train import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def sample(ds, domain: str, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rows = []
    for c in ds.classes:
        paths = sorted((s for s in ds.samples if s.domain == domain and s.cls == c and s.split == "train"), key=lambda s: s.path)
        rows += [paths[i] for i in rng.permutation(len(paths))[:per_class]]
    x = torch.from_numpy(np.stack([decode_image(Path(ds.root) / s.path, size) for s in rows])).permute(0, 3, 1, 2)
    return x.float() / 255, torch.tensor([s.label for s in rows])


def pooled(model: DGNet, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Global-average-pooled backbone features, in ``batch``-sized forwards (the model's current mode)."""
    feats = []
    hook = classifier(model.net, model.spec.backbone).register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        hook.remove()
    return torch.cat(feats)


def norm_train_mode(model: DGNet) -> DGNet:
    """A copy in eval mode but for its normalization layers (no dropout / drop-connect)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, DomainBatchNorm2d)):
            m.train()
    return model


def similarity(spec: ModelSpec, x: torch.Tensor, ref: dict, batch: int) -> dict:
    model = DGNet(spec)
    return {"eval": float(F.cosine_similarity(pooled(model.eval(), x, 64), ref["eval"]).mean()),
            "train": float(F.cosine_similarity(pooled(norm_train_mode(model), x, batch), ref["train"]).mean())}


def finetune(spec: ModelSpec, cfg, sources, target, steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = DGNet(spec).train()
    opt = build_optimizer(model, replace(cfg, lr=lr))
    xs = torch.cat([s[0] for s in sources])
    ys = torch.cat([s[1] for s in sources])
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.cat([torch.randint(len(s[0]), (batch,), generator=gen) + sum(len(t[0]) for t in sources[:k])
                         for k, s in enumerate(sources)])
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 3))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(target[0][i : i + 64]).argmax(1) for i in range(0, len(target[0]), 64)])
    return {"loss_first": losses[0], "loss_last": losses[-1], "finite": bool(np.isfinite(losses).all()),
            "classes_predicted": int(pred.unique().numel()), "target_acc": float((pred == target[1]).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="images per training-mode forward (per-domain batch)")
    ap.add_argument("--per-class", type=int, default=10, help="images per class and domain")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--norms", nargs="+", default=["bn", "bgn", "cbn", "mbn", "iebn", "proxynorm"])
    ap.add_argument("--groups", nargs="+", type=int, default=[32, 8, 80640], help="bgn/proxynorm groups (80640, a multiple of every Lite0 width: one channel each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "norms" / "diagnosis.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = load_params(args.params)
    ds = load_folder_dataset(cfg.root, cfg.splits)
    data = {d: sample(ds, d, args.per_class, args.size, 0) for d in ds.domains}
    g = torch.Generator().manual_seed(0)  # batches of one domain, classes mixed (as a BNE sub-batch)
    x = torch.cat([data[d][0][torch.randperm(len(data[d][0]), generator=g)] for d in ("photo", "art_painting", "cartoon")])
    bn = DGNet(replace(cfg.model, norm="bn", domains=()))
    ref = {"eval": pooled(bn.eval(), x, 64), "train": pooled(norm_train_mode(bn), x, args.batch)}
    rows = []
    for norm in args.norms:
        for g in args.groups if norm in ("bgn", "proxynorm") else [cfg.model.norm_groups]:
            spec = replace(cfg.model, norm=norm, norm_groups=g, domains=())
            row = {"norm": norm, "groups": g if norm in ("bgn", "proxynorm") else None, **similarity(spec, x, ref, args.batch)}
            srcs = [data[d] for d in ("art_painting", "cartoon", "photo")]
            for tag, lr in (("lr", cfg.train.lr), ("lr/10", cfg.train.lr / 10)):
                row[tag] = finetune(spec, cfg.train, srcs, data["sketch"], args.steps, args.batch, lr, 0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| norm | groups | cos. sim. to BN, eval | cos. sim. to BN, batch statistics (b={args.batch}) | after {args.steps} steps at lr {cfg.train.lr}: "
          f"classes predicted / sketch acc. | at lr {cfg.train.lr / 10:g} |\n|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["lr"], r["lr/10"]
        print(f"| {r['norm']} | {r['groups'] or ''} | {r['eval']:.3f} | {r['train']:.3f} | {a['classes_predicted']} / "
              f"{100 * a['target_acc']:.1f} | {b['classes_predicted']} / {100 * b['target_acc']:.1f} |")
    out = {"size": args.size, "batch": args.batch, "per_class": args.per_class, "steps": args.steps,
           "threads": args.threads, "seconds": round(time.time() - t0, 1), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
