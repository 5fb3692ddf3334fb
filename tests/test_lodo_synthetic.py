"""End to end on synthetic styles: three source styles train BNE, a fourth style is the unseen target.

Runs `bne lodo`'s stage functions (the ones `dvc repro` runs) on a copy of params.yaml with a few overrides.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks import params as P
from tasks.lodo import run_lodo

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["red_on_white", "yellow_on_blue", "noisy_gray", "green_on_black"]


def synthetic_params(tmp: Path, data_root: Path, *extra: str) -> Path:
    """params.yaml of the project with the synthetic dataset and a small budget."""
    path = tmp / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    P.write_overrides(path, [
        "dataset.name=syn", f"dataset.root={data_root}", "dataset.splits=''", "dataset.val_fraction=0.25",
        f"dataset.domains=[{', '.join(STYLES)}]", "dataset.folds=[green_on_black]", "train.resolution=64",
        "train.seeds=[0]", "train.device=cpu", "train.epochs=3", "train.per_domain_batch=8", "train.warmup_frac=0.1",
        "eval.batch=16", "tune.inference.enabled=false", *extra,
    ])
    return path


@pytest.fixture(scope="module")
def lodo_run(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lodo")
    path = synthetic_params(tmp, synthetic_root)
    p = P.load(path)
    metrics = run_lodo(p, tmp, tmp, log=lambda m: None, progress=False)
    return p, tmp, metrics


def test_embedding_identifies_source_domains(lodo_run):
    _, _, metrics = lodo_run
    assert metrics["green_on_black"]["domain_id_acc"] >= 90.0


def test_bne_on_an_unseen_style_is_far_above_chance(lodo_run):
    _, _, metrics = lodo_run
    m = metrics["green_on_black"]
    # chance is 33.3. Measured with one thread, seeds 0 / 1 / 2: 97.2 / 68.1 / 100 (lr 0.02 with every layer
    # training swung from 43 to 83 over the same seeds, and with the memory layout: too fragile to test)
    assert m["bne"] >= 55.0


def test_reports_have_the_promised_shape(lodo_run):
    _, tmp, metrics = lodo_run
    on_disk = json.loads((tmp / "reports" / "syn" / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) == {"green_on_black", "mean"}
    for k in ("deepall", "bne", "uniform", "nearest", "oracle"):
        assert 0 <= on_disk["mean"][k] <= 100
    table = (tmp / "reports" / "syn" / "metrics.md").read_text()
    assert "| green_on_black |" in table and "| mean |" in table
    assert (tmp / "data" / "stats" / "syn" / "green_on_black.parquet").is_file()
    for fig in ("accuracy.png", "bne_weights.png", "confusion.png", "embedding_map.png"):
        assert (tmp / "reports" / "syn" / fig).stat().st_size > 0
    fold = json.loads((tmp / "reports" / "syn" / "details.json").read_text())["folds"][0]
    n_target = 24 * 3  # every image of the held-out style
    assert sum(map(sum, fold["confusion"]["bne"])) == n_target == sum(map(sum, fold["confusion"]["deepall"]))
    assert abs(sum(fold["mean_weights"]) - 1) < 1e-5


def test_statistics_parquet_has_the_documented_schema(lodo_run):
    import pyarrow.parquet as pq

    _, tmp, _ = lodo_run
    t = pq.read_table(tmp / "data" / "stats" / "syn" / "green_on_black.parquet")
    for col in ("dataset", "held_out", "seed", "domain", "layer", "layer_index", "channel", "mean", "var", "count", "kind"):
        assert col in t.column_names
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    for key in ("checkpoint_sha256", "params_hash", "norm", "created_at"):
        assert meta[key]
    df = t.to_pandas()
    assert set(df["held_out"]) == {"green_on_black"} and "green_on_black" not in set(df["domain"])
    assert set(df["kind"]) == {"running", "population", "instance_average"}
    assert (df["var"] >= 0).all() and (df.loc[df["kind"] == "population", "count"] > 0).all()


def test_target_never_reaches_training_or_selection(lodo_run, monkeypatch):
    """The stages before evaluate never open the held-out domain's cache file; evaluate does."""
    from tasks import embed, evaluate, stats, train, tune
    from tasks.paths import Layout

    p, tmp, _ = lodo_run
    layout = Layout(tmp, "syn")
    target_file = layout.cache(64) / "green_on_black.npy"
    opened = []
    real_load = np.load

    def spy(file, *a, **k):
        opened.append(Path(file).resolve())
        return real_load(file, *a, **k)

    monkeypatch.setattr(np, "load", spy)
    for module in (train, stats, embed, tune):
        view = p.scoped(module.PARAMS, module.__name__)
        args = (view, layout, "green_on_black")
        module.run(*args, log=lambda m: None) if module in (stats, tune) else module.run(*args, progress=False, log=lambda m: None)
        assert target_file.resolve() not in opened, f"{module.__name__} opened the held-out domain"
    assert opened, "the spy saw no cache reads at all"
    evaluate.run(p.scoped(evaluate.PARAMS, "evaluate"), layout, "green_on_black", progress=False, log=lambda m: None)
    assert target_file.resolve() in opened


def test_every_declared_parameter_is_read(lodo_run):
    """Each stage's PARAMS (= its dvc.yaml params) is what it reads: no key declared in vain."""
    from tasks import cache, embed, evaluate, ingest, report, stats, train, tune, validate

    for module in (ingest, validate, cache, train, stats, embed, tune, evaluate, report):
        stage = module.__name__.split(".")[-1]
        read = {k for s, k in P.READS if s == stage}
        unread = [d for d in module.PARAMS if not any(k == d or k.startswith(d + ".") for k in read)]
        assert not unread, f"{stage} declares {unread} but never reads them"


def test_a_stage_cannot_read_an_undeclared_parameter(lodo_run):
    p, _, _ = lodo_run
    with pytest.raises(P.ParamsError, match="reads .train. but does not declare it"):
        p.scoped(("dataset.name",), "probe").train.epochs
