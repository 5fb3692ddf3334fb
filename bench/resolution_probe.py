"""Resolution trade-off for the CPU protocol: frozen-feature LODO accuracy and training throughput per resolution.

For each resolution: (1) pretrained Lite0 features (global-average-pooled, frozen) of every PACS image,
then a leave-one-domain-out logistic-regression probe trained on the source domains' train lists and
tested on the whole target domain: how much the backbone's features lose at that resolution;
(2) training-step throughput (DeepAll and BNE, the configured frozen stages) on this machine.
Prints a table and writes reports/bench/resolution.json.

    python bench/resolution_probe.py --resolutions 96 112 128 160 224
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bne.data import build_cache, load_cache, load_folder_dataset, to_tensor
from bne.lodo import load_params
from bne.model import DGNet, ModelSpec

from _util import train_throughput  # noqa: E402  (bench/ is on sys.path when run as a script)


@torch.no_grad()
def features(model: DGNet, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = (to_tensor(images[i : i + batch]) - model.mean) / model.std
        out.append(model.net.extract_features(x).mean((2, 3)))
    return torch.cat(out)


def probe(train_x, train_y, test_x, test_y, classes: int, epochs: int = 200) -> float:
    """Multinomial logistic regression (full-batch L-BFGS, L2), standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((b @ w + bias).argmax(1) == test_y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[96, 112, 128, 160, 224])
    ap.add_argument("--cache", default="data/bench-cache")
    ap.add_argument("--out", default="reports/bench/resolution.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_params(args.params)
    ds = load_folder_dataset(cfg.root, cfg.splits)
    model = DGNet(ModelSpec(num_classes=len(ds.classes))).eval()
    rows = []
    for res in args.resolutions:
        arrays = load_cache(ds, build_cache(ds, res, Path(args.cache) / cfg.name / str(res)))
        t0 = time.perf_counter()
        feats = {d: features(model, a.images) for d, a in arrays.items()}
        infer = sum(len(a.images) for a in arrays.values()) / (time.perf_counter() - t0)
        accs = {}
        for target in ds.domains:
            src = [d for d in ds.domains if d != target]
            tx = torch.cat([feats[d][arrays[d].train] for d in src])
            ty = torch.cat([torch.as_tensor(arrays[d].labels[arrays[d].train]) for d in src])
            accs[target] = 100 * probe(tx, ty, feats[target], torch.as_tensor(arrays[target].labels), len(ds.classes))
        row = {
            "resolution": res,
            **{f"probe_{k}": round(v, 2) for k, v in accs.items()},
            "probe_mean": round(float(np.mean(list(accs.values()))), 2),
            "inference_img_s": round(infer, 1),
            "train_img_s_deepall": round(train_throughput("deepall", res, cfg.train.freeze_stages), 1),
            "train_img_s_bne": round(train_throughput("bne", res, cfg.train.freeze_stages), 1),
        }
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
