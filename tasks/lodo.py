"""``bne lodo``: every stage of leave-one-domain-out in one process, the same stage functions ``dvc repro`` runs.

ingest -> validate -> cache -> per fold (dataset.folds): train -> stats -> embed -> tune -> evaluate -> report.
Each stage sees only its declared parameters (as under DVC); checkpoints resume; the held-out domain is read
only by its fold's evaluate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks import cache, embed, evaluate, ingest, report, stats, train, tune, validate
from tasks.params import Params
from tasks.paths import Layout


def run_lodo(p: Params, root: Path | str, base: Path | str, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every stage for ``p.dataset.folds``; returns the metrics of ``report``. ``base``: the params file's folder."""
    root, base = Path(root), Path(base)
    layout = Layout(root, p.dataset.name)

    def scoped(module):
        view = p.scoped(module.PARAMS, stage=module.__name__.split(".")[-1])
        assert view.dataset.name == layout.dataset  # every stage locates its files by the dataset's name
        return view

    log(ingest.summary(ingest.run(scoped(ingest), layout, base, progress)))
    checked = validate.run(scoped(validate), layout, root / "reports", base)
    if not checked["success"]:
        raise ValueError(validate.summary(checked))
    log(cache.run(scoped(cache), layout, progress))
    for target in p.dataset.folds:
        train.run(scoped(train), layout, target, progress, log)
        stats.run(scoped(stats), layout, target, log)
        embed.run(scoped(embed), layout, target, progress, log)
        tune.run(scoped(tune), layout, target, log)
        evaluate.run(scoped(evaluate), layout, target, progress, log)
    return report.run(scoped(report), layout, log)
