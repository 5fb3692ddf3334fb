"""The ``bne`` command line: one command per pipeline stage (what ``dvc.yaml`` runs), ``bne lodo``, ``bne predict``.

Every stage command reads ``--params`` (default ``params.yaml``) through :mod:`tasks.params`, with ``--set
dotted.key=value`` overrides, and works in the project folder ``--root`` (``data/`` and ``reports/`` under it).
A bad parameter or input is one line naming it and exit 1, before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from tasks import params as params_mod
from tasks.paths import Layout

app = typer.Typer(help="Batch Normalization Embeddings for domain generalization.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

PARAMS = typer.Option(Path("params.yaml"), help="parameters file")
SET = typer.Option(None, "--set", help="override a parameter: --set train.epochs=1 (repeatable)")
ROOT = typer.Option(Path("."), help="project folder: stage outputs under ROOT/data, reports under ROOT/reports")
PROGRESS = typer.Option(True, help="progress (a bar on a terminal, a line every 30 s in a log)")
TARGET = typer.Option(..., help="the held-out domain of the fold")


def _fail(e: Exception) -> NoReturn:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def _stage(name: str, params: Path, set_: list[str] | None, root: Path):
    """The stage module, its scoped parameters and the project layout; bad parameters stop here."""
    import importlib

    module = importlib.import_module(f"tasks.{name}")
    try:
        p = params_mod.load(params, set_ or []).scoped(module.PARAMS, stage=name)
        return module, p, Layout(root, p.dataset.name)
    except (ValueError, OSError) as e:
        _fail(e)


def _max_pixels(given: int | None, params: Path, set_: list[str] | None, stage: str) -> int:
    """``--max-pixels``, else the params file's ``dataset.max_pixels``; neither: one line saying what to give."""
    if given is not None:
        if given < 1:
            _fail(ValueError(f"--max-pixels {given}: must be a positive number of pixels (width x height)"))
        return given
    if not params.is_file():
        _fail(ValueError(f"no {params}: give --max-pixels (the largest image to decode, width x height)"))
    if stage:
        return _stage(stage, params, set_, Path("."))[1].dataset.max_pixels
    try:
        return params_mod.load(params, set_ or []).dataset.max_pixels
    except (ValueError, OSError) as e:
        _fail(e)


MAX_PIXELS = typer.Option(None, "--max-pixels", help="with SOURCE/MANIFEST: largest image decoded, width x height (default: dataset.max_pixels of --params)")


def _run(fn):
    """Run a stage; an expected failure (bad input, missing artifact) becomes one clear line and exit 1."""
    try:
        return fn()
    except (ValueError, OSError) as e:
        _fail(e)


@app.command()
def ingest(
    source: Path = typer.Argument(None, help="a <domain>/<class>/<image> tree; default: the pipeline's dataset.root"),
    out: Path = typer.Option(None, help="with SOURCE: folder for manifest.parquet and ingest_report.json"),
    splits: Path = typer.Option(None, help="with SOURCE: PACS-format split files (default: a seeded stratified split)"),
    sums: Path = typer.Option(None, help="with SOURCE: SHA256SUMS to verify (default: SOURCE/SHA256SUMS or SOURCE/../SHA256SUMS)"),
    name: str = typer.Option(None, help="with SOURCE: dataset name (default: SOURCE's folder name, its parent's for 'images')"),
    val_fraction: float = typer.Option(0.1, help="with SOURCE and no split files: validation fraction of the stratified split"),
    max_pixels: int = MAX_PIXELS,
    params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS,
) -> None:
    """Stage ingest: scan, hash and inspect every image; write a Parquet manifest with splits and dataset metadata."""
    from tasks.ingest import SPLIT_SEED, summary

    if source is None:
        module, p, layout = _stage("ingest", params, set_, root)
        r = _run(lambda: module.run(p, layout, params.parent, progress))
    else:
        if out is None:
            _fail(ValueError("with SOURCE, give --out"))
        from bne.ingest import ingest as run_ingest

        limit = _max_pixels(max_pixels, params, set_, "ingest")
        r = _run(lambda: run_ingest(source, out, splits, sums, val_fraction, SPLIT_SEED, name, None, progress, max_pixels=limit))
    typer.echo(summary(r))


@app.command()
def validate(
    manifest: Path = typer.Argument(None, help="a manifest.parquet; default: the pipeline's (data/ingest/<dataset>)"),
    validated: Path = typer.Option(None, help="with MANIFEST: where the validated copy goes (default: beside it)"),
    reports: Path = typer.Option(None, help="with MANIFEST: validation.json/.md go to REPORTS/<dataset> (default ROOT/reports)"),
    min_per_class: int = typer.Option(None, help="with MANIFEST and no params file: fewer images per domain and class warn"),
    min_size: int = typer.Option(None, help="with MANIFEST and no params file: smallest width/height in pixels"),
    near_duplicate_bits: int = typer.Option(None, help="with MANIFEST and no params file: perceptual hashes this close across domains warn"),
    max_pixels: int = typer.Option(None, "--max-pixels", help="with MANIFEST and no params file: largest image read for the hashes"),
    params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT,
) -> None:
    """Stage validate: the Great Expectations suite; the validated copy only on success; exit 1 on failure.

    The configured dataset.domains/classes apply only to a manifest of the configured dataset; without a
    params file, a MANIFEST is validated on its own with --min-per-class, --min-size, --near-duplicate-bits and --max-pixels.
    """
    from tasks.validate import ValidationConfig, config_for, summary, validate_manifest

    if manifest is None:
        module, p, layout = _stage("validate", params, set_, root)
        report = _run(lambda: module.run(p, layout, root / "reports", params.parent))
    else:
        if params.is_file():
            _, p, _ = _stage("validate", params, set_, root)
            cfg, note = _run(lambda: config_for(p, manifest))
        elif None in (min_per_class, min_size, near_duplicate_bits, max_pixels):
            _fail(ValueError(f"no {params}: give --min-per-class, --min-size, --near-duplicate-bits and --max-pixels "
                             f"to validate {manifest} on its own"))
        else:
            values = {"min_per_class": min_per_class, "min_size": min_size, "near_duplicate_bits": near_duplicate_bits,
                      "max_pixels": max_pixels}
            bad = [f"--{k.replace('_', '-')} {v}" for k, v in values.items() if v < (0 if k == "near_duplicate_bits" else 1)]
            if bad:
                _fail(ValueError(f"{', '.join(bad)}: must be positive (--near-duplicate-bits: 0 or more)"))
            cfg, note = ValidationConfig(**values), f"no {params}: validated on its own"
        report = _run(lambda: validate_manifest(manifest, reports or root / "reports", cfg, validated, note))
    typer.echo(summary(report), err=not report["success"])
    if not report["success"]:
        raise typer.Exit(1)


@app.command()
def cache(
    manifest: Path = typer.Argument(None, help="a validated manifest; default: the pipeline's (data/validated/<dataset>)"),
    out: Path = typer.Option(None, help="with MANIFEST: folder for <domain>.npy (uint8, N x size x size x 3) and index.json"),
    size: int = typer.Option(None, help="with MANIFEST: side in pixels (default: train.resolution of the params file)"),
    verify: bool = typer.Option(False, "--verify", help="re-hash every source image first; one that changed since ingest is refused"),
    max_pixels: int = MAX_PIXELS,
    params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS,
) -> None:
    """Stage cache: decode every image of the validated manifest once into memory-mappable per-domain arrays.

    Content-addressed: an image is decoded again when its SHA-256 (from the manifest) or the size changes.
    """
    if manifest is None:
        module, p, layout = _stage("cache", params, set_, root)
        typer.echo(_run(lambda: module.run(p, layout, progress, verify=verify)))
        return
    from bne.data import build_cache
    from bne.ingest import dataset_from_manifest
    from tasks.cache import WORKERS

    if out is None:
        _fail(ValueError("with MANIFEST, give --out"))
    if size is None:
        _, p, _ = _stage("cache", params, set_, root)
        size = p.train.resolution
    limit = _max_pixels(max_pixels, params, set_, "cache")
    ds = _run(lambda: dataset_from_manifest(manifest))
    _run(lambda: build_cache(ds, size, out, WORKERS, progress, verify=verify, max_pixels=limit))
    typer.echo(f"{out}: {len(ds.samples)} images of {len(ds.domains)} domains at {size}x{size}" + ("; every source re-hashed" if verify else ""))


@app.command()
def train(target: str = TARGET, params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS) -> None:
    """Stage train: DeepAll and BNE without TARGET, every seed; resumes from the last epoch checkpoint."""
    module, p, layout = _stage("train", params, set_, root)
    _run(lambda: module.run(p, layout, target, progress))


stats_app = typer.Typer(help="Per-domain statistics (stats.parquet): the stage, and a summary of a file.", no_args_is_help=True)
app.add_typer(stats_app, name="stats")


@stats_app.command("extract")
def stats_extract(target: str = TARGET, params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT) -> None:
    """Stage stats: per-domain statistics of the fold's BNE model to ROOT/data/stats/<dataset>/<target>.parquet."""
    module, p, layout = _stage("stats", params, set_, root)
    _run(lambda: module.run(p, layout, target))


@app.command()
def embed(target: str = TARGET, params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS) -> None:
    """Stage embed: branch outputs and per-layer distances of the sources' validation images."""
    module, p, layout = _stage("embed", params, set_, root)
    _run(lambda: module.run(p, layout, target, progress))


@app.command()
def tune(target: str = TARGET, params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT) -> None:
    """Stage tune: an Optuna study of the BNE inference options on source validation (own branch left out)."""
    module, p, layout = _stage("tune", params, set_, root)
    _run(lambda: module.run(p, layout, target))


@app.command()
def evaluate(target: str = TARGET, params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS) -> None:
    """Stage evaluate: the only stage that reads TARGET; every method, every seed."""
    module, p, layout = _stage("evaluate", params, set_, root)
    _run(lambda: module.run(p, layout, target, progress))


@app.command()
def report(params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT) -> None:
    """Stage report: metrics.json, metrics.md, details.json, ablation.json and figures from every fold."""
    module, p, layout = _stage("report", params, set_, root)
    _run(lambda: module.run(p, layout))


@app.command()
def final(params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS) -> None:
    """Stage final: BNE trained on every domain (no held-out domain), the model `bne predict` uses."""
    module, p, layout = _stage("final", params, set_, root)
    _run(lambda: module.run(p, layout, progress))


@app.command()
def extend(params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS) -> None:
    """Stage extend: add the domains of `extend.domains` to the final model as new branches (statistics pass)."""
    module, p, layout = _stage("extend", params, set_, root)
    _run(lambda: module.run(p, layout, params.parent, progress))


@app.command()
def lodo(
    target: list[str] = typer.Option(None, help="held-out domain(s) to run (default: dataset.folds)"),
    params: Path = PARAMS, set_: list[str] = SET, root: Path = ROOT, progress: bool = PROGRESS,
) -> None:
    """Every stage of leave-one-domain-out in one process, the same stage functions `dvc repro` runs."""
    from tasks.lodo import run_lodo

    overrides = list(set_ or []) + ([f"dataset.folds=[{', '.join(target)}]"] if target else [])
    try:
        p = params_mod.load(params, overrides)
    except (ValueError, OSError) as e:
        _fail(e)
    _run(lambda: run_lodo(p, root, params.parent, progress))


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    model: Path = typer.Option(None, help="model folder (default: ROOT/data/extend/<dataset>/model if present, else ROOT/data/final/<dataset>)"),
    params: Path = typer.Option(Path("params.yaml"), help="eval.options, eval.batch and dataset.max_pixels from this file when it exists (else the model's options)"),
    max_pixels: int = typer.Option(None, "--max-pixels", help="largest image decoded, width x height (default: dataset.max_pixels of --params; needed without it)"),
    root: Path = ROOT,
    json_: Path = typer.Option(None, "--json", help="also write the predictions as JSON to this file"),
    csv: Path = typer.Option(None, help="also write the predictions as CSV to this file"),
) -> None:
    """Class, probability and the weight of each source domain, per image; undecodable images are named and skipped.

    Images are decoded with the ingest rules (16-bit and float modes, more than dataset.max_pixels pixels: refused
    with the reason) and predicted in batches. Nothing predicted: exit 1, no output file.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from bne.io import atomic_write
    from bne.predict import Predictor, image_files

    limit = _max_pixels(max_pixels, params, None, "")
    try:
        p = params_mod.load(params) if params.is_file() else None
        if model is None:
            if p is None:
                raise ValueError(f"give --model (no {params} to find the default model)")
            layout = Layout(root, p.dataset.name)
            model = layout.extend / "model" if (layout.extend / "model" / "model.json").is_file() else layout.final
        files = image_files(inputs)
        if not files:
            raise ValueError(f"no image files in {[str(i) for i in inputs]}")
        pred = Predictor(model, p.eval.batch if p else 16)
        if p is not None:
            pred.options = p.eval.options.options()  # the current eval.options, as `bne evaluate` uses
        rows, errors = pred.predict_files(files, max_pixels=limit)
    except (ValueError, OSError) as e:
        _fail(e)
    for e in errors:
        typer.echo(f"skipped {e['file']}: {e['error']}", err=True)
    if not rows:  # no table, no header-only CSV: one line and exit 1
        _fail(ValueError(f"nothing predicted: none of the {len(errors)} file(s) decoded (each named above)"))
    table = Table(title=f"{len(rows)} image(s), model {pred.dir} (domains {', '.join(pred.domains)})")
    for col in ("file", "class", "probability", *[f"w_{d}" for d in pred.domains]):
        table.add_column(col, justify="left" if col in ("file", "class") else "right")
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    Console().print(table)
    if json_:
        atomic_write(json_, json.dumps({"model": str(pred.dir), "predictions": rows, "skipped": errors}, indent=2))
    if csv:
        import pandas as pd

        columns = ["file", "class", "probability", *[f"w_{d}" for d in pred.domains]]
        atomic_write(csv, pd.DataFrame(rows, columns=columns).to_csv(index=False))


@stats_app.command("show")
def stats_show(file: Path = typer.Argument(..., help="a stats.parquet written by the stats or final stage")) -> None:
    """Per-domain, per-layer summary of a statistics file and the pairwise W2 distances between domains."""
    import numpy as np

    from bne.stats import pairwise_w2, read_stats_table

    if not file.is_file():
        _fail(FileNotFoundError(f"no such file: {file}"))
    stage = "final (or extend)" if file.name == "stats.parquet" else "stats"  # a model's file, or a fold's
    meta, kinds, domains = _run(lambda: read_stats_table(str(file), stage=stage))
    typer.echo(f"{file}: domains {domains}; " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    for kind, st in kinds.items():
        typer.echo(f"\n[{kind}] {len(st.layer_names)} layers; mean |mean| and mean std per domain, first/last layer:")
        for d, dom in enumerate(domains):
            first, last = 0, len(st.layer_names) - 1
            typer.echo(
                f"  {dom:>14}: {st.layer_names[first]} |mu| {np.abs(st.mean[first][d]).mean():.3f} sd {np.sqrt(st.var[first][d]).mean():.3f}"
                f" | {st.layer_names[last]} |mu| {np.abs(st.mean[last][d]).mean():.3f} sd {np.sqrt(st.var[last][d]).mean():.3f}"
            )
        w2 = pairwise_w2(st)
        typer.echo("  pairwise W2 (mean over layers):")
        typer.echo("  " + " " * 15 + "".join(f"{dom[:12]:>13}" for dom in domains))
        for d, dom in enumerate(domains):
            typer.echo(f"  {dom:>14} " + "".join(f"{w2[d, e]:13.3f}" for e in range(len(domains))))


if __name__ == "__main__":
    app()
