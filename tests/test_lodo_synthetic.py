"""End to end on synthetic styles: three source styles train BNE, a fourth style is the unseen target."""

import json

import pytest

from bne.embedding import InferenceOptions
from bne.lodo import EvalConfig, LodoConfig, load_params, run_lodo
from bne.model import ModelSpec
from bne.train import TrainConfig


@pytest.fixture(scope="module")
def lodo_run(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lodo")
    cfg = LodoConfig(
        name="syn",
        root=str(synthetic_root),
        splits=None,
        val_fraction=0.25,
        resolution=64,
        seeds=(0,),
        targets=("green_on_black",),
        device="cpu",
        model=ModelSpec(num_classes=3),
        train=TrainConfig(epochs=3, per_domain_batch=8, lr=0.01, freeze_stages=4, warmup_frac=0.1),
        eval=EvalConfig(batch=16, options=InferenceOptions()),
    )
    metrics = run_lodo(cfg, tmp / "work", tmp / "reports", tmp / "cache", log=lambda m: None, progress=False)
    return cfg, tmp, metrics


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
    on_disk = json.loads((tmp / "reports" / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) == {"green_on_black", "mean"}
    for k in ("deepall", "bne", "uniform", "nearest", "oracle"):
        assert 0 <= on_disk["mean"][k] <= 100
    table = (tmp / "reports" / "metrics.md").read_text()
    assert "| green_on_black |" in table and "| mean |" in table
    assert (tmp / "work" / "stats" / "syn" / "green_on_black.parquet").is_file()
    for fig in ("accuracy.png", "bne_weights.png", "confusion.png", "embedding_map.png"):
        assert (tmp / "reports" / fig).stat().st_size > 0
    fold = json.loads((tmp / "reports" / "details.json").read_text())["folds"][0]
    n_target = 24 * 3  # every image of the held-out style
    assert sum(map(sum, fold["confusion"]["bne"])) == n_target == sum(map(sum, fold["confusion"]["deepall"]))
    assert abs(sum(fold["mean_weights"]) - 1) < 1e-5


def test_statistics_parquet_has_the_documented_schema(lodo_run):
    import pyarrow.parquet as pq

    _, tmp, _ = lodo_run
    t = pq.read_table(tmp / "work" / "stats" / "syn" / "green_on_black.parquet")
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
    """Rerun training and option selection with the target's arrays poisoned: nothing before evaluation reads them."""
    import bne.lodo as lodo

    cfg, tmp, _ = lodo_run
    from bne.data import build_cache, load_cache, load_folder_dataset

    ds = load_folder_dataset(cfg.root, None, cfg.val_fraction)
    arrays = load_cache(ds, build_cache(ds, cfg.resolution, tmp / "cache" / "syn" / "64"))
    reads = []

    class Spy:
        def __init__(self, a):
            self.a = a

        def __getitem__(self, k):
            reads.append(k)
            return self.a[k]

        def __len__(self):
            return len(self.a)

    tgt = arrays["green_on_black"]
    tgt.images = Spy(tgt.images)
    real_branch_outputs = lodo.branch_outputs
    order = []

    def tracking(model, images, *a, **k):
        order.append("target" if isinstance(images, Spy) else "source")
        assert not reads, "held-out images were read before the target evaluation"
        return real_branch_outputs(model, images, *a, **k)

    monkeypatch.setattr(lodo, "branch_outputs", tracking)
    root = tmp / "work_again"
    for stage in (lodo.train_fold, lodo.stats_fold, lodo.embed_fold):
        stage(cfg, ds, arrays, "green_on_black", root, log=lambda m: None)
        assert not reads, f"{stage.__name__} read held-out images"
    lodo.passthrough_tune(cfg, "green_on_black", root)
    lodo.evaluate_fold(cfg, ds, arrays, "green_on_black", root, log=lambda m: None, progress=False)
    assert order == ["source", "target"] and reads


def test_params_file_is_strict(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("dataset: {name: x, root: imgs}\nmodel: {backbone: resnet18, bogus: 1}\ntrain: {resolution: 32}\neval: {}\n")
    with pytest.raises(ValueError, match="bogus"):
        load_params(p)


def test_dotted_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("dataset: {name: x, root: imgs}\nmodel: {backbone: resnet18}\ntrain: {resolution: 32}\neval: {options: {power: 1.0}}\n")
    cfg = load_params(p, overrides=["train.epochs=1", "eval.options.power=2", "eval.branch_stats=precise"])
    assert cfg.train.epochs == 1 and cfg.eval.options.power == 2 and cfg.eval.branch_stats == "precise"
    assert cfg.root == str((tmp_path / "imgs").resolve())
    with pytest.raises(ValueError, match="nosuch"):
        load_params(p, overrides=["nosuch.x=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_params(p, overrides=["train.epochs"])
