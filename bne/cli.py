"""The ``bne`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(help="Batch Normalization Embeddings for domain generalization.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Batch Normalization Embeddings for domain generalization."""


@app.command()
def lodo(
    params: Path = typer.Option(Path("params.yaml"), help="parameters file"),
    work: Path = typer.Option(Path("data/lodo"), help="checkpoints and per-fold outputs (resumable)"),
    reports: Path = typer.Option(None, help="where metrics.json and metrics.md go (default reports/<dataset>)"),
    cache: Path = typer.Option(Path("data/cache"), help="decoded image cache"),
    target: list[str] = typer.Option(None, help="held-out domain(s) to run (default: params, else all)"),
    set_: list[str] = typer.Option(None, "--set", help="override a parameter: --set train.epochs=1 (repeatable)"),
    manifest: Path = typer.Option(None, help="a validated manifest (pipeline); default: scan the dataset root of params"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Leave-one-domain-out: DeepAll and BNE per held-out domain; writes metrics.json and a markdown table."""
    from dataclasses import replace

    from bne.lodo import load_params, run_lodo

    cfg = load_params(params, overrides=set_ or [])
    if target:
        cfg = replace(cfg, targets=tuple(target))
    dataset = None
    if manifest is not None:
        from bne.ingest import dataset_from_manifest

        dataset = dataset_from_manifest(manifest)
    run_lodo(cfg, work / cfg.name, reports or Path("reports") / cfg.name, cache, progress=progress, dataset=dataset)


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
