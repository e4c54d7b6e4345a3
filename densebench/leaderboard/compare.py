"""Comparing two models on a leaderboard: finding each model's entries, pairing them per benchmark
and metric, and rendering the deltas."""

from __future__ import annotations

import difflib
import io

from ..errors import ConfigError, ResultError, choices_message
from .entries import entry_version, headline_metrics
from .view import (NONSTANDARD_MARK, benchmark_sort_key, format_value, md_escape, metric_value,
                   short_fingerprint)


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
                         "delta": None if va is None or vb is None else vb - va,
                         "same_protocol": same and va is not None and vb is not None,
                         "a_from": _origin_label(ea) if va is not None else "",
                         "b_from": _origin_label(eb) if vb is not None else "",
                         "a_protocol": (entry_version(ea) or "") if va is not None else "",
                         "b_protocol": (entry_version(eb) or "") if vb is not None else ""})
    return rows


def render_comparison(rows: list[dict], model_a: str, model_b: str, fmt: str = "table"):
    """The comparison as a rich Table (fmt="table"), Markdown or CSV text."""
    header = ["benchmark", "metric", model_a, model_b, "delta (B-A)", "same protocol", "A from", "B from",
              "protocol version"]

    def cells(r: dict) -> list[str]:
        delta = "" if r["delta"] is None else f"{r['delta']:+.1f}"
        same = "" if r["delta"] is None else ("yes" if r["same_protocol"] else "no")
        versions = [v for v in (r["a_protocol"], r["b_protocol"]) if v]
        version = " vs ".join(dict.fromkeys(versions)) if len(set(versions)) > 1 else "".join(versions[:1])
        return [r["benchmark"], r["metric"], format_value(r["a"]), format_value(r["b"]), delta, same,
                r["a_from"], r["b_from"], version]

    if fmt == "table":
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(f"{model_a} (A) vs {model_b} (B)"))
        for i, h in enumerate(header):
            table.add_column(escape(h), justify="right" if 2 <= i <= 4 else "left")
        for r in rows:
            c = [escape(x) for x in cells(r)]
            if r["delta"] is not None and r["delta"] != 0:
                colour = "green" if r["delta"] > 0 else "red"
                c[4] = f"[bold {colour}]{c[4]}[/]"
            table.add_row(*c)
        return table
    if fmt == "markdown":
        lines = ["| " + " | ".join(md_escape(h) for h in header) + " |",
                 "|---|---|---:|---:|---:|---|---|---|---|"]
        lines += ["| " + " | ".join(md_escape(x) for x in cells(r)) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        import pandas as pd

        columns = ["benchmark", "metric", "a", "b", "delta", "same_protocol", "a_from", "b_from", "a_protocol",
                   "b_protocol"]
        buf = io.StringIO()
        pd.DataFrame([{k: r[k] for k in columns} for r in rows], columns=columns).to_csv(
            buf, index=False, lineterminator="\n")
        return buf.getvalue()
    raise ConfigError(choices_message("format", fmt, ("table", "markdown", "csv")))
