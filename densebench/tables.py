"""Listings in every format a person or a script wants: a terminal table that never cuts a name or a number,
or JSON, CSV, Markdown and plain tab-separated text for pipes.

A column is a *key* (names users copy: never wrapped or shortened), a *number* (never wrapped, right
aligned), *text* (folds to the width left) or *secondary* (shown only when the terminal is wide enough).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .options import option_text

FORMATS = ("table", "json", "csv", "markdown", "plain")


@dataclass(frozen=True)
class Col:
    key: str
    header: str = ""
    role: str = "text"          # key | number | text | secondary

    @property
    def title(self) -> str:
        return self.header or self.key


def cell(value: Any) -> str:
    """A value as a person reads it in a listing: yes/no for booleans, '-' for nothing, comma lists."""
    return option_text(value, "yes", "no")


def _width(rows: Sequence[dict], col: Col) -> int:
    return max([len(col.title)] + [len(cell(r.get(col.key))) for r in rows]) + 3


def check_format(fmt: str, as_json: bool = False) -> str:
    """The ``--format`` asked for (``--json`` wins), refused with the choices when it is not one of :data:`FORMATS`."""
    fmt = "json" if as_json else fmt
    if fmt not in FORMATS:
        from .errors import ConfigError, choices_message

        raise ConfigError(choices_message("--format", fmt, FORMATS))
    return fmt


def render(rows: Sequence[dict], columns: Sequence[Col], fmt: str, *, title: str = "", width: int = 80) -> Any:
    """A rich Table for ``table`` (fitted to ``width``), else the text of the other formats."""
    check_format(fmt)
    if fmt == "json":
        return json.dumps([{c.key: r.get(c.key) for c in columns} for r in rows], indent=2, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([c.key for c in columns])
        writer.writerows([[cell(r.get(c.key)) for c in columns] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.title for c in columns) + " |",
                 "|" + "|".join("---:" if c.role == "number" else "---" for c in columns) + "|"]
        lines += ["| " + " | ".join(cell(r.get(c.key)).replace("|", "\\|") for c in columns) + " |" for r in rows]
        return "\n".join(lines)
    if fmt == "plain":
        return "\n".join(["\t".join(c.key for c in columns)]
                         + ["\t".join(cell(r.get(c.key)) for c in columns) for r in rows])
    fixed = sum(_width(rows, c) for c in columns if c.role in ("key", "number"))
    shown = [c for c in columns if c.role != "secondary"]
    room = width - fixed - 36 * sum(c.role == "text" for c in shown)
    for c in columns:
        if c.role == "secondary" and _width(rows, c) <= room:
            shown.append(c)
            room -= _width(rows, c)
    shown.sort(key=list(columns).index)
    table = Table(title=title or None)
    for c in shown:
        rigid = c.role in ("key", "number", "secondary")
        table.add_column(c.title, no_wrap=rigid, overflow="fold", justify="right" if c.role == "number" else "left",
                         min_width=_width(rows, c) - 3 if rigid else None, ratio=None if rigid else 1)
    for r in rows:
        table.add_row(*(escape(cell(r.get(c.key))) for c in shown))
    return table


def emit(console: Console, rows: Sequence[dict], columns: Sequence[Col], fmt: str, *, title: str = "") -> None:
    """Print ``rows`` in ``fmt``; text formats are printed verbatim (no wrapping, no markup)."""
    out = render(rows, columns, fmt, title=title, width=console.width)
    if isinstance(out, str):   # written as is: rich would expand the tabs of `plain` into spaces
        console.file.write(out if out.endswith("\n") else out + "\n")
        console.file.flush()
    else:
        console.print(out)
