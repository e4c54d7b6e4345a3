"""The models x benchmarks view every renderer draws, with its sort keys and cell formatting.

Like is compared with like: a benchmark whose entries come from several protocol versions (e.g. hbird-1.1 and
hbird-2.0 in-context numbers) gets one column per version, labelled with it, so the best of a column is the
best among numbers produced by the same protocol code."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import benchmark_table
from ..errors import ConfigError, choices_message
from .entries import entry_version, headline_metrics
from .store import SOURCES

NONSTANDARD_MARK = "†"


@dataclass(frozen=True)
class Column:
    benchmark: str
    metric: str
    label: str
    version: str | None = None        # the protocol version of every entry in this column
    split: bool = False               # the benchmark has one column per version (the label names it)


@dataclass
class Row:
    model: str
    architecture: str
    source: str                       # "measured" | "published"
    origin: str                       # citation short name, or the weights fingerprint (short)
    standard: bool
    note: str                         # the variant / reasons when non-standard
    citation: dict | None
    cells: dict[Column, dict] = field(default_factory=dict)   # column -> entry


@dataclass
class BoardView:
    title: str
    columns: list[Column]
    rows: list[Row]
    best: dict[Column, float]
    citations: list[dict]             # in order of first use; footnote n = index + 1

    def citation_number(self, citation: dict | None) -> int | None:
        return None if citation is None else self.citations.index(citation) + 1


def benchmark_sort_key(benchmark: str) -> tuple:
    return benchmark_table.benchmark_order(benchmark)


def short_fingerprint(fp: str) -> str:
    fp = fp.split(":", 1)[1] if fp.startswith("sha256:") else fp
    return fp[:12]


def _row_key(entry: dict) -> tuple:
    if entry["source"] == "published":
        origin = entry["citation"]["short"]
        variant = None if entry["standard"] else entry["variant"]
    else:
        origin = short_fingerprint(entry["model"]["fingerprint"])
        variant = None if entry["standard"] else entry["config_hash"]
    return (entry["source"], entry["model"]["name"], origin, variant)


def metric_value(entry: dict, metric: str) -> float | None:
    """An entry's value of one metric as a float (None when missing or not finite)."""
    v = entry["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _select(entries: list[dict], benchmarks: Sequence[str] | None, source: str | None) -> list[dict]:
    """The entries of the chosen benchmarks (each must have entries) and source."""
    present = sorted({e["benchmark"] for e in entries}, key=benchmark_sort_key)
    if benchmarks:
        unknown = [b for b in benchmarks if b not in present]
        if unknown:
            raise ConfigError(choices_message("benchmark", unknown[0], present),
                              hint="benchmarks listed are those with entries on this leaderboard")
        entries = [e for e in entries if e["benchmark"] in benchmarks]
    if source is not None:
        if source not in SOURCES:
            raise ConfigError(choices_message("source", source, SOURCES))
        entries = [e for e in entries if e["source"] == source]
    return entries


def _versions(entries: list[dict], bench: str) -> list[str | None]:
    """The protocol versions of ``bench``'s entries: the benchmark's default version first, then in order of
    first appearance."""
    spec = benchmark_table.find_benchmark(bench)
    default = spec.version_of() if spec else None
    found = list(dict.fromkeys(entry_version(e) for e in entries if e["benchmark"] == bench))
    return sorted(found, key=lambda v: v != default)


def _columns(entries: list[dict]) -> list[Column]:
    """Headline metrics that at least one entry reports (every scalar for unknown families), one column per
    protocol version where a benchmark's entries come from several."""
    columns: list[Column] = []
    for bench in sorted({e["benchmark"] for e in entries}, key=benchmark_sort_key):
        versions = _versions(entries, bench)
        for version in versions:
            mine = [e for e in entries if e["benchmark"] == bench and entry_version(e) == version]
            reported = {m for e in mine for m in e["metrics"]}
            wanted = headline_metrics(bench) or tuple(sorted(reported))
            metrics = [m for m in wanted if m in reported]
            name = f"{bench} ({version})" if len(versions) > 1 and version else bench
            for m in metrics:
                columns.append(Column(bench, m, name if len(metrics) == 1 else f"{name} {m}", version,
                                      split=len(versions) > 1 and version is not None))
    return columns


def _new_row(e: dict, key: tuple, citations: list[dict]) -> Row:
    """The row an entry starts (its citation joins ``citations`` on first use)."""
    if e["source"] == "published":
        note = "; ".join(x for x in ("" if e["standard"] else e["variant"], e.get("remark", "")) if x)
        if e["citation"] not in citations:
            citations.append(e["citation"])
    else:
        note = "" if e["standard"] else "; ".join(e["nonstandard_reasons"])
    return Row(model=e["model"]["name"], architecture=e["model"]["architecture"], source=e["source"],
               origin=key[2], standard=e["standard"], note=note,
               citation=e.get("citation") if e["source"] == "published" else None)


def build_view(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None) -> BoardView:
    """Pivot entries into rows (one model as reported by one source / one set of weights) x columns
    (benchmark, headline metric). Every selected entry lands in exactly one row; best = column max."""
    entries = _select(list(doc["entries"]), benchmarks, source)
    columns = _columns(entries)
    by_bench: dict[tuple, list[Column]] = {}
    for c in columns:
        by_bench.setdefault((c.benchmark, c.version), []).append(c)

    # Rows: measured first, then published in file order; an entry whose cells are taken starts a new row.
    ordered = ([e for e in entries if e["source"] == "measured"]
               + [e for e in entries if e["source"] == "published"])
    rows: list[Row] = []
    open_rows: dict[tuple, list[Row]] = {}
    citations: list[dict] = []
    for e in ordered:
        cols = [c for c in by_bench.get((e["benchmark"], entry_version(e)), [])
                if metric_value(e, c.metric) is not None]
        if not cols:
            continue
        key = _row_key(e)
        row = next((r for r in open_rows.get(key, []) if not any(c in r.cells for c in cols)), None)
        if row is None:
            row = _new_row(e, key, citations)
            rows.append(row)
            open_rows.setdefault(key, []).append(row)
        for c in cols:
            row.cells[c] = e
    best = {}
    for c in columns:
        vals = [metric_value(r.cells[c], c.metric) for r in rows if c in r.cells]
        if vals:
            best[c] = max(vals)
    return BoardView(title=doc.get("name", "leaderboard"), columns=columns, rows=rows, best=best,
                     citations=citations)


# ---------------------------------------------------------------------------------------------------
# Cell text, shared by the renderers and the comparison

def format_value(v: float | None) -> str:
    """A metric value as shown in tables: one decimal, empty for None."""
    return "" if v is None else f"{v:.1f}"


def md_escape(text: str) -> str:
    """Escape the characters Markdown tables and emphasis would read."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def cell_text(view: BoardView, row: Row, col: Column) -> str:
    """A cell's value, marked when its entry is non-standard (empty when the row has no entry there)."""
    entry = row.cells.get(col)
    if entry is None:
        return ""
    return format_value(metric_value(entry, col.metric)) + ("" if entry["standard"] else NONSTANDARD_MARK)


def is_best(view: BoardView, row: Row, col: Column) -> bool:
    """Whether the row's value in this column is the column's best."""
    entry = row.cells.get(col)
    return entry is not None and metric_value(entry, col.metric) == view.best.get(col)


def source_text(view: BoardView, row: Row) -> str:
    """``published [n]`` (n: the citation's footnote) or ``measured (fingerprint)``."""
    if row.source == "published":
        return f"published [{view.citation_number(row.citation)}]"
    return f"measured ({row.origin})"
