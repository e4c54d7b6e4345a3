"""Help screens as users read them in an 80-column terminal: conventional metavars (``--seed N``, ``--out DIR``),
never a Python type (``<int>``, ``<bool>``, ``<list[Path]>``, ``<class 'int'>``), a help text for every option;
``neco_train --help`` shows every option's help and its default.

The expected metavars below are written out by hand (what click / argparse users expect), not computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from densebench import cli_help
from densebench.cli import app
from neco_train.cli import build_parser
from neco_train.trainer import TrainConfig

PYTHON_TYPE = re.compile(r"<(str|int|float|bool|path|file|dir|list|tuple|dict|class|datetime|uuid)\b", re.I)
runner = CliRunner()


def _walk(command: typer.core.TyperGroup | typer.core.TyperCommand, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, (*path, name))


ALL_COMMANDS = [path for path, _ in _walk(typer.main.get_command(app))]


def _help(args: list[str], target=app) -> str:
    result = runner.invoke(target, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _row_cells(text: str, option: str) -> list[str]:
    """The cells of the help-table row that starts with ``option``: names, metavar (if any), help."""
    for line in text.splitlines():
        inner = line.strip().strip("│").strip()
        cells = [c for c in re.split(r"\s{2,}", inner.lstrip("* ")) if c]
        if cells and cells[0] == option:
            return cells
    raise AssertionError(f"no help row for {option!r} in:\n{text}")


def test_the_walk_finds_every_command():
    # a hand-written list of what users run: if the walk missed groups, the checks below would check little
    expected = {("run",), ("list", "models"), ("list", "benchmarks"), ("data", "verify"), ("data", "prepare"),
                ("synth",), ("submit",), ("leaderboard", "show"), ("leaderboard", "compare"), ("report",),
                ("reproduce",), ("selfcheck",), ("cache", "ls"), ("cache", "du"), ("cache", "verify"),
                ("cache", "prune"), ("cache", "path")}
    assert expected <= set(ALL_COMMANDS)


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "densebench")
def test_help_has_no_python_types_and_every_option_a_help_text(path):
    text = _help(list(path))
    assert not PYTHON_TYPE.search(text), PYTHON_TYPE.search(text).group(0)
    assert max(len(line) for line in text.splitlines()) <= 80
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="densebench")
    for name in path:
        command = command.commands[name]
        ctx = typer.Context(command, info_name=name, parent=ctx)
    params = [p for p in command.get_params(ctx) if not p.hidden]
    assert any(p.opts == ["--help"] for p in params)
    for param in params:
        assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help text"
        row = param.opts[0] if param.param_type_name == "option" else param.name
        assert row in text


# by hand: what the help must show after each option (None: a flag, nothing)
EXPECTED_METAVARS = {
    ("run",): {"--model": "MODEL", "--weights": "FILE", "--benchmark": "NAMES", "--data-root": "DIR",
               "--input-size": "PIXELS", "--seed": "N", "--batch-size": "N", "--output": "PATH", "--cache-dir": "DIR",
               "--device": "DEVICE", "--overwrite": None, "--no-cache": None, "--quiet": None, "--help": None},
    ("cache", "prune"): {"--older-than": "DAYS", "--model": "SUBSTR", "--max-size": "GB",  # explicit metavars stay
                         "--all": None, "--dry-run": None, "--json": None},
    ("reproduce",): {"--tolerance": "POINTS", "--device": "DEVICE", "--no-cache": None},
    ("selfcheck",): {"--out": "FILE", "--keep": "DIR", "--only": "GROUP", "--quick": None},
    ("synth",): {"--out": "DIR", "--seed": "N"},
    ("leaderboard", "show"): {"--benchmark": "NAMES", "--format": "FORMAT", "--output": "PATH"},
    ("submit",): {"--leaderboard": "FILE", "--replace": None},
    (): {"--version": None, "--help": None},
}


@pytest.mark.parametrize("path", list(EXPECTED_METAVARS), ids=lambda p: " ".join(p) or "densebench")
def test_options_show_conventional_metavars(path):
    text = _help(list(path))
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    helps = {p.opts[0]: p.help for p in command.params}
    helps["--help"] = "Show this message and exit."
    for option, metavar in EXPECTED_METAVARS[path].items():
        cells = _row_cells(text, option)
        cells = [c for c in cells[1:] if not re.fullmatch(r"-\w", c)]  # drop the short name (-m)
        if metavar is None:  # a flag: its help text follows the names directly
            assert helps[option].startswith(cells[0]), (option, cells)
        else:
            assert cells[0] == metavar, (option, cells)


def test_arguments_show_conventional_metavars():
    assert _row_cells(_help(["submit"]), "results...")[1] == "FILE..."
    assert _row_cells(_help(["data", "verify"]), "name")[1] == "DATASET"
    assert _row_cells(_help(["leaderboard", "compare"]), "model_a")[1] == "MODEL"
    assert _row_cells(_help(["cache", "path"]), "key")[1] == "KEY"


def test_parsing_and_errors_are_unchanged():
    # a value of the wrong type is still refused by the option's name, a missing argument by its name
    bad = runner.invoke(app, ["cache", "prune", "--older-than", "soon"], env={"COLUMNS": "80"})
    assert bad.exit_code == 2 and "--older-than" in bad.output
    missing = runner.invoke(app, ["data", "verify"], env={"COLUMNS": "80"})
    assert missing.exit_code == 2 and "name" in missing.output.lower()
    listed = runner.invoke(app, ["list", "benchmarks", "--format", "plain"])
    assert listed.exit_code == 0 and "voc-incontext" in listed.output


class Colour(str, enum.Enum):
    red = "red"
    blue = "blue"


def _toy_app() -> typer.Typer:
    toy = typer.Typer(add_completion=False)

    @toy.command()
    def go(count: Annotated[int, typer.Option(help="how many")] = 1,
           ratio: Annotated[float, typer.Option(help="a ratio")] = 0.5,
           config: Annotated[Path, typer.Option(help="a file", dir_okay=False)] = Path("c.toml"),
           where: Annotated[Path | None, typer.Option(help="a folder", file_okay=False)] = None,
           colour: Annotated[Colour, typer.Option(help="a colour")] = Colour.red,
           tags: Annotated[list[str] | None, typer.Option(help="tags")] = None,
           pair: Annotated[tuple[int, int], typer.Option(help="two numbers")] = (1, 2),
           label: Annotated[str, typer.Option(metavar="LABEL", help="explicit")] = "x",
           text: Annotated[str, typer.Option(help="some text")] = "",
           verbose: Annotated[bool, typer.Option(help="more output")] = False) -> None:
        typer.echo(f"{count} {ratio} {config} {where} {colour.value} {tags} {pair} {label} {text} {verbose}")

    @toy.command()
    def other() -> None:
        pass

    return toy


def test_any_typer_app_by_type_and_the_others_untouched():
    toy = _toy_app()
    plain = _help(["go"], toy)  # not installed: typer's own display, so nothing was patched globally
    assert "<int>" in plain and "<bool>" in plain
    text = _help(["go"], cli_help.install(toy))
    assert not PYTHON_TYPE.search(text)
    expected = {"--count": "N", "--ratio": "NUM", "--config": "FILE", "--where": "DIR", "--colour": "[red|blue]",
                "--tags": "NAMES", "--pair": "N N", "--label": "LABEL", "--text": "TEXT"}
    for option, metavar in expected.items():
        assert _row_cells(text, option)[1] == metavar
    assert _row_cells(text, "--verbose")[1:3] == ["--no-verbose", "more output [default: no-verbose]"]
    ran = runner.invoke(toy, ["go", "--count", "3", "--pair", "4", "5", "--tags", "a", "--tags", "b", "--verbose"])
    assert ran.exit_code == 0 and ran.output.split() == ["3", "0.5", "c.toml", "None", "red", "['a',", "'b']",
                                                         "(4,", "5)", "x", "True"]


def test_install_refuses_a_foreign_group_class():
    class Other(typer.core.TyperGroup):
        pass

    with pytest.raises(TypeError):
        cli_help.install(typer.Typer(cls=Other))


def test_type_metavar():
    assert [cli_help.type_metavar(t) for t in (int, float, str, bool, Path, list[str], list[Path], tuple[int, float])
            ] == ["N", "NUM", "TEXT", "BOOLEAN", "PATH", "NAMES", "PATH...", "N NUM"]
    assert cli_help.type_metavar(Path, "dir") == "DIR"


def test_densebench_help_piped_at_80_columns():
    # the installed entry point, stdout a pipe (as in CI logs), without rich's terminal detection
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "densebench", "cache", "prune", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not PYTHON_TYPE.search(out.stdout)
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    assert _row_cells(out.stdout, "--cache-dir")[1] == "DIR" and _row_cells(out.stdout, "--older-than")[1] == "DAYS"


# ---- neco_train ---------------------------------------------------------------------------------------------------

def _neco_help(monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    return build_parser().format_help()


def _option_blocks(text: str) -> dict[str, str]:
    """Help text of each option, keyed by each of its flags, lines joined."""
    blocks: dict[str, str] = {}
    body = text.split("options:\n", 1)[1]
    for block in re.split(r"\n(?=  -)", body):
        head = block.strip().split("  ")[0]
        for flag in re.findall(r"--?[\w-]+", head):
            blocks.setdefault(flag, " ".join(block.split()))
    return blocks


def _typed(value) -> str:
    """A default as the user types it (by hand: booleans on/off, pairs as two numbers)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def test_neco_train_every_option_has_help_and_default(monkeypatch):
    text = _neco_help(monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "default: None" not in text and "(default: )" not in text and "default: []" not in text
    assert not PYTHON_TYPE.search(text)
    blocks = _option_blocks(text)
    defaults = TrainConfig()
    actions = [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= len(dataclasses.fields(TrainConfig))
    for action in actions:
        flag = action.option_strings[0]
        assert (action.help or "").strip(), f"{flag} has no help"
        block = blocks[flag]
        assert "(default:" in block or "(required)" in block, block
        name = action.dest
        if hasattr(defaults, name) and getattr(defaults, name) not in (None, "", {}):
            assert f"(default: {_typed(getattr(defaults, name))})" in block, block
        if action.nargs != 0:  # takes a value: a short metavar, not argparse's dest (BATCH_SIZE)
            metavar = " ".join(action.metavar) if isinstance(action.metavar, tuple) else action.metavar
            assert metavar and "_" not in metavar and block.startswith(f"{flag} "), (flag, metavar)
            assert metavar in block.split(" (default")[0], (flag, metavar)


def test_neco_train_defaults_by_hand(monkeypatch):
    blocks = _option_blocks(_neco_help(monkeypatch))
    assert "(default: 0.25 1.0)" in blocks["--global-scale"] and blocks["--global-scale"].startswith(
        "--global-scale LOW HIGH")
    assert "(default: off)" in blocks["--compile"] and "(default: on)" in blocks["--photometric"]
    assert "(default: auto, 518 for /14 models, 224 for /16)" in blocks["--global-size"]
    assert "(default: all epochs)" in blocks["--max-steps"]
    assert blocks["--epochs"].startswith("--epochs N ") and blocks["--lr-head"].startswith("--lr-head X ")
    assert "(default: 0.0001)" in blocks["--lr-head"] and "(default: 64)" in blocks["--batch-size"]
    assert "meta-offset (NeCo's" in blocks["--pos-interp"]  # names are never split at their hyphen
    assert "(default: the training one)" in blocks["--bench-device"]


def test_neco_train_parsing_unchanged():
    args = build_parser().parse_args([])
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        got = getattr(args, f.name)
        assert (tuple(got) if isinstance(got, list) else got) == getattr(defaults, f.name), f.name
    args = build_parser().parse_args(["--global-scale", "0.3", "0.9", "--max-steps", "all", "--no-photometric",
                                      "--lr-head", "2e-4", "--dry-run"])
    assert args.global_scale == [0.3, 0.9] and args.max_steps is None and args.photometric is False
    assert args.lr_head == 2e-4 and args.dry_run == 3
