"""Leaderboards: one JSON file of entries, validated, submitted to safely, rendered and compared.

A leaderboard keeps two kinds of entries side by side (MTEB / lm-evaluation-harness style: a number
is worth only as much as the record of how it was made):

* ``measured``: made by ``densebench submit`` from a result record whose integrity hash checks out.
  Its config is compared with the benchmark's canonical config (the protocol's published defaults);
  a mismatch, or synthetic data, makes it *non-standard*, accepted only when asked for and always
  shown as such.
* ``published``: reference numbers copied verbatim from a paper or README, each with its citation
  and the protocol variant as the source reports it. Sources that disagree stay separate entries.

Writes happen under a file lock and through an atomic rename, so concurrent submissions both land
and a failed write (full disk) leaves the previous file byte-identical.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import hashlib
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import jsonschema

from .errors import ConfigError, ResultError, choices_message
from .results import _jsonable, atomic_write_text, canonical_json, config_hash, load_schema, read_result

LEADERBOARD_SCHEMA_VERSION = 1
#: Config fields that never change a measured number, used when a protocol module does not list its own.
DEFAULT_NON_SEMANTIC_FIELDS = frozenset({"batch_size", "num_workers", "device"})
#: The metrics a leaderboard shows per benchmark family (the last part of the benchmark name).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "incontext": ("miou",),
    "linear": ("miou",),
    "overcluster": ("miou@gt", "miou@300", "miou@500"),
    "correspondence": ("pck@0.10",),
}
FORMATS = ("table", "markdown", "csv", "html")
SOURCES = ("measured", "published")
NONSTANDARD_MARK = "†"

_FAMILY_ORDER = {"incontext": 0, "linear": 1, "overcluster": 2, "correspondence": 3}
_DATASET_ORDER = {"voc": 0, "ade20k": 1, "coco-things": 2, "coco-stuff": 3, "spair": 4}
_VIT_SIZES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}


# ---------------------------------------------------------------------------------------------------
# Reading and validating

def new_leaderboard(name: str, description: str = "") -> dict:
    """An empty leaderboard document."""
    return {"schema_version": LEADERBOARD_SCHEMA_VERSION, "name": name, "description": description, "entries": []}


def validate_leaderboard(doc: Any, *, source: str = "leaderboard") -> None:
    """Schema check plus the rules a schema cannot say (unique ids); raises ResultError naming the problem."""
    if not isinstance(doc, dict):
        raise ResultError(f"{source} is not a JSON object")
    version = doc.get("schema_version")
    if version != LEADERBOARD_SCHEMA_VERSION:
        raise ResultError(f"{source} has schema_version {version!r}; this densebench reads leaderboard version "
                          f"{LEADERBOARD_SCHEMA_VERSION}", hint="use the densebench version that wrote it")
    validator = jsonschema.Draft202012Validator(load_schema("leaderboard.schema.json"))
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ResultError(f"{source} does not match the leaderboard schema at {where}: {error.message}",
                          hint="restore the file from version control; densebench did not change it")
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc["entries"]):
        if entry["id"] in seen:
            raise ResultError(f"{source}: entries {seen[entry['id']]} and {i} have the same id {entry['id']} "
                              "(the same model, benchmark and config twice)",
                              hint="remove one of them; `densebench submit --replace` replaces entries")
        seen[entry["id"]] = i


def load_leaderboard(path: str | os.PathLike) -> dict:
    """Read and validate a leaderboard file; a missing, unparsable or invalid file is a ResultError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultError(f"leaderboard {path} does not exist",
                          hint="give an existing file, or submit a result to create it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultError(f"leaderboard {path} cannot be read ({e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultError(f"leaderboard {path} is not valid JSON ({e})",
                          hint="restore the file from version control; densebench did not change it") from None
    validate_leaderboard(doc, source=str(path))
    return doc


def default_leaderboard() -> Path:
    """The leaderboard shipped with densebench (published reference numbers plus measured entries)."""
    from .paths import shipped_leaderboard

    return shipped_leaderboard("dense-ssl.json")


# ---------------------------------------------------------------------------------------------------
# Result -> entry

def benchmark_family(benchmark: str) -> str:
    """``voc-incontext`` -> ``incontext``; ``coco-things-overcluster`` -> ``overcluster``."""
    return benchmark.rsplit("-", 1)[-1]


def headline_metrics(benchmark: str) -> tuple[str, ...] | None:
    """The metrics tables show for this benchmark (None: unknown family, show every scalar metric)."""
    return HEADLINE_METRICS.get(benchmark_family(benchmark))


def canonical_config(benchmark: str, model: dict | None = None) -> tuple[dict, frozenset[str]]:
    """The benchmark's canonical config as JSON (its protocol's published defaults) and the fields ignored.

    Results record the *resolved* config (e.g. ``input_size`` 504 where the default says "by patch
    size"), so a protocol module may define ``resolve_canonical(config: dict, model: dict) -> dict`` to
    fill its automatic fields for a given model the way ``run`` does. ``NON_SEMANTIC_FIELDS`` in the
    protocol module lists fields that do not change the measured numbers (device, batch size...).
    """
    from .protocols import get_benchmark

    try:
        bench = get_benchmark(benchmark)
    except ConfigError as e:
        raise ResultError(f"benchmark {benchmark!r} is not known to this densebench, so its canonical config "
                          f"cannot be checked ({e.message})", hint="use the densebench version that ran it") from None
    module = bench.module()
    config = _jsonable(dataclasses.asdict(bench.default_config()))
    resolve = getattr(module, "resolve_canonical", None)
    if resolve is not None and model is not None:
        config = _jsonable(resolve(dict(config), dict(model)))
    ignored = frozenset(getattr(module, "NON_SEMANTIC_FIELDS", DEFAULT_NON_SEMANTIC_FIELDS))
    return config, ignored


def semantic_config(config: dict, canonical: dict, ignored: Iterable[str]) -> dict:
    """The part of a result's config that identifies the measurement: the protocol's own fields minus the
    non-semantic ones. Extra keys a protocol adds to its result config (resolved sizes, notes) are
    derived from these and are left out."""
    ignored = set(ignored)
    return {k: config[k] for k in sorted(canonical) if k in config and k not in ignored}


def config_differences(config: dict, canonical: dict, ignored: Iterable[str]) -> list[str]:
    """Human-readable differences between a result's config and the canonical one."""
    ignored = set(ignored)
    out = []
    for key in sorted(canonical):
        if key in ignored:
            continue
        if key not in config:
            out.append(f"{key} missing (canonical {canonical[key]!r})")
        elif config[key] != canonical[key]:
            out.append(f"{key}={config[key]!r} (canonical {canonical[key]!r})")
    return out


def architecture_label(model: dict) -> str:
    """``ViT-S/14`` style label: the model's own ``architecture``/``arch`` field, else from width and patch."""
    for key in ("architecture", "arch"):
        if isinstance(model.get(key), str) and model[key]:
            return model[key]
    dim, patch = model.get("embed_dim"), model["patch_size"]
    size = _VIT_SIZES.get(dim)
    return f"ViT-{size}/{patch}" if size else f"{dim}-d/{patch}"


def _entry_id(kind: str, *parts: Any) -> str:
    return f"{kind}-" + hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:16]


def published_entry_id(citation_short: str, model_name: str, benchmark: str, variant: str) -> str:
    """Stable id of a published entry: one source's number for one model, benchmark and variant."""
    return _entry_id("p", citation_short, model_name, benchmark, variant)


def entry_from_result(result: dict) -> dict:
    """A measured leaderboard entry from a validated result record (scalar metrics only; the per-class
    values stay in the result file, which the entry names by its integrity hash)."""
    benchmark = result["benchmark"]
    model = result["model"]
    prov = result["provenance"]
    canonical, ignored = canonical_config(benchmark, model)
    semantic = semantic_config(result["config"], canonical, ignored)
    reasons = config_differences(result["config"], canonical, ignored)
    if prov["dataset"].get("synthetic"):
        reasons.insert(0, "measured on synthetic data")
    chash = config_hash(semantic)
    metrics = {k: v for k, v in result["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        raise ResultError(f"result for {model['name']} on {benchmark} has no scalar metric to rank")
    source_url = next((model[k] for k in ("source_url", "url", "weights_url") if isinstance(model.get(k), str)), None)
    n_params = model.get("n_parameters")
    return {
        "id": _entry_id("m", model["fingerprint"], benchmark, chash),
        "source": "measured",
        "model": {"name": model["name"], "architecture": architecture_label(model), "patch_size": model["patch_size"],
                  "n_parameters": n_params if isinstance(n_params, int) else None,
                  "fingerprint": model["fingerprint"], "source_url": source_url},
        "benchmark": benchmark,
        "config_hash": chash,
        "canonical_config_hash": config_hash(semantic_config(canonical, canonical, ignored)),
        "standard": not reasons,
        "nonstandard_reasons": reasons,
        "metrics": metrics,
        "densebench_version": prov["densebench_version"],
        "date": prov["date"],
        "hardware": {"device": prov["device"], **(prov.get("hardware") or {})},
        "wall_time_s": float(prov["timings"]["total_s"]),
        "config": semantic,
        "dataset": prov["dataset"],
        "result_integrity": result["integrity"],
        "submitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------
# Submitting

@dataclass(frozen=True)
class Submission:
    """What happened to one result file."""
    result_path: Path
    entry: dict
    action: str          # "added" or "replaced"


def _describe(entry: dict) -> str:
    return f"{entry['model']['name']} on {entry['benchmark']}"


def write_leaderboard(doc: dict, path: str | os.PathLike) -> None:
    """Validate, then replace the file atomically; on failure (e.g. a full disk) the old file is untouched."""
    path = Path(path)
    validate_leaderboard(doc, source=str(path))
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ResultError(f"could not write leaderboard {path} ({e.strerror or e}); the previous file was left "
                          "unchanged", hint="free disk space (or fix permissions) and submit again") from None


def submit(results: Sequence[str | os.PathLike], leaderboard: str | os.PathLike, *,
           allow_nonstandard: bool = False, replace: bool = False, lock_timeout: float = 60.0) -> list[Submission]:
    """Add result files to a leaderboard: all of them or none.

    Each result must pass its schema and integrity check; a config other than the benchmark's canonical
    one (or synthetic data) needs ``allow_nonstandard``; a result already on the board (same weights
    fingerprint, benchmark and semantic config) needs ``replace``. The read-modify-write runs under
    ``<leaderboard>.lock``; a missing leaderboard file is created.
    """
    if not results:
        raise ResultError("no result files given", hint="densebench submit RESULT.json... --leaderboard FILE")
    prepared: list[tuple[Path, dict]] = []
    for p in map(Path, results):
        entry = entry_from_result(read_result(p))
        if not entry["standard"] and not allow_nonstandard:
            raise ResultError(f"{p} ({_describe(entry)}) was not measured with the canonical config: "
                              + "; ".join(entry["nonstandard_reasons"]),
                              hint="re-run with the benchmark's defaults on the real dataset, or pass "
                                   "--allow-nonstandard to add it marked as non-standard")
        for q, other in prepared:
            if other["id"] == entry["id"]:
                raise ResultError(f"{q} and {p} are the same measurement ({_describe(entry)}, config "
                                  f"{entry['config_hash']})", hint="submit only one of them")
        prepared.append((p, entry))

    path = Path(leaderboard)
    lock = filelock.FileLock(str(path) + ".lock", timeout=lock_timeout)
    try:
        with lock:
            doc = load_leaderboard(path) if path.exists() else new_leaderboard(path.stem)
            entries = doc["entries"]
            where = {e["id"]: i for i, e in enumerate(entries)}
            done = []
            for p, entry in prepared:
                if entry["id"] in where:
                    old = entries[where[entry["id"]]]
                    if not replace:
                        raise ResultError(
                            f"{path} already has {_describe(entry)} with the same weights and config "
                            f"(entry {entry['id']}, submitted {old.get('submitted', 'earlier')}); "
                            f"{p} was not added", hint="pass --replace to overwrite that entry")
                    entries[where[entry["id"]]] = entry
                    done.append(Submission(p, entry, "replaced"))
                else:
                    where[entry["id"]] = len(entries)
                    entries.append(entry)
                    done.append(Submission(p, entry, "added"))
            write_leaderboard(doc, path)
    except filelock.Timeout:
        raise ResultError(f"could not lock {path}.lock within {lock_timeout:.0f} s",
                          hint="another submit holds the lock; retry (delete the .lock file only if no "
                               "densebench process is running)") from None
    return done


# ---------------------------------------------------------------------------------------------------
# The models x benchmarks view every renderer draws

@dataclass(frozen=True)
class Column:
    benchmark: str
    metric: str
    label: str


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

    @property
    def source_label(self) -> str:
        return f"{self.source} · {self.origin}"


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
    family = benchmark_family(benchmark)
    dataset = benchmark[: -len(family) - 1]
    return (_FAMILY_ORDER.get(family, len(_FAMILY_ORDER)), _DATASET_ORDER.get(dataset, len(_DATASET_ORDER)), benchmark)


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


def _value(entry: dict, metric: str) -> float | None:
    v = entry["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def build_view(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None) -> BoardView:
    """Pivot entries into rows (one model as reported by one source / one set of weights) x columns
    (benchmark, headline metric). Every selected entry lands in exactly one row; best = column max."""
    entries = list(doc["entries"])
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

    # Columns: headline metrics that at least one entry reports (every scalar for unknown families).
    columns: list[Column] = []
    for bench in sorted({e["benchmark"] for e in entries}, key=benchmark_sort_key):
        reported = {m for e in entries if e["benchmark"] == bench for m in e["metrics"]}
        wanted = headline_metrics(bench) or tuple(sorted(reported))
        metrics = [m for m in wanted if m in reported]
        for m in metrics:
            columns.append(Column(bench, m, bench if len(metrics) == 1 else f"{bench} {m}"))
    by_bench: dict[str, list[Column]] = {}
    for c in columns:
        by_bench.setdefault(c.benchmark, []).append(c)

    # Rows: measured first, then published in file order; an entry whose cells are taken starts a new row.
    ordered = [e for e in entries if e["source"] == "measured"] + [e for e in entries if e["source"] == "published"]
    rows: list[Row] = []
    open_rows: dict[tuple, list[Row]] = {}
    citations: list[dict] = []
    for e in ordered:
        cols = [c for c in by_bench.get(e["benchmark"], []) if _value(e, c.metric) is not None]
        if not cols:
            continue
        key = _row_key(e)
        row = next((r for r in open_rows.get(key, []) if not any(c in r.cells for c in cols)), None)
        if row is None:
            if e["source"] == "published":
                note = "; ".join(x for x in ("" if e["standard"] else e["variant"], e.get("remark", "")) if x)
                if e["citation"] not in citations:
                    citations.append(e["citation"])
            else:
                note = "" if e["standard"] else "; ".join(e["nonstandard_reasons"])
            row = Row(model=e["model"]["name"], architecture=e["model"]["architecture"], source=e["source"],
                      origin=key[2], standard=e["standard"], note=note,
                      citation=e.get("citation") if e["source"] == "published" else None)
            rows.append(row)
            open_rows.setdefault(key, []).append(row)
        for c in cols:
            row.cells[c] = e
    best = {}
    for c in columns:
        vals = [_value(r.cells[c], c.metric) for r in rows if c in r.cells]
        if vals:
            best[c] = max(vals)
    return BoardView(title=doc.get("name", "leaderboard"), columns=columns, rows=rows, best=best,
                     citations=citations)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _cell_text(view: BoardView, row: Row, col: Column) -> str:
    entry = row.cells.get(col)
    if entry is None:
        return ""
    return _fmt(_value(entry, col.metric)) + ("" if entry["standard"] else NONSTANDARD_MARK)


def _is_best(view: BoardView, row: Row, col: Column) -> bool:
    entry = row.cells.get(col)
    return entry is not None and _value(entry, col.metric) == view.best.get(col)


def _source_text(view: BoardView, row: Row) -> str:
    if row.source == "published":
        return f"published [{view.citation_number(row.citation)}]"
    return f"measured ({row.origin})"


# ---------------------------------------------------------------------------------------------------
# Renderers: rich table, Markdown, CSV, HTML

def render_table(doc: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None):
    """A rich Table: best per column in bold green, published rows in italic cyan, non-standard marked †."""
    from rich.table import Table

    view = build_view(doc, benchmarks=benchmarks, source=source)
    table = Table(title=f"{view.title}: {len(view.rows)} rows", caption=(
        f"bold green = best in column · {NONSTANDARD_MARK} non-standard protocol (see note) · "
        + " · ".join(f"[{i + 1}] {c['short']}" for i, c in enumerate(view.citations))))
    table.add_column("model", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for c in view.columns:
        family = benchmark_family(c.benchmark)
        table.add_column(f"{c.benchmark[: -len(family) - 1]}\n{family}\n{c.metric}", justify="right")
    table.add_column("note", overflow="fold", max_width=48)
    for row in view.rows:
        cells = []
        for c in view.columns:
            text = _cell_text(view, row, c)
            cells.append(f"[bold green]{text}[/]" if _is_best(view, row, c) else text)
        style = "italic cyan" if row.source == "published" else None
        table.add_row(row.model, row.architecture, _source_text(view, row), *cells, row.note, style=style)
    return table


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def render_markdown(leaderboard: dict, *, benchmarks: Sequence[str] | None = None,
                    source: str | None = None) -> str:
    """The leaderboard as a GitHub Markdown table (best per column in bold) with numbered citations,
    for pasting into a README."""
    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    header = ["Model", "Arch", "Source", *(c.label for c in view.columns), "Note"]
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * len(view.columns) + ["---"]) + "|"]
    for row in view.rows:
        cells = []
        for c in view.columns:
            text = _md_escape(_cell_text(view, row, c))
            cells.append(f"**{text}**" if text and _is_best(view, row, c) else text)
        lines.append("| " + " | ".join([_md_escape(row.model), _md_escape(row.architecture),
                                        _md_escape(_source_text(view, row)), *cells, _md_escape(row.note)]) + " |")
    lines.append("")
    lines.append(f"mIoU / PCK in %. **Bold**: best in column. {NONSTANDARD_MARK}: non-standard protocol variant "
                 "(see Note). Measured rows name their weights fingerprint.")
    lines.append("")
    for i, c in enumerate(view.citations):
        link = f" <{c['url']}>" if c.get("url") else ""
        lines.append(f"{i + 1}. {_md_escape(c['full'])}{link}")
    return "\n".join(lines) + "\n"


def render_csv(leaderboard: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None) -> str:
    """The same rows and columns as the table, one numeric column per (benchmark, metric), via pandas."""
    import pandas as pd

    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    records = []
    for row in view.rows:
        rec: dict[str, Any] = {"model": row.model, "architecture": row.architecture, "source": row.source,
                               "origin": row.origin, "citation": row.citation["full"] if row.citation else "",
                               "standard": row.standard, "note": row.note}
        for c in view.columns:
            rec[c.label] = _value(row.cells[c], c.metric) if c in row.cells else None
        records.append(rec)
    columns = ["model", "architecture", "source", "origin", "citation", "standard", "note",
               *(c.label for c in view.columns)]
    buf = io.StringIO()
    pd.DataFrame.from_records(records, columns=columns).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1d2330;background:#fff}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin-top:1.6rem}
.meta{color:#5b6475;font-size:.85rem;margin:0 0 1rem}
.filters{display:flex;gap:1rem;flex-wrap:wrap;margin:.6rem 0;font-size:.9rem}
table.sortable{border-collapse:collapse;font-size:.85rem}
table.sortable th,table.sortable td{border:1px solid #d9dde5;padding:.25rem .45rem;vertical-align:top}
table.sortable th{background:#f1f3f7;cursor:pointer;user-select:none;position:sticky;top:0}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{font-weight:700;background:#e3f6e6}
tr.published td{color:#24507a;font-style:italic}
tr.nonstandard td.src{color:#8a4b00}
td.note{max-width:28rem;color:#5b6475;font-size:.8rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:640px;border:1px solid #d9dde5}
figcaption{font-size:.8rem;color:#5b6475}
.missing{color:#a00}
"""

# Sorting: click a header; numbers sort best-first on the first click, empty cells always last.
# Filters: <select data-filter=ATTR data-table=ID> keeps rows whose data-ATTR equals the choice;
# <select data-column-filter data-table=ID> shows only the columns of one benchmark.
_JS = """
(function(){
  function key(td, numeric){
    if(!td) return null;
    if(numeric){ var v = td.getAttribute('data-value'); return v === null ? null : parseFloat(v); }
    return td.textContent.trim().toLowerCase();
  }
  function sortBy(th){
    var table = th.closest('table'), tbody = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var dir = current ? (current === 'ascending' ? 'descending' : 'ascending') : (numeric ? 'descending' : 'ascending');
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function(r1, r2){
      var a = key(r1.cells[idx], numeric), b = key(r2.cells[idx], numeric);
      if(a === null && b === null) return 0;
      if(a === null) return 1;
      if(b === null) return -1;
      var c = a < b ? -1 : (a > b ? 1 : 0);
      return dir === 'ascending' ? c : -c;
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
    th.parentNode.querySelectorAll('th').forEach(function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
  }
  function applyFilters(table){
    var rowFilters = document.querySelectorAll('select[data-filter][data-table="' + table.id + '"]');
    var colSel = document.querySelector('select[data-column-filter][data-table="' + table.id + '"]');
    var col = colSel ? colSel.value : '';
    table.querySelectorAll('[data-bench]').forEach(function(c){ c.hidden = col !== '' && c.getAttribute('data-bench') !== col; });
    Array.prototype.forEach.call(table.tBodies[0].rows, function(tr){
      var show = Array.prototype.every.call(rowFilters, function(s){
        return s.value === '' || tr.getAttribute('data-' + s.getAttribute('data-filter')) === s.value;
      });
      if(show && col !== ''){
        show = Array.prototype.some.call(tr.querySelectorAll('td[data-bench="' + col + '"]'), function(td){
          return td.hasAttribute('data-value');
        });
      }
      tr.hidden = !show;
    });
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th){
      th.addEventListener('click', function(){ sortBy(th); });
    });
  });
  document.querySelectorAll('select[data-filter], select[data-column-filter]').forEach(function(s){
    s.addEventListener('change', function(){ applyFilters(document.getElementById(s.getAttribute('data-table'))); });
  });
})();
"""


def esc(value: Any) -> str:
    """HTML-escape anything (attributes and text)."""
    return html.escape(str(value), quote=True)


def html_page(title: str, body: str) -> str:
    """A self-contained page: inline CSS and JS, and a Content-Security-Policy that forbids every network
    request (images must be data: URIs), so opening it never phones home."""
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{esc(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n<script>{_JS}</script>\n</body></html>\n")


def html_select(label: str, options: Iterable[str], *, table_id: str, filter_attr: str | None = None) -> str:
    """A filter <select> for a sortable table: rows by ``data-<filter_attr>``, or columns by benchmark."""
    attr = f'data-filter="{esc(filter_attr)}"' if filter_attr else "data-column-filter"
    opts = "".join(f'<option value="{esc(o)}">{esc(o)}</option>' for o in options)
    return (f'<label>{esc(label)} <select {attr} data-table="{esc(table_id)}" id="f-{esc(table_id)}-'
            f'{esc(filter_attr or "benchmark")}"><option value="">all</option>{opts}</select></label>')


def render_html(leaderboard: dict, *, benchmarks: Sequence[str] | None = None, source: str | None = None) -> str:
    """A static, self-contained HTML page: sortable columns, filters by benchmark and source."""
    from . import __version__

    view = build_view(leaderboard, benchmarks=benchmarks, source=source)
    head = ['<th data-type="text">Model</th>', '<th data-type="text">Arch</th>', '<th data-type="text">Source</th>']
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
            v = _value(entry, c.metric)
            detail = [f"{entry['benchmark']} {c.metric}", entry.get("variant") or f"config {entry['config_hash']}"]
            if entry.get("date"):
                detail.append(str(entry["date"]))
            cls = "num best" if _is_best(view, row, c) else "num"
            cells.append(f'<td class="{cls}" data-bench="{esc(c.benchmark)}" data-value="{v!r}" '
                         f'data-entry="{esc(entry["id"])}" title="{esc(" · ".join(detail))}">'
                         f"{esc(_cell_text(view, row, c))}</td>")
        cells.append(f'<td class="note">{esc(row.note)}</td>')
        body_rows.append(f'<tr class="{" ".join(classes)}" data-source="{row.source}" '
                         f'data-standard="{"yes" if row.standard else "no"}">' + "".join(cells) + "</tr>")
    cites = "".join(
        f'<li id="cite-{i + 1}">{esc(c["full"])}'
        + (f' <a href="{esc(c["url"])}" rel="noreferrer">{esc(c["url"])}</a>' if c.get("url") else "") + "</li>"
        for i, c in enumerate(view.citations))
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"<h1>{esc(view.title)}</h1>"
        f'<p class="meta">{esc(leaderboard.get("description", ""))}<br>{len(view.rows)} rows from '
        f"{sum(len(r.cells) for r in view.rows)} cells · generated by densebench {esc(__version__)} on {generated} · "
        f"mIoU / PCK in % · bold = best in column · {NONSTANDARD_MARK} = non-standard protocol (see Note). "
        "Click a column header to sort.</p>"
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


def render(leaderboard: dict, fmt: str, *, benchmarks: Sequence[str] | None = None, source: str | None = None):
    """Dispatch on ``fmt`` (table -> rich Table; the others -> str)."""
    renderers = {"table": render_table, "markdown": render_markdown, "csv": render_csv, "html": render_html}
    if fmt not in renderers:
        raise ConfigError(choices_message("format", fmt, FORMATS))
    return renderers[fmt](leaderboard, benchmarks=benchmarks, source=source)


# ---------------------------------------------------------------------------------------------------
# Comparing two models

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
    the same source table and variant for published numbers); ``same_protocol`` says whether one was
    found, because a delta across protocols mixes the model change with the protocol change.
    """
    a_entries, b_entries = model_entries(leaderboard, model_a), model_entries(leaderboard, model_b)
    rows = []
    benches = sorted({e["benchmark"] for e in a_entries + b_entries}, key=benchmark_sort_key)
    for bench in benches:
        ra = _ranked([e for e in a_entries if e["benchmark"] == bench])
        rb = _ranked([e for e in b_entries if e["benchmark"] == bench])
        pair = next(((ea, eb) for ea in ra for eb in rb if _protocol_key(ea) == _protocol_key(eb)), None)
        same = pair is not None
        ea, eb = pair if pair else (ra[0] if ra else None, rb[0] if rb else None)
        reported = set((ea or {}).get("metrics", {})) | set((eb or {}).get("metrics", {}))
        metrics = [m for m in (headline_metrics(bench) or sorted(reported)) if m in reported]
        for m in metrics:
            va = _value(ea, m) if ea else None
            vb = _value(eb, m) if eb else None
            if va is None and vb is None:
                continue
            rows.append({"benchmark": bench, "metric": m, "a": va, "b": vb,
                         "delta": None if va is None or vb is None else vb - va,
                         "same_protocol": same and va is not None and vb is not None,
                         "a_from": _origin_label(ea) if va is not None else "",
                         "b_from": _origin_label(eb) if vb is not None else ""})
    return rows


def render_comparison(rows: list[dict], model_a: str, model_b: str, fmt: str = "table"):
    """The comparison as a rich Table (fmt="table"), Markdown or CSV text."""
    header = ["benchmark", "metric", model_a, model_b, "delta (B-A)", "same protocol", "A from", "B from"]

    def cells(r: dict) -> list[str]:
        delta = "" if r["delta"] is None else f"{r['delta']:+.1f}"
        return [r["benchmark"], r["metric"], _fmt(r["a"]), _fmt(r["b"]), delta,
                "" if r["delta"] is None else ("yes" if r["same_protocol"] else "no"), r["a_from"], r["b_from"]]

    if fmt == "table":
        from rich.table import Table

        table = Table(title=f"{model_a} (A) vs {model_b} (B)")
        for i, h in enumerate(header):
            table.add_column(h, justify="right" if 2 <= i <= 4 else "left")
        for r in rows:
            c = cells(r)
            if r["delta"] is not None and r["delta"] != 0:
                colour = "green" if r["delta"] > 0 else "red"
                c[4] = f"[bold {colour}]{c[4]}[/]"
            table.add_row(*c)
        return table
    if fmt == "markdown":
        lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
                 "|---|---|---:|---:|---:|---|---|---|"]
        lines += ["| " + " | ".join(_md_escape(x) for x in cells(r)) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        import pandas as pd

        buf = io.StringIO()
        pd.DataFrame([{**{k: r[k] for k in ("benchmark", "metric", "a", "b", "delta", "same_protocol")},
                       "a_from": r["a_from"], "b_from": r["b_from"]} for r in rows],
                     columns=["benchmark", "metric", "a", "b", "delta", "same_protocol", "a_from", "b_from"]
                     ).to_csv(buf, index=False, lineterminator="\n")
        return buf.getvalue()
    raise ConfigError(choices_message("format", fmt, ("table", "markdown", "csv")))

