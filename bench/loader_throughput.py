"""Loader vs trainer: images/s of the cached-array loader with augmentation, and of training steps.

The loader is what training runs each step: rows read from the memory-mapped uint8 cache and augmented
(random resized crop, flip, colour jitter, grayscale). The ratio loader/trainer must stay >= 3.
Prints a table and writes reports/bench/loader.json.

    python bench/loader_throughput.py [--params params.yaml] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _util import train_throughput  # noqa: E402  (bench/ is on sys.path when run as a script)
from bne.data import Augment, build_cache, domain_batches, load_cache, load_folder_dataset
from bne.lodo import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cache", default="data/cache")
    ap.add_argument("--out", default="reports/bench/loader.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_params(args.params)
    res, b = cfg.resolution, cfg.train.per_domain_batch
    ds = load_folder_dataset(cfg.root, cfg.splits)
    arrays = load_cache(ds, build_cache(ds, res, Path(args.cache) / cfg.name / str(res)))
    sources = [arrays[d] for d in ds.domains[:3]]
    augment = Augment(cfg.train.augment, res)
    batches = list(domain_batches([a.train for a in sources], b, args.steps, torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    for rows in batches:
        torch.cat([augment(a.images[r]) for a, r in zip(sources, rows)])
    loader = args.steps * 3 * b / (time.perf_counter() - t0)
    row = {
        "resolution": res,
        "batch": 3 * b,
        "threads": torch.get_num_threads(),
        "loader_img_s": round(loader, 1),
        "train_img_s_deepall": round(train_throughput("deepall", res, cfg.train.freeze_stages, b), 1),
        "train_img_s_bne": round(train_throughput("bne", res, cfg.train.freeze_stages, b), 1),
    }
    row["loader_vs_trainer"] = round(loader / max(row["train_img_s_deepall"], row["train_img_s_bne"]), 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print("| " + " | ".join(row) + " |\n|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
