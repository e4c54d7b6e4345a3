"""Progress on stderr: rich bars on a terminal, plain timed lines in logs (SLURM, ``| tee``, CI).

Every bar says what it belongs to: :func:`job` sets a label (model, benchmark, "job 3/22") that prefixes
the stage name of every bar opened inside it. When stderr is not a terminal, a bar prints one line every
``DENSEBENCH_PROGRESS_SECONDS`` seconds (default 10) with the count, rate and ETA, and one line when the
stage ends, instead of redrawing a bar nobody sees.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
_labels: list[str] = []


@contextlib.contextmanager
def job(label: str) -> Iterator[None]:
    """Prefix every progress bar opened inside with ``label`` (e.g. ``pixels · voc-linear · job 3/22``)."""
    _labels.append(label)
    try:
        yield
    finally:
        _labels.pop()


def _described(desc: str) -> str:
    return " · ".join([*_labels, desc])


def _interval() -> float:
    try:
        return max(0.5, float(os.environ.get("DENSEBENCH_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class _LogLines:
    """The non-terminal progress: a line every few seconds and one at the end."""

    def __init__(self, desc: str, total: int | None):
        self.desc, self.total, self.done = desc, total, 0
        self.start = self.last = time.monotonic()
        self.every = _interval()

    def line(self, final: bool = False) -> str:
        elapsed = max(1e-9, time.monotonic() - self.start)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        text = f"{self.desc}: {count}"
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f}%)"
        text += f", {rate:.1f}/s, elapsed {_clock(elapsed)}"
        if not final and self.total and rate > 0:
            text += f", ETA {_clock((self.total - self.done) / rate)}"
        return text + (" - done" if final else "")

    def advance(self, n: int = 1, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            console.print(self.line(), markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1, total=None)`` (``total`` re-sizes the bar); draws on stderr when enabled."""
    if not enabled:
        yield lambda n=1, total=None: None
        return
    desc = _described(desc)
    if not console.is_terminal:
        lines = _LogLines(desc, total)
        yield lines.advance
        console.print(lines.line(final=True), markup=False, highlight=False, soft_wrap=True)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(escape(desc), total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        yield advance
