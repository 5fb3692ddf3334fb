"""Prefect flow ``dg-pipeline``: one task per DVC stage, each executed through DVC.

The flow adds no logic of its own: every task runs ``dvc repro --single-item <stage>`` in the project, so the
DVC cache and ``dvc.lock`` are exactly those of ``dvc repro``. Task names are stage names (``train@photo``
for the per-domain instances); the log says which stages ran and which DVC found up to date; the results
table becomes a markdown artifact.

    python flows/dg_pipeline.py                 # the pipeline on PACS (a temporary local Prefect API)
    python flows/dg_pipeline.py --smoke         # every stage on a tiny PACS subset, in a temporary copy
    python flows/dg_pipeline.py --retrain-new-domains   # look for new domains; extend the final model
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "didn't change, skipping"
#: What a smoke run changes (a tiny subset is built separately by :func:`smoke_project`).
SMOKE_OVERRIDES = [
    "train.resolution=64", "train.epochs=1", "train.per_domain_batch=4", "train.eval_batch=16",
    "eval.batch=8", "tune.inference.n_trials=5", "train.seeds=[0]",
]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "bne", "tasks", "flows", ".dvcignore")


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the stages' `bne` commands live beside this interpreter
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}


def _lookup(params: dict, ref: str):
    node = params
    for key in ref.split("."):
        node = node[key]
    return node


def dvc_stages(root: Path) -> list[str]:
    """Stage names of ``dvc.yaml`` in pipeline order, ``foreach`` stages expanded to ``name@item``."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    names = []
    for name, body in stages.items():
        if "foreach" not in body:
            names.append(name)
            continue
        items = body["foreach"]
        if isinstance(items, str):
            m = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", items)
            if not m:
                raise ValueError(f"dvc.yaml stage {name!r}: unsupported foreach {items!r}")
            items = _lookup(params, m.group(1))
        names += [f"{name}@{item}" for item in (items if isinstance(items, list) else list(items))]
    return names


def apply_overrides(root: Path, overrides: list[str]) -> None:
    """Set ``dotted.key=value`` in the project's ``params.yaml`` (comments kept), as ``dvc exp run -S`` does."""
    from ruamel.yaml import YAML

    rt = YAML()
    path = root / "params.yaml"
    doc = rt.load(path.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node = doc
        *parents, leaf = key.split(".")
        for k in parents:
            if k not in node:
                raise ValueError(f"override {item!r}: no parameter section {k!r} in {path}")
            node = node[k]
        if leaf not in node:
            raise ValueError(f"override {item!r}: no parameter {key!r} in {path}")
        node[leaf] = yaml.safe_load(value)
    with open(path, "w") as f:
        rt.dump(doc, f)


def smoke_project(dest: Path, source: Path | None = None, per_class: int = 6) -> Path:
    """A throw-away copy of the project (git + DVC initialised) whose dataset is a tiny subset of ``source``.

    The subset takes the first ``per_class`` images of every domain and class (sorted by name); without split
    files the project's seeded stratified split applies. One held-out fold (the first domain) runs every
    per-fold stage; the final model uses every domain. The main project's results are never touched.
    """
    dest = Path(dest)
    for item in PROJECT_FILES:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy(src, dest / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    source = Path(source) if source else (ROOT / params["dataset"]["root"]).resolve()
    subset = dest / "subset"
    domains = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in domains:
        for c in sorted(p.name for p in (source / d).iterdir() if p.is_dir()):
            (subset / d / c).mkdir(parents=True)
            for img in sorted(p for p in (source / d / c).iterdir() if p.is_file())[:per_class]:
                shutil.copy(img, subset / d / c / img.name)
    apply_overrides(dest, [*SMOKE_OVERRIDES, f"dataset.root={subset}", "dataset.splits=''", "dataset.val_fraction=0.34",
                           f"dataset.domains={domains}".replace("'", ""), f"dataset.folds=[{domains[0]}]"])
    run = lambda *a: subprocess.run(a, cwd=dest, check=True, capture_output=True, env=_env())  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return dest


@task
def run_stage(stage: str, root: str, upstream: bool = False) -> bool:
    """``dvc repro --single-item STAGE`` (``upstream``: with the stages it depends on); True when it ran."""
    cmd = [sys.executable, "-m", "dvc", "repro", stage] + ([] if upstream else ["--single-item"])
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True)
    logger = get_run_logger()
    if proc.returncode:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ran = SKIPPED not in proc.stdout
    logger.info("%s: %s", stage, "ran" if ran else "up to date (cached)")
    return ran


@flow(name="dg-pipeline")
def dg_pipeline(
    dataset: str = "pacs",
    root: str = str(ROOT),
    overrides: list[str] | None = None,
    smoke: bool = False,
    action: str = "run",
    smoke_source: str | None = None,
) -> dict:
    """Run every DVC stage in order for ``dataset`` (the dataset that ``params.yaml`` configures).

    ``overrides``: ``dotted.key=value`` written to ``params.yaml`` first (like ``dvc exp run -S``).
    ``smoke``: run on a tiny subset (of ``smoke_source``, default the configured dataset) in a temporary copy.
    ``action``: ``run`` (the pipeline) or ``retrain-new-domains`` (look for domains the final model lacks).
    """
    logger = get_run_logger()
    if action not in ("run", "retrain-new-domains"):
        raise ValueError(f"action must be 'run' or 'retrain-new-domains', got {action!r}")
    project = Path(root)
    if smoke:
        project = smoke_project(Path(tempfile.mkdtemp(prefix="bne-smoke-")), Path(smoke_source) if smoke_source else None)
        logger.info("smoke run in %s", project)
    if overrides:
        apply_overrides(project, list(overrides))
    configured = yaml.safe_load((project / "params.yaml").read_text())["dataset"]["name"]
    if dataset != configured:
        raise ValueError(f"dataset {dataset!r} is not the one params.yaml configures ({configured!r})")
    if action == "retrain-new-domains":
        from flows.retrain import retrain_new_domains

        return retrain_new_domains(project, dataset)
    ran = {stage: run_stage.with_options(name=stage)(stage, str(project)) for stage in dvc_stages(project)}
    table = project / "reports" / dataset / "metrics.md"
    if table.is_file():
        create_markdown_artifact(table.read_text(), key=f"{re.sub(r'[^a-z0-9-]', '-', dataset.lower())}-results",
                                 description="leave-one-domain-out results")
    logger.info("ran: %s; cached: %s", [s for s, r in ran.items() if r] or "none", [s for s, r in ran.items() if not r] or "none")
    return ran


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="pacs")
    ap.add_argument("--smoke", action="store_true", help="tiny subset in a temporary copy of the project")
    ap.add_argument("--retrain-new-domains", action="store_true", help="look for new domains and extend the final model")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value (repeatable)")
    a = ap.parse_args()
    dg_pipeline(dataset=a.dataset, smoke=a.smoke, overrides=a.overrides,
                action="retrain-new-domains" if a.retrain_new_domains else "run")
