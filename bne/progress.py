"""Progress of long loops: a tqdm bar on a terminal, else a log line at least every 30 s (readable under DVC)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
#: Seconds between two log lines when the output is not a terminal.
LOG_EVERY = 30.0


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", items_per_step: int = 1,
             enabled: bool = True, every: float | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while reporting steps done, ``unit``/s (``items_per_step`` per step) and the ETA.

    On a terminal: a tqdm bar. Otherwise (a log, ``dvc repro`` piped): one line on stderr at the start,
    then at least every ``every`` seconds (default :data:`LOG_EVERY`), and one at the end.
    """
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=items_per_step, leave=False)
        return
    every = LOG_EVERY if every is None else every
    start = last = time.monotonic()
    done = 0

    def line(final: bool = False) -> None:
        elapsed = max(time.monotonic() - start, 1e-9)
        rate = done * items_per_step / elapsed
        parts = [f"{desc}: {done}/{total if total is not None else '?'}", f"{rate:.1f} {unit}/s", f"elapsed {_duration(elapsed)}"]
        if not final and total and done:
            parts.append(f"ETA {_duration(elapsed / done * (total - done))}")
        if done == 0:
            parts = [f"{desc}: 0/{total if total is not None else '?'} {unit}, started"]
        print(", ".join(parts) + (" (done)" if final else ""), file=sys.stderr, flush=True)

    line()
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            last = now
            line()
    line(final=True)
