"""Retraining when new domains arrive: the body of the ``dg-pipeline/retrain-new-domains`` deployment.

Each run lists the domains of ``dataset.root`` and compares them with the final model's. None new: it says
so and returns within seconds. New ones: they are written to ``extend.domains`` in ``params.yaml`` and
``dvc repro extend`` ingests and validates them, measures each as an unseen domain, adds its branch to the
final model (a statistics pass, the shared weights frozen) and measures again; DVC records the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from prefect import get_run_logger, task

from flows.dg_pipeline import apply_overrides, run_stage


def model_domains(project: Path, dataset: str) -> list[str] | None:
    """Domains of the newest model (extended, else final); None when no final model exists yet."""
    for d in (project / "data" / "extend" / dataset / "model", project / "data" / "final" / dataset):
        if (d / "model.json").is_file():
            return list(json.loads((d / "model.json").read_text())["domains"])
    return None


def source_domains(project: Path) -> list[str]:
    ds = yaml.safe_load((project / "params.yaml").read_text())["dataset"]
    root = (project / ds["root"]).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.root {root} is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@task(name="find-new-domains")
def find_new(project: str, dataset: str) -> list[str]:
    root = Path(project)
    known = model_domains(root, dataset)
    if known is None:
        raise FileNotFoundError(f"no final model under {root}/data/final/{dataset}: run the pipeline first (dvc repro final)")
    return [d for d in source_domains(root) if d not in known]


def retrain_new_domains(project: Path, dataset: str) -> dict:
    logger = get_run_logger()
    new = find_new(str(project), dataset)
    if not new:
        logger.info("no new domains in the dataset source: the final model is current")
        return {"new_domains": [], "ran": False}
    logger.info("new domain(s) %s: extending the final model", new)
    params = yaml.safe_load((project / "params.yaml").read_text())
    known = list((params.get("extend") or {}).get("domains") or [])
    apply_overrides(project, [f"extend.domains={json.dumps(known + [d for d in new if d not in known])}"])
    run_stage.with_options(name="extend")("extend", str(project), upstream=True)
    report = json.loads((project / "reports" / dataset / "new_domains.json").read_text())
    for r in report["results"]:
        logger.info("%s: BNE %.1f%% as an unseen domain, %.1f%% with its own branch", r["domain"], r["unseen_bne_acc"], r["own_branch_bne_acc"])
    return {"new_domains": new, "ran": True, "results": report["results"]}
