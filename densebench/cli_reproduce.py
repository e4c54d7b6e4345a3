"""``densebench reproduce RESULT.json``: re-measure a result here and compare every metric (exit 0 / 1).

``register(app)`` adds the command to the main typer app (densebench/cli.py). Errors that stop the
re-run (unreadable result, other weights, missing data) are DenseBenchErrors: exit 2 from ``main()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .reproduce import DEFAULT_TOLERANCE, Reproduction


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def reproduction_table(rep: Reproduction) -> Table:
    """Headline metrics always; nested (per-class, per-category) values only where they differ."""
    r = rep.recorded
    table = Table(title=escape(f"{r.model_name} on {r.benchmark}: recorded vs measured here "
                               f"(tolerance ±{rep.tolerance:g} points)"))
    for col in ("metric", "recorded", "measured", "delta", "within"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for c in rep.checks:
        ok = c.within(rep.tolerance)
        if c.nested and ok:
            continue
        delta = "" if c.delta is None else f"{c.delta:+.2f}"
        table.add_row(escape(c.name), _value(c.recorded), _value(c.measured), delta,
                      "[green]yes[/]" if ok else "[bold red]NO[/]")
    return table


def reproduce(
    result: Annotated[Path, typer.Argument(help="A result JSON written by `densebench run` (e.g. a submitted one).")],
    data_root: Annotated[str | None, typer.Option("--data-root", help="The benchmark's data here (default "
                                                  "$DENSEBENCH_DATA).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest accepted |measured - recorded| per "
                                             "metric, in metric points (metrics are %).")] = DEFAULT_TOLERANCE,
    weights: Annotated[str | None, typer.Option("--weights", help="The weights file the result was made with, "
                                                "when its recorded path is not on this machine.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="Feature cache (default $DENSEBENCH_CACHE "
                                                  "or the user cache dir).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Extract every feature afresh.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Re-run the recorded model, benchmark and config on this machine and compare every metric.

    Exit 0: every metric within the tolerance (reproduced); exit 1: not reproduced; exit 2: could not re-run.
    """
    from .reproduce import reproduce as run_reproduction

    rep = run_reproduction(result, data_root=data_root, tolerance=tolerance, weights=weights, device=device,
                           cache_dir=cache_dir, use_cache=not no_cache, progress=not quiet)
    console = Console(emoji=False, highlight=False)
    console.print(reproduction_table(rep))
    nested = [c for c in rep.checks if c.nested]
    if nested:
        bad = sum(not c.within(rep.tolerance) for c in nested)
        console.print(f"{len(nested)} per-class / per-category values compared, {bad} outside the tolerance")
    for note in rep.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for diff in rep.config_differences:
        console.print(f"[red]config differs:[/] {escape(diff)}")
    if rep.reproduced:
        console.print(f"[bold green]reproduced[/]: all {len(rep.checks)} metrics of {escape(str(result))} within "
                      f"±{rep.tolerance:g} points")
        return
    why = [f"{len(rep.failed)} metric(s) outside ±{rep.tolerance:g} points"] if rep.failed else []
    why += ["the config ran differs from the recorded one"] if rep.config_differences else []
    console.print(f"[bold red]not reproduced[/]: {escape(str(result))}: {'; '.join(why)}")
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``reproduce`` to the densebench app."""
    app.command("reproduce")(reproduce)
