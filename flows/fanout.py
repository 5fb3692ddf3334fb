"""The coordinator's side of ``fanout.mode: pool``: the folds as runs of the ``dg-fold`` deployment on a work pool.

``dg-pipeline`` runs ``ingest``, ``validate`` and ``cache`` here and pushes their outputs to the DVC remote; then it
submits one ``dg-fold`` run per fold (``run_deployment``, all at once, from a task each), waits, completes its
``dvc.lock`` with the entries each fold reports (the stages ``train@T`` .. ``evaluate@T`` keep ``persist`` outputs,
which DVC leaves out of its run cache, so the entries themselves travel, as an artifact of the run), pulls those
outputs from the remote (nothing is recomputed: ``dvc status`` must find them up to date) and runs the remaining
stages (``final``, ``extend``, ``report``) here. A fold whose run crashed or failed is submitted again
(``fanout.retries``, the only retries of the pipeline: a new run, on whichever worker takes it); the folds that
still fail are named in the error that ends the coordinator's run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.deployments import run_deployment

from bne.io import atomic_path
from flows.dvc import dvc, run_stage
from flows.fold import FOLD_STAGES, INPUT_STAGES, artifact_key, parse_artifact, unpack
from tasks import params as P

#: Stages before the folds, run by the coordinator and pushed for the workers.
BEFORE = ("ingest", "validate", "cache")


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()[-1000:]}")
    return proc.stdout.rstrip("\n")


def coordinator_commit(root: Path) -> str:
    """``HEAD`` of ``root``; refused when tracked files other than ``params.yaml`` and ``dvc.lock`` differ from it
    (the workers clone the commit: uncommitted code would run here but not there)."""
    head = git(root, "rev-parse", "HEAD").strip()
    dirty = [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
             if line[3:] not in (P.PARAMS_FILE, "dvc.lock")]
    if dirty:
        raise RuntimeError(f"fanout.mode pool: {root} has uncommitted changes in {dirty}; the workers run commit "
                           f"{head[:12]}: commit them (or run with fanout.mode local)")
    return head


def remote_url(root: Path) -> str:
    """The URL of ``root``'s default DVC remote; a relative folder is made absolute (relative to ``.dvc/``, where
    DVC resolves it), so that a worker's clone elsewhere reaches the same folder."""
    name = dvc(root, "remote", "default").stdout.strip()
    if not name:
        raise RuntimeError(f"fanout.mode pool needs a default DVC remote in {root}/.dvc/config (docs/operations.md)")
    url = dvc(root, "config", f"remote.{name}.url").stdout.strip()
    if "://" not in url and not Path(url).is_absolute():
        url = str((root / ".dvc" / url).resolve())
    return url


@task
def submit_fold(deployment: str, parameters: dict, poll: float) -> dict:
    """One run of ``dg-fold/<deployment>``, waited for; its record (the artifact), or an error naming the fold."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    target = parameters["target"]
    try:
        run = run_deployment(name=f"dg-fold/{deployment}", parameters=parameters, poll_interval=poll, timeout=None)
    except Exception as e:  # noqa: BLE001 - e.g. no such deployment: say which fold and what
        raise RuntimeError(f"fold {target}: cannot submit to dg-fold/{deployment}: {type(e).__name__}: {e}") from e
    if not run.state or not run.state.is_completed():
        state = run.state.type.value if run.state else "unknown"
        raise RuntimeError(f"fold {target}: dg-fold run {run.name!r} ended {state}: {run.state.message if run.state else ''}")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    records = [parse_artifact(a.data) for a in arts if a.key == artifact_key(parameters["dataset"], target)]
    if not records:
        raise RuntimeError(f"fold {target}: dg-fold run {run.name!r} completed without its record")
    return {**records[0], "flow_run": str(run.id), "flow_run_name": run.name}


def merge_lock(root: Path, entries: dict, order: list[str]) -> None:
    """Add the folds' ``dvc.lock`` entries to ``root/dvc.lock`` (stages in pipeline order), atomically."""
    path = root / "dvc.lock"
    lock = yaml.safe_load(path.read_text())
    stages = {**lock.get("stages", {}), **entries}
    lock["stages"] = {s: stages[s] for s in order if s in stages} | {s: v for s, v in stages.items() if s not in order}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(lock, sort_keys=False))


def run_pool(root: Path, params: P.Params, order: list[str]) -> tuple[dict, dict]:
    """The pipeline with the folds on the work pool ``fanout.pool``; returns ({stage: ran}, {fold: record})."""
    logger = get_run_logger()
    fan = params.fanout
    commit = coordinator_commit(root)
    remote = remote_url(root)
    # The stages here run the project's own code too (its folder first on the import path), as the workers' do.
    code = {"PYTHONPATH": str(root)}
    ran = {s: run_stage.with_options(name=s)(s, str(root), extra_env=code) for s in order if s in BEFORE}
    dvc(root, "push", *INPUT_STAGES)
    logger.info("inputs pushed to %s; submitting %d fold(s) to dg-fold/%s on pool %s at %s", remote,
                len(params.dataset.folds), fan.deployment, fan.pool, commit[:12])
    base = {"dataset": params.dataset.name, "repo": str(root), "commit": commit,
            "params_yaml": (root / P.PARAMS_FILE).read_text(), "lock": (root / "dvc.lock").read_text(), "remote": remote}
    futures = {t: submit_fold.with_options(name=f"dg-fold@{t}", retries=fan.retries, retry_delay_seconds=0)
               .submit(fan.deployment, {**base, "target": t}, fan.poll) for t in params.dataset.folds}
    folds, failed = {}, {}
    for t, fut in futures.items():
        try:
            folds[t] = fut.result()
        except Exception as e:  # noqa: BLE001 - every fold is waited for, then the failures are named together
            failed[t] = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} fold(s) failed for good after {fan.retries} retr"
                           f"{'y' if fan.retries == 1 else 'ies'}: {', '.join(failed)}; " + "; ".join(failed.values()))
    for t, rec in folds.items():
        logger.info("fold %s: worker %s, flow run %s", t, rec["worker"], rec["flow_run_name"])
    fold_stages = [f"{s}@{t}" for t in params.dataset.folds for s in FOLD_STAGES]
    merge_lock(root, {s: e for rec in folds.values() for s, e in rec["lock"].items()}, order)
    for rec in folds.values():  # the uncached outputs (study plots) came with the record
        unpack(root, rec.pop("files"))
    dvc(root, "pull", *fold_stages)
    status = dvc(root, "status", *fold_stages).stdout
    if "up to date" not in status:
        raise RuntimeError(f"the folds' outputs pulled from {remote} do not match dvc.lock:\n{status[-2000:]}")
    ran |= {s: any(rec["ran"].get(s) for rec in folds.values()) for s in fold_stages}
    ran |= {s: run_stage.with_options(name=s)(s, str(root), extra_env=code) for s in order if s not in ran}
    return ran, folds
