"""Prefect flow ``dg-fold``: one held-out domain, ``train@T`` through ``evaluate@T``, in a workspace of its own.

The coordinator (``dg-pipeline`` with ``fanout.mode: pool``) submits one run of the ``dg-fold`` deployment per
fold to a work pool; a worker (``prefect worker start --pool bne --type process``, ``make workers``) picks it up.
The run clones the coordinator's repository at the coordinator's commit into a fresh folder under the worker's
workspace (``BNE_WORKSPACE``), writes the coordinator's ``params.yaml`` and ``dvc.lock`` there, pulls the fold's
inputs (the ``validate`` and ``cache`` outputs) from the DVC remote, runs the five stages with ``dvc repro
--single-item`` (the code of the clone, not the worker's), pushes their outputs and the run cache (``dvc push
--run-cache``) and reports the stages' ``dvc.lock`` entries as an artifact (``dg-fold-<dataset>-<target>``) from
which the coordinator completes its own ``dvc.lock`` before it pulls the outputs. The few outputs DVC does not
cache (``cache: false``: the study plots), which no DVC remote carries, travel in the artifact too. DVC uploads each file to a
temporary name and renames it, and the coordinator only ever asks for the hashes the entries name, so an
interrupted push never passes for a complete output.

The folder is removed afterwards, also after a failure (``keep``: kept). A killed run is not resumed: the
coordinator submits the fold again (``fanout.retries``) and it starts in a new folder; a worker of ``make workers``
(one run at a time, ``BNE_WORKSPACE_EXCLUSIVE=1``) removes the folders killed runs left in its workspace first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.dvc import dvc, run_stage
from tasks import params as P

#: The per-fold stages, in order; ``dg-fold`` runs them, the coordinator everything else.
FOLD_STAGES = ("train", "stats", "embed", "tune", "evaluate")
#: The stages whose outputs a fold reads (pulled from the remote before it starts).
INPUT_STAGES = ("validate", "cache")
REMOTE = "bne-fanout"


def artifact_key(dataset: str, target: str) -> str:
    return "dg-fold-" + re.sub(r"[^a-z0-9-]", "-", f"{dataset}-{target}".lower())


def parse_artifact(markdown: str) -> dict:
    """The JSON record inside a ``dg-fold`` artifact."""
    m = re.search(r"```json\n(.*?)\n```", markdown, re.S)
    if not m:
        raise ValueError("not a dg-fold record")
    return json.loads(m.group(1))


def _git(cwd: Path | str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()[-1000:]}")
    return proc.stdout.strip()


def workspace_base() -> Path:
    """Where a worker's folds go: ``BNE_WORKSPACE`` (set by ``make workers`` per worker), else the temp folder."""
    base = Path(os.environ.get("BNE_WORKSPACE") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base


def checkout(repo: str, commit: str, dest: Path, params_yaml: str, lock: str) -> Path:
    """A clone of ``repo`` at ``commit`` in ``dest`` with the coordinator's ``params.yaml`` and ``dvc.lock``."""
    _git(dest.parent, "clone", "-q", "--no-checkout", repo, str(dest))
    _git(dest, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", commit)
    (dest / P.PARAMS_FILE).write_text(params_yaml)
    P.load(dest / P.PARAMS_FILE)  # checked before any work
    (dest / "dvc.lock").write_text(lock)
    site = dest / ".dvc" / "site-cache"  # nothing of this fold left in /var/tmp/dvc
    dvc(dest, "config", "--local", "core.site_cache_dir", str(site), extra_env={"DVC_SITE_CACHE_DIR": str(site)})
    return dest


#: The largest archive of uncached outputs a fold sends through its artifact (bytes, base64 before).
MAX_UNCACHED = 8 * 2**20


def uncached_outs(root: Path, stage: str, target: str, dataset: str) -> list[str]:
    """The outputs of ``stage`` (a foreach template of ``dvc.yaml``) with ``cache: false`` (study plots): DVC keeps
    them out of its cache, so no remote carries them. Only ``${item}`` and ``${dataset.name}`` are interpolated,
    the only variables this project's output paths use (anything else is refused)."""
    body = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    body = body.get("do", body)
    out = []
    for kind in ("outs", "metrics", "plots"):
        for o in body.get(kind, []):
            if isinstance(o, dict):
                path, opts = next(iter(o.items()))
                if (opts or {}).get("cache") is False:
                    path = path.replace("${item}", target).replace("${dataset.name}", dataset)
                    if "${" in path:
                        raise ValueError(f"dvc.yaml {stage}: cannot resolve the output path {path!r}")
                    out.append(path)
    return out


def pack(root: Path, paths: list[str]) -> str:
    """``paths`` (files or folders under ``root``) as a base64 tar.gz."""
    import base64
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in paths:
            if (root / p).exists():
                tar.add(root / p, arcname=p)
    if buf.tell() > MAX_UNCACHED:
        raise RuntimeError(f"the uncached outputs {paths} hold {buf.tell()} bytes compressed, above {MAX_UNCACHED}")
    return base64.b64encode(buf.getvalue()).decode()


def unpack(root: Path, data: str) -> None:
    """The inverse of :func:`pack` into ``root`` (tar's ``data`` filter: nothing outside ``root``, no links out)."""
    import base64
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(data)), mode="r:gz") as tar:
        tar.extractall(root, filter="data")


def lock_entries(root: Path, stages: list[str]) -> dict:
    """The ``dvc.lock`` entries of ``stages`` in ``root``."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    missing = [s for s in stages if s not in lock]
    if missing:
        raise RuntimeError(f"dvc.lock of {root} has no entry for {missing}")
    return {s: lock[s] for s in stages}


@flow(name="dg-fold")
def dg_fold(
    dataset: str,
    target: str,
    repo: str,
    commit: str,
    params_yaml: str,
    lock: str,
    remote: str,
    keep: bool = False,
) -> dict:
    """Run ``train@T`` .. ``evaluate@T`` for ``target`` of ``dataset`` in a fresh clone of ``repo`` at ``commit``.

    ``params_yaml`` and ``lock``: the coordinator's files (the folds must run with exactly its parameters and
    inputs); ``remote``: the DVC remote's URL (a folder, ``s3://...``, ``ssh://...``), the coordinator's default
    remote. Returns the record that also goes into the artifact: the worker, the folder, the stages that ran,
    their ``dvc.lock`` entries.
    """
    logger = get_run_logger()
    params = P.from_dict(yaml.safe_load(params_yaml), "the coordinator's params.yaml")
    if dataset != params.dataset.name or target not in params.dataset.folds:
        raise ValueError(f"fold {target!r} of {dataset!r} is not configured by the coordinator's params.yaml "
                         f"(dataset {params.dataset.name!r}, folds {params.dataset.folds})")
    worker = os.environ.get("BNE_WORKER") or socket.gethostname()
    base = workspace_base()
    if os.environ.get("BNE_WORKSPACE_EXCLUSIVE") == "1":  # a worker of make workers (--limit 1): any fold folder here
        for stale in base.glob("*-*-*"):                 # is a killed run's, left behind
            if stale.is_dir() and (stale / ".git").exists():
                logger.info("removing %s, left by a killed run", stale)
                shutil.rmtree(stale, ignore_errors=True)
    ws = Path(tempfile.mkdtemp(prefix=f"{dataset}-{target}-", dir=base))
    logger.info("dg-fold %s of %s on worker %s (pid %d) in %s at %s", target, dataset, worker, os.getpid(), ws, commit[:12])
    try:
        checkout(repo, commit, ws, params_yaml, lock)
        dvc(ws, "remote", "add", "--local", "--force", "--default", REMOTE, remote)
        stages = [f"{s}@{target}" for s in FOLD_STAGES]
        dvc(ws, "pull", *INPUT_STAGES)
        # The stages run the clone's code: its folder comes first on the import path of `bne`.
        path_env = {"PYTHONPATH": os.pathsep.join([str(ws), *filter(None, [os.environ.get("PYTHONPATH")])])}
        ran = {s: run_stage.with_options(name=s)(s, str(ws), extra_env=path_env) for s in stages}
        dvc(ws, "push", "--run-cache", *stages)
        uncached = [o for s in FOLD_STAGES for o in uncached_outs(ws, s, target, dataset)]
        record = {"dataset": dataset, "target": target, "worker": worker, "pid": os.getpid(), "workspace": str(ws),
                  "commit": commit, "ran": ran, "lock": lock_entries(ws, stages),
                  "uncached": uncached, "files": pack(ws, uncached)}
        create_markdown_artifact(key=artifact_key(dataset, target), description=f"dg-fold {target}: dvc.lock entries",
                                 markdown=f"fold `{target}` on worker `{worker}`\n\n```json\n{json.dumps(record)}\n```\n")
        logger.info("%s: stages %s pushed to the remote", target, ", ".join(stages))
        return record
    finally:
        if keep:
            logger.info("workspace kept: %s", ws)
        else:
            shutil.rmtree(ws, ignore_errors=True)
