"""The ``bne`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(help="Batch Normalization Embeddings for domain generalization.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Batch Normalization Embeddings for domain generalization."""


PARAMS = typer.Option(Path("params.yaml"), help="parameters file")
WORK = typer.Option(Path("data"), help="root of the stage outputs (train/, stats/, embed/, tune/, eval/)")
CACHE = typer.Option(Path("data/cache"), help="decoded image cache")
MANIFEST = typer.Option(None, help="validated manifest (default: data/validated/<dataset>/manifest.parquet if present, else scan the dataset root)")
SET = typer.Option(None, "--set", help="override a parameter: --set train.epochs=1 (repeatable)")
PROGRESS = typer.Option(True, help="progress bars")
TARGET = typer.Option(..., help="the held-out domain of the fold")


def _fold_context(params: Path, manifest: Path | None, cache: Path, set_: list[str] | None, progress: bool, held_out: str | None = None):
    """Configuration, dataset and memory-mapped arrays shared by the stage commands (``held_out``'s not opened)."""
    from bne.lodo import load_params, prepare

    try:
        cfg = load_params(params, overrides=set_ or [])
        if manifest is None:
            default = Path("data/validated") / cfg.name / "manifest.parquet"
            manifest = default if default.is_file() else None
        dataset = None
        if manifest is not None:
            from bne.ingest import dataset_from_manifest

            dataset = dataset_from_manifest(manifest)
        dataset, arrays = prepare(cfg, cache, dataset, progress, log=lambda m: None, held_out=held_out)  # fixes: in the ingest report
    except (ValueError, OSError) as e:
        _fail(e)
    return cfg, dataset, arrays


@app.command()
def train(target: str = TARGET, params: Path = PARAMS, work: Path = WORK, cache: Path = CACHE, manifest: Path = MANIFEST,
          set_: list[str] = SET, progress: bool = PROGRESS) -> None:
    """Stage train: DeepAll and BNE without TARGET, every seed; resumes from the last epoch checkpoint."""
    from dataclasses import asdict, replace

    from bne.lodo import FoldPaths, train_fold
    from bne.train import pick_device

    cfg, ds, arrays = _fold_context(params, manifest, cache, set_, progress, held_out=target)
    extra = None
    if (_params(params).get("tune") or {}).get("training", {}).get("enabled"):
        from tasks.tune import TuneConfig, tuned_train_config

        tcfg = TuneConfig.from_params(params, overrides=set_ or [])
        best, study = tuned_train_config(cfg, tcfg, ds, cache / cfg.name / str(cfg.resolution), target,
                                         FoldPaths(work, cfg.name, target).train(), pick_device(cfg.device))
        cfg = replace(cfg, train=best)  # the best training hyper-parameters of the source-only study
        extra = {"tuned_train": asdict(best), "train_study": study}
    _run(lambda: train_fold(cfg, ds, arrays, target, work, progress=progress, extra=extra))


@app.command()
def embed(target: str = TARGET, params: Path = PARAMS, work: Path = WORK, cache: Path = CACHE, manifest: Path = MANIFEST,
          set_: list[str] = SET, progress: bool = PROGRESS) -> None:
    """Stage embed: branch outputs and per-layer distances of the sources' validation images."""
    from bne.lodo import embed_fold

    cfg, ds, arrays = _fold_context(params, manifest, cache, set_, progress, held_out=target)
    _run(lambda: embed_fold(cfg, ds, arrays, target, work, progress=progress))


@app.command()
def tune(target: str = TARGET, params: Path = PARAMS, work: Path = WORK, reports: Path = typer.Option(None, help="study plots go to REPORTS/tune (default reports/<dataset>)"),
         set_: list[str] = SET) -> None:
    """Stage tune: an Optuna study of the BNE inference options on source validation (own branch left out)."""
    from bne.lodo import load_params

    from tasks.tune import TuneConfig, tune_fold

    try:
        cfg = load_params(params, overrides=set_ or [])
        tcfg = TuneConfig.from_params(params, overrides=set_ or [])
    except (ValueError, OSError) as e:
        _fail(e)
    _run(lambda: tune_fold(cfg, tcfg, target, work, reports or Path("reports") / cfg.name))


@app.command()
def evaluate(target: str = TARGET, params: Path = PARAMS, work: Path = WORK, cache: Path = CACHE, manifest: Path = MANIFEST,
             set_: list[str] = SET, progress: bool = PROGRESS) -> None:
    """Stage evaluate: the only stage that reads TARGET; every method, every seed."""
    from bne.lodo import evaluate_fold

    cfg, ds, arrays = _fold_context(params, manifest, cache, set_, progress)
    _run(lambda: evaluate_fold(cfg, ds, arrays, target, work, progress=progress))


@app.command()
def report(params: Path = PARAMS, work: Path = WORK, reports: Path = typer.Option(None, help="default reports/<dataset>"),
           manifest: Path = MANIFEST, set_: list[str] = SET) -> None:
    """Stage report: metrics.json, metrics.md, details.json, ablation.json and figures from every fold."""
    from bne.lodo import load_params, report as run_report

    try:
        cfg = load_params(params, overrides=set_ or [])
        classes, targets = None, list(cfg.targets or [])
        if manifest is None:
            default = Path("data/validated") / cfg.name / "manifest.parquet"
            manifest = default if default.is_file() else None
        if manifest is not None:
            from bne.ingest import read_manifest_meta

            meta = read_manifest_meta(manifest)
            classes, targets = meta["classes"], targets or meta["domains"]
        if not targets:
            raise ValueError(f"no folds: set dataset.folds in {params} or give --manifest")
    except (ValueError, OSError) as e:
        _fail(e)
    _run(lambda: run_report(cfg, targets, work, reports or Path("reports") / cfg.name, classes))


@app.command()
def final(params: Path = PARAMS, out: Path = typer.Option(None, help="model folder (default data/final/<dataset>)"),
          cache: Path = CACHE, manifest: Path = MANIFEST, set_: list[str] = SET, progress: bool = PROGRESS) -> None:
    """Stage final: BNE trained on every domain (no held-out domain), the model `bne predict` uses."""
    from bne.final import train_final

    cfg, ds, arrays = _fold_context(params, manifest, cache, set_, progress)
    _run(lambda: train_final(cfg, ds, arrays, out or Path("data/final") / cfg.name, progress=progress))


def _default_model(params: Path) -> Path:
    name = (_params(params).get("dataset") or {}).get("name", "pacs")
    extended = Path("data/extend") / name / "model"
    return extended if (extended / "model.json").is_file() else Path("data/final") / name


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    model: Path = typer.Option(None, help="model folder (default: data/extend/<dataset>/model if present, else data/final/<dataset>)"),
    params: Path = typer.Option(Path("params.yaml"), help="eval.options from this file when it exists (else the model's own)"),
    json_: Path = typer.Option(None, "--json", help="also write the predictions as JSON to this file"),
    csv: Path = typer.Option(None, help="also write the predictions as CSV to this file"),
) -> None:
    """Class, probability and the weight of each source domain, per image; undecodable images are named and skipped."""
    from rich.console import Console
    from rich.table import Table

    from bne.final import Predictor, image_files

    try:
        files = image_files(inputs)
        pred = Predictor(model or _default_model(params))
        if params.is_file() and (_params(params).get("eval") or {}).get("options") is not None:
            from bne.lodo import load_params

            pred.options = load_params(params).eval.options  # the current eval.options, as `bne evaluate` uses
        rows, errors = pred.predict_files(files)
    except (ValueError, OSError) as e:
        _fail(e)
    table = Table(title=f"{len(rows)} image(s), model {pred.dir} (domains {', '.join(pred.domains)})")
    for col in ("file", "class", "probability", *[f"w_{d}" for d in pred.domains]):
        table.add_column(col, justify="left" if col in ("file", "class") else "right")
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    Console().print(table)
    for e in errors:
        typer.echo(f"skipped {e['file']}: {e['error']}", err=True)
    if json_:
        import json

        json_.write_text(json.dumps({"model": str(pred.dir), "predictions": rows, "skipped": errors}, indent=2))
    if csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(csv, index=False)
    if errors and not rows:
        raise typer.Exit(1)


@app.command()
def extend(params: Path = PARAMS, set_: list[str] = SET, reports: Path = typer.Option(None, help="default reports/<dataset>"),
           progress: bool = PROGRESS) -> None:
    """Stage extend: add the domains of `extend.domains` to the final model as new branches (statistics pass).

    Each new domain is ingested and validated, measured as an unseen domain (existing branches), given its own
    branch from its train images, and measured again; data/extend/<dataset>/ holds the model and a report.
    """
    from bne.lodo import load_params

    try:
        cfg = load_params(params, overrides=set_ or [])
        raw = _params(params)
        new = list((raw.get("extend") or {}).get("domains") or [])
    except (ValueError, OSError) as e:
        _fail(e)
    _run(lambda: _extend(cfg, new, reports or Path("reports") / cfg.name, progress))


def _extend(cfg, new: list[str], reports: Path, progress: bool) -> None:
    import json
    import os
    import shutil

    from bne.data import build_cache, load_cache
    from bne.final import extend_with_domain
    from bne.ingest import dataset_from_manifest, ingest as run_ingest
    from tasks.validate import ValidationConfig, summary, validate_manifest

    out = Path("data/extend") / cfg.name
    final_dir = Path("data/final") / cfg.name
    results = []
    if new:
        work = out / "work"
        run_ingest(cfg.root, work / "ingest", None, None, cfg.val_fraction, 0, cfg.name, None, progress, domains=new)
        report = validate_manifest(work / "ingest" / "manifest.parquet", work / "reports", ValidationConfig(), work / "validated" / "manifest.parquet")
        if not report["success"]:
            raise ValueError(f"new domain(s) {new} failed validation: {summary(report)}")
        ds = dataset_from_manifest(work / "validated" / "manifest.parquet")
        model_classes = json.loads((final_dir / "model.json").read_text())["classes"]
        if ds.classes != model_classes:
            raise ValueError(f"classes of {cfg.root} {ds.classes} differ from the final model's {model_classes}")
        arrays = load_cache(ds, build_cache(ds, cfg.resolution, work / "cache", progress=progress))
        current = final_dir
        for i, name in enumerate(new):
            step = out / f"step{i}"
            results.append(extend_with_domain(current, arrays[name], step))
            current = step
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(current, tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
    else:
        out.mkdir(parents=True, exist_ok=True)
    record = {"final_model": str(final_dir), "new_domains": new, "results": results}
    from bne.lodo import _write_json

    _write_json(out / "extend.json", record)
    _write_json(reports / "new_domains.json", record)
    lines = [f"# {cfg.name}: new domains\n\n"]
    if not results:
        lines.append("No new domains: the final model is current.\n")
    else:
        lines.append("| new domain | BNE as an unseen domain (existing branches) | BNE with its own branch | val images |\n|---|---|---|---|\n")
        lines += [f"| {r['domain']} | {r['unseen_bne_acc']:.1f} | {r['own_branch_bne_acc']:.1f} | {r['val_images']} |\n" for r in results]
    (reports / "new_domains.md").write_text("".join(lines))
    typer.echo("".join(lines))


def _run(fn) -> None:
    """Run a stage; an expected failure (bad input, missing artifact) becomes one clear line and exit 1."""
    try:
        fn()
    except (ValueError, OSError) as e:
        _fail(e)


@app.command()
def lodo(
    params: Path = PARAMS,
    work: Path = WORK,
    reports: Path = typer.Option(None, help="where metrics.json and metrics.md go (default reports/<dataset>)"),
    cache: Path = CACHE,
    target: list[str] = typer.Option(None, help="held-out domain(s) to run (default: dataset.domains, else all)"),
    set_: list[str] = SET,
    manifest: Path = typer.Option(None, help="a validated manifest; default: scan the dataset root of params"),
    progress: bool = PROGRESS,
    tuned: bool = typer.Option(True, help="run the Optuna tuning of the inference options (tune.* params)"),
) -> None:
    """Every stage of leave-one-domain-out in one command (what `dvc repro` runs stage by stage)."""
    from dataclasses import replace

    from bne.lodo import load_params, run_lodo

    cfg = load_params(params, overrides=set_ or [])
    if target:
        cfg = replace(cfg, targets=tuple(target))
    dataset = None
    if manifest is not None:
        from bne.ingest import dataset_from_manifest

        dataset = dataset_from_manifest(manifest)
    tuner = None
    rep = reports or Path("reports") / cfg.name
    if tuned:
        from tasks.tune import TuneConfig, tune_fold

        tcfg = TuneConfig.from_params(params, overrides=set_ or [])
        tuner = lambda c, t, root: tune_fold(c, tcfg, t, root, rep)  # noqa: E731
    _run(lambda: run_lodo(cfg, work, rep, cache, progress=progress, dataset=dataset, tuner=tuner))


def _params(path: Path) -> dict:
    """The parameters file as a dict; empty when it does not exist."""
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _fail(e: Exception) -> NoReturn:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def ingest(
    source: Path = typer.Argument(None, help="<domain>/<class>/<image> tree (default: params dataset.root)"),
    out: Path = typer.Option(..., help="folder for manifest.parquet and ingest_report.json"),
    splits: Path = typer.Option(None, help="PACS-format split files (default: params dataset.splits when SOURCE is too)"),
    sums: Path = typer.Option(None, help="SHA256SUMS to verify (default: SOURCE/SHA256SUMS or SOURCE/../SHA256SUMS)"),
    name: str = typer.Option(None, help="dataset name (default: SOURCE's folder name, its parent's for 'images')"),
    val_fraction: float = typer.Option(None, help="without split files (default: params dataset.val_fraction, else 0.1)"),
    seed: int = typer.Option(0, help="seed of the stratified split"),
    params: Path = typer.Option(Path("params.yaml"), help="parameters file, if present"),
    workers: int = typer.Option(None, help="hashing/decoding threads (default: min(8, CPUs))"),
    progress: bool = typer.Option(True, help="progress bar"),
) -> None:
    """Scan SOURCE, hash and decode every image, write a Parquet manifest with splits and dataset metadata."""
    from bne.ingest import ingest as run_ingest

    ds = _params(params).get("dataset") or {}
    if source is None:  # the pipeline's way: every path from params.yaml, relative to it
        if not ds.get("root"):
            _fail(ValueError(f"give SOURCE or dataset.root in {params}"))
        source = params.parent / ds["root"]
        splits = splits or (params.parent / ds["splits"] if ds.get("splits") else None)
        name = name or ds.get("name")
    if val_fraction is None:
        val_fraction = float(ds.get("val_fraction", 0.1))
    try:
        r = run_ingest(source, out, splits, sums, val_fraction, seed, name, workers, progress)
    except (ValueError, OSError) as e:  # OSError: unreadable files, missing split files
        _fail(e)
    checked = r["checksums"]
    sums_note = f"{checked['verified']} verified against {checked['file']}" if checked else "no SHA256SUMS"
    typer.echo(
        f"{r['manifest']}: {r['images']} images, {len(r['domains'])} domains {r['domains']}, {len(r['classes'])} classes\n"
        f"split: {r['split']['method']}; fixes: {len(r['fixes'])}; converted to RGB: {len(r['converted'])}; "
        f"undecodable: {len(r['undecodable'])}; ignored files: {len(r['ignored'])}; checksums: {sums_note}"
    )


@app.command()
def validate(
    manifest: Path = typer.Argument(..., help="manifest.parquet written by `bne ingest`"),
    reports: Path = typer.Option(Path("reports"), help="validation.json and validation.md go to REPORTS/<dataset>"),
    params: Path = typer.Option(Path("params.yaml"), help="dataset.domains/classes, validate.* settings, if present"),
    min_per_class: int = typer.Option(None, help="fewer images per domain and class is a warning (default 5)"),
    min_size: int = typer.Option(None, help="smallest width/height in pixels (default 32)"),
    validated: Path = typer.Option(None, help="where the validated copy goes (default: beside the manifest)"),
) -> None:
    """Run the Great Expectations suite; on success copy the manifest to manifest.validated.parquet; exit 1 on failure."""
    from dataclasses import replace

    from tasks.validate import ValidationConfig, summary, validate_manifest

    cfg = ValidationConfig.from_params(params) if params.is_file() else ValidationConfig()
    cfg = replace(cfg, **{k: v for k, v in {"min_per_class": min_per_class, "min_size": min_size}.items() if v is not None})
    try:
        report = validate_manifest(manifest, reports, cfg, validated)
    except (ValueError, OSError) as e:  # not a manifest, or no such file
        _fail(e)
    typer.echo(summary(report), err=not report["success"])
    if not report["success"]:
        raise typer.Exit(1)


@app.command()
def cache(
    manifest: Path = typer.Argument(..., help="a validated manifest (manifest.validated.parquet)"),
    out: Path = typer.Option(..., help="folder for <domain>.npy (uint8, N x size x size x 3) and index.json"),
    size: int = typer.Option(None, help="side in pixels (default: params train.resolution)"),
    params: Path = typer.Option(Path("params.yaml"), help="parameters file, if present"),
    workers: int = typer.Option(4, help="decoding threads"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Decode and resize every image of MANIFEST once into memory-mappable per-domain arrays."""
    from bne.data import build_cache
    from bne.ingest import dataset_from_manifest

    if size is None:
        size = int((_params(params).get("train") or {}).get("resolution", 0)) or _fail(ValueError("give --size or train.resolution in params"))
    try:
        ds = dataset_from_manifest(manifest)
        build_cache(ds, size, out, workers, progress)
    except (ValueError, OSError) as e:
        _fail(e)
    typer.echo(f"{out}: {len(ds.samples)} images of {len(ds.domains)} domains at {size}x{size}")


stats_app = typer.Typer(help="Per-domain statistics artifacts (stats.parquet).", no_args_is_help=True)
app.add_typer(stats_app, name="stats")


@stats_app.command("extract")
def stats_extract(target: str = TARGET, params: Path = PARAMS, work: Path = WORK, cache: Path = CACHE,
                  manifest: Path = MANIFEST, set_: list[str] = SET) -> None:
    """Stage stats: per-domain statistics of the fold's BNE model to WORK/stats/<dataset>/<target>.parquet."""
    from bne.lodo import stats_fold

    cfg, ds, arrays = _fold_context(params, manifest, cache, set_, False, held_out=target)
    _run(lambda: stats_fold(cfg, ds, arrays, target, work))


@stats_app.command("show")
def stats_show(file: Path = typer.Argument(..., help="a stats.parquet written by `bne lodo`")) -> None:
    """Per-domain, per-layer summary of a statistics file and the pairwise W2 distances between domains."""
    import numpy as np

    from bne.stats import pairwise_w2, read_stats_table

    if not file.is_file():
        _fail(FileNotFoundError(f"no such file: {file}"))
    meta, kinds, domains = read_stats_table(str(file))
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
