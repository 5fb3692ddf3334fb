"""Stage ``extend``: the domains of ``extend.domains`` added to the final model as new branches (a statistics pass).

Each new domain is ingested and validated, measured as an unseen domain (existing branches), given its own branch
from its train images, and measured again. ``data/extend/<dataset>/`` holds the model; ``reports/<dataset>/
new_domains.{json,md}`` the measurements.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from bne.data import build_cache, load_cache
from bne.ingest import dataset_from_manifest, ingest
from bne.io import atomic_write, read_json, write_json
from bne.predict import extend_with_domain
from tasks.paths import Layout, resolve

PARAMS = ("dataset.name", "dataset.root", "dataset.val_fraction", "dataset.max_pixels", "extend.domains", "train.resolution",
          "eval.batch", "validation.min_per_class", "validation.min_size", "validation.near_duplicate_bits")


def run(p, layout: Layout, base: Path, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    out, final_dir = layout.extend, layout.final
    new = list(p.extend.domains)
    results = []
    if new:
        # here, not at the top: Great Expectations takes seconds to import, and most runs of this stage add nothing
        from tasks.validate import ValidationConfig, summary, validate_manifest

        work = out / "work"
        ingest(resolve(base, p.dataset.root), work / "ingest", None, None, p.dataset.val_fraction, 0, p.dataset.name, None,
               progress, domains=new, max_pixels=p.dataset.max_pixels)
        cfg = ValidationConfig(min_per_class=p.validation.min_per_class, min_size=p.validation.min_size,
                               near_duplicate_bits=p.validation.near_duplicate_bits, max_pixels=p.dataset.max_pixels,
                               domains=tuple(new))
        report = validate_manifest(work / "ingest" / "manifest.parquet", work / "reports", cfg, work / "validated" / "manifest.parquet")
        if not report["success"]:
            raise ValueError(f"new domain(s) {new} failed validation: {summary(report)}")
        ds = dataset_from_manifest(work / "validated" / "manifest.parquet")
        model_classes = read_json(final_dir / "model.json", "final model", "final")["classes"]
        if ds.classes != model_classes:
            raise ValueError(f"classes of {p.dataset.root} {ds.classes} differ from the final model's {model_classes}")
        arrays = load_cache(ds, build_cache(ds, p.train.resolution, work / "cache", progress=progress,
                                                max_pixels=p.dataset.max_pixels))
        current = final_dir
        for i, name in enumerate(new):
            step = out / f"step{i}"
            results.append(extend_with_domain(current, arrays[name], step, batch=p.eval.batch, log=log))
            current = step
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(current, tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")
    record = {"final_model": str(final_dir), "new_domains": new, "results": results}
    lines = [f"# {p.dataset.name}: new domains\n\n"]
    if not results:
        lines.append("No new domains: the final model is current.\n")
    else:
        lines.append("| new domain | BNE as an unseen domain (existing branches) | BNE with its own branch | val images |\n|---|---|---|---|\n")
        lines += [f"| {r['domain']} | {r['unseen_bne_acc']:.1f} | {r['own_branch_bne_acc']:.1f} | {r['val_images']} |\n" for r in results]
    write_json(out / "extend.json", record)
    write_json(layout.reports / "new_domains.json", record)
    atomic_write(layout.reports / "new_domains.md", "".join(lines))
    log("".join(lines))
    return record
