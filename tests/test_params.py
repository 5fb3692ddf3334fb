"""tasks/params.py: params.yaml is read, typed and checked in one place; errors name the key and the value."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS, ROOT

from bne.data import AugmentConfig
from bne.embedding import InferenceOptions
from bne.model import ModelSpec
from bne.train import TrainConfig
from tasks import params
from tasks.params import ParamsError

PARAMS_FILE = ROOT / "params.yaml"


def test_params_yaml_loads_into_the_library_configs():
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    p = params.load(PARAMS_FILE)
    assert p == PARAMS
    spec = p.model.spec(num_classes=7, domains=["a", "b"])
    assert isinstance(spec, ModelSpec) and spec.num_classes == 7 and spec.domains == ("a", "b")
    assert {k: getattr(spec, k) for k in raw["model"]} == raw["model"]
    cfg = p.train.config(seed=5)
    assert isinstance(cfg, TrainConfig) and cfg.seed == 5
    for k, v in raw["train"].items():
        if k not in ("resolution", "seeds", "device", "augment"):
            assert getattr(cfg, k) == v, k
    assert isinstance(cfg.augment, AugmentConfig) and cfg.augment == p.train.augment.config()
    augment = raw["train"]["augment"]
    assert dataclasses.asdict(cfg.augment) == {**augment, "crop_scale": tuple(augment["crop_scale"])}
    opts = p.eval.options.options()
    assert isinstance(opts, InferenceOptions) and dataclasses.asdict(opts) == raw["eval"]["options"]
    assert p.eval.options.model_copy(update={"layers": [0, 2]}).options().layers == (0, 2)  # hashable, as the dataclass


def test_library_configs_have_no_defaults_of_their_own():
    """Every default lives in params.yaml: the dataclasses require every value but the data's and the run's."""
    optional = {ModelSpec: {"domains"}, TrainConfig: {"seed"}, AugmentConfig: set(), InferenceOptions: set()}
    for cls, allowed in optional.items():
        defaulted = {f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        assert defaulted == allowed, cls.__name__
        with pytest.raises(TypeError):
            cls()


@pytest.mark.parametrize(("override", "key", "value"), [
    ("train.epochs=abc", "train.epochs", "'abc'"),
    ("train.epochs=0", "train.epochs", "0"),
    ("train.epochs=-1", "train.epochs", "-1"),
    ("train.epochs=1.5", "train.epochs", "1.5"),
    ("train.per_domain_batch=0", "train.per_domain_batch", "0"),
    ("train.seeds=[]", "train.seeds", "[]"),
    ("train.seeds=[1, 1]", "train.seeds", "[1, 1]"),
    ("train.device=tpu", "train.device", "'tpu'"),
    ("train.select=worst", "train.select", "'worst'"),
    ("train.augment.crop_scale=[0.9, 0.5]", "train.augment.crop_scale", "[0.9, 0.5]"),
    ("train.ema=1.5", "train.ema", "1.5"),
    ("train.ema=-0.1", "train.ema", "-0.1"),
    ("train.ema=1", "train.ema", "1"),
    ("train.ema_bn_batches=0", "train.ema_bn_batches", "0"),
    ("model.backbone=vgg", "model.backbone", "'vgg'"),
    ("model.norm=layernorm", "model.norm", "'layernorm'"),
    ("model.domain_layers=0", "model.domain_layers", "0"),
    ("model.domain_layers=some", "model.domain_layers", "'some'"),
    ("dataset.val_fraction=1.5", "dataset.val_fraction", "1.5"),
    ("eval.options.power=-3", "eval.options.power", "-3"),
    ("eval.options.distance=foo", "eval.options.distance", "'foo'"),
    ("dataset.folds=[art_painting, nowhere]", "dataset.folds", "nowhere"),
    ("dataset.max_pixels=0", "dataset.max_pixels", "0"),
    ("dataset.max_pixels=-1", "dataset.max_pixels", "-1"),
    ("dataset.max_pixels=abc", "dataset.max_pixels", "'abc'"),
    ("dataset.max_pixels=2.5", "dataset.max_pixels", "2.5"),
    ("validation.near_duplicate_bits=-1", "validation.near_duplicate_bits", "-1"),
    ("validation.near_duplicate_bits=257", "validation.near_duplicate_bits", "257"),
    ("fanout.heartbeat=10", "fanout.heartbeat", "10"),  # Prefect's minimum is 30
    ("fanout.lost_after=30", "fanout.lost_after", "30"),  # not above the heartbeat: a healthy run taken for lost
])
def test_impossible_values_name_the_key_and_the_value(override, key, value):
    with pytest.raises(ParamsError) as err:
        params.load(PARAMS_FILE, [override])
    assert key in str(err.value) and value in str(err.value)


def test_weight_average_refuses_norms_without_plain_running_statistics():
    assert params.load(PARAMS_FILE, ["train.ema=0.99", "model.norm=bgn"]).train.ema == 0.99
    assert params.load(PARAMS_FILE, ["train.ema=0", "model.norm=mbn"]).model.norm == "mbn"
    for norm in ("mbn", "cbn", "simplex"):
        with pytest.raises(ParamsError, match=rf"train\.ema = 0\.99 with model\.norm = '{norm}'"):
            params.load(PARAMS_FILE, ["train.ema=0.99", f"model.norm={norm}"])


def test_unknown_and_missing_keys_are_named():
    raw = params.read_raw(PARAMS_FILE)
    raw["train"]["epochz"] = 3
    del raw["model"]["norm"]
    with pytest.raises(ParamsError, match=r"model\.norm: missing.*train\.epochz = 3: unknown parameter"):
        params.from_dict(raw)
    raw = params.read_raw(PARAMS_FILE)
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ParamsError, match=r"trian: unknown parameter"):
        params.from_dict(raw)


def test_overrides_parse_as_yaml_and_must_name_an_existing_key():
    assert params.parse_override("train.seeds=[0,1]") == (["train", "seeds"], [0, 1])
    assert params.parse_override("dataset.splits=") == (["dataset", "splits"], None)
    assert params.parse_override("tune.inference.timeout=null") == (["tune", "inference", "timeout"], None)
    assert params.load(PARAMS_FILE, ["train.seeds=[0,1]"]).train.seeds == [0, 1]
    assert params.load(PARAMS_FILE, ["eval.options.layers=[1, 3]"]).eval.options.options().layers == (1, 3)
    with pytest.raises(ParamsError, match=r"no parameter 'train\.epochz'"):
        params.load(PARAMS_FILE, ["train.epochz=3"])
    with pytest.raises(ParamsError, match=r"no parameter 'nowhere'"):
        params.load(PARAMS_FILE, ["nowhere.epochs=3"])
    with pytest.raises(ParamsError, match="not dotted.key=value"):
        params.parse_override("train.epochs")
    raw = params.read_raw(PARAMS_FILE)
    assert params.apply_overrides(raw, ["train.epochs=7"]) is raw and raw["train"]["epochs"] == 7


def test_write_overrides_keeps_comments_and_refuses_bad_values(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS_FILE, path)
    before = path.read_text()
    params.write_overrides(path, ["train.epochs=5", "train.seeds=[0, 1]", "eval.options.distance=kl"])
    after = path.read_text()
    p = params.load(path)
    assert p.train.epochs == 5 and p.train.seeds == [0, 1] and p.eval.options.distance == "kl"
    assert p.model_copy(update={"train": PARAMS.train, "eval": PARAMS.eval}) == PARAMS  # nothing else changed
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["epochs: 5", "seeds: [0, 1]", "distance: kl"]
    assert "# identical budget for DeepAll and BNE" in after and 'storage: ""' in after  # comments and quotes kept
    for bad in (["train.epochs=0"], ["train.epochz=3"], ["train.epochs=6", "model.backbone=vgg"]):
        with pytest.raises(ParamsError):
            params.write_overrides(path, bad)
        assert path.read_text() == after  # checked before writing: the file is untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["params.yaml"]  # no temporary file left


def test_scoped_view_refuses_undeclared_keys_and_records_reads():
    view = PARAMS.scoped(["train.epochs", "model", "eval.options"], stage="probe")
    assert view.train.epochs == PARAMS.train.epochs
    assert ("probe", "train.epochs") in params.READS
    with pytest.raises(ParamsError, match=r"probe.*'train\.lr'"):
        view.train.lr
    with pytest.raises(ParamsError, match=r"probe.*'train\.augment'"):
        view.train.augment
    with pytest.raises(ParamsError, match=r"probe.*'dataset'"):
        view.dataset
    with pytest.raises(ParamsError, match=r"probe.*'train'"):
        view.train.config(seed=0)  # needs all of train
    assert ("probe", "train.lr") not in params.READS
    assert view.model.spec(num_classes=3) == PARAMS.model.spec(num_classes=3)
    assert {("probe", f"model.{k}") for k in type(PARAMS.model).model_fields} <= params.READS
    assert view.eval.options.options() == PARAMS.eval.options.options()
    assert ("probe", "eval.options.power") in params.READS and ("probe", "eval.batch") not in params.READS


def test_resolve_is_relative_to_the_params_folder(tmp_path):
    assert params.resolve(tmp_path, "") is None
    assert params.resolve(tmp_path, "data/x") == (tmp_path / "data/x").resolve()
    assert params.resolve(tmp_path, "/abs/x") == Path("/abs/x")
