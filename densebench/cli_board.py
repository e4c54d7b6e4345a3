"""CLI commands for leaderboards and reports: ``submit``, ``leaderboard show|compare`` and ``report``.

``register(app)`` adds them to the main typer app (densebench/cli.py). User errors are raised as
DenseBenchError subclasses; the app's ``main()`` prints them and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import leaderboard as lb
from .errors import ConfigError, choices_message
from .results import atomic_write_text, check_writable_folder


def _split(values: list[str] | None) -> list[str] | None:
    """Repeatable, comma-separated option values -> flat list (None when not given)."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _console(stderr: bool = False) -> Console:
    """A console that prints user text (paths, model names) as written: no :emoji: codes, no highlighting."""
    return Console(stderr=stderr, emoji=False, highlight=False)


def _emit(text: str, output: Path | None, console: Console) -> None:
    if output is None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end="")
        return
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder", hint="name the file to write, e.g. board.html")
    check_writable_folder(output.parent, what="--output folder", hint="choose an --output on a writable disk")
    atomic_write_text(output, text)
    _console(stderr=True).print(f"wrote [bold]{escape(str(output))}[/]")


def submit(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files written by `densebench run`.")],
    leaderboard: Annotated[Path, typer.Option("--leaderboard", "-l", help="Leaderboard JSON to add them to "
                                              "(created if missing), e.g. leaderboards/dense-ssl.json.")],
    allow_nonstandard: Annotated[bool, typer.Option("--allow-nonstandard", help="Accept results whose config "
                                                    "differs from the benchmark's canonical one (or synthetic "
                                                    "data); they are shown as non-standard.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an entry with the same weights "
                                          "fingerprint, benchmark and config.")] = False,
) -> None:
    """Validate results (schema, integrity hash, canonical config) and add them to a leaderboard atomically."""
    done = lb.submit(results, leaderboard, allow_nonstandard=allow_nonstandard, replace=replace)
    console = _console()
    for s in done:
        e = s.entry
        reasons = escape("; ".join(e["nonstandard_reasons"]))
        mark = "" if e["standard"] else f" [yellow]non-standard: {reasons}[/]"
        metrics = ", ".join(f"{k}={v:.2f}" for k, v in e["metrics"].items()
                            if k in (lb.headline_metrics(e["benchmark"]) or e["metrics"]))
        console.print(escape(f"{s.action} {e['model']['name']} on {e['benchmark']} ({metrics}) from "
                             f"{s.result_path}") + mark)
    n = len(lb.load_leaderboard(leaderboard)["entries"])
    console.print(f"[bold]{escape(str(leaderboard))}[/] now holds {n} entries")


_PROTOCOL_HELP = ("Protocol versions as columns: auto = one per benchmark (its default version when present, else the "
                  "one with the most entries; the others are named under the table), all = a column per version, or "
                  "version names (e.g. hbird-1.1,hbird-unknown; auto for the other benchmarks).")
_METRICS_HELP = "main = each benchmark's main metric; all = every headline metric (e.g. overclustering K=gt, 300, 500)."
_SORT_HELP = ("Sort rows by mean, rank, model, arch, or a benchmark (name, column label or code); numbers best first "
              "(rank lowest first), blanks last.")


def show(
    file: Annotated[Path | None, typer.Argument(help="Leaderboard JSON (default: the shipped "
                                                "dense-ssl.json).")] = None,
    benchmark: Annotated[list[str] | None, typer.Option("--benchmark", "-b", help="Only these benchmarks or groups "
                                                        "(all, linear, voc, ...; repeat or comma-separate).")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Only measured or only published "
                                               "entries.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", metavar="auto|all|NAMES", help=_PROTOCOL_HELP)] = "auto",
    metrics: Annotated[str, typer.Option("--metrics", metavar="main|all", help=_METRICS_HELP)] = "main",
    sort: Annotated[str, typer.Option("--sort", "-s", metavar="COLUMN", help=_SORT_HELP)] = "mean",
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, markdown, csv, json, plain or html "
                                     "(a self-contained page, sortable by any column).")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of "
                                                "stdout.")] = None,
) -> None:
    """One row per model, one column per benchmark: standard entries merged across runs and sources, each kind of
    non-standard entry (another config, synthetic data, a published variant) its own row marked †. Mean and rank
    use the main metric of the benchmarks shown and only models that have all of them (MTEB's rule; others are
    blank and sort last); rank = the mean of the model's per-benchmark ranks among those standard models (1 =
    best). Non-standard cells are never best. At any width the terminal table keeps names and numbers whole: short
    column codes (legend below), column blocks that repeat the model column. Details: docs/leaderboard.md."""
    if fmt not in lb.FORMATS:
        raise ConfigError(choices_message("format", fmt, lb.FORMATS))
    if fmt == "table" and output is not None:
        raise ConfigError("--output needs --format markdown, csv, json, plain or html", hint="or redirect the table")
    doc = lb.load_leaderboard(file or lb.default_leaderboard())
    console = _console()
    rendered = lb.render(doc, fmt, benchmarks=_split(benchmark), source=source, protocols=protocol,
                         metrics=metrics, sort=sort, width=console.width)
    if fmt == "table":
        rendered.print(console)
    else:
        _emit(rendered, output, console)



def compare(
    model_a: Annotated[str, typer.Argument(help="Model name or weights fingerprint (prefix): the baseline, A.")],
    model_b: Annotated[str, typer.Argument(help="Model name or weights fingerprint (prefix): e.g. after "
                                           "neco_train, B.")],
    leaderboard: Annotated[Path | None, typer.Option("--leaderboard", "-l", help="Leaderboard JSON "
                                                     "(default: the shipped dense-ssl.json).")] = None,
    sort: Annotated[str | None, typer.Option("--sort", "-s", metavar="COLUMN", help="Sort rows by benchmark "
                                             "(default), metric, a, b or delta (numbers largest first, blanks "
                                             "last).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, markdown, csv, json, plain or "
                                     "html.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of "
                                                "stdout.")] = None,
) -> None:
    """Per-benchmark deltas B - A, pairing entries measured the same way when the board has them."""
    if fmt == "table" and output is not None:
        raise ConfigError("--output needs --format markdown, csv, json, plain or html", hint="or redirect the table")
    doc = lb.load_leaderboard(leaderboard or lb.default_leaderboard())
    rows = lb.compare_models(doc, model_a, model_b)
    console = _console()
    rendered = lb.render_comparison(rows, model_a, model_b, fmt, sort=sort, width=console.width)
    if fmt == "table":
        rendered.print(console)
    else:
        _emit(rendered, output, console)


def report(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files written by `densebench run`, or "
                                                       "folders of them (summary.json is skipped).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html and the PNG plots.")],
    leaderboard: Annotated[Path | None, typer.Option("--leaderboard", help="Leaderboard JSON whose published "
                                                     "rows the model cards are compared with (default: the "
                                                     "shipped dense-ssl.json).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a report already in --out.")] = False,
) -> None:
    """An HTML report: a model card per encoder beside published rows of its family, plots, saved pictures."""
    from .report import write_report

    summary = write_report(results, out, leaderboard=leaderboard, overwrite=overwrite)
    console = _console()
    console.print(f"report written to [bold]{escape(str(summary.index))}[/] ({len(summary.plots)} plots, "
                  f"{summary.n_artifacts} saved pictures)")
    for problem in summary.warnings:
        console.print(f"[yellow]warning:[/] {escape(problem)}")


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``leaderboard show|compare`` and ``report`` to the densebench app."""
    app.command("submit")(submit)
    board = typer.Typer(help="Show leaderboards and compare models.", no_args_is_help=True)
    board.command("show")(show)
    board.command("compare")(compare)
    app.add_typer(board, name="leaderboard")
    app.command("report")(report)
