"""Record new code and parameter dependencies in ``dvc.lock`` for stages whose outputs are not in this workspace.

`dvc commit` needs every output on disk. After a change that cannot alter a stage's outputs (a refactor, an error
message, a new parameter whose value leaves the outputs as they were), this records the stages' current
dependency hashes and parameter values and keeps the locked output hashes, as `dvc commit` would have. Use it
only with evidence that the outputs are unchanged (rerun one stage and compare, say) and say so in the commit.

    python tools/relock.py                 # every locked stage
    python tools/relock.py train@sketch    # just these
"""

from __future__ import annotations

import argparse
from pathlib import Path


def relock(root: Path, names: list[str] | None = None) -> list[str]:
    """Re-save the deps of the locked stages of ``root`` (``names``: only these), outputs kept; returns the stages."""
    from dvc.repo import Repo

    done = []
    with Repo(str(root)) as repo, repo.lock:
        stages = [s for s in repo.index.stages if s.cmd and s.name
                  and s.dvcfile.lockfile_contents.get("stages", {}).get(s.name) is not None]
        known = {s.name for s in stages}
        unknown = sorted(set(names or []) - known)
        if unknown:
            raise SystemExit(f"not locked stages of {root / 'dvc.yaml'}: {unknown} (locked: {sorted(known)})")
        for stage in stages:
            if names and stage.name not in names:
                continue
            locked_outs = {str(o): o.hash_info for o in stage.outs}
            stage.save(allow_missing=True, run_cache=False)
            lost = [k for k, o in ((str(o), o) for o in stage.outs) if not o.hash_info and locked_outs[k]]
            if lost:
                raise SystemExit(f"{stage.name}: outputs {lost} lost their locked hashes; nothing written")
            stage.dump(update_pipeline=False)
            done.append(stage.name)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", help="stage names (default: every locked stage)")
    ap.add_argument("--root", type=Path, default=Path("."))
    a = ap.parse_args()
    for name in relock(a.root, a.stages or None):
        print(f"relocked {name}")


if __name__ == "__main__":
    main()
