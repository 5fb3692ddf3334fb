"""A compact, re-encoded copy of PACS for the GPU protocol (everything carried to the GPU machine must fit
in 64 MiB, the Lite0 weights included), and what the re-encoding costs in accuracy.

The copy keeps PACS's layout: ``OUT/images/<domain>/<class>/<name>.webp`` (``--size`` px square, WebP
``--quality``), ``OUT/splits/*.txt`` with the paths renamed, and a fresh ``OUT/SHA256SUMS`` (``bne ingest`` checks
it on the GPU machine). ``pack.json`` records the settings and sizes.

``--measure``: on the CPU, each fold's trained DeepAll and BNE models of the pipeline (``data/``, run
``dvc repro`` first) classify the held-out domain's images decoded from the original files and from the
packed ones, both resized to ``train.resolution`` as the cache stage does; the table gives the accuracies, their
difference and the share of changed predictions, and goes to ``reports/bench/pack.json``.

    python bench/gpu/pack_pacs.py --out gpu_data/pacs                 # the full copy (~35 MiB)
    python bench/gpu/pack_pacs.py --out gpu_data/pacs --measure --limit 1000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's bne and tasks

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bne.data import decode_image, load_folder_dataset  # noqa: E402


def encode(src: Path, size: int, quality: int) -> bytes:
    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "WEBP", quality=quality, method=6)
        return buf.getvalue()


def renamed(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(".webp"))


def pack(source: Path, out: Path, size: int, quality: int, per_class: int | None, workers: int) -> dict:
    """Write the compact copy; returns what pack.json holds. ``per_class``: the first N images of each domain
    and class only (a tiny copy for a dry run); split files keep only the images that are there."""
    images, splits = source / "images", source / "splits"
    ds = load_folder_dataset(images, splits if splits.is_dir() else None)
    keep = []
    for dom in ds.domains:
        for c in ds.classes:
            rows = sorted(s.path for s in ds.samples if s.domain == dom and s.cls == c)
            keep += rows[:per_class] if per_class else rows
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def one(rel: str) -> tuple[str, int, str]:
        data = encode(images / rel, size, quality)
        dst = tmp / "images" / renamed(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return renamed(rel), len(data), hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(workers) as pool:
        done = list(tqdm(pool.map(one, keep), total=len(keep), desc="re-encoding"))
    (tmp / "SHA256SUMS").write_text("".join(f"{h}  {rel}\n" for rel, _, h in done))
    kept = set(keep)
    if splits.is_dir():
        (tmp / "splits").mkdir()
        for f in sorted(splits.glob("*.txt")):
            lines = []
            for line in f.read_text(encoding="utf-8").splitlines():
                words = line.strip().rsplit(None, 1)
                if words and words[0] in kept:
                    lines.append(" ".join([renamed(words[0])] + words[1:]))
            (tmp / "splits" / f.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    total = sum(n for _, n, _ in done)
    info = {
        "source": str(source), "size": size, "format": "webp", "quality": quality, "images": len(done),
        "per_class": per_class, "bytes": total, "mib": round(total / 2**20, 2),
        "mean_kib_per_image": round(total / len(done) / 1024, 2),
    }
    (tmp / "pack.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def measure(packed: Path, params: Path, work: Path, limit: int | None, threads: int) -> dict:
    """Accuracy of each fold's trained models (the pipeline's, under ``work``) on the original vs the re-encoded
    held-out images."""
    import torch

    from bne.evaluate import accuracy, bne_inference, branch_chunk, plain_probs
    from bne.model_io import load_model, model_with_stats
    from bne.train import pick_device
    from tasks import params as P
    from tasks.paths import FoldPaths

    torch.set_num_threads(threads)
    p = P.load(params)
    root = P.resolve(params.parent, p.dataset.root)
    ds = load_folder_dataset(root, P.resolve(params.parent, p.dataset.splits), p.dataset.val_fraction, seed=0)
    device = pick_device(p.train.device)
    opts, seed, res, batch = p.eval.options.options(), p.train.seeds[0], p.train.resolution, p.eval.batch
    chunk = branch_chunk(p.eval.branch_chunk, batch, device)
    rows = {}
    for t in p.dataset.folds:
        names = [d for d in ds.domains if d != t]
        paths = FoldPaths(work, p.dataset.name, t)
        model, kinds = model_with_stats(p.model.spec(len(ds.classes), names), paths.train(seed, "bne") / "model.pt",
                                        paths.stats, seed, device)
        deep = load_model(p.model.spec(len(ds.classes)), paths.train(seed, "deepall") / "model.pt", device)
        samples = [s for s in ds.samples if s.domain == t]
        pick = np.random.default_rng(0).permutation(len(samples))[:limit] if limit else np.arange(len(samples))
        samples = [samples[i] for i in sorted(pick)]
        labels = torch.tensor([s.label for s in samples])
        res = {"images": len(samples)}
        preds = {}
        for version, base, name in (("original", root, lambda rel: rel), ("packed", packed / "images", renamed)):
            with ThreadPoolExecutor(threads) as pool:
                imgs = np.stack(list(pool.map(lambda s: decode_image(base / name(s.path), res, max_pixels=p.dataset.max_pixels), samples)))
            bp, _ = bne_inference(model, imgs, kinds[opts.embedding], opts, batch, device, chunk=chunk)
            dp = plain_probs(deep, imgs, batch, device)
            res[version] = {"bne": accuracy(bp, labels), "deepall": accuracy(dp, labels)}
            preds[version] = (bp.argmax(1), dp.argmax(1))
        res["changed_predictions"] = {
            m: float((preds["original"][i] != preds["packed"][i]).float().mean()) for i, m in enumerate(("bne", "deepall"))
        }
        rows[t] = res
        print(f"{t}: " + json.dumps(res))
    return {"resolution": res, "seed": seed, "limit": limit, "folds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "datasets" / "pacs",
                    help="PACS folder holding images/ and splits/")
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_data" / "pacs")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=50)
    ap.add_argument("--per-class", type=int, help="only the first N images of each domain and class (dry runs)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--measure", action="store_true", help="accuracy cost of the re-encoding on the CPU models")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "data")
    ap.add_argument("--limit", type=int, help="held-out images per fold for --measure (seeded sample)")
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "bench" / "pack.json")
    args = ap.parse_args()
    info = json.loads((args.out / "pack.json").read_text()) if (args.out / "pack.json").is_file() else {}
    wanted = {"size": args.size, "quality": args.quality, "per_class": args.per_class}
    if not args.measure or any(info.get(k) != v for k, v in wanted.items()):  # --measure reuses a matching copy
        info = pack(args.source, args.out, args.size, args.quality, args.per_class, args.workers)
    print(f"{info['images']} images, {info['mib']} MiB ({info['mean_kib_per_image']} KiB/image), "
          f"{info['size']} px WebP q{info['quality']} -> {args.out}")
    if not args.measure:
        return
    result = {"pack": info, **measure(args.out, args.params, args.work, args.limit, args.workers)}
    print("\n| held-out | images | DeepAll orig. | DeepAll packed | BNE orig. | BNE packed | changed (BNE) |\n|---|---|---|---|---|---|---|")
    for t, r in result["folds"].items():
        o, p = r["original"], r["packed"]
        print(f"| {t} | {r['images']} | {100 * o['deepall']:.1f} | {100 * p['deepall']:.1f} | {100 * o['bne']:.1f} | "
              f"{100 * p['bne']:.1f} | {100 * r['changed_predictions']['bne']:.1f}% |")
    for m in ("deepall", "bne"):
        d = [100 * (r["packed"][m] - r["original"][m]) for r in result["folds"].values()]
        result[f"mean_delta_{m}_points"] = round(float(np.mean(d)), 2)
    print(f"mean change (points): DeepAll {result['mean_delta_deepall_points']:+.2f}, BNE {result['mean_delta_bne_points']:+.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
