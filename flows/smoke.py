"""The smoke project: a throw-away copy of this project whose dataset is a tiny subset, removed after use.

The copy holds only what ``dvc repro`` needs (``dvc.yaml``, ``params.yaml``, the code DVC hashes as stage
dependencies) and a few images of every domain and class (a few MB with PACS). What a smoke run writes (the
checkpoints of one fold and of the final model, twice: in the workspace and in the DVC cache, about 340 MB
with Lite0) goes away with the folder, unless ``keep``. DVC's per-repository site cache is kept inside the
copy, so nothing is left in ``/var/tmp/dvc`` either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.dvc import ROOT, SMOKE_MARKER, dvc
from tasks import params as P

#: What a smoke run changes besides the dataset (the subset is built by :func:`build`).
OVERRIDES = (
    "train.resolution=64", "train.epochs=1", "train.per_domain_batch=4", "train.eval_batch=16",
    "eval.batch=8", "tune.inference.n_trials=5", "train.seeds=[0]",
)
#: The project files a smoke copy needs: the pipeline and the code its stages declare as dependencies.
FILES = ("dvc.yaml", P.PARAMS_FILE, ".dvcignore", "bne", "tasks")
SUBSET = "subset"


def build(dest: Path | str, source: Path | str | None = None, per_class: int = 6) -> Path:
    """Make the smoke project in the empty or new folder ``dest``; returns it.

    The subset (``dest/subset``, ``dataset.root: subset``) takes the first ``per_class`` images of every domain
    and class of ``source`` (default: the configured ``dataset.root``), sorted by name; without split files
    the project's seeded stratified split applies. One held-out fold (the first domain) runs every per-fold
    stage; the final model uses every domain. The main project is never touched.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    params = P.load(ROOT / P.PARAMS_FILE)
    source = Path(source) if source else P.resolve(ROOT, params.dataset.root)
    if source is None or not source.is_dir():
        raise FileNotFoundError(f"smoke source {source} is not a folder")
    for item in FILES:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy(src, dest / item)
    domains = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(domains) < 2:
        raise ValueError(f"smoke source {source} has {len(domains)} domain folder(s); at least 2 are needed")
    for d in domains:
        for c in sorted(p.name for p in (source / d).iterdir() if p.is_dir() and not p.name.startswith(".")):
            (dest / SUBSET / d / c).mkdir(parents=True)
            for img in sorted(p for p in (source / d / c).iterdir() if p.is_file() and not p.name.startswith("."))[:per_class]:
                shutil.copy(img, dest / SUBSET / d / c / img.name)
    P.write_overrides(dest / P.PARAMS_FILE, [
        *OVERRIDES, f"dataset.root={SUBSET}", "dataset.splits=''", "dataset.val_fraction=0.34",
        f"dataset.domains={json.dumps(domains)}", f"dataset.folds={json.dumps(domains[:1])}",
    ])
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
    site_cache = {"DVC_SITE_CACHE_DIR": str(dest.resolve() / ".dvc" / "site-cache")}  # `dvc init` writes there already
    dvc(dest, "init", "-q", extra_env=site_cache)
    dvc(dest, "config", "--local", "core.analytics", "false", extra_env=site_cache)
    dvc(dest, "config", "--local", "core.site_cache_dir", site_cache["DVC_SITE_CACHE_DIR"], extra_env=site_cache)
    (dest / SMOKE_MARKER).write_text(json.dumps({"made_by": "flows/smoke.py", "project": str(ROOT), "source": str(source)}) + "\n")
    return dest


@contextmanager
def smoke_project(source: Path | str | None = None, keep: bool = False, per_class: int = 6) -> Iterator[Path]:
    """A smoke project in a new temporary folder (``bne-smoke-*``), removed on exit (also after a failure)
    unless ``keep``."""
    dest = Path(tempfile.mkdtemp(prefix="bne-smoke-"))
    try:
        yield build(dest, source, per_class)
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)
