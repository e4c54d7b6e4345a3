"""Self-contained HTML pages (the leaderboard's and the report's): escaping, the page shell with the
sortable-table stylesheet and script inlined, and the filter drop-downs.

The stylesheet and script live next to this module as ``board.css`` and ``board.js`` (package data).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Iterable
from importlib import resources
from typing import Any


@functools.cache
def asset(name: str) -> str:
    """The text of a static file shipped in this package (``board.css``, ``board.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def esc(value: Any) -> str:
    """HTML-escape anything (attributes and text)."""
    return html.escape(str(value), quote=True)


def value_attr(value: float | None) -> str:
    """The ``data-value`` attribute board.js sorts a numeric cell by (none for an empty cell: sorted last)."""
    return "" if value is None else f' data-value="{value!r}"'


def html_page(title: str, body: str) -> str:
    """A self-contained page: inline CSS and JS, and a Content-Security-Policy that forbids every network
    request (images must be data: URIs), so opening it never phones home."""
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{esc(title)}</title>"
            f"<style>\n{asset('board.css')}</style></head>\n"
            f"<body>\n{body}\n<script>\n{asset('board.js')}</script>\n</body></html>\n")


def html_select(label: str, options: Iterable[str], *, table_id: str, filter_attr: str | None = None) -> str:
    """A filter <select> for a sortable table: rows by ``data-<filter_attr>``, or columns by benchmark."""
    attr = f'data-filter="{esc(filter_attr)}"' if filter_attr else "data-column-filter"
    opts = "".join(f'<option value="{esc(o)}">{esc(o)}</option>' for o in options)
    return (f'<label>{esc(label)} <select {attr} data-table="{esc(table_id)}" id="f-{esc(table_id)}-'
            f'{esc(filter_attr or "benchmark")}"><option value="">all</option>{opts}</select></label>')
