"""``densebench selfcheck``: every CUDA path (and the CPU ones) checked in one command, one JSON report.

``register(app)`` adds the command to the main typer app (densebench/cli.py); the checks live in
densebench/selfcheck.py (``bench/gpu_check.py`` runs the same command). Exit 0 when no check failed, 1 when
one did, 2 (from ``main()``) when it cannot start (a report that exists, no CUDA for ``--device cuda``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


def report_table(report: dict) -> Table:
    """One row per check: status, the figure that matters (the reason for a FAIL or SKIP), seconds."""
    mode = "quick" if report["quick"] else "full"
    table = Table(title=escape(f"densebench selfcheck on {report['device']} ({mode}): {report['counts']['PASS']} "
                               f"passed, {report['counts']['FAIL']} failed, {report['counts']['SKIP']} skipped "
                               f"in {report['seconds']:.0f} s"))
    for col in ("check", "status", "result", "s"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for c in report["checks"]:
        table.add_row(escape(c["name"]), f"[{STYLE[c['status']]}]{c['status']}[/]", _result_text(c),
                      f"{c['seconds']:.1f}")
    return table


def _result_text(c: dict) -> str:
    if c["status"] == "PASS":
        return escape(c["figure"])
    return escape("; ".join(filter(None, [c["reason"], c["figure"]])))


def selfcheck(
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when visible), cpu, cuda or cuda:N.")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A subset in seconds (one benchmark per protocol on the "
                                        "tiny synthetic suite, smaller retrieval / k-means / training runs).")
                     ] = False,
    out: Annotated[Path | None, typer.Option("--out", metavar="FILE", help="The JSON report (default "
                                             "./densebench-selfcheck-<timestamp>.json; never replaced).")] = None,
    keep: Annotated[Path | None, typer.Option("--keep", help="Keep the working files (results, caches, training "
                                              "runs) in this new folder.")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only these groups (repeatable): "
                                                   "benchmarks, retrieval, kmeans, neco_train, distributed; the "
                                                   "environment always runs.")] = None,
) -> None:
    """Exercise every CUDA path and write one JSON report: the one command to run whenever a GPU is at hand.

    Each benchmark on the synthetic suite on the device and on the CPU (metric difference), every retrieval
    backend against a float64 brute force, GPU k-means, neco_train (bf16, checkpoint, resume, --compile,
    images/s), and a 2-process torchrun against 1 process. Exit 0: nothing failed; 1: a check failed.
    """
    from .selfcheck import run_selfcheck

    console = Console(emoji=False, highlight=False, stderr=True)

    def progress(check) -> None:
        console.print(f"[{STYLE[check.status]}]{check.status}[/] {escape(check.name)} ({check.seconds:.1f} s)")

    report = run_selfcheck(device=device, quick=quick, out=out, keep=keep, only=only, on_check=progress)
    result = Console(emoji=False, highlight=False)
    result.print(report_table(report))
    if not report["within_budget"]:
        result.print(f"[yellow]note:[/] took {report['seconds']:.0f} s, over the {report['budget_s']:.0f} s budget")
    result.print(f"report written to [bold]{escape(report['path'])}[/]")
    if not report["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("selfcheck")(selfcheck)
