"""Prefect flow ``dg-pipeline``: one task per DVC stage, each executed through DVC.

The flow adds no logic of its own: every task runs ``dvc repro --single-item <stage>`` in the project, so the
DVC cache and ``dvc.lock`` are exactly those of ``dvc repro``. Task names are stage names (``train@photo``
for the per-domain instances); each stage's output streams into the flow log; the log says which stages ran
and which DVC found up to date; the results table becomes a markdown artifact.

    python -m flows.dg_pipeline                    # the pipeline on PACS (a temporary local Prefect API)
    python -m flows.dg_pipeline --smoke [--keep]   # every stage on a tiny PACS subset, in a temporary copy
    python -m flows.dg_pipeline --retrain-new-domains   # look for new domains; extend the final model
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.dvc import ROOT, project, run_stage, stages
from flows.fanout import run_pool
from flows.retrain import retrain_new_domains
from flows.smoke import smoke_project
from tasks import params as P
from tasks.paths import Layout

ACTIONS = ("run", "retrain-new-domains")
MODES = ("local", "pool")


def _run(root: Path | str, dataset: str, overrides: list[str], action: str, mode: str | None = None) -> dict:
    logger = get_run_logger()
    path, params = project(root, dataset, overrides)  # root, dataset and overrides checked before anything is written
    if overrides:
        P.write_overrides(path / P.PARAMS_FILE, overrides)
        logger.info("params.yaml: %s", ", ".join(overrides))
    if action == "retrain-new-domains":
        return retrain_new_domains(dataset=dataset, root=str(path))
    folds = None
    if (mode or params.fanout.mode) == "pool":
        ran, folds = run_pool(path, params, stages(path))
    else:
        ran = {stage: run_stage.with_options(name=stage)(stage, str(path)) for stage in stages(path)}
    table = Layout(path, dataset).reports / "metrics.md"
    if table.is_file():
        create_markdown_artifact(table.read_text(), key=f"{re.sub(r'[^a-z0-9-]', '-', dataset.lower())}-results",
                                 description="leave-one-domain-out results")
    logger.info("ran: %s; cached: %s", [s for s, r in ran.items() if r] or "none", [s for s, r in ran.items() if not r] or "none")
    return ran if folds is None else {"stages": ran, "folds": folds}


@flow(name="dg-pipeline")
def dg_pipeline(
    dataset: str = "pacs",
    root: str = str(ROOT),
    overrides: list[str] | None = None,
    smoke: bool = False,
    action: str = "run",
    smoke_source: str | None = None,
    keep: bool = False,
    mode: str | None = None,
) -> dict:
    """Run every DVC stage in order for ``dataset`` (the dataset that ``params.yaml`` configures).

    ``root``: this project, or a smoke project made by ``flows/smoke.py``; any other folder is refused.
    ``overrides``: ``dotted.key=value`` written to ``params.yaml`` first (like ``dvc exp run -S``), all checked first.
    ``smoke``: run on a tiny subset (of ``smoke_source``, default the configured dataset) in a temporary copy
    of this project, removed afterwards unless ``keep``.
    ``action``: ``run`` (the pipeline) or ``retrain-new-domains`` (the flow of that name, as a subflow).
    ``mode``: ``local`` (every stage here) or ``pool`` (each fold a run of the ``dg-fold`` deployment on the work
    pool ``fanout.pool``, then ``report`` here: flows/fanout.py); default ``fanout.mode`` of ``params.yaml``.
    Returns ``{stage: ran}`` (False: DVC found it up to date), in pool mode ``{"stages": {stage: ran}, "folds":
    {fold: record of its dg-fold run}}``, or the retraining flow's result.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (or None: fanout.mode), got {mode!r}")
    overrides = list(overrides or [])
    if not smoke:
        return _run(root, dataset, overrides, action, mode)
    project(root, dataset)  # the root parameter is checked even though the copy is made of this project
    with smoke_project(smoke_source, keep=keep) as copy:
        get_run_logger().info("smoke project in %s (%s)", copy, "kept" if keep else "removed afterwards")
        return _run(copy, dataset, overrides, action, mode)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="pacs")
    ap.add_argument("--smoke", action="store_true", help="tiny subset in a temporary copy of the project")
    ap.add_argument("--smoke-source", help="the folder the smoke subset is taken from (default: dataset.root)")
    ap.add_argument("--keep", action="store_true", help="keep the smoke copy (its path is logged)")
    ap.add_argument("--retrain-new-domains", action="store_true", help="look for new domains and extend the final model")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value (repeatable)")
    a = ap.parse_args()
    if a.keep and not a.smoke:
        ap.error("--keep applies to --smoke only")
    dg_pipeline(dataset=a.dataset, smoke=a.smoke, smoke_source=a.smoke_source, keep=a.keep, overrides=a.overrides,
                action="retrain-new-domains" if a.retrain_new_domains else "run")


if __name__ == "__main__":
    main()
