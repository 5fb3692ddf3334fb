"""The pipeline's parameters: the only reader of ``params.yaml``, typed and checked before any work.

Every default lives in ``params.yaml``; the models here have no defaults of their own, so a missing key, an
unknown key, a wrong type or an impossible value (negative epochs, batch 0, unknown backbone) stops with the
key and the value named. One override parser (:func:`parse_override`) serves ``--set``, the flow's
``overrides`` and ``bne lodo``.

A stage reads its parameters through :meth:`Params.scoped`, a view limited to the keys the stage declares
(``PARAMS`` in its module, the same list as its ``params:`` in ``dvc.yaml``): reading any other key is an
error, so a stage cannot depend on a parameter DVC does not track. The keys read are recorded (:data:`READS`)
so a test can check that every declared key is used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bne.data import AugmentConfig
from bne.dedup import BITS
from bne.embedding import DISTANCES, LAYER_SETS, WEIGHTINGS, InferenceOptions
from bne.io import atomic_path
from bne.model import BACKBONES, NORMS, ModelSpec
from bne.train import EMA_REFUSED_NORMS, TrainConfig
from tasks.paths import resolve  # noqa: F401  (the one path resolver; re-exported)

PARAMS_FILE = "params.yaml"
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class ParamsError(ValueError):
    """A parameters file or override that cannot be used; the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---------------------------------------------------------------------------------------------- sections


class Dataset(Section):
    name: Name
    root: str = Field(min_length=1)
    splits: str  # "": a seeded stratified split
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    domains: list[Name] = Field(min_length=2)
    classes: list[str]  # []: whatever the data holds; else validation requires exactly these
    folds: list[Name] = Field(min_length=1)
    max_pixels: Annotated[int, Field(ge=1)]  # the decode rules' limit (width x height), from the image header

    @model_validator(mode="after")
    def _folds_are_domains(self) -> Dataset:
        for key in ("domains", "folds", "classes"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"dataset.{key} has duplicates: {values}")
        unknown = [f for f in self.folds if f not in self.domains]
        if unknown:
            raise ValueError(f"dataset.folds {unknown} are not in dataset.domains {self.domains}")
        return self


class Model(Section):
    backbone: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str = Field(min_length=1)  # pretrained | none | path to a local file
    bn_momentum: Annotated[float, Field(gt=0.0, le=1.0)]
    domain_affine: bool
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    drop_connect: Annotated[float, Field(ge=0.0, lt=1.0)]
    norm: Literal[NORMS]  # type: ignore[valid-type]
    domain_layers: Literal["all"] | Annotated[int, Field(ge=1)]  # "all" | k: the first k stages domain-specific
    norm_groups: Annotated[int, Field(ge=1)]
    cbn_window: Annotated[int, Field(ge=1)]
    cbn_burnin: Annotated[int, Field(ge=0)]
    mbn_window: Annotated[int, Field(ge=1)]
    proxy_eps: Positive
    simplex_concentration: Positive
    simplex_leave_out: Unit

    def spec(self, num_classes: int, domains: Iterable[str] = ()) -> ModelSpec:
        """The network's spec for ``num_classes`` classes; ``domains`` empty: an ordinary (DeepAll) network."""
        return ModelSpec(num_classes=num_classes, domains=tuple(domains), **self.model_dump())


class Augment(Section):
    crop_scale: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(min_length=2, max_length=2)
    hflip: Unit
    brightness: NonNegative
    contrast: NonNegative
    saturation: NonNegative
    hue: Annotated[float, Field(ge=0.0, le=0.5)]
    grayscale: Unit

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v: list[float]) -> list[float]:
        if v[0] > v[1]:
            raise ValueError(f"crop_scale must be [low, high] with low <= high, got {v}")
        return v

    def config(self) -> AugmentConfig:
        d = self.model_dump()
        return AugmentConfig(**{**d, "crop_scale": tuple(d["crop_scale"])})


class Train(Section):
    resolution: Annotated[int, Field(ge=16, le=1024)]
    epochs: Annotated[int, Field(ge=1)]
    per_domain_batch: Annotated[int, Field(ge=1)]
    lr: Positive
    head_lr_mult: Positive
    weight_decay: NonNegative
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    warmup_frac: Unit
    freeze_stages: Annotated[int, Field(ge=0)]
    select: Literal["best", "last"]
    eval_batch: Annotated[int, Field(ge=1)]
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
    ensemble_loss: NonNegative
    ensemble_own_out: bool
    ema: Annotated[float, Field(ge=0.0, lt=1.0)]  # 0 = off; else the decay per step, in (0, 1)
    ema_bn_batches: Annotated[int, Field(ge=1)]
    augment: Augment

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds has duplicates: {v}")
        return v

    def config(self, seed: int) -> TrainConfig:
        """The optimisation recipe of one seed (identical for DeepAll and BNE)."""
        d = self.model_dump(exclude={"resolution", "seeds", "device", "augment"})
        return TrainConfig(seed=seed, augment=self.augment.config(), **d)


class Options(Section):
    embedding: Literal["running", "population", "instance_average"]
    distance: Literal[DISTANCES]  # type: ignore[valid-type]
    layers: Literal[LAYER_SETS] | list[Annotated[int, Field(ge=0)]]  # type: ignore[valid-type]
    aggregate: Literal["mean", "sum"]
    weighting: Literal[WEIGHTINGS]  # type: ignore[valid-type]
    power: Positive
    temperature: Positive
    instance_stats: Literal["per_branch", "single_pass"]

    def options(self) -> InferenceOptions:
        d = self.model_dump()
        return InferenceOptions(**{**d, "layers": d["layers"] if isinstance(d["layers"], str) else tuple(d["layers"])})


class Eval(Section):
    batch: Annotated[int, Field(ge=1)]
    single_pass: bool
    branch_chunk: Literal["auto"] | Annotated[int, Field(ge=0)]
    branch_stats: Literal["running", "precise"]
    options: Options


class Validation(Section):
    min_per_class: Annotated[int, Field(ge=1)]
    min_size: Annotated[int, Field(ge=1)]
    near_duplicate_bits: Annotated[int, Field(ge=0, le=BITS)]  # of the 256-bit perceptual hash


class Study(Section):
    enabled: bool
    n_trials: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0)]
    timeout: Positive | None  # seconds per fold; null: no limit


class TrainingStudy(Study):
    space: dict[Literal["lr", "weight_decay", "epochs", "augment_strength"], list[float] | None]


class Tune(Section):
    storage: str  # "": a journal file per fold; an RDB URL (postgresql://...) shared by several machines
    inference: Study
    training: TrainingStudy


class Extend(Section):
    domains: list[Name]


class Schedule(Section):
    retrain_cron: str = Field(pattern=r"^\S+( \S+){4}$")
    timezone: str = Field(min_length=1)


class Fanout(Section):
    """How ``dg-pipeline`` runs the folds; read by the flows only (no stage), so it never changes an output."""

    mode: Literal["local", "pool"]
    pool: Name
    deployment: Name
    retries: Annotated[int, Field(ge=0)]
    poll: Positive
    heartbeat: Annotated[int, Field(ge=30)]
    lost_after: Annotated[int, Field(gt=0)]

    @model_validator(mode="after")
    def _lost_after_heartbeats(self):
        if self.lost_after <= self.heartbeat:
            raise ValueError(f"fanout.lost_after = {self.lost_after} must exceed fanout.heartbeat = {self.heartbeat} "
                             "(else a healthy run is taken for lost between two heartbeats)")
        return self


class Params(Section):
    """``params.yaml``, parsed and checked. ``base``: the folder relative dataset paths start from."""

    dataset: Dataset
    model: Model
    train: Train
    eval: Eval
    validation: Validation
    tune: Tune
    extend: Extend
    schedule: Schedule
    fanout: Fanout

    @model_validator(mode="after")
    def _ema_norm(self) -> Params:
        if self.train.ema and self.model.norm in EMA_REFUSED_NORMS:
            raise ValueError(f"train.ema = {self.train.ema} with model.norm = {self.model.norm!r}: "
                             f"{EMA_REFUSED_NORMS[self.model.norm]}; use train.ema: 0 or another norm")
        return self

    def scoped(self, keys: Iterable[str], stage: str = "") -> Scoped:
        """A read-only view that allows only ``keys`` (dotted; a section allows everything under it)."""
        return Scoped(self, "", tuple(keys), stage)


# ------------------------------------------------------------------------------------- loading, overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``dotted.key=value`` -> (key path, value parsed as YAML); the one parser of every override."""
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ParamsError(f"override {item!r} is not dotted.key=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ParamsError(f"override {item!r}: the value is not valid YAML ({e})") from e
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Set each ``dotted.key=value`` in the nested dict ``raw`` (in place); the key must exist already."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, k in enumerate(path):
            if not isinstance(node, dict) or k not in node:
                raise ParamsError(f"override {item!r}: no parameter {'.'.join(path[: i + 1])!r}")
            if i == len(path) - 1:
                node[k] = value
            else:
                node = node[k]
    return raw


def _describe(e: ValidationError, source: str) -> str:
    """One ``key = value: problem`` per error; pydantic's type tags (``list[int]``...) dropped from the key."""
    lines = []
    for err in e.errors():
        parts = [str(p) for p in err["loc"] if isinstance(p, int) or re.fullmatch(r"[A-Za-z_]\w*", str(p))]
        key, value, kind = ".".join(parts), err.get("input"), err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "missing":
            lines.append(f"{key}: missing")
        elif kind == "extra_forbidden":
            lines.append(f"{key}: unknown parameter (a section)" if isinstance(value, dict) else f"{key} = {value!r}: unknown parameter")
        elif isinstance(value, dict):  # a check across keys: its message names them
            lines.append(msg)
        else:
            lines.append(f"{key} = {value!r}: {msg}")
    return f"{source}: " + "; ".join(dict.fromkeys(lines))


def from_dict(raw: dict, source: str = PARAMS_FILE) -> Params:
    """Check a parameters dict; a :class:`ParamsError` names every bad key and value."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_describe(e, source)) from None


def read_raw(path: Path | str = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no parameters file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load(path: Path | str = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """``params.yaml`` (``yaml.safe_load``) with ``overrides`` applied, checked before any work."""
    return from_dict(apply_overrides(read_raw(path), list(overrides)), str(path))


def write_overrides(path: Path | str, overrides: Iterable[str]) -> None:
    """Apply ``overrides`` to the file itself, comments kept (as ``dvc exp run -S``); checked first, written atomically."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    path = Path(path)
    overrides = list(overrides)
    load(path, overrides)  # every key exists, every value is valid
    rt = YAML()
    rt.preserve_quotes = True  # untouched lines keep their quotes ("" stays "")
    doc = rt.load(path.read_text())
    for item in overrides:
        keys, value = parse_override(item)
        node = doc
        for k in keys[:-1]:
            node = node[k]
        if isinstance(value, list):  # [a, b] as written, not a block list under the key
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        node[keys[-1]] = value
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        rt.dump(doc, f)


# ------------------------------------------------------------------------------------------ scoped reads

#: Every key read through a scoped view in this process: (stage, key). Tests compare it with the declarations.
READS: set[tuple[str, str]] = set()


def _leaves(node: Any, prefix: str) -> list[str]:
    if isinstance(node, BaseModel):
        return [k for name in type(node).model_fields for k in _leaves(getattr(node, name), f"{prefix}.{name}")]
    return [prefix]


@dataclass(frozen=True)
class Scoped:
    """A view of a section that refuses keys its stage does not declare, and records those it reads."""

    _node: BaseModel
    _path: str
    _keys: tuple[str, ...]
    _stage: str

    def _allowed(self, key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in self._keys)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._path}.{name}" if self._path else name
        fields = type(self._node).model_fields
        if name not in fields:  # a method of the section (spec(), config(), options()): it reads all of it
            if not self._allowed(self._path):
                raise ParamsError(f"stage {self._stage or '?'} uses all of {self._path!r} but declares only {list(self._keys)}")
            READS.update((self._stage, k) for k in _leaves(self._node, self._path))
            return getattr(self._node, name)
        value = getattr(self._node, name)
        if isinstance(value, BaseModel):
            if not (self._allowed(key) or any(k.startswith(key + ".") for k in self._keys)):
                raise ParamsError(f"stage {self._stage or '?'} reads {key!r} but does not declare it (declared: {list(self._keys)})")
            return Scoped(value, key, self._keys, self._stage)
        if not self._allowed(key):
            raise ParamsError(f"stage {self._stage or '?'} reads {key!r} but does not declare it (declared: {list(self._keys)})")
        READS.add((self._stage, key))
        return value
