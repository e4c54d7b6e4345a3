"""Rich progress bars that stay quiet when disabled or when output is not a terminal-friendly stream."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1, total=None)`` (``total`` re-sizes the bar); draws on stderr when enabled."""
    if not enabled:
        yield lambda n=1, total=None: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(desc, total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, n)

        yield advance
