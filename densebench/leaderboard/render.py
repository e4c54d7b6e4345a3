"""Renderers of a leaderboard view: a rich table, Markdown, CSV and a static HTML page; ``render``
picks one by name."""

from __future__ import annotations

import datetime as _dt
import io
from collections.abc import Sequence
from typing import Any

from .. import benchmark_table
from ..errors import ConfigError, choices_message
from .page import esc, html_page, html_select
from .store import SOURCES
from .view import (NONSTANDARD_MARK, benchmark_sort_key, build_view, cell_text, is_best, md_escape,
                   metric_value, source_text)

FORMATS = ("table", "markdown", "csv", "html")


def render_table(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None):
    """A rich Table: best per column in bold green, published rows in italic cyan, non-standard marked †."""
    from rich.markup import escape
    from rich.table import Table

    view = build_view(doc, benchmarks=benchmarks, source=source)
    # Names, notes and citations come from the file: printed as written, never as rich markup.
    table = Table(title=escape(f"{view.title}: {len(view.rows)} rows"), caption=escape(
        f"bold green = best in column · {NONSTANDARD_MARK} non-standard protocol (see note) · "
        + " · ".join(f"[{i + 1}] {c['short']}" for i, c in enumerate(view.citations))))
    table.add_column("model", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for c in view.columns:
        spec = benchmark_table.find_benchmark(c.benchmark)
        head = f"{spec.dataset.name}\n{spec.protocol_name}" if spec else c.benchmark
        head += f"\n{c.version}" if c.split else ""
        table.add_column(f"{head}\n{c.metric}", justify="right")
    table.add_column("note", overflow="fold", max_width=48)
    for row in view.rows:
        cells = []
        for c in view.columns:
            text = cell_text(view, row, c)
            cells.append(f"[bold green]{text}[/]" if is_best(view, row, c) else text)
        style = "italic cyan" if row.source == "published" else None
        table.add_row(escape(row.model), escape(row.architecture), escape(source_text(view, row)), *cells,
                      escape(row.note), style=style)
    return table


def render_markdown(leaderboard: dict, *, benchmarks: Sequence[str] | None = None,
                    source: str | None = None) -> str:
    """The leaderboard as a GitHub Markdown table (best per column in bold) with numbered citations,
    for pasting into a README."""
    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    header = ["Model", "Arch", "Source", *(c.label for c in view.columns), "Note"]
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * len(view.columns) + ["---"]) + "|"]
    for row in view.rows:
        cells = []
        for c in view.columns:
            text = md_escape(cell_text(view, row, c))
            cells.append(f"**{text}**" if text and is_best(view, row, c) else text)
        lines.append("| " + " | ".join([md_escape(row.model), md_escape(row.architecture),
                                        md_escape(source_text(view, row)), *cells, md_escape(row.note)])
                     + " |")
    lines.append("")
    lines.append(f"mIoU / PCK in %. **Bold**: best in column. {NONSTANDARD_MARK}: non-standard protocol "
                 "variant (see Note). Measured rows name their weights fingerprint.")
    versions = [f"{md_escape(b)} {md_escape(v)}"
                for b, v in dict.fromkeys((c.benchmark, c.version) for c in view.columns if c.version and not c.split)]
    if any(c.split for c in view.columns) or versions:
        lines.append("")
        lines.append("Protocol versions (numbers are compared only within one version; a benchmark measured with "
                     "several has one column per version, named in brackets)" + (": " + ", ".join(versions)
                                                                                  if versions else "") + ".")
    lines.append("")
    for i, c in enumerate(view.citations):
        link = f" <{c['url']}>" if c.get("url") else ""
        lines.append(f"{i + 1}. {md_escape(c['full'])}{link}")
    return "\n".join(lines) + "\n"


def render_csv(leaderboard: dict, *, benchmarks: Sequence[str] | None = None,
               source: str | None = None) -> str:
    """The same rows and columns as the table, one numeric column per (benchmark, metric), via pandas."""
    import pandas as pd

    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    records = []
    for row in view.rows:
        rec: dict[str, Any] = {"model": row.model, "architecture": row.architecture, "source": row.source,
                               "origin": row.origin, "citation": row.citation["full"] if row.citation else "",
                               "standard": row.standard, "note": row.note}
        for c in view.columns:
            rec[c.label] = metric_value(row.cells[c], c.metric) if c in row.cells else None
        records.append(rec)
    columns = ["model", "architecture", "source", "origin", "citation", "standard", "note",
               *(c.label for c in view.columns)]
    buf = io.StringIO()
    pd.DataFrame.from_records(records, columns=columns).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def render_html(leaderboard: dict, *, benchmarks: Sequence[str] | None = None,
                source: str | None = None) -> str:
    """A static, self-contained HTML page: sortable columns, filters by benchmark and source."""
    from .. import __version__

    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    head = ['<th data-type="text">Model</th>', '<th data-type="text">Arch</th>',
            '<th data-type="text">Source</th>']
    for c in view.columns:
        metric = f"<br><small>{esc(c.metric)}</small>"
        head.append(f'<th data-type="num" data-bench="{esc(c.benchmark)}" data-metric="{esc(c.metric)}">'
                    f'{esc(c.benchmark)}{metric}</th>')
    head.append('<th data-type="text">Note</th>')
    body_rows = []
    for row in view.rows:
        classes = [row.source] + ([] if row.standard else ["nonstandard"])
        cells = [f"<td>{esc(row.model)}</td>", f"<td>{esc(row.architecture)}</td>"]
        n = view.citation_number(row.citation)
        src = (f'published <a href="#cite-{n}">[{n}]</a>' if n else f"measured ({esc(row.origin)})")
        cells.append(f'<td class="src">{src}</td>')
        for c in view.columns:
            entry = row.cells.get(c)
            if entry is None:
                cells.append(f'<td class="num" data-bench="{esc(c.benchmark)}"></td>')
                continue
            v = metric_value(entry, c.metric)
            detail = [f"{entry['benchmark']} {c.metric}", *([f"protocol {c.version}"] if c.version else []),
                      entry.get("variant") or f"config {entry['config_hash']}"]
            if entry.get("date"):
                detail.append(str(entry["date"]))
            cls = "num best" if is_best(view, row, c) else "num"
            cells.append(f'<td class="{cls}" data-bench="{esc(c.benchmark)}" data-value="{v!r}" '
                         f'data-entry="{esc(entry["id"])}" title="{esc(" · ".join(detail))}">'
                         f"{esc(cell_text(view, row, c))}</td>")
        cells.append(f'<td class="note">{esc(row.note)}</td>')
        body_rows.append(f'<tr class="{" ".join(classes)}" data-source="{row.source}" '
                         f'data-standard="{"yes" if row.standard else "no"}">' + "".join(cells) + "</tr>")
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
        f"{generated} · mIoU / PCK in % · bold = best in column · {NONSTANDARD_MARK} = non-standard "
        "protocol (see Note). Click a column header to sort.</p>"
        '<div class="filters">'
        + html_select("Benchmark", sorted({c.benchmark for c in view.columns}, key=benchmark_sort_key),
                      table_id="board")
        + html_select("Source", SOURCES, table_id="board", filter_attr="source")
        + html_select("Protocol", ("yes", "no"), table_id="board", filter_attr="standard")
        + "</div>"
        f'<table id="board" class="sortable"><thead><tr>{"".join(head)}</tr></thead>'
        f'<tbody>{"".join(body_rows)}</tbody></table>'
        f"<h2>Sources</h2><ol>{cites}</ol>")
    return html_page(f"densebench leaderboard: {view.title}", body)


def render(leaderboard: dict, fmt: str, *, benchmarks: Sequence[str] | None = None,
           source: str | None = None):
    """Dispatch on ``fmt`` (table -> rich Table; the others -> str)."""
    renderers = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "html": render_html}
    if fmt not in renderers:
        raise ConfigError(choices_message("format", fmt, FORMATS))
    return renderers[fmt](leaderboard, benchmarks=benchmarks, source=source)
