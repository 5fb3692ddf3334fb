"""Atomic file writes (a temporary file beside the target, then ``os.replace``) and file hashes.

A reader never sees a torn file: a killed writer leaves the previous version (or nothing) in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_call(path: Path | str, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the file (``np.save``, ``fig.savefig``, ``pq.write_table``...); then it replaces ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path | str, obj: object) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def read_json(path: Path | str, what: str) -> dict:
    """A JSON file another stage wrote; a missing or torn one is a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}; run the earlier stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); rerun the stage that writes it") from None


def atomic_torch_save(obj: object, path: Path | str) -> None:
    import torch

    atomic_call(path, lambda tmp: torch.save(obj, tmp))


def write_parquet(table, path: Path | str) -> None:
    import pyarrow.parquet as pq

    atomic_call(path, lambda tmp: pq.write_table(table, tmp))


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_npy(path: Path | str, array) -> None:
    """``np.save`` atomically (to a file object, so numpy adds no suffix)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_call(path, write)
