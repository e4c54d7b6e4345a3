"""Renderers of a leaderboard view: a terminal table that never cuts a name or a number, Markdown, CSV, JSON,
plain tab-separated text and a static HTML page; ``render`` picks one by name.

The text formats go through :mod:`densebench.tables` (the listings' one renderer). The terminal table is drawn
here because it marks the best cells and, when the model column plus every number column do not fit the width
(80 columns, a pipe), it splits the number columns into blocks that each repeat the model column, with short
column codes explained in a legend below. Legend, notes and citations are printed as written (never wrapped
by densebench, so URLs copy whole)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import tables
from ..errors import ConfigError, choices_message
from .page import esc, html_page, html_select, value_attr
from .store import SOURCES
from .view import (DISAGREE_MARK, NONSTANDARD_MARK, BoardView, Column, Row, benchmark_sort_key, build_view,
                   cell_text, format_value, is_best, md_escape, metric_value, source_text, summary_text)

FORMATS = ("table", "markdown", "csv", "json", "plain", "html")


# ---------------------------------------------------------------------------------------------------
# Legend text, shared by the terminal, Markdown and HTML

def summary_line(view: BoardView) -> str:
    """How mean and rank are computed, or why no row has them (no model has every shown benchmark)."""
    if not any(summary_text(row, "mean") for row in view.rows):
        return (f"Mean and rank: no model has all {len(view.main_columns)} benchmark columns shown; "
                "choose fewer with -b (e.g. -b linear).")
    return summary_rule(view)


def summary_rule(view: BoardView) -> str:
    """How the mean and the average rank are computed over this view."""
    n = len(view.main_columns)
    return (f"Mean and rank use the main metric of the {n} benchmark column{'s' if n != 1 else ''} shown, only for "
            f"models that have all {n} (others: blank, sorted last); rank = the mean over those columns of the "
            "model's rank among the standard complete models (1 = best).")


def marks_rule() -> str:
    return (f"Best = highest among standard rows. {NONSTANDARD_MARK} non-standard (another config, data or variant: "
            f"see note; never best, not ranked). {DISAGREE_MARK} another source or run reports a different value "
            "for this cell (shown: the newest measured, else the first published; json and html list all).")


def hidden_rule(view: BoardView) -> list[str]:
    """What the chosen protocol versions and metrics leave out, and the flag that shows it."""
    lines = []
    if view.hidden:
        by_bench: dict[str, list[str]] = {}
        for bench, version, n in view.hidden:
            by_bench.setdefault(bench, []).append(f"{version} ({n} entr{'y' if n == 1 else 'ies'})")
        lines.append("Other protocol versions on this board (numbers compare only within one version): "
                     + "; ".join(f"{b}: {', '.join(v)}" for b, v in by_bench.items())
                     + ". --protocol all shows a column per version, --protocol NAME picks one.")
    if view.hidden_metrics:
        lines.append("--metrics all adds each benchmark's other headline metrics.")
    return lines


def column_legend(view: BoardView, width: int) -> list[str]:
    """``CODE = benchmark metric (version)`` items, packed into lines of at most ``width`` characters."""
    items = []
    for c in view.columns:
        code = "/".join(c.code.split("\n"))
        items.append(f"{code} = {c.benchmark} {c.metric}" + (f" ({c.version})" if c.version else ""))
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return lines


def _citation_lines(view: BoardView) -> list[str]:
    return [f"[{i + 1}] {c['full']}" + (f" <{c['url']}>" if c.get("url") else "")
            for i, c in enumerate(view.citations)]


# ---------------------------------------------------------------------------------------------------
# Terminal

@dataclass
class TerminalBoard:
    """Tables (blocks of columns, each repeating the model column) and the lines printed under them."""
    tables: list[Any]
    lines: list[str] = field(default_factory=list)

    def print(self, console) -> None:
        for table in self.tables:
            console.print(table)
        for line in self.lines:
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def _span(header: str, cells: list[str]) -> int:
    """Characters a column takes in a boxed rich table (content + padding + rule)."""
    return max([len(x) for x in header.split("\n")] + [len(x) for x in cells]) + 3


def _terminal_columns(view: BoardView) -> tuple[list[tuple], list[tuple]]:
    """(key columns, number columns) as (header, cells, styles per row); styles mark the best cells."""
    rows = view.rows
    keys = [("model", [r.label for r in rows], None),
            ("src", [_short_source(view, r) for r in rows], None)]
    numbers = []
    for what in ("mean", "rank"):
        cells = [summary_text(r, what) for r in rows]
        if any(cells):
            numbers.append((what, cells, None))
    for c in view.columns:
        numbers.append((c.code, [cell_text(view, r, c) for r in rows],
                        ["bold green" if is_best(view, r, c) else None for r in rows]))
    return keys, numbers


def _short_source(view: BoardView, row: Row) -> str:
    if row.source == "published":
        return "[" + ",".join(str(view.citation_number(c)) for c in row.citations) + "]"
    return row.origin


def _blocks(keys: list[tuple], numbers: list[tuple], width: int) -> list[list[tuple]]:
    """Number columns packed into blocks that fit ``width`` next to the key columns (at least one per block)."""
    room = width - 1 - sum(_span(h, c) for h, c, _ in keys)
    blocks: list[list[tuple]] = [[]]
    used = 0
    for col in numbers:
        span = _span(col[0], col[1])
        if blocks[-1] and used + span > room:
            blocks.append([])
            used = 0
        blocks[-1].append(col)
        used += span
    return blocks


def _vertical(keys: list[tuple], numbers: list[tuple]) -> list[str]:
    """One line per row, ``model (src): CODE value, ...``, for terminals too narrow for a table."""
    lines = []
    for i in range(len(keys[0][1])):
        values = [f"{'/'.join(h.split(chr(10)))} {cells[i]}" for h, cells, _ in numbers if cells[i]]
        lines.append(f"{keys[0][1][i]} ({keys[1][1][i]}): " + ", ".join(values))
    return lines


def _block_table(view: BoardView, keys: list[tuple], block: list[tuple], title: str | None):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title) if title else None, title_justify="left")
    for header, cells, _ in keys:
        table.add_column(escape(header), no_wrap=True, min_width=_span(header, cells) - 3)
    for header, cells, _ in block:
        table.add_column(escape(header), no_wrap=True, justify="right", min_width=_span(header, cells) - 3)
    for i, row in enumerate(view.rows):
        texts = [escape(cells[i]) for _, cells, _ in keys]
        for _, cells, styles in block:
            text = escape(cells[i])
            texts.append(f"[{styles[i]}]{text}[/]" if styles and styles[i] and text else text)
        table.add_row(*texts, style="italic cyan" if row.source == "published" else None)
    return table


def _notes(view: BoardView) -> list[str]:
    out = []
    for r in view.rows:
        if r.note:
            src = "published " + _short_source(view, r) if r.source == "published" else f"measured {r.origin}"
            out.append(f"{r.label} ({src}): {r.note}")
    return out


def render_table(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None,
                 protocols: str | Sequence[str] | None = "all", metrics: str = "all", sort: str | None = None,
                 width: int = 80) -> TerminalBoard:
    """The view for a terminal of ``width`` columns: names and numbers whole, column blocks when needed."""
    view = build_view(doc, benchmarks=benchmarks, source=source, protocols=protocols, metrics=metrics, sort=sort)
    keys, numbers = _terminal_columns(view)
    title = (f"{view.title}: {len(view.rows)} rows, {len(view.main_columns)} benchmark columns"
             + (f", sorted by {view.sort}" if view.sort else ""))
    if not view.rows:
        return TerminalBoard([], [f"{view.title}: no entries to show (filters: benchmarks {benchmarks or 'all'}, "
                                  f"source {source or 'any'}); `densebench submit` adds measured entries."])
    if numbers and sum(_span(h, c) for h, c, _ in keys) + max(_span(h, c) for h, c, _ in numbers) + 1 > width:
        out = TerminalBoard([], [title, *_vertical(keys, numbers)])     # too narrow for any table: one line a row
    else:
        blocks = _blocks(keys, numbers, width)
        out = TerminalBoard([
            _block_table(view, keys, block, title if i == 0 else f"(columns continued, {i + 1}/{len(blocks)})")
            for i, block in enumerate(blocks)])
    out.lines += column_legend(view, width)
    out.lines.append("src: [n] = published in source n (below); otherwise the measured weights' fingerprint.")
    out.lines.append(summary_line(view))
    out.lines += [marks_rule(), *hidden_rule(view), *_notes(view), *_citation_lines(view)]
    return out


# ---------------------------------------------------------------------------------------------------
# Markdown, CSV, JSON, plain (through densebench.tables)

def _record(view: BoardView, row: Row, missing: Any) -> dict:
    """One row as flat fields: names, the summary, and a value per column label (``missing`` when empty)."""
    rec: dict[str, Any] = {
        "model": row.model, "architecture": row.architecture, "source": row.source, "origin": row.origin,
        "fingerprint": row.fingerprint if row.fingerprint else missing,
        "citation": "; ".join(c["full"] for c in row.citations) if row.citations else missing,
        "standard": row.standard, "note": row.note or missing,
        "mean": missing if row.mean is None else row.mean, "rank": missing if row.rank is None else row.rank,
        "benchmarks": row.coverage}
    for c in view.columns:
        v = metric_value(row.cells[c], c.metric) if c in row.cells else None
        rec[c.label] = missing if v is None else v
    return rec


def _cell_detail(view: BoardView, row: Row, c: Column) -> dict:
    """Everything about one cell, for JSON: the entry shown and the other entries for it."""
    e = row.cells[c]

    def origin(x: dict) -> str:
        return x["citation"]["short"] if x["source"] == "published" else f"measured {x.get('date') or ''}".strip()

    return {"value": metric_value(e, c.metric), "entry": e["id"], "protocol": c.version, "standard": e["standard"],
            "best": is_best(view, row, c), "from": origin(e), "reasons": e.get("nonstandard_reasons") or [],
            "also": [{"value": metric_value(a, c.metric), "entry": a["id"], "from": origin(a)}
                     for a in row.alternatives.get(c, [])]}


def _flat_columns(view: BoardView) -> list[tables.Col]:
    fixed = [tables.Col("model", role="key"), tables.Col("architecture", role="secondary"),
             tables.Col("source", role="key"), tables.Col("origin", role="secondary"),
             tables.Col("fingerprint", role="secondary"), tables.Col("citation", role="secondary"),
             tables.Col("standard", role="key"), tables.Col("note"), tables.Col("mean", role="number"),
             tables.Col("rank", role="number"), tables.Col("benchmarks", role="number")]
    return fixed + [tables.Col(c.label, role="number") for c in view.columns]


def render_csv(leaderboard: dict, **kw) -> str:
    """One line per row: names, mean, rank, coverage and one numeric column per (benchmark, version, metric);
    empty where there is no value."""
    view = build_view(leaderboard, **kw)
    return tables.render([_record(view, r, "") for r in view.rows], _flat_columns(view), "csv") + "\n"


def render_plain(leaderboard: dict, **kw) -> str:
    """The CSV's fields, tab-separated, ``-`` where there is no value."""
    view = build_view(leaderboard, **kw)
    return tables.render([_record(view, r, None) for r in view.rows], _flat_columns(view), "plain") + "\n"


def render_json(leaderboard: dict, **kw) -> str:
    """The CSV's fields (null where there is no value) plus ``cells``: per column label, the entry shown, whether
    it is the column's best, and the other entries for that cell."""
    view = build_view(leaderboard, **kw)
    records = []
    for r in view.rows:
        rec = _record(view, r, None)
        rec["cells"] = {c.label: _cell_detail(view, r, c) for c in view.columns if c in r.cells}
        records.append(rec)
    return tables.render(records, [*_flat_columns(view), tables.Col("cells")], "json") + "\n"


def render_markdown(leaderboard: dict, **kw) -> str:
    """A GitHub Markdown table (best per column in bold) with the legend and numbered citations, for a README."""
    view = build_view(leaderboard, **kw)
    cols = [tables.Col("model", "Model", "key"), tables.Col("arch", "Arch", "key"),
            tables.Col("source", "Source", "key"), tables.Col("mean", "Mean", "number"),
            tables.Col("rank", "Rank", "number"),
            *(tables.Col(c.label, md_escape(c.label, pipes=False), "number") for c in view.columns),
            tables.Col("note", "Note")]
    records = []
    for row in view.rows:
        rec = {"model": md_escape(row.label, pipes=False), "arch": md_escape(row.architecture, pipes=False),
               "source": source_text(view, row), "mean": summary_text(row, "mean"),
               "rank": summary_text(row, "rank"), "note": md_escape(row.note, pipes=False)}
        for c in view.columns:
            text = cell_text(view, row, c)
            rec[c.label] = f"**{text}**" if text and is_best(view, row, c) else text
        records.append(rec)
    lines = [tables.render(records, cols, "markdown"), "",
             f"mIoU / PCK / J&F in %. **Bold**: the best value. {md_escape(marks_rule(), pipes=False)}", "",
             summary_line(view)]
    versions = [f"{c.label}: {c.version}" for c in view.columns if c.version and c.main]
    if versions:
        lines += ["", "Protocol versions (numbers are compared only within one version): " + ", ".join(
            md_escape(v) for v in versions) + "."]
    for line in hidden_rule(view):
        lines += ["", md_escape(line, pipes=False)]
    lines.append("")
    for i, c in enumerate(view.citations):
        link = f" <{c['url']}>" if c.get("url") else ""
        lines.append(f"{i + 1}. {md_escape(c['full'])}{link}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# HTML

_SUMMARY_ORDER = {"mean": "desc", "rank": "asc"}


def _model_tooltip(view: BoardView, row: Row) -> str:
    if row.source == "measured":
        lines = [f"weights fingerprint {row.fingerprint}"]
    else:
        lines = ["published numbers (no weights fingerprint)"]
        lines += [f"[{view.citation_number(c)}] {c['short']}" for c in row.citations]
    lines.append(f"architecture {row.architecture}")
    if not row.standard:
        lines.append(f"non-standard: {row.note}")
    return "\n".join(lines)


def _cell_tooltip(row: Row, c: Column) -> str:
    entry = row.cells[c]
    detail = [f"{entry['benchmark']} {c.metric}", *([f"protocol {c.version}"] if c.version else []),
              entry.get("variant") or f"config {entry['config_hash']}"]
    if entry["source"] == "published":
        detail.append(entry["citation"]["short"])
    if entry.get("date"):
        detail.append(str(entry["date"]))
    if entry.get("nonstandard_reasons"):
        detail.append("non-standard: " + "; ".join(entry["nonstandard_reasons"]))
    for alt in row.alternatives.get(c, []):
        where = alt["citation"]["short"] if alt["source"] == "published" else f"measured {alt.get('date') or ''}"
        detail.append(f"also {format_value(metric_value(alt, c.metric))} ({where})")
    return " · ".join(detail)


def _html_head(view: BoardView) -> str:
    sort = (view.sort or "").strip().lower()

    def aria(name: str, direction: str) -> str:
        return f' aria-sort="{direction}"' if sort and sort == name else ""

    head = [f'<th data-type="text" data-key="model"{aria("model", "ascending")}>Model</th>',
            f'<th data-type="text" data-key="arch"{aria("arch", "ascending")}>Arch</th>',
            '<th data-type="text" data-key="source">Source</th>',
            f'<th data-type="num" data-key="mean" title="{esc(summary_rule(view))}"{aria("mean", "descending")}>'
            "Mean</th>",
            f'<th data-type="num" data-key="rank" data-order="asc" title="{esc(summary_rule(view))}"'
            f'{aria("rank", "ascending")}>Rank</th>']
    for c in view.columns:
        sorted_here = c == view.sort_column
        version = f"<br><small>{esc(c.version)}</small>" if c.version and "(" in c.label else ""
        attrs = f'data-type="num" data-bench="{esc(c.benchmark)}" data-metric="{esc(c.metric)}"'
        attrs += f' data-version="{esc(c.version)}"' if c.version else ""
        attrs += ' aria-sort="descending"' if sorted_here else ""
        head.append(f"<th {attrs}>{esc(c.benchmark)}{version}<br><small>{esc(c.metric)}</small></th>")
    head.append('<th data-type="text" data-key="note">Note</th>')
    return "".join(head)


def _html_row(view: BoardView, row: Row) -> str:
    classes = [row.source] + ([] if row.standard else ["nonstandard"])
    n = [view.citation_number(c) for c in row.citations]
    src = ("published " + "".join(f'<a href="#cite-{i}">[{i}]</a>' for i in n) if n
           else f"measured ({esc(row.origin)})")
    cells = [f'<td class="model" title="{esc(_model_tooltip(view, row))}">{esc(row.model)}</td>',
             f'<td class="arch">{esc(row.architecture)}</td>', f'<td class="src">{src}</td>']
    for what, value in (("mean", row.mean), ("rank", row.rank)):
        cells.append(f'<td class="num {what}"{value_attr(value)}>{esc(summary_text(row, what))}</td>')
    for c in view.columns:
        entry = row.cells.get(c)
        if entry is None:
            cells.append(f'<td class="num" data-bench="{esc(c.benchmark)}"></td>')
            continue
        alts = row.alternatives.get(c, [])
        also = f' data-alternatives="{esc(" ".join(a["id"] for a in alts))}"' if alts else ""
        cls = "num best" if is_best(view, row, c) else "num"
        cells.append(f'<td class="{cls}" data-bench="{esc(c.benchmark)}" '
                     f'{value_attr(metric_value(entry, c.metric)).strip()} data-entry="{esc(entry["id"])}"{also} '
                     f'title="{esc(_cell_tooltip(row, c))}">{esc(cell_text(view, row, c))}</td>')
    cells.append(f'<td class="note">{esc(row.note)}</td>')
    return (f'<tr class="{" ".join(classes)}" data-source="{row.source}" '
            f'data-standard="{"yes" if row.standard else "no"}">' + "".join(cells) + "</tr>")


def render_html(leaderboard: dict, **kw) -> str:
    """A static, self-contained HTML page: one row per model, sortable by any column, filters by benchmark,
    source and standard-ness; the full fingerprint in the model cell's tooltip."""
    from .. import __version__

    view = build_view(leaderboard, **kw)
    cites = "".join(
        f'<li id="cite-{i + 1}">{esc(c["full"])}'
        + (f' <a href="{esc(c["url"])}" rel="noreferrer">{esc(c["url"])}</a>' if c.get("url") else "")
        + "</li>"
        for i, c in enumerate(view.citations))
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"<h1>{esc(view.title)}</h1>"
        f'<p class="meta">{esc(leaderboard.get("description", ""))}<br>{len(view.rows)} rows from '
        f"{sum(len(r.cells) for r in view.rows)} cells · generated by densebench {esc(__version__)} on "
        f"{generated} · mIoU / PCK / J&amp;F in % · bold = best in column. Click a column header to sort; hover "
        "a model for its weights fingerprint, a number for its source.</p>"
        f'<p class="meta">{esc(summary_rule(view))} {esc(marks_rule())}'
        + "".join(f" {esc(x)}" for x in hidden_rule(view)) + "</p>"
        '<div class="filters">'
        + html_select("Benchmark", sorted({c.benchmark for c in view.columns}, key=benchmark_sort_key),
                      table_id="board")
        + html_select("Source", SOURCES, table_id="board", filter_attr="source")
        + html_select("Protocol", ("yes", "no"), table_id="board", filter_attr="standard")
        + "</div>"
        f'<div class="table-scroll"><table id="board" class="sortable"><thead><tr>{_html_head(view)}</tr></thead>'
        f'<tbody>{"".join(_html_row(view, r) for r in view.rows)}</tbody></table></div>'
        f"<h2>Sources</h2><ol>{cites}</ol>")
    return html_page(f"densebench leaderboard: {view.title}", body)


_RENDERERS = {"markdown": render_markdown, "csv": render_csv, "json": render_json, "plain": render_plain,
              "html": render_html, "table": render_table}


def render(leaderboard: dict, fmt: str, **kw):
    """Dispatch on ``fmt`` (table -> a :class:`TerminalBoard`; the others -> str). Keywords: ``benchmarks``,
    ``source``, ``protocols``, ``metrics``, ``sort`` (and ``width`` for the table)."""
    if fmt not in _RENDERERS:
        raise ConfigError(choices_message("format", fmt, FORMATS))
    if fmt != "table":
        kw.pop("width", None)
    return _RENDERERS[fmt](leaderboard, **kw)
