"""Comparing two models on a leaderboard: finding each model's entries, pairing them per benchmark
and metric, and rendering the deltas."""

from __future__ import annotations

import difflib

from .. import tables
from ..errors import ConfigError, ResultError, choices_message
from .entries import entry_version, headline_metrics
from .page import esc, html_page, value_attr
from .view import (NONSTANDARD_MARK, benchmark_sort_key, format_value, md_escape, metric_value,
                   short_fingerprint)

COMPARE_FORMATS = ("table", "markdown", "csv", "json", "plain", "html")


def _fingerprint_matches(fp: str | None, query: str) -> bool:
    """Full fingerprint, or a prefix of >= 6 characters, with or without the ``sha256:`` scheme."""
    if not fp or len(query) < 6:
        return False
    bare = fp.split(":", 1)[1] if fp.startswith("sha256:") else fp
    return fp.startswith(query) or bare.startswith(query)


def model_entries(doc: dict, query: str) -> list[dict]:
    """Entries of one model: by exact model name, else by weights fingerprint (or a prefix of >= 6 chars).

    A name shared by measured entries of different weights is ambiguous and refused (give a fingerprint).
    """
    entries = [e for e in doc["entries"] if e["model"]["name"] == query]
    if not entries:
        entries = [e for e in doc["entries"] if _fingerprint_matches(e["model"]["fingerprint"], query)]
    if not entries:
        names = sorted({e["model"]["name"] for e in doc["entries"]})
        close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
        raise ResultError(f"no leaderboard entry for model {query!r}",
                          hint=("did you mean " + ", ".join(close) + "?") if close else
                          "models on this leaderboard: " + ", ".join(names))
    fps = sorted({e["model"]["fingerprint"] for e in entries if e["source"] == "measured"})
    if len(fps) > 1:
        raise ResultError(f"model name {query!r} matches measured entries of {len(fps)} different weights",
                          hint="name one by its fingerprint: " + ", ".join(short_fingerprint(f) for f in fps))
    return entries


def _protocol_key(entry: dict) -> tuple:
    if entry["source"] == "measured":
        return ("measured", entry["config_hash"])
    return ("published", entry["citation"]["short"], entry["variant"])


def _same_way(ea: dict, eb: dict, exact: bool) -> bool:
    """Measured the same way: the same config (or source table and variant); failing that (``exact`` False),
    both standard entries of one protocol version, i.e. the canonical config of the same reference code."""
    if exact:
        return _protocol_key(ea) == _protocol_key(eb)
    version = entry_version(ea)
    return bool(ea["standard"] and eb["standard"] and version and version == entry_version(eb))


def _ranked(entries: list[dict]) -> list[dict]:
    """Standard before non-standard, measured before published, newest first."""
    newest = sorted(entries, key=lambda e: e.get("date") or "", reverse=True)
    return sorted(newest, key=lambda e: (not e["standard"], e["source"] != "measured"))


def _origin_label(entry: dict) -> str:
    if entry["source"] == "published":
        label = entry["citation"]["short"]
    else:
        label = f"measured, config {entry['config_hash'][:8]}"
    return label + ("" if entry["standard"] else f" {NONSTANDARD_MARK}")


def compare_models(leaderboard: dict, model_a: str, model_b: str) -> list[dict]:
    """Per benchmark and headline metric: A's value, B's value and B − A.

    For each benchmark the pair of entries measured the same way is preferred (same config hash, or
    the same source table and variant for published numbers, else two standard entries of one protocol
    version); ``same_protocol`` says whether one was found, because a delta across protocols (or protocol
    versions) mixes the model change with the protocol change.
    """
    a_entries, b_entries = model_entries(leaderboard, model_a), model_entries(leaderboard, model_b)
    rows = []
    benches = sorted({e["benchmark"] for e in a_entries + b_entries}, key=benchmark_sort_key)
    for bench in benches:
        ra = _ranked([e for e in a_entries if e["benchmark"] == bench])
        rb = _ranked([e for e in b_entries if e["benchmark"] == bench])
        pair = next(((ea, eb) for exact in (True, False) for ea in ra for eb in rb if _same_way(ea, eb, exact)),
                    None)
        same = pair is not None
        ea, eb = pair if pair else (ra[0] if ra else None, rb[0] if rb else None)
        reported = set((ea or {}).get("metrics", {})) | set((eb or {}).get("metrics", {}))
        metrics = [m for m in (headline_metrics(bench) or sorted(reported)) if m in reported]
        for m in metrics:
            va = metric_value(ea, m) if ea else None
            vb = metric_value(eb, m) if eb else None
            if va is None and vb is None:
                continue
            rows.append({"benchmark": bench, "metric": m, "a": va, "b": vb,
                         "delta": None if va is None or vb is None else round(vb - va, 6),
                         "same_protocol": same and va is not None and vb is not None,
                         "a_from": _origin_label(ea) if va is not None else "",
                         "b_from": _origin_label(eb) if vb is not None else "",
                         "a_protocol": (entry_version(ea) or "") if va is not None else "",
                         "b_protocol": (entry_version(eb) or "") if vb is not None else ""})
    return rows


COMPARE_SORTS = ("benchmark", "metric", "a", "b", "delta")


def sort_comparison(rows: list[dict], key: str) -> list[dict]:
    """Rows by ``benchmark`` (the table's order), ``metric`` (A-Z), ``a`` / ``b`` / ``delta`` (largest first);
    missing values last, ties in their order."""
    key = key.strip().lower()
    if key not in COMPARE_SORTS:
        raise ConfigError(choices_message("--sort column", key, COMPARE_SORTS))
    if key == "benchmark":
        return sorted(rows, key=lambda r: benchmark_sort_key(r["benchmark"]))
    if key == "metric":
        return sorted(rows, key=lambda r: r["metric"])
    present = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=True)
    return present + [r for r in rows if r[key] is None]


def _compare_record(r: dict, missing) -> dict:
    """A comparison row for text output: values as numbers, ``missing`` where there is none."""
    return {**{k: (missing if r[k] is None else r[k]) for k in ("a", "b", "delta")},
            "benchmark": r["benchmark"], "metric": r["metric"],
            "same_protocol": missing if r["delta"] is None else r["same_protocol"],
            **{k: r[k] or missing for k in ("a_from", "b_from", "a_protocol", "b_protocol")}}


def _display_record(r: dict, escape=lambda s: s) -> dict:
    """A comparison row as people read it: one decimal, signed delta, the protocol version(s)."""
    versions = [v for v in (r["a_protocol"], r["b_protocol"]) if v]
    version = " vs ".join(dict.fromkeys(versions)) if len(set(versions)) > 1 else "".join(versions[:1])
    same = "" if r["delta"] is None else ("yes" if r["same_protocol"] else "no")
    return {"benchmark": escape(r["benchmark"]), "metric": escape(r["metric"]), "a": format_value(r["a"]),
            "b": format_value(r["b"]), "delta": "" if r["delta"] is None else f"{r['delta']:+.1f}", "same": same,
            "a_from": escape(r["a_from"]), "b_from": escape(r["b_from"]),
            "protocol": escape(version)}


def _comparison_html(rows: list[dict], model_a: str, model_b: str) -> str:
    head = "".join(f'<th data-type="{t}">{esc(h)}</th>' for h, t in (
        ("benchmark", "text"), ("metric", "text"), (f"A: {model_a}", "num"), (f"B: {model_b}", "num"),
        ("B - A", "num"), ("same protocol", "text"), ("A from", "text"), ("B from", "text"), ("protocol", "text")))
    body = []
    for r in rows:
        d = _display_record(r)
        nums = "".join(f'<td class="num"{value_attr(r[k])}>{esc(d[k])}</td>' for k in ("a", "b", "delta"))
        body.append(f"<tr><td>{esc(d['benchmark'])}</td><td>{esc(d['metric'])}</td>{nums}<td>{esc(d['same'])}</td>"
                    f"<td>{esc(d['a_from'])}</td><td>{esc(d['b_from'])}</td><td>{esc(d['protocol'])}</td></tr>")
    title = f"{model_a} (A) vs {model_b} (B)"
    return html_page(title, f"<h1>{esc(title)}</h1><p class=\"meta\">Per benchmark and headline metric: B - A. "
                     "\"same protocol\" = both entries measured the same way (same config or source table, else "
                     "standard entries of one protocol version); a delta across protocols mixes the model change "
                     "with the protocol change. Click a column header to sort.</p>"
                     f'<table id="compare" class="sortable"><thead><tr>{head}</tr></thead>'
                     f'<tbody>{"".join(body)}</tbody></table>')


def _comparison_terminal(rows: list[dict], model_a: str, model_b: str, width: int):
    """A terminal table whose text columns are short: where each number comes from is a footnote number."""
    from .render import TerminalBoard

    sources: list[str] = []

    def ref(label: str, version: str) -> str:
        if not label:
            return ""
        label += f" (protocol {version})" if version else ""
        if label not in sources:
            sources.append(label)
        return f"[{sources.index(label) + 1}]"

    records = []
    for r in rows:
        d = _display_record(r)
        a, b = ref(r["a_from"], r["a_protocol"]), ref(r["b_from"], r["b_protocol"])
        d["from"] = a if a == b or not b else (b if not a else f"A{a} B{b}")
        records.append(d)
    cols = [tables.Col("benchmark", role="key"), tables.Col("metric", role="key"), tables.Col("a", "A", "number"),
            tables.Col("b", "B", "number"), tables.Col("delta", "B-A", "number"), tables.Col("same", role="key"),
            tables.Col("from", role="key")]
    table = tables.render(records, cols, "table", width=width, title=f"A = {model_a}, B = {model_b}")
    lines = ["same: both numbers measured the same way (same config or source table, else standard entries of one "
             "protocol version); a delta across protocols mixes the model change with the protocol change.",
             *(f"[{i + 1}] {label}" for i, label in enumerate(sources))]
    return TerminalBoard([table], lines)


def render_comparison(rows: list[dict], model_a: str, model_b: str, fmt: str = "table", *,
                      sort: str | None = None, width: int = 80):
    """The comparison as a terminal table (fmt="table": a TerminalBoard that never cuts a name or a number at
    ``width``; sources as numbered notes), Markdown, CSV, JSON, plain text or an HTML page; ``sort`` reorders
    the rows."""
    if fmt not in COMPARE_FORMATS:
        raise ConfigError(choices_message("format", fmt, COMPARE_FORMATS))
    rows = sort_comparison(rows, sort) if sort else list(rows)
    if fmt == "html":
        return _comparison_html(rows, model_a, model_b)
    if fmt == "table":
        return _comparison_terminal(rows, model_a, model_b, width)
    if fmt == "markdown":
        cols = [tables.Col("benchmark", role="key"), tables.Col("metric", role="key"),
                tables.Col("a", md_escape(model_a, pipes=False), "number"),
                tables.Col("b", md_escape(model_b, pipes=False), "number"),
                tables.Col("delta", "delta (B-A)", "number"), tables.Col("same", "same protocol"),
                tables.Col("a_from", "A from"), tables.Col("b_from", "B from"),
                tables.Col("protocol", "protocol version")]
        md = lambda s: md_escape(s, pipes=False)
        return tables.render([_display_record(r, md) for r in rows], cols, "markdown") + "\n"
    cols = [tables.Col(k) for k in ("benchmark", "metric", "a", "b", "delta", "same_protocol", "a_from", "b_from",
                                    "a_protocol", "b_protocol")]
    missing = "" if fmt == "csv" else None
    return tables.render([_compare_record(r, missing) for r in rows], cols, fmt) + "\n"
