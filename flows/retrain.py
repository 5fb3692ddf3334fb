"""Flow ``retrain-new-domains``: add the domains that appeared in ``dataset.root`` to the final model.

Each run lists the domains of ``dataset.root`` and compares them with the newest model's (extended, else
final). None new: it says so and returns within seconds. New ones: they are written to ``extend.domains`` in
``params.yaml`` and ``dvc repro extend`` ingests and validates them, measures each as an unseen domain, adds
its branch to the final model (a statistics pass, the shared weights frozen) and measures again; DVC records
the run. ``dg-pipeline`` with ``action="retrain-new-domains"`` runs this flow (the deployment
``dg-pipeline/retrain-new-domains``).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from bne.io import read_json
from flows.dvc import ROOT, project, run_stage
from tasks import params as P
from tasks.paths import Layout


def model_domains(layout: Layout) -> list[str] | None:
    """Domains of the newest model (extended, else final); None when no final model exists yet."""
    for d in (layout.extend / "model", layout.final):
        if (d / "model.json").is_file():
            return list(read_json(d / "model.json", "model description", "extend" if d != layout.final else "final")["domains"])
    return None


def source_domains(root: Path, params: P.Params) -> list[str]:
    """The domain folders of ``dataset.root``."""
    data = P.resolve(root, params.dataset.root)
    if data is None or not data.is_dir():
        raise FileNotFoundError(f"dataset.root {data} is not a folder")
    return sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))


@task(name="find-new-domains")
def find_new(root: str, dataset: str) -> list[str]:
    """Domains of ``dataset.root`` that the newest model lacks."""
    path, params = project(root, dataset)
    known = model_domains(Layout(path, dataset))
    if known is None:
        raise FileNotFoundError(f"no final model under {Layout(path, dataset).final}: run the pipeline first (dvc repro final)")
    return [d for d in source_domains(path, params) if d not in known]


@flow(name="retrain-new-domains")
def retrain_new_domains(dataset: str = "pacs", root: str = str(ROOT)) -> dict:
    """Extend the final model with the new domains of ``dataset.root``, if any."""
    logger = get_run_logger()
    path, params = project(root, dataset)
    new = find_new(str(path), dataset)
    if not new:
        logger.info("no new domains in the dataset source: the final model is current")
        return {"new_domains": [], "ran": False}
    logger.info("new domain(s) %s: extending the final model", new)
    known = list(params.extend.domains)
    P.write_overrides(path / P.PARAMS_FILE, [f"extend.domains={json.dumps(known + [d for d in new if d not in known])}"])
    run_stage.with_options(name="extend")("extend", str(path), upstream=True)
    report = read_json(Layout(path, dataset).reports / "new_domains.json", "new-domains report", "extend")
    for r in report["results"]:
        logger.info("%s: BNE %.1f%% as an unseen domain, %.1f%% with its own branch", r["domain"], r["unseen_bne_acc"], r["own_branch_bne_acc"])
    return {"new_domains": new, "ran": True, "results": report["results"]}
