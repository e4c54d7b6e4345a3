"""The models x benchmarks view every renderer draws: one row per model, mean and average rank, sorting, and
the cell text.

**Rows.** One row per model: a measured model is its weights (fingerprint), a published one its name; every
standard entry of that model lands in its row, whichever run or source it came from. Entries that are not
standard (another config than the canonical one of their protocol version, synthetic data, a published variant)
make separate rows, one per model and kind of deviation (a published variant, the list of config differences,
or "measured on synthetic data" for a whole synthetic run), marked :data:`NONSTANDARD_MARK`. When two entries
fill one cell (two sources of a published number, two synthetic runs), the newest measured entry, else the
first published one in file order, is shown and the others are kept as the cell's ``alternatives``
(:data:`DISAGREE_MARK` when their value differs).

**Columns.** One per benchmark, protocol version and metric. ``protocols`` picks the versions: ``all`` (a column
per version), ``auto`` (one per benchmark: its default version when present, else the version with the most
entries; the others are listed in ``hidden``) or version names (those, ``auto`` elsewhere). ``metrics`` is
``main`` (each benchmark's main metric) or ``all`` (every headline metric).

**Mean and average rank** (MTEB's convention) use each shown benchmark's main-metric column and only the rows
that have a value in every one of them; other rows get none (and sort last). The rank of a row in a column is
its position among the *standard* complete rows (1 = best, ties share the mean of their positions); the average
rank is the mean over the columns. A non-standard row gets a mean (marked) but no rank, and is never "best".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import benchmark_table
from ..errors import ConfigError, choices_message
from .entries import entry_version, headline_metrics
from .store import SOURCES

NONSTANDARD_MARK = "†"
DISAGREE_MARK = "‡"
PROTOCOL_CHOICES = ("auto", "all")
METRIC_CHOICES = ("main", "all")
SYNTHETIC_REASON = "measured on synthetic data"

_DATASET_CODES = {"voc": "VOC", "ade20k": "ADE", "coco-things": "Thing", "coco-stuff": "Stuff", "spair": "SPair",
                  "davis": "DAVIS"}
_PROTOCOL_CODES = {"incontext": "ic", "linear": "lin", "overcluster": "oc", "correspondence": "kp", "davis": "vos"}


@dataclass(frozen=True)
class Column:
    benchmark: str
    metric: str
    label: str                        # the long name: CSV / JSON key, Markdown and HTML header
    version: str | None = None        # the protocol version of every entry in this column
    split: bool = False               # the benchmark has one column per version (the label names it)
    code: str = ""                    # short header for narrow terminals (lines joined by newlines)
    main: bool = True                 # the benchmark's main metric: counts for the mean and the rank


@dataclass
class Row:
    model: str
    architecture: str
    source: str                       # "measured" | "published"
    origin: str                       # the citations' short names, or the weights fingerprint (short)
    standard: bool
    note: str                         # why the row is non-standard, and the sources' remarks
    citation: dict | None             # the first citation used (published rows)
    cells: dict[Column, dict] = field(default_factory=dict)   # column -> the entry shown
    alternatives: dict[Column, list[dict]] = field(default_factory=dict)   # other entries for the same cell
    citations: list[dict] = field(default_factory=list)
    fingerprint: str | None = None    # full weights fingerprint (measured rows)
    mean: float | None = None
    rank: float | None = None
    coverage: int = 0                 # main columns with a value

    @property
    def label(self) -> str:
        """The model name, marked when the row is non-standard."""
        return self.model if self.standard else f"{self.model} {NONSTANDARD_MARK}"


@dataclass
class BoardView:
    title: str
    columns: list[Column]
    rows: list[Row]
    best: dict[Column, float]
    citations: list[dict]             # in order of first use; footnote n = index + 1
    hidden: list[tuple[str, str, int]] = field(default_factory=list)   # (benchmark, version, entries) not shown
    hidden_metrics: bool = False      # headline metrics left out (metrics="main")
    sort: str | None = None
    sort_column: Column | None = None   # the column ``sort`` named (None: model, arch, mean or rank)

    def citation_number(self, citation: dict | None) -> int | None:
        return None if citation is None else self.citations.index(citation) + 1

    @property
    def main_columns(self) -> list[Column]:
        return [c for c in self.columns if c.main]


def benchmark_sort_key(benchmark: str) -> tuple:
    return benchmark_table.benchmark_order(benchmark)


def short_fingerprint(fp: str) -> str:
    fp = fp.split(":", 1)[1] if fp.startswith("sha256:") else fp
    return fp[:12]


def metric_value(entry: dict, metric: str) -> float | None:
    """An entry's value of one metric as a float (None when missing or not finite)."""
    v = entry["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------------
# Selecting entries and columns

def _expand_benchmarks(requested: Sequence[str], present: list[str]) -> list[str]:
    """Benchmark names and groups (``linear``, ``voc``, ``all``) -> the benchmarks with entries, in order."""
    chosen: list[str] = []
    for name in requested:
        if name in present:
            chosen.append(name)
            continue
        specs = [benchmark_table.find_benchmark(b) for b in present]
        group = [b for b, s in zip(present, specs)
                 if name == "all" or (s is not None and name in (s.protocol_name, s.dataset.name))]
        if not group:
            raise ConfigError(choices_message("benchmark", name, present),
                              hint="benchmarks listed are those with entries on this leaderboard; groups: all, "
                                   + ", ".join(benchmark_table.groups()))
        chosen += group
    return list(dict.fromkeys(chosen))


def _select(entries: list[dict], benchmarks: Sequence[str] | None, source: str | None) -> list[dict]:
    """The entries of the chosen benchmarks (each must have entries) and source."""
    present = sorted({e["benchmark"] for e in entries}, key=benchmark_sort_key)
    if benchmarks:
        wanted = set(_expand_benchmarks(benchmarks, present))
        entries = [e for e in entries if e["benchmark"] in wanted]
    if source is not None:
        if source not in SOURCES:
            raise ConfigError(choices_message("source", source, SOURCES))
        entries = [e for e in entries if e["source"] == source]
    return entries


def parse_protocols(protocols: str | Sequence[str] | None) -> str | list[str]:
    """``auto`` / ``all`` / a list of version names, from a string ("a,b") or a sequence."""
    if protocols is None:
        return "all"
    names = [p.strip() for p in (protocols.split(",") if isinstance(protocols, str) else protocols) if p.strip()]
    if len(names) == 1 and names[0] in PROTOCOL_CHOICES:
        return names[0]
    if not names or any(n in PROTOCOL_CHOICES for n in names):
        raise ConfigError(f"--protocol takes auto, all, or protocol version names, not {protocols!r}",
                          hint="e.g. --protocol hbird-1.1,hbird-unknown")
    return names


def _versions(entries: list[dict], bench: str) -> list[str | None]:
    """The protocol versions of ``bench``'s entries: the benchmark's default version first, then in order of
    first appearance."""
    spec = benchmark_table.find_benchmark(bench)
    default = spec.version_of() if spec else None
    found = list(dict.fromkeys(entry_version(e) for e in entries if e["benchmark"] == bench))
    return sorted(found, key=lambda v: v != default)


def _default_version(bench: str) -> str | None:
    spec = benchmark_table.find_benchmark(bench)
    return spec.version_of() if spec else None


def _shown_versions(entries: list[dict], bench: str, protocols: str | list[str]) -> list[str | None]:
    versions = _versions(entries, bench)
    if protocols == "all":
        return versions
    named = [v for v in versions if protocols != "auto" and v in protocols]
    if named:
        return named
    if _default_version(bench) in versions:
        return [_default_version(bench)]
    counts = {v: sum(1 for e in entries if e["benchmark"] == bench and entry_version(e) == v) for v in versions}
    return [max(versions, key=lambda v: counts[v])]          # max keeps the first of equal counts


def _code(bench: str, metric: str, main: str, version: str | None, tagged: bool) -> str:
    """``VOC-lin``; the metric when it is not the main one (``@gt``); the version tag when it is in the label."""
    spec = benchmark_table.find_benchmark(bench)
    if spec is None:
        lines = [bench]
    else:
        lines = [f"{_DATASET_CODES.get(spec.dataset.name, spec.dataset.name)}-"
                 f"{_PROTOCOL_CODES.get(spec.protocol_name, spec.protocol_name)}"]
    if metric != main:
        lines.append(metric[4:] if metric.startswith("miou@") else metric)
    if tagged and version:
        lines.append(version.split("-", 1)[1] if "-" in version else version)
    return "\n".join(lines)


def _columns(entries: list[dict], protocols: str | list[str], metrics: str) -> tuple[list[Column], list]:
    """Headline metrics that at least one entry reports (every scalar for unknown families), for the protocol
    versions chosen; and the (benchmark, version, entries) left out."""
    if metrics not in METRIC_CHOICES:
        raise ConfigError(choices_message("--metrics", metrics, METRIC_CHOICES))
    columns: list[Column] = []
    hidden = []
    for bench in sorted({e["benchmark"] for e in entries}, key=benchmark_sort_key):
        shown = _shown_versions(entries, bench, protocols)
        for v in _versions(entries, bench):
            if v not in shown:
                hidden.append((bench, v, sum(1 for e in entries if e["benchmark"] == bench and entry_version(e) == v)))
        for version in shown:
            mine = [e for e in entries if e["benchmark"] == bench and entry_version(e) == version]
            reported = {m for e in mine for m in e["metrics"]}
            wanted = headline_metrics(bench) or tuple(sorted(reported))
            found = [m for m in wanted if m in reported]
            if not found:                  # only non-headline metrics: nothing to show for this version
                continue
            spec = benchmark_table.find_benchmark(bench)
            main = spec.main_metric if spec and spec.main_metric in found else found[0]
            chosen = found if metrics == "all" else [main]
            split = len(shown) > 1 and version is not None
            tagged = split or (version is not None and version != _default_version(bench))
            name = f"{bench} ({version})" if tagged else bench
            for m in chosen:
                columns.append(Column(bench, m, name if len(chosen) == 1 else f"{name} {m}", version, split=split,
                                      code=_code(bench, m, main, version, tagged), main=m == main))
    return _unique_codes(columns), hidden


def _unique_codes(columns: list[Column]) -> list[Column]:
    """Benchmarks whose short codes coincide (protocols this table does not abbreviate) keep their names."""
    owners: dict[str, set[str]] = {}
    for c in columns:
        owners.setdefault(c.code.split("\n")[0], set()).add(c.benchmark)
    return [c if len(owners[c.code.split("\n")[0]]) == 1
            else dataclasses.replace(c, code="\n".join([c.benchmark, *c.code.split("\n")[1:]])) for c in columns]


# ---------------------------------------------------------------------------------------------------
# Rows

def _row_key(entry: dict) -> tuple:
    """Which row an entry belongs to: the model (its weights when measured), and for a non-standard entry the kind
    of deviation (a published variant; a synthetic run; the config differences)."""
    if entry["source"] == "published":
        return ("published", entry["model"]["name"], None, None if entry["standard"] else entry["variant"])
    return ("measured", entry["model"]["name"], entry["model"]["fingerprint"], _deviation(entry))


def _deviation(entry: dict) -> str | None:
    if entry["standard"]:
        return None
    reasons = entry.get("nonstandard_reasons") or ["non-standard"]
    return SYNTHETIC_REASON if SYNTHETIC_REASON in reasons else "; ".join(reasons)


def _new_row(e: dict, key: tuple) -> Row:
    fp = e["model"].get("fingerprint")
    return Row(model=e["model"]["name"], architecture=e["model"]["architecture"], source=e["source"],
               origin="" if e["source"] == "published" else short_fingerprint(fp), standard=e["standard"],
               note=key[3] or "", citation=None, fingerprint=fp if e["source"] == "measured" else None)


def _add_entry(row: Row, e: dict, cols: list[Column], citations: list[dict]) -> None:
    """Fill the row's empty cells with ``e``; a taken cell keeps ``e`` as an alternative."""
    for c in cols:
        if c in row.cells:
            row.alternatives.setdefault(c, []).append(e)
        else:
            row.cells[c] = e
    if e["source"] != "published":
        return
    cite = e["citation"]
    if cite not in citations:
        citations.append(cite)
    if cite not in row.citations:
        row.citations.append(cite)
        row.citation = row.citation or cite
        row.origin = "; ".join(c["short"] for c in row.citations)
    remark = e.get("remark", "")
    if remark and remark not in row.note:
        row.note = "; ".join(x for x in (row.note, remark) if x)


def _ordered(entries: list[dict]) -> list[dict]:
    """Measured entries newest first, then published ones in file order: the first entry of a cell is shown."""
    measured = sorted((e for e in entries if e["source"] == "measured"), key=lambda e: str(e.get("date") or ""),
                      reverse=True)
    return measured + [e for e in entries if e["source"] == "published"]


def _rank_column(values: list[float]) -> list[float]:
    """1-based ranks, best (largest) first; tied values share the mean of their positions."""
    order = sorted(values, reverse=True)
    return [order.index(v) + (order.count(v) + 1) / 2 for v in values]


def _summarise(rows: list[Row], main: list[Column]) -> None:
    """Coverage, mean and average rank per row (see the module docstring)."""
    for r in rows:
        r.coverage = sum(1 for c in main if c in r.cells)
        r.mean = r.rank = None
        if main and r.coverage == len(main):
            r.mean = sum(metric_value(r.cells[c], c.metric) for c in main) / len(main)
    ranked = [r for r in rows if r.standard and r.mean is not None]
    if not ranked:
        return
    per_column = [_rank_column([metric_value(r.cells[c], c.metric) for r in ranked]) for c in main]
    for i, r in enumerate(ranked):
        r.rank = sum(ranks[i] for ranks in per_column) / len(main)


def build_view(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None,
               protocols: str | Sequence[str] | None = "all", metrics: str = "all",
               sort: str | None = None) -> BoardView:
    """Pivot entries into one row per model (standard entries merged; each kind of non-standard entry its own
    row) x one column per (benchmark, protocol version, metric). Every selected entry of a shown column lands in
    exactly one row, as its cell or one of the cell's alternatives; best = column max over standard rows.

    Rows come standard first, then non-standard, each measured (newest first) then published (file order);
    ``sort`` (see :func:`sort_view`) reorders them. The defaults show everything (``protocols="all"``,
    ``metrics="all"``); ``densebench leaderboard show`` passes ``auto`` and ``main``."""
    entries = _select(list(doc["entries"]), benchmarks, source)
    protocols = parse_protocols(protocols)
    if isinstance(protocols, list):
        known = {entry_version(e) for e in entries}
        for name in protocols:
            if name not in known:
                raise ConfigError(choices_message("protocol version", name, sorted(v for v in known if v)),
                                  hint="versions listed are those of the chosen entries")
    columns, hidden = _columns(entries, protocols, metrics)
    by_bench: dict[tuple, list[Column]] = {}
    for c in columns:
        by_bench.setdefault((c.benchmark, c.version), []).append(c)

    rows: dict[tuple, Row] = {}
    citations: list[dict] = []
    for e in _ordered(entries):
        cols = [c for c in by_bench.get((e["benchmark"], entry_version(e)), [])
                if metric_value(e, c.metric) is not None]
        if not cols:
            continue
        key = _row_key(e)
        if key not in rows:
            rows[key] = _new_row(e, key)
        _add_entry(rows[key], e, cols, citations)
    best = {}
    for c in columns:
        vals = [metric_value(r.cells[c], c.metric) for r in rows.values() if r.standard and c in r.cells]
        if vals:
            best[c] = max(vals)
    ordered = [r for r in rows.values() if r.standard] + [r for r in rows.values() if not r.standard]
    view = BoardView(title=doc.get("name", "leaderboard"), columns=columns, rows=ordered, best=best,
                     citations=citations, hidden=hidden,
                     hidden_metrics=metrics == "main" and any(len(headline_metrics(c.benchmark) or ()) > 1
                                                              for c in columns))
    _summarise(view.rows, view.main_columns)
    if sort:
        sort_view(view, sort)
    return view


# ---------------------------------------------------------------------------------------------------
# Sorting

def sort_names(view: BoardView) -> list[str]:
    """What ``--sort`` accepts for this view."""
    names = ["model", "arch", "mean", "rank"]
    for c in view.columns:
        names += [c.label, c.benchmark, c.code.split("\n")[0]]
    return list(dict.fromkeys(names))


def _sort_key(view: BoardView, name: str) -> tuple[Callable[[Row], object], bool, Column | None]:
    """(value of a row, descending, the column) for a sort name; None values always sort last."""
    wanted = name.strip().lower()
    fixed = {"model": (lambda r: r.model.lower(), False, None),
             "arch": (lambda r: r.architecture.lower(), False, None),
             "mean": (lambda r: r.mean, True, None), "rank": (lambda r: r.rank, False, None)}
    if wanted in fixed:
        return fixed[wanted]
    col = next((c for match in (lambda c: c.label.lower() == wanted,
                                lambda c: c.benchmark.lower() == wanted and c.main,
                                lambda c: c.code.split("\n")[0].lower() == wanted)
                for c in view.columns if match(c)), None)
    if col is not None:
        return (lambda r: metric_value(r.cells[col], col.metric) if col in r.cells else None), True, col
    raise ConfigError(choices_message("--sort column", name, sort_names(view)),
                      hint="sort by model, arch, mean, rank, or a benchmark (its name, column label or code)")


def sort_view(view: BoardView, name: str) -> None:
    """Reorder the rows in place: numbers best first (rank: lowest first), names A-Z, missing values last; rows
    that tie keep their order."""
    key, descending, view.sort_column = _sort_key(view, name)
    present = [r for r in view.rows if key(r) is not None]
    present.sort(key=key, reverse=descending)          # sort() is stable, also in reverse
    view.rows = present + [r for r in view.rows if key(r) is None]
    view.sort = name


# ---------------------------------------------------------------------------------------------------
# Cell text, shared by the renderers and the comparison

def format_value(v: float | None) -> str:
    """A metric value as shown in tables: one decimal, empty for None."""
    return "" if v is None else f"{v:.1f}"


def md_escape(text: str, pipes: bool = True) -> str:
    """Escape the characters Markdown tables and emphasis would read (``pipes`` False: leave ``|`` to the table
    renderer, which escapes it)."""
    text = text.replace("|", "\\|") if pipes else text
    return text.replace("*", "\\*").replace("_", "\\_")


def disagrees(row: Row, col: Column) -> bool:
    """Whether another entry for this cell (another source, another run) shows a different value."""
    shown = format_value(metric_value(row.cells[col], col.metric))
    return any(format_value(metric_value(e, col.metric)) != shown for e in row.alternatives.get(col, ()))


def cell_text(view: BoardView, row: Row, col: Column) -> str:
    """A cell's value, marked when its entry is non-standard or other entries disagree (empty when none)."""
    entry = row.cells.get(col)
    if entry is None:
        return ""
    return (format_value(metric_value(entry, col.metric)) + ("" if entry["standard"] else NONSTANDARD_MARK)
            + (DISAGREE_MARK if disagrees(row, col) else ""))


def summary_text(row: Row, what: str) -> str:
    """The mean (marked on a non-standard row) or the average rank, with two decimals (ranks are often halves
    and quarters; means of one-decimal numbers would tie at one)."""
    if what == "mean":
        return "" if row.mean is None else f"{row.mean:.2f}" + ("" if row.standard else NONSTANDARD_MARK)
    return "" if row.rank is None else f"{row.rank:.2f}"


def is_best(view: BoardView, row: Row, col: Column) -> bool:
    """Whether the row's value in this column is the column's best (only standard rows can be)."""
    entry = row.cells.get(col)
    return (entry is not None and row.standard and entry["standard"]
            and metric_value(entry, col.metric) == view.best.get(col))


def source_text(view: BoardView, row: Row) -> str:
    """``published [n, m]`` (the citations' footnotes) or ``measured (fingerprint)``."""
    if row.source == "published":
        return "published [" + ",".join(str(view.citation_number(c)) for c in row.citations) + "]"
    return f"measured ({row.origin})"
