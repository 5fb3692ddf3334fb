"""Pipeline stage ``tune``: Optuna studies over BNE inference options and over training hyper-parameters.

Both studies optimise on *source* data only: inference options on source-validation images scored with their own
domain's branch left out (a stand-in for an unseen domain), training hyper-parameters on per-epoch source-validation
accuracy. The held-out domain is never an argument here.

Studies live in a journal file (a path) or an RDB URL (``sqlite:///x.db``, ``postgresql://...``: several machines
can share one study; heartbeats mark the trials of a killed process FAIL and queue them again). ``n_trials`` is
the number of *finished* (complete or pruned) trials the study should hold: a killed study resumes and runs only
the rest. Failed or stale running trials do not count and are run again.

The library ``bne`` never imports optuna; this module does.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bne.data import AugmentConfig, DomainArrays
from bne.embedding import LAYER_SETS, InferenceOptions
from bne.evaluate import (
    BranchOutputs,
    leave_own_out_accuracy,
    options_dict,
    options_from_dict,
)
from bne.io import atomic_call, file_sha256, write_json
from bne.model import ModelSpec
from bne.train import TrainConfig, config_hash, train
from tasks.embed import load_val

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POWER = (0.5, 16.0)  # inverse-distance power, log-uniform
TEMPERATURE = (0.01, 100.0)  # softmax temperature, log-uniform (distances are ~1-20)


# ----------------------------------------------------------------------------------------------------- studies


SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "sslpassword")


def redact(storage: str | Path) -> str:
    """A storage string fit for a record: a URL's password (``user:***@host``) and secret query values masked.

    ``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; a journal path is unchanged.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit

    text = str(storage)
    if "://" not in text:
        return text
    try:
        u = urlsplit(text)
    except ValueError:
        return "<unparsable storage URL, redacted>"
    netloc = u.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(any(w in k.lower() for w in SECRET_KEYS) for k, _ in pairs):
            query = urlencode([(k, "***" if any(w in k.lower() for w in SECRET_KEYS) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (u.netloc, u.query):
        return text
    return f"{u.scheme}://{netloc}{u.path}" + (f"?{query}" if query else "") + (f"#{u.fragment}" if u.fragment else "")


#: RDB storages (``postgresql://...``, shared by several processes or machines): a running trial records a
#: heartbeat every HEARTBEAT_INTERVAL s; a trial without one for GRACE_PERIOD s (its process was killed) is marked
#: FAIL by the next process that asks for a trial and queued again with the same parameters, at most MAX_RETRY
#: times. Failed trials do not count towards ``n_trials``, so the study goes on to its full size.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 60
MAX_RETRY = 2


def is_rdb(storage: str | Path) -> bool:
    """True for an RDB URL (contains ``://``: ``postgresql://...``, ``sqlite:///...``); else a journal file path."""
    return isinstance(storage, str) and "://" in storage


def open_storage(storage: str | Path) -> optuna.storages.BaseStorage:
    """An RDB URL (contains ``://``): an :class:`~optuna.storages.RDBStorage` with heartbeats and the retry of
    stale trials (above); anything else is a journal file path (folders created).

    Several processes may open the same new database at once: creating its tables is retried a few times (the
    loser of the race sees the winner's tables)."""
    if is_rdb(storage):
        import time

        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
        from sqlalchemy.exc import SQLAlchemyError

        kwargs = {"pool_pre_ping": True} if not storage.startswith("sqlite") else {}
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(storage, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                      grace_period=GRACE_PERIOD,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
            except SQLAlchemyError as e:
                if attempt == 4:
                    raise RuntimeError(f"cannot open the study storage {redact(storage)}: {type(e).__name__}") from None
                time.sleep(0.5 * (attempt + 1))
    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _sampler(seed: int, n_trials: int, shared: bool = False) -> optuna.samplers.TPESampler:
    """Seeded TPE. Random start-up trials: TPE's default of 10, fewer for small budgets. ``shared`` (an RDB study
    other processes may run at once): :class:`_TrialSeededTPE` with ``constant_liar``, so that trials running
    elsewhere count as bad results and are not sampled again."""
    kw = dict(seed=seed, n_startup_trials=max(1, min(10, n_trials // 2)))
    return _TrialSeededTPE(**kw, constant_liar=True) if shared else optuna.samplers.TPESampler(**kw)


class _TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose random state is set from (seed, trial number) before every trial. The database numbers each trial
    of a study once, so processes sharing a study (even ones that join at the same moment) draw from different
    streams, and a study run again with the same seed gets the same draws trial by trial."""

    def __init__(self, *, seed: int, **kw) -> None:
        super().__init__(seed=seed, **kw)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        s = (self._base_seed * 1_000_003 + trial.number) % 2**32
        self._rng.rng.seed(s)  # TPE's own draws and its start-up RandomSampler's (optuna 5.0's attributes)
        self._random_sampler._rng.rng.seed(s)
        super().before_trial(study, trial)


def _create_study(storage: str | Path, study_name: str, seed: int, n_trials: int, **kwargs) -> optuna.Study:
    """Create or load ``study_name`` with the seeded sampler (per trial on an RDB storage: :class:`_TrialSeededTPE`)."""
    return optuna.create_study(study_name=study_name, storage=open_storage(storage),
                               sampler=_sampler(seed, n_trials, is_rdb(storage)), load_if_exists=True, **kwargs)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def _enqueue_once(study: optuna.Study, params: Mapping) -> None:
    """Queue ``params`` unless a finished or waiting trial already has them (a killed run re-queues it)."""
    states = (*FINISHED, TrialState.WAITING)
    for t in study.get_trials(deepcopy=False, states=states):
        if t.system_attrs.get("fixed_params", t.params) == dict(params):
            return
    study.enqueue_trial(dict(params))


def _optimize(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int, timeout: float | None) -> None:
    """Run until the study holds ``n_trials`` finished trials (across every process sharing it)."""
    left = n_trials - len(_finished(study))
    if left > 0:
        stop = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
        study.optimize(objective, n_trials=left, timeout=timeout, callbacks=[stop])


# ------------------------------------------------------------------------------------------ inference options


def _layers_choice(layers: str | tuple[int, ...]) -> str:
    return layers if isinstance(layers, str) else ",".join(str(i) for i in layers)


def _layers_value(choice: str) -> str | tuple[int, ...]:
    return choice if choice in LAYER_SETS else tuple(int(i) for i in choice.split(","))


@dataclass(frozen=True)
class InferenceSpace:
    """The choices of an inference study, derived from the recorded distances and the base options."""

    instance_stats: tuple[str, ...]
    embedding: tuple[str, ...]
    distance: tuple[str, ...]
    layers: tuple[str, ...]
    power: tuple[float, float]
    temperature: tuple[float, float]

    @classmethod
    def of(cls, val: BranchOutputs, base: InferenceOptions) -> InferenceSpace:
        keys = set(val.dists)
        modes, kinds, dists = (tuple(sorted({k[i] for k in keys})) for i in range(3))
        missing = [k for k in itertools.product(modes, kinds, dists) if k not in keys]
        if missing:
            raise ValueError(f"distances recorded for only part of (instance_stats x embedding x distance): missing {missing}")
        layers = LAYER_SETS if isinstance(base.layers, str) else (*LAYER_SETS, _layers_choice(base.layers))
        return cls(
            modes, kinds, dists, tuple(layers),
            (min(POWER[0], base.power), max(POWER[1], base.power)),
            (min(TEMPERATURE[0], base.temperature), max(TEMPERATURE[1], base.temperature)),
        )

    def suggest(self, trial: optuna.Trial, base: InferenceOptions) -> InferenceOptions:
        """Options for one trial; power only with inverse weighting, temperature only with softmax."""
        weighting = trial.suggest_categorical("weighting", ["inverse", "softmax"])
        opts = replace(
            base,
            instance_stats=trial.suggest_categorical("instance_stats", self.instance_stats),
            embedding=trial.suggest_categorical("embedding", self.embedding),
            distance=trial.suggest_categorical("distance", self.distance),
            layers=_layers_value(trial.suggest_categorical("layers", self.layers)),
            aggregate=trial.suggest_categorical("aggregate", ["mean", "sum"]),
            weighting=weighting,
        )
        if weighting == "inverse":
            return replace(opts, power=trial.suggest_float("power", *self.power, log=True))
        return replace(opts, temperature=trial.suggest_float("temperature", *self.temperature, log=True))


def _inference_params(opts: InferenceOptions) -> dict:
    """Trial parameters equal to ``opts`` (for enqueueing)."""
    p = {k: getattr(opts, k) for k in ("weighting", "instance_stats", "embedding", "distance", "aggregate")}
    p["layers"] = _layers_choice(opts.layers)
    p["power" if opts.weighting == "inverse" else "temperature"] = opts.power if opts.weighting == "inverse" else opts.temperature
    return p


def tune_inference(
    val: BranchOutputs,
    val_domains: torch.Tensor,
    base: InferenceOptions,
    *,
    n_trials: int,
    seed: int,
    storage: str | Path,
    study_name: str,
    timeout: float | None = None,
) -> dict:
    """Search BNE inference options on source validation, each image's own branch left out.

    ``base`` is the first trial; when no trial beats it, it is the result (ties keep ``base``). Returns
    ``best_options`` (an :func:`options_dict`), ``best_value``, ``baseline_value``, ``best_trial`` (the winning trial's
    number; ``None`` if ``base`` won but is not a finished trial, e.g. a timeout hit first), ``n_trials`` (finished
    trials in the study).
    """
    space = InferenceSpace.of(val, base)
    baseline = leave_own_out_accuracy(val, val_domains, base)

    def objective(trial: optuna.Trial) -> float:
        opts = space.suggest(trial, base)
        trial.set_user_attr("options", options_dict(opts))
        return leave_own_out_accuracy(val, val_domains, opts)

    study = _create_study(storage, study_name, seed, n_trials, direction="maximize")
    base_params = _inference_params(base)
    _enqueue_once(study, base_params)
    _optimize(study, objective, n_trials, timeout)
    finished = _finished(study)
    best, best_value = base, baseline
    best_trial = next((t.number for t in finished if t.params == base_params), None)
    if finished and study.best_value > baseline:
        best, best_value, best_trial = options_from_dict(study.best_trial.user_attrs["options"]), study.best_value, study.best_trial.number
    return {
        "study_name": study_name,
        "storage": redact(storage),  # never a password in a record
        "best_options": options_dict(best),
        "best_value": float(best_value),
        "baseline_value": float(baseline),
        "best_trial": best_trial,
        "n_trials": len(_finished(study)),
    }


# -------------------------------------------------------------------------------------- training hyper-params


@dataclass(frozen=True)
class TrainSpace:
    """Ranges of the training search; ``None`` keeps the base configuration's value."""

    lr: tuple[float, float] | None  # log-uniform
    weight_decay: tuple[float, float] | None  # log-uniform
    epochs: tuple[int, int] | None
    augment_strength: tuple[float, float] | None  # multiplies the base augmentation (1: unchanged)

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainSpace:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tune.training.space parameter(s): {sorted(unknown)}")
        values = {k: None if d.get(k) is None else tuple(d[k]) for k in cls.__dataclass_fields__}
        if values["epochs"] is not None:
            values["epochs"] = tuple(int(e) for e in values["epochs"])
        return cls(**values)


def scale_augment(a: AugmentConfig, strength: float) -> AugmentConfig:
    """Colour jitter and grayscale probability times ``strength``; the crop's lower scale moves away from 1 likewise."""
    lo, hi = a.crop_scale
    return replace(
        a,
        crop_scale=(min(hi, max(0.05, 1 - strength * (1 - lo))), hi),
        brightness=a.brightness * strength,
        contrast=a.contrast * strength,
        saturation=a.saturation * strength,
        hue=min(0.5, a.hue * strength),
        grayscale=min(1.0, a.grayscale * strength),
    )


def train_params(cfg: TrainConfig, space: TrainSpace) -> dict:
    """Trial parameters equal to ``cfg`` (augmentation strength 1), for enqueueing the base configuration."""
    base = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "epochs": cfg.epochs, "augment_strength": 1.0}
    return {k: v for k, v in base.items() if getattr(space, k) is not None}


def suggest_train(trial: optuna.Trial, cfg: TrainConfig, space: TrainSpace) -> TrainConfig:
    """``cfg`` with the trial's hyper-parameters."""
    changes: dict = {}
    if space.lr is not None:
        changes["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    if space.weight_decay is not None:
        changes["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    if space.epochs is not None:
        changes["epochs"] = trial.suggest_int("epochs", *space.epochs)
    if space.augment_strength is not None:
        changes["augment"] = scale_augment(cfg.augment, trial.suggest_float("augment_strength", *space.augment_strength))
    return replace(cfg, **changes)


@dataclass
class TrainingObjective:
    """A trial trains BNE on the sources with sampled hyper-parameters; the value is the best source-val accuracy.

    Each epoch's source-validation accuracy is reported to the trial; a pruned trial stops after that epoch.
    """

    spec: ModelSpec
    base: TrainConfig
    resolution: int
    sources: list[DomainArrays]
    work_dir: Path
    device: torch.device
    space: TrainSpace
    keep_checkpoints: bool = False
    log: Callable[[str], None] = print

    @property
    def base_params(self) -> dict:
        return train_params(self.base, self.space)

    def __call__(self, trial: optuna.Trial) -> float:
        tcfg = suggest_train(trial, self.base, self.space)
        trial.set_user_attr("train", asdict(tcfg))
        out = Path(self.work_dir) / trial.study.study_name / f"trial{trial.number:04d}"

        def on_epoch(epoch: int, acc: float) -> None:
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} (source-val accuracy {acc:.4f})")

        try:
            res = train("bne", self.spec, self.sources, tcfg, self.resolution, out, self.device,
                        progress=False, log=self.log, on_epoch=on_epoch)
        finally:
            if not self.keep_checkpoints:
                shutil.rmtree(out, ignore_errors=True)
        return max(h["source_val_acc"] for h in res.history)


def tune_training(
    objective_fn: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    seed: int,
    storage: str | Path,
    study_name: str,
    timeout: float | None = None,
    n_startup_trials: int = 3,
    n_warmup_epochs: int = 1,
    enqueue: Mapping | None = None,
) -> dict:
    """A TPE study with median pruning on per-epoch values; ``enqueue`` (e.g. ``objective.base_params``) runs first.

    Pruning starts once ``n_startup_trials`` trials completed, and never within a trial's first ``n_warmup_epochs``
    epochs (epochs are reported as steps 1, 2, ...).

    Returns ``best_params``, ``best_value``, ``best_trial``, ``best_train`` (the winner's ``TrainConfig`` as a dict,
    when the objective records it), ``n_complete`` and ``n_pruned``. ``best_*`` are ``None`` if no trial completed.
    """
    study = _create_study(
        storage, study_name, seed, n_trials,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_epochs + 1),
        direction="maximize",
    )
    if enqueue:
        _enqueue_once(study, enqueue)
    _optimize(study, objective_fn, n_trials, timeout)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    return {
        "study_name": study_name,
        "storage": redact(storage),  # never a password in a record
        "best_params": best.params if best else None,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_train": best.user_attrs.get("train") if best else None,
        "n_complete": len(complete),
        "n_pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
    }


# ---------------------------------------------------------------------------------------------------- plots


def save_study_plots(study: optuna.Study, out_dir: Path | str) -> dict:
    """Optimization history, parameter importances and (if reported) per-epoch values as PNGs in ``out_dir``.

    Returns ``{"written": [paths], "skipped": {plot: reason}}``; importances need >= 2 completed trials in
    which some parameter takes more than one value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written: list[str] = []
    skipped: dict[str, str] = {}

    def save(name: str, plot: Callable[[], object]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot()
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        atomic_call(out_dir / f"{name}.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(str(out_dir / f"{name}.png"))

    if complete:
        save("optimization_history", lambda: vis.plot_optimization_history(study))
    else:
        skipped["optimization_history"] = "no completed trial"
    varied = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 2 or not varied:
        skipped["param_importances"] = f"needs >= 2 completed trials with varied parameters ({len(complete)} completed)"
    else:
        try:
            save("param_importances", lambda: vis.plot_param_importances(study))
        except (ValueError, RuntimeError) as e:  # the evaluator can still refuse degenerate studies
            plt.close("all")
            skipped["param_importances"] = f"importance evaluation failed: {e}"
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        save("intermediate_values", lambda: vis.plot_intermediate_values(study))
    return {"written": written, "skipped": skipped}


# ------------------------------------------------------------------------------------------ pipeline stage

PARAMS = ("dataset.name", "train.seeds", "eval.options", "tune.storage", "tune.inference")


def _digest(path: Path) -> str:
    return file_sha256(path)[:12]


def run(p, layout, target: str, log: Callable[[str], None] = print) -> dict:
    """The ``tune`` stage of one fold: per seed, a study of the inference options on the ``embed`` outputs.

    Writes ``data/tune/<dataset>/<target>/best.json`` (read by ``evaluate``), the study journal beside it (unless
    ``tune.storage`` is an RDB URL) and the study plots to ``reports/<dataset>/tune/<target>/seed<seed>/``. The study
    name carries a digest of the source-validation outputs, so a retrained model starts a new study.
    """
    paths = layout.fold(target)
    study, storage_url = p.tune.inference, p.tune.storage
    base = p.eval.options.options()
    record: dict = {"target": target, "tuned": bool(study.enabled), "seeds": {str(seed): None for seed in p.train.seeds}}
    if study.enabled:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for seed in p.train.seeds:
            val, domains = load_val(paths, seed)
            name = f"{p.dataset.name}-{target}-seed{seed}-{_digest(paths.embed(seed) / 'val_outputs.npz')}"
            storage = storage_url or paths.tune / f"seed{seed}.journal"
            r = tune_inference(val, domains, base, n_trials=study.n_trials, seed=study.seed,
                               storage=storage, study_name=name, timeout=study.timeout)
            record["seeds"][str(seed)] = {"options": r["best_options"], "value": r["best_value"], "baseline": r["baseline_value"],
                                          "trials": r["n_trials"], "study_name": name}
            save_study_plots(optuna.load_study(study_name=name, storage=open_storage(storage)),
                             layout.reports / "tune" / target / f"seed{seed}")
            log(f"{target} seed {seed}: {r['n_trials']} trials, source score {r['baseline_value']:.4f} -> {r['best_value']:.4f}")
    write_json(paths.tune / "best.json", record)
    return record


def tuned_train_config(spec: ModelSpec, base: TrainConfig, resolution: int, study, storage: str, sources: list[DomainArrays],
                       name: str, work: Path | str, device: torch.device) -> tuple[TrainConfig, dict]:
    """Level (b): a study of the training hyper-parameters on the fold's source domains; the best TrainConfig.

    ``study`` is ``tune.training``; the held-out domain is not among ``sources``. The journal lives in ``work``.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = TrainSpace.from_dict(dict(study.space))
    obj = TrainingObjective(spec, base, resolution, list(sources), Path(work) / "trials", device, space)
    name = f"{name}-train-{config_hash(spec, base, resolution, [a.fingerprint for a in sources])[:12]}"
    r = tune_training(obj, n_trials=study.n_trials, seed=study.seed, storage=storage or Path(work) / "train-study.journal",
                      study_name=name, timeout=study.timeout, enqueue=obj.base_params)
    return _train_config(r["best_train"]), r


def _train_config(d: dict) -> TrainConfig:
    """A TrainConfig from its ``asdict`` (as a trial records it)."""
    d = dict(d)
    aug = dict(d.pop("augment"))
    aug["crop_scale"] = tuple(aug["crop_scale"])
    return TrainConfig(augment=AugmentConfig(**aug), **d)
