"""What the flows need from DVC: the project a flow may run in, its stages in order, and one stage run.

DVC itself is only ever run as a subprocess (``python -m dvc ...`` with ``cwd`` the project), never imported
here: DVC takes the current directory as the repository, and one DVC command per repository runs at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task

from tasks import params as P

ROOT = Path(__file__).resolve().parents[1]
#: Written by :func:`flows.smoke.build` into every smoke project: a flow runs only there or in :data:`ROOT`.
SMOKE_MARKER = ".bne-smoke"
SKIPPED = "didn't change, skipping"
RESTORED = "is cached - skipping run"
TAIL = 40  # lines of a failed stage's output repeated in the error


def env() -> dict[str, str]:
    """The stages' environment: this interpreter's bin folder first on PATH (the ``bne`` command), no telemetry,
    unbuffered Python output (so a stage's progress lines reach the flow log as they are printed)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }


def dvc(root: Path | str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dvc ARGS`` in ``root``, output captured; a failure raises with DVC's message."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root} (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def project(root: Path | str, dataset: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, P.Params]:
    """The project folder a flow may run in, and its parameters (with ``overrides``), checked before any work.

    Accepted: this project (:data:`ROOT`) or a smoke project made by :func:`flows.smoke.build` (it holds
    :data:`SMOKE_MARKER`); either must hold ``dvc.yaml`` and ``params.yaml``. Any other folder is refused: the
    flow runs the commands of the folder's ``dvc.yaml``, and the Prefect API takes ``root`` from anyone who
    reaches it. ``dataset`` must be the dataset that ``params.yaml`` configures.
    """
    path = Path(root).resolve()
    if path != ROOT and not (path / SMOKE_MARKER).is_file():
        raise ValueError(f"root {str(root)!r} is neither this project ({ROOT}) nor a smoke project made by flows/smoke.py")
    for name in ("dvc.yaml", P.PARAMS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"root {str(root)!r} has no {name}")
    params = P.load(path / P.PARAMS_FILE, overrides)
    if dataset != params.dataset.name:
        raise ValueError(f"dataset {dataset!r} is not the one params.yaml configures ({params.dataset.name!r})")
    return path, params


def stages(root: Path | str) -> list[str]:
    """The stages of ``root/dvc.yaml`` in pipeline order, ``foreach`` expanded to ``name@item``, as DVC lists them
    (``dvc stage list``: the file's order, which a test checks is an order in which every stage follows its deps)."""
    out = dvc(root, "stage", "list", "--name-only").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@task
def run_stage(stage: str, root: str, upstream: bool = False, extra_env: dict[str, str] | None = None) -> bool:
    """``dvc repro --single-item STAGE`` in ``root`` (``upstream``: with the stages it depends on), its output
    streamed line by line to the flow log; True when the stage's command ran, False when DVC found it up to date.
    ``extra_env``: added to the stage's environment."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", stage, *([] if upstream else ["--single-item"])]
    tail: deque[str] = deque(maxlen=TAIL)
    ran = restored = False
    with subprocess.Popen(cmd, cwd=root, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as proc:
        for line in proc.stdout:  # universal newlines: a carriage-return progress update is a line too
            line = line.rstrip()
            if not line:
                continue
            logger.info("%s", line)
            tail.append(line)
            ran = ran or line.startswith("Running stage")
            restored = restored or RESTORED in line
    if proc.returncode:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {proc.returncode}); its last lines:\n" + "\n".join(tail))
    logger.info("%s: %s", stage, "ran" if ran else "restored from the DVC run cache" if restored else "up to date (cached)")
    return ran
