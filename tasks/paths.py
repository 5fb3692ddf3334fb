"""Where every stage reads and writes, under the project folder: one place for the pipeline's file layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FoldPaths:
    """The outputs of one held-out fold's stages under ``data`` (``data/`` in the pipeline)."""

    data: Path
    dataset: str
    target: str

    def train(self, seed: int | None = None, method: str | None = None) -> Path:
        d = self.data / "train" / self.dataset / self.target
        d = d if seed is None else d / f"seed{seed}"
        return d if method is None else d / method

    @property
    def stats(self) -> Path:
        return self.data / "stats" / self.dataset / f"{self.target}.parquet"

    def embed(self, seed: int | None = None) -> Path:
        d = self.data / "embed" / self.dataset / self.target
        return d if seed is None else d / f"seed{seed}"

    @property
    def tune(self) -> Path:
        return self.data / "tune" / self.dataset / self.target

    def eval(self, seed: int | None = None) -> Path:
        d = self.data / "eval" / self.dataset / self.target
        return d if seed is None else d / f"seed{seed}"


@dataclass(frozen=True)
class Layout:
    """The project's folders for ``dataset``: ``root/data/...`` (DVC outputs) and ``root/reports/<dataset>``."""

    root: Path
    dataset: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ingest(self) -> Path:
        return self.data / "ingest" / self.dataset

    @property
    def manifest(self) -> Path:
        """The validated manifest: the only one the stages after validation read."""
        return self.data / "validated" / self.dataset / "manifest.parquet"

    def cache(self, resolution: int) -> Path:
        return self.data / "cache" / self.dataset / str(resolution)

    def fold(self, target: str) -> FoldPaths:
        return FoldPaths(self.data, self.dataset, target)

    @property
    def final(self) -> Path:
        return self.data / "final" / self.dataset

    @property
    def extend(self) -> Path:
        return self.data / "extend" / self.dataset

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.dataset


def resolve(base: Path | str, value: str) -> Path | None:
    """A path parameter relative to ``base`` (the parameters file's folder); ``""``: None. The one resolver.

    Not made absolute: artifacts that record the path (the manifest's source) stay the same on every machine.
    """
    if value in ("", None):
        return None
    p = Path(value)
    return p if p.is_absolute() else Path(base) / p
