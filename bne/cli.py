"""The ``bne`` command line."""

from __future__ import annotations

from pathlib import Path

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
    epochs: int = typer.Option(None, help="override train.epochs"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Leave-one-domain-out: DeepAll and BNE per held-out domain; writes metrics.json and a markdown table."""
    from dataclasses import replace

    from bne.lodo import load_params, run_lodo

    cfg = load_params(params)
    if target:
        cfg = replace(cfg, targets=tuple(target))
    if epochs:
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    run_lodo(cfg, work / cfg.name, reports or Path("reports") / cfg.name, cache, progress=progress)


if __name__ == "__main__":
    app()
