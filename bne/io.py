"""Atomic file writes (a temporary file beside the target, then ``os.replace``), checked reads, file hashes.

A reader never sees a torn file: a killed writer leaves the previous version (or nothing) in place. A file torn
anyway (a disk full, a copy cut short, an edit) is, for every reader of JSON, ``.npy`` and Parquet artifacts
(:func:`read_json`, :func:`load_npy`, :func:`read_parquet`), one line naming the file and the stage to rerun.
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


def one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of the message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def torn(path: Path | str, what: str, stage: str, e: BaseException) -> ValueError:
    """The one error of a file that exists but does not read back: names it, the reason and the stage to rerun."""
    return ValueError(f"{path}: {what} is torn or not a complete file ({one_line(e)}); rerun the {stage} stage")


def _exists(path: Path, what: str, stage: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}; run the {stage} stage first")


def read_json(path: Path | str, what: str, stage: str) -> dict:
    """A JSON object the ``stage`` stage wrote; a missing, torn or non-object one is one line naming the file and stage."""
    path = Path(path)
    _exists(path, what, stage)
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError; UnicodeDecodeError when cut inside a character
        raise torn(path, what, stage, e) from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: {what} is a JSON {type(out).__name__}, not an object; rerun the {stage} stage")
    return out


def load_npy(path: Path | str, what: str, stage: str, mmap_mode: str | None = None):
    """An ``.npy`` array the ``stage`` stage wrote (no pickles); a missing or torn one is one line naming it and the stage."""
    import numpy as np

    path = Path(path)
    _exists(path, what, stage)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, EOFError, OSError, UnpicklingError...
        raise torn(path, what, stage, e) from None


def read_parquet(path, what: str, stage: str, columns: list[str] | None = None):
    """A Parquet table the ``stage`` stage wrote (a path or a buffer); a torn one is one line naming it and the stage."""
    import pyarrow.parquet as pq

    if isinstance(path, (str, Path)):
        _exists(Path(path), what, stage)
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError...) do not name the file
        raise torn(path, what, stage, e) from None


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
