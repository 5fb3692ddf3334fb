"""The Optuna tuning stage: resumable, seeded studies on source data only."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import optuna
import PIL.Image
import pytest
import torch
from optuna.trial import TrialState

import tasks.tune as tune
from bne.data import build_cache, load_cache, load_folder_dataset
from bne.embedding import DISTANCES
from bne.evaluate import BranchOutputs, leave_own_out_accuracy, options_dict
from conftest import augment_cfg, options, spec, train_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # on shared cores, two OpenMP threads made a 4 s training run take 60 s

MAX_PIXELS = 8192 * 8192  # the decode rules' limit (the pipeline's: params.yaml dataset.max_pixels)

optuna.logging.set_verbosity(optuna.logging.WARNING)
HELD_OUT = "green_on_black"


def outputs(seed: int = 0, s: int = 3, n: int = 60, k: int = 3, layers: int = 6) -> tuple[BranchOutputs, torch.Tensor]:
    """Random branch outputs in which each branch is right more often on its own domain's images."""
    g = torch.Generator().manual_seed(seed)
    domains = torch.arange(n) % s
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(s, n, k, generator=g)
    logits[:, torch.arange(n), labels] += 1.0
    dists = {
        (m, e, d): torch.rand(s, n, layers, generator=g) * 5 + 1
        for m in ("per_branch", "single_pass")
        for e in ("running", "population")
        for d in DISTANCES
    }
    return BranchOutputs(torch.softmax(logits, -1), labels, dists), domains


def journal(path: Path) -> optuna.storages.BaseStorage:
    return tune.open_storage(path)


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


# ------------------------------------------------------------------------------------------ inference options


def test_killed_inference_study_resumes_to_exactly_n_trials(tmp_path, monkeypatch):
    val, dom = outputs()
    path = tmp_path / "studies" / "inference.journal"
    kw = dict(n_trials=12, seed=0, storage=path, study_name="fold")
    real = tune.leave_own_out_accuracy
    calls = []

    def dies_in_fifth_trial(*a):
        calls.append(1)
        if len(calls) == 1 + 5:  # the first call is the baseline
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(tune, "leave_own_out_accuracy", dies_in_fifth_trial)
    with pytest.raises(KeyboardInterrupt):
        tune.tune_inference(val, dom, options(), **kw)
    study = optuna.load_study(study_name="fold", storage=journal(path))
    assert states(study) == [TrialState.COMPLETE] * 4 + [TrialState.FAIL]
    study.ask()  # a process killed mid-trial leaves a trial RUNNING for ever: it must not count either
    monkeypatch.setattr(tune, "leave_own_out_accuracy", real)

    res = tune.tune_inference(val, dom, options(), **kw)
    study = optuna.load_study(study_name="fold", storage=journal(path))
    assert res["n_trials"] == 12 and res["storage"] == str(path)
    assert states(study).count(TrialState.COMPLETE) == 12 and len(study.trials) == 12 + 2
    assert tune.tune_inference(val, dom, options(), **kw)["n_trials"] == 12  # complete: runs nothing
    assert len(optuna.load_study(study_name="fold", storage=journal(path)).trials) == 14
    first = study.trials[0]
    assert first.user_attrs["options"] == options_dict(options())  # base is the first trial
    assert first.value == res["baseline_value"] == leave_own_out_accuracy(val, dom, options())


def test_result_is_never_worse_than_the_base_options(tmp_path):
    val, dom = outputs(1)
    base = options(layers=(0, 2, 5), power=32.0)  # an explicit layer list and a power outside the range
    res = tune.tune_inference(val, dom, base, n_trials=15, seed=3, storage=tmp_path / "a.journal", study_name="s")
    assert res["best_value"] >= res["baseline_value"]
    assert res["best_value"] == leave_own_out_accuracy(val, dom, tune.options_from_dict(res["best_options"]))
    only_base = tune.tune_inference(val, dom, base, n_trials=1, seed=3, storage=tmp_path / "b.journal", study_name="s")
    assert only_base["best_trial"] == 0 and tune.options_from_dict(only_base["best_options"]) == base


def test_same_seed_same_study(tmp_path):
    val, dom = outputs(2)

    def run(name: str, seed: int) -> list:
        tune.tune_inference(val, dom, options(), n_trials=14, seed=seed, storage=tmp_path / f"{name}.journal", study_name="s")
        study = optuna.load_study(study_name="s", storage=journal(tmp_path / f"{name}.journal"))
        return [(t.params, t.value) for t in study.trials]

    a, b = run("a", 7), run("b", 7)
    assert a == b and len(a) == 14
    assert run("c", 8) != a


def test_rdb_url_storage(tmp_path):
    val, dom = outputs(3)
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    kw = dict(seed=0, storage=url, study_name="shared")
    assert tune.tune_inference(val, dom, options(), n_trials=3, **kw)["n_trials"] == 3
    res = tune.tune_inference(val, dom, options(), n_trials=5, **kw)  # resumes: two more trials
    study = optuna.load_study(study_name="shared", storage=url)
    assert res["storage"] == url and res["n_trials"] == 5 and len(study.trials) == 5


def test_options_round_trip_and_partial_distances():
    for opts in (options(), options(layers=(1, 3), weighting="softmax", temperature=0.3)):
        assert tune.options_from_dict(options_dict(opts)) == opts
    val, dom = outputs()
    del val.dists[("single_pass", "population", "kl")]
    with pytest.raises(ValueError, match="missing"):
        tune.InferenceSpace.of(val, options())


def test_study_plots(tmp_path):
    val, dom = outputs(4)
    path = tmp_path / "p.journal"
    tune.tune_inference(val, dom, options(), n_trials=1, seed=0, storage=path, study_name="s")
    study = optuna.load_study(study_name="s", storage=journal(path))
    one = tune.save_study_plots(study, tmp_path / "one")
    assert [Path(p).name for p in one["written"]] == ["optimization_history.png"]
    assert "param_importances" in one["skipped"]
    tune.tune_inference(val, dom, options(), n_trials=12, seed=0, storage=path, study_name="s")
    many = tune.save_study_plots(study, tmp_path / "many")
    assert not many["skipped"]
    assert {Path(p).name for p in many["written"]} == {"optimization_history.png", "param_importances.png"}
    assert all(Path(p).stat().st_size > 1000 for p in many["written"])


# -------------------------------------------------------------------------------------- training hyper-params


@pytest.fixture(scope="module")
def synthetic_cache(synthetic_root, tmp_path_factory):
    """The cache stage's output for every domain (built before tuning starts)."""
    ds = load_folder_dataset(synthetic_root, val_fraction=0.25)
    return ds, build_cache(ds, 32, tmp_path_factory.mktemp("tune_cache"), workers=2, progress=False, max_pixels=MAX_PIXELS)


SPACE = tune.TrainSpace(lr=(1e-3, 1e-1), weight_decay=(1e-5, 1e-2), epochs=None, augment_strength=(0.0, 1.5))


def objective_for(ds, cache, work: Path, epochs: int = 2) -> tune.TrainingObjective:
    """A training study's objective on every domain but the held-out one (its cache file is never opened)."""
    arrays = load_cache(ds, cache, skip=[HELD_OUT])
    sources = [arrays[d] for d in ds.domains if d != HELD_OUT]
    base = train_cfg(epochs=epochs, per_domain_batch=8, lr=0.02, freeze_stages=0, warmup_frac=0.1)
    return tune.TrainingObjective(spec(backbone="resnet18", weights="none"), base, 32, sources, work, torch.device("cpu"),
                                  SPACE, log=lambda m: None)


def test_training_study_reports_every_epoch_and_reads_only_sources(synthetic_cache, tmp_path, monkeypatch):
    ds, cache = synthetic_cache
    opened: list[str] = []

    def spy(real):
        def wrapper(file, *a, **k):
            opened.append(str(file))
            return real(file, *a, **k)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(np, "load", spy(np.load))
    monkeypatch.setattr(PIL.Image, "open", spy(PIL.Image.open))

    objective = objective_for(ds, cache, tmp_path / "work")
    sources = objective.sources
    res = tune.tune_training(objective, n_trials=2, seed=0, storage=tmp_path / "train.journal", study_name="t", enqueue=objective.base_params)
    monkeypatch.undo()

    assert [a.name for a in sources] == [d for d in ds.domains if d != HELD_OUT]
    assert not [p for p in opened if HELD_OUT in p], "the held-out domain's files were opened"
    for a in sources:
        assert any(p.endswith(f"{a.name}.npy") for p in opened)
    assert res["n_complete"] == 2 and res["n_pruned"] == 0
    study = optuna.load_study(study_name="t", storage=journal(tmp_path / "train.journal"))
    assert study.trials[0].params == {"lr": 0.02, "weight_decay": objective.base.weight_decay, "augment_strength": 1.0}
    for t in study.trials:
        assert sorted(t.intermediate_values) == [1, 2]
        assert t.value == max(t.intermediate_values.values()) and 0 <= t.value <= 1
        assert t.user_attrs["train"]["lr"] == t.params["lr"] and t.user_attrs["train"]["epochs"] == 2
    assert res["best_value"] == max(t.value for t in study.trials)
    assert tune._train_config(res["best_train"]).lr == res["best_params"]["lr"]
    assert not any((tmp_path / "work" / "t").iterdir())  # trial checkpoints removed


def test_forced_pruning_stops_a_trial_after_its_first_epoch(synthetic_cache, tmp_path, monkeypatch):
    ds, cache = synthetic_cache
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    objective = objective_for(ds, cache, tmp_path / "work")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="after epoch 1"):
        objective(trial)
    assert list(study.trials[0].intermediate_values) == [1]
    res = tune.tune_training(objective, n_trials=1, seed=0, storage=tmp_path / "p.journal", study_name="p", n_startup_trials=0)
    assert res["n_pruned"] == 1 and res["n_complete"] == 0 and res["best_value"] is None


def test_median_pruning_waits_for_startup_trials_and_warmup_epochs(tmp_path):
    """With a stand-in objective: three good trials complete, then a poor one is pruned at epoch 2, not 1."""

    def objective(trial: optuna.Trial) -> float:
        good = trial.number < 3
        for epoch in (1, 2, 3):
            trial.report(0.9 if good else 0.1, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 0.9 if good else 0.1

    res = tune.tune_training(objective, n_trials=4, seed=0, storage=tmp_path / "m.journal", study_name="m",
                             n_startup_trials=3, n_warmup_epochs=1)
    assert res["n_complete"] == 3 and res["n_pruned"] == 1
    pruned = optuna.load_study(study_name="m", storage=journal(tmp_path / "m.journal")).trials[3]
    assert pruned.state == TrialState.PRUNED and sorted(pruned.intermediate_values) == [1, 2]


def test_train_space_helpers():
    a = augment_cfg()
    assert tune.scale_augment(a, 1.0) == a
    none = tune.scale_augment(a, 0.0)
    assert none.crop_scale == (1.0, 1.0) and none.brightness == 0 and none.grayscale == 0
    strong = tune.scale_augment(a, 20.0)
    assert strong.crop_scale[0] == 0.05 and strong.hue == 0.5 and strong.grayscale == 1.0
    space = tune.TrainSpace.from_dict({"lr": [0.001, 0.01], "epochs": None})
    assert space.lr == (0.001, 0.01) and space.epochs is None
    assert space.weight_decay is None  # a key left out is not searched
    assert tune.train_params(train_cfg(lr=0.05, weight_decay=5e-4), space) == {"lr": 0.05}
    assert tune.train_params(train_cfg(lr=0.05, weight_decay=5e-4), SPACE) == {"lr": 0.05, "weight_decay": 5e-4, "augment_strength": 1.0}
    with pytest.raises(ValueError, match="bogus"):
        tune.TrainSpace.from_dict({"bogus": [1, 2]})
