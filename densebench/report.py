"""``densebench report``: one static HTML page (plus the PNG plots) for a set of result files.

What a user looks at after a run: a model card per encoder (architecture, patch size, fingerprint, weights, its
runs with their headline metrics, standard or non-standard and why) beside the published rows of comparable
models (same architecture family, e.g. every ViT-S) from the shipped leaderboard; a sortable table of every
result; a horizontal bar chart per benchmark (± std where a metric has several seeds, non-standard results
hatched); the in-context mIoU against the training fraction when several fractions were run; and the pictures
the protocols saved (``provenance.artifacts``: a list of paths, or a {caption: path} mapping, relative to the
result file). The HTML embeds every image as a data: URI, so the page is one self-contained file that makes no
network request; the plots are also written as PNG files next to it. Every file is written atomically with
the permission bits a result gets (readable by a lab's web server under the usual umask).
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import benchmark_table
from . import leaderboard as lb
from .errors import ResultError
from .paths import slug
from .pictures import write_bytes_atomic
from .results import RUN_SUMMARY, atomic_write_text, canonical_json, check_writable_folder, config_hash, read_result

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
#: In-context config fields that select the training subset: they vary along the fraction curve.
FRACTION_FIELDS = frozenset({"train_fraction", "fraction_seed", "train_list"})
#: ``densebench run`` writes this beside the per-benchmark results: not a result, skipped in folders.
SUMMARY_NAME = RUN_SUMMARY
#: One colour per metric in the bar charts (matplotlib's tab10).
METRIC_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_SIZE_WORDS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "G"}
_SIZE_LETTERS = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H", "g": "g"}


@dataclass
class ReportItem:
    """One result as the report shows it."""
    path: Path
    result: dict
    label: str = ""
    semantic: dict = field(default_factory=dict)
    nonstandard: list[str] = field(default_factory=list)


@dataclass
class ReportSummary:
    index: Path
    plots: list[Path]
    n_artifacts: int
    warnings: list[str]


def _semantic(result: dict) -> tuple[dict, list[str]]:
    """(the config fields that identify the measurement, why it is non-standard). Benchmarks this
    densebench does not know keep their whole config and are reported as unchecked."""
    try:
        semantic, _, reasons = lb.check_config(result)
    except ResultError:
        return dict(result["config"]), ["benchmark unknown to this densebench (config not checked)"]
    return semantic, reasons


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _assign_labels(items: list[ReportItem]) -> None:
    """Model name, plus the weights fingerprint when one name has several, plus the config fields that differ
    between this model's results of the same benchmark: short labels that still tell the bars apart."""
    fps_by_name: dict[str, set] = {}
    for it in items:
        fps_by_name.setdefault(it.result["model"]["name"], set()).add(it.result["model"]["fingerprint"])
    by_bench: dict[str, list[ReportItem]] = {}
    for it in items:
        by_bench.setdefault(it.result["benchmark"], []).append(it)
    for group in by_bench.values():
        same_model: dict[tuple, list[ReportItem]] = {}
        for it in group:
            same_model.setdefault((it.result["model"]["name"], it.result["model"]["fingerprint"]), []).append(it)
        seen: dict[str, int] = {}
        for it in group:
            mates = same_model[(it.result["model"]["name"], it.result["model"]["fingerprint"])]
            keys = sorted({k for mate in mates for k in mate.semantic})
            varying = [k for k in keys if len({canonical_json(mate.semantic.get(k)) for mate in mates}) > 1]
            name = it.result["model"]["name"]
            parts = [name]
            if len(fps_by_name[name]) > 1:
                parts.append(f"[{lb.short_fingerprint(it.result['model']['fingerprint'])[:8]}]")
            parts += [f"{k}={_fmt_value(it.semantic.get(k))}" for k in varying]
            label = " ".join(parts)
            seen[label] = seen.get(label, 0) + 1
            it.label = label if seen[label] == 1 else f"{label} #{seen[label]}"


def _metric_names(benchmark: str, items: list[ReportItem]) -> list[str]:
    reported = {k for it in items for k, v in it.result["metrics"].items() if _is_number(v)}
    wanted = lb.headline_metrics(benchmark) or sorted(k for k in reported
                                                      if not (k.endswith("_std") and k[:-4] in reported))
    return [m for m in wanted if m in reported]


def main_metric(benchmark: str, metrics: Sequence[str] = ()) -> str | None:
    """The benchmark's main metric (for a benchmark this densebench does not know: the first of ``metrics``)."""
    spec = benchmark_table.find_benchmark(benchmark)
    if spec is not None:
        return spec.main_metric
    return next(iter(metrics), None)


def metric_spread(metrics: dict, name: str) -> tuple[float | None, int | None]:
    """(std over seeds, number of seeds) of metric ``name``: from its per-seed values ``<name>_seeds`` when
    recorded (population std, ddof=0, as the protocols report ``_std``), else its recorded ``<name>_std`` (seed
    count unknown). (None, n) when there is nothing to spread: a single seed, or no record of one."""
    seeds = metrics.get(f"{name}_seeds")
    if isinstance(seeds, list) and seeds and all(_is_number(v) for v in seeds):
        return (float(np.std(np.asarray(seeds, dtype=np.float64))) if len(seeds) > 1 else None), len(seeds)
    std = metrics.get(f"{name}_std")
    if _is_number(std) and std > 0:
        return float(std), None
    return None, None


def _pm(value: float, std: float | None) -> str:
    """``65.0 ± 0.1``; a spread under 0.05 keeps two decimals (not a misleading ``± 0.0``)."""
    if std is None:
        return f"{value:.1f}"
    return f"{value:.1f} ± {std:.1f}" if std >= 0.05 else f"{value:.1f} ± {std:.2f}"


def _with_spread(metrics: dict, name: str) -> str:
    """``65.0 ± 0.1 (2 seeds)``: a metric as the cards write it."""
    std, n = metric_spread(metrics, name)
    return _pm(float(metrics[name]), std) + (f" ({n} seeds)" if std is not None and n else "")


def architecture_family(model: dict) -> str | None:
    """The architecture family a model is compared within: ``ViT-S`` for a ``ViT-S/14 +4 reg`` leaderboard
    entry, a timm ``vit_small_patch16_224``, a hub ``dinov2_vits14`` or ``facebook/dinov2-small``; from the
    width for a ViT that names no size. None when the model is not a ViT of a known size (e.g. ``pixels``)."""
    label = lb.architecture_label(model)
    m = re.match(r"ViT-(Ti|S|B|L|H|g|G)\b", label)
    if m:
        return f"ViT-{m.group(1)}"
    low = label.lower()
    if "vit" not in low and "dino" not in low:
        return None
    m = re.search(r"(?:^|[^a-z])(tiny|small|base|large|huge|gigantic|giant)(?:[^a-z]|$)", low)
    if m:
        return f"ViT-{_SIZE_WORDS[m.group(1)]}"
    m = re.search(r"vit(ti|s|b|l|h|g)\d", low)
    if m:
        return f"ViT-{_SIZE_LETTERS[m.group(1)]}"
    by_width = lb.architecture_label({"embed_dim": model.get("embed_dim"), "patch_size": model.get("patch_size")})
    return by_width.split("/", 1)[0] if by_width.startswith("ViT-") else None


# ---------------------------------------------------------------------------------------------------
# Plots

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_figure(fig, path: Path) -> bytes:
    """Render ``fig`` as PNG, write it atomically to ``path`` and return the bytes (for the data: URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    write_bytes_atomic(path, data)
    return data


@dataclass(frozen=True)
class Bar:
    """One bar of a benchmark's chart: a result's value of one metric, ± std over seeds when several."""
    label: str
    metric: str
    value: float
    std: float | None
    standard: bool


def bar_data(benchmark: str, items: list[ReportItem]) -> list[Bar]:
    """The bars of ``benchmark``'s chart, in result order, one per (result, headline metric it reports)."""
    bars = []
    names = _metric_names(benchmark, items)
    for it in items:
        for m in names:
            v = it.result["metrics"].get(m)
            if _is_number(v):
                bars.append(Bar(it.label, m, float(v), metric_spread(it.result["metrics"], m)[0],
                                not it.nonstandard))
    return bars


def _wrap(label: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


def bar_figure(benchmark: str, items: list[ReportItem]):
    """Horizontal grouped bars (long labels wrap on the left instead of squashing the plot): one group per
    result, one bar per headline metric, value (± std) written at the bar's end; non-standard results hatched."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bars = bar_data(benchmark, items)
    metrics = list(dict.fromkeys(b.metric for b in bars))
    labels = list(dict.fromkeys(b.label for b in bars))
    n_lines = sum(_wrap(lab).count("\n") + 1 for lab in labels)
    height = 1.5 + max(0.3 * len(bars) + 0.15 * len(labels), 0.2 * n_lines)
    fig = _figure(9.0, height)
    ax = fig.add_subplot()
    step = 0.8 / len(metrics)
    colour = {m: METRIC_COLOURS[j % len(METRIC_COLOURS)] for j, m in enumerate(metrics)}
    top = max([b.value + (b.std or 0.0) for b in bars], default=1.0)
    for b in bars:
        y = labels.index(b.label) + (metrics.index(b.metric) - (len(metrics) - 1) / 2) * step
        ax.barh(y, b.value, height=step * 0.9, color=colour[b.metric] if b.standard else "white",
                edgecolor=colour[b.metric], hatch=None if b.standard else "///", linewidth=1.2)
        if b.std is not None:
            ax.errorbar(b.value, y, xerr=b.std, fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.annotate(_pm(b.value, b.std), (b.value + (b.std or 0.0), y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_yticks(range(len(labels)), [_wrap(lab) for lab in labels], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, top) * 1.22)
    ax.set_xlabel("score (%)")
    ax.set_title(benchmark)
    handles = [Patch(color=colour[m], label=m) for m in metrics] if len(metrics) > 1 else []
    if not all(b.standard for b in bars):
        handles.append(Patch(facecolor="white", edgecolor="#444", hatch="///",
                             label="non-standard (why: results table)"))
    if any(b.std is not None for b in bars):
        handles.append(Line2D([], [], color="black", marker="|", markersize=8, label="± std over seeds"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8)
    return fig


def bar_chart(benchmark: str, items: list[ReportItem], path: Path) -> Path:
    """Draw :func:`bar_figure` into ``path`` (PNG)."""
    _save_figure(bar_figure(benchmark, items), path)
    return path


def fraction_of(config: dict) -> float:
    """The share of the training split an in-context run used: ``train_fraction`` N means 1/N; None = all."""
    f = config.get("train_fraction")
    if f is None:
        return 1.0
    f = float(f)
    return 1.0 / f if f > 1 else f


def fraction_series(items: list[ReportItem]) -> dict[str, list[tuple[float, list[float]]]]:
    """In-context results grouped into curves: same model and config apart from the training subset.
    Returns {curve label: [(fraction, [miou per seed/list]), ...]} for curves with >= 2 fractions."""
    curves: dict[tuple, dict[float, list[float]]] = {}
    names: dict[tuple, str] = {}
    for it in items:
        miou = it.result["metrics"].get("miou")
        # Curves exist for protocols whose config selects a training fraction (the in-context protocol).
        if "train_fraction" not in it.semantic or not isinstance(miou, (int, float)):
            continue
        rest = {k: v for k, v in it.semantic.items() if k not in FRACTION_FIELDS}
        key = (it.result["benchmark"], it.result["model"]["fingerprint"], config_hash(rest))
        curves.setdefault(key, {}).setdefault(fraction_of(it.result["config"]), []).append(float(miou))
        names.setdefault(key, it.result["model"]["name"])
    out = {}
    labels_used: dict[str, int] = {}
    for key, points in curves.items():
        if len(points) < 2:
            continue
        label = names[key]
        labels_used[label] = labels_used.get(label, 0) + 1
        if labels_used[label] > 1:
            label = f"{label} (config {key[1][:6]})"
        out[label] = sorted(points.items())
    return out


def fraction_figure(benchmark: str, series: dict[str, list[tuple[float, list[float]]]]):
    """mIoU against the training fraction (log2 axis, 1/128 ... 1); several seeds -> mean ± std (ddof=0)."""
    fig = _figure(8.0, 4.2)
    ax = fig.add_subplot()
    for label, points in series.items():
        xs = [x for x, _ in points]
        means = [float(np.mean(v)) for _, v in points]
        stds = [float(np.std(v)) for _, v in points]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(ticks, [("1" if x == 1 else f"1/{round(1 / x)}") for x in ticks])
    ax.set_xlabel("fraction of the training split in the memory bank")
    ax.set_ylabel("mIoU (%), mean ± std over seeds")
    ax.set_title(f"{benchmark}: mIoU vs training fraction")
    ax.legend(fontsize=8)
    return fig


def fraction_plot(benchmark: str, series: dict[str, list[tuple[float, list[float]]]], path: Path) -> Path:
    """Draw :func:`fraction_figure` into ``path`` (PNG)."""
    _save_figure(fraction_figure(benchmark, series), path)
    return path


# ---------------------------------------------------------------------------------------------------
# Model cards and the published rows of the same architecture family

@dataclass
class ModelGroup:
    """The results of one encoder (one name and weights fingerprint)."""
    name: str
    title: str                          # the name, plus a short fingerprint when one name has several
    model: dict
    family: str | None
    items: list[ReportItem]


def model_groups(items: list[ReportItem]) -> list[ModelGroup]:
    """Results grouped per encoder, in order of first appearance; each group's results in benchmark order."""
    groups: dict[tuple[str, str], ModelGroup] = {}
    for it in items:
        model = it.result["model"]
        key = (model["name"], model["fingerprint"])
        if key not in groups:
            groups[key] = ModelGroup(model["name"], model["name"], model, architecture_family(model), [])
        groups[key].items.append(it)
    names = [k[0] for k in groups]
    for (name, fp), g in groups.items():
        if names.count(name) > 1:
            g.title = f"{name} [{lb.short_fingerprint(fp)[:8]}]"
        g.items.sort(key=lambda it: lb.benchmark_sort_key(it.result["benchmark"]))
    return list(groups.values())


@dataclass(frozen=True)
class CompareColumn:
    benchmark: str
    version: str | None
    metric: str

    @property
    def key(self) -> str:
        return f"{self.benchmark}|{self.version or ''}|{self.metric}"


@dataclass
class CompareRow:
    label: str
    architecture: str
    source: str                         # "measured" (this report) | "published"
    origin: str                         # citation short name, or the short weights fingerprint
    standard: bool
    note: str
    citation: dict | None = None
    cells: dict[CompareColumn, tuple[float, bool, str]] = field(default_factory=dict)  # value, standard, why


@dataclass
class Comparison:
    family: str
    columns: list[CompareColumn]
    rows: list[CompareRow]
    citations: list[dict]


def _version(benchmark: str, config: dict | None) -> str | None:
    return lb.entry_version({"benchmark": benchmark, "config": config or {}})


def _place(rows: list[CompareRow], new_row, column: CompareColumn, cell: tuple) -> None:
    """Put ``cell`` in the first of ``rows`` whose column is free, else in a new row (``new_row()``)."""
    row = next((r for r in rows if column not in r.cells), None)
    if row is None:
        row = new_row()
        rows.append(row)
    row.cells[column] = cell


def published_comparison(family: str, groups: list[ModelGroup], doc: dict) -> Comparison:
    """This report's models of ``family`` beside the leaderboard's published rows of the same family.

    Columns: each benchmark the models ran, its main metric, one column per protocol version (the measured runs'
    version first, then the published ones), so numbers of different protocol code never share a column.
    Published rows: one per (model, source, variant), only those with a value in some column."""
    mine = [g for g in groups if g.family == family]
    benches = sorted({it.result["benchmark"] for g in mine for it in g.items}, key=lb.benchmark_sort_key)
    published = [e for e in doc["entries"] if e["source"] == "published" and e["benchmark"] in benches
                 and architecture_family(e["model"]) == family]
    columns: list[CompareColumn] = []
    for bench in benches:
        metric = main_metric(bench, _metric_names(bench, [it for g in mine for it in g.items]))
        if metric is None:
            continue
        measured_versions = [_version(bench, it.result["config"]) for g in mine for it in g.items
                             if it.result["benchmark"] == bench]
        published_versions = [lb.entry_version(e) for e in published
                              if e["benchmark"] == bench and _is_number(e["metrics"].get(metric))]
        columns += [CompareColumn(bench, v, metric)
                    for v in dict.fromkeys(measured_versions + published_versions)]
    by_key = {(c.benchmark, c.version): c for c in columns}

    rows: list[CompareRow] = []
    for g in mine:
        mine_rows: list[CompareRow] = []
        for it in sorted(g.items, key=lambda it: bool(it.nonstandard)):
            col = by_key.get((it.result["benchmark"], _version(it.result["benchmark"], it.result["config"])))
            v = it.result["metrics"].get(col.metric) if col else None
            if not _is_number(v):
                continue
            _place(mine_rows, lambda g=g, it=it, n=len(mine_rows): CompareRow(
                _extra_row_label(g.title, it.label, n), lb.architecture_label(g.model), "measured",
                lb.short_fingerprint(g.model["fingerprint"]), True, ""), col,
                (float(v), not it.nonstandard, "; ".join(it.nonstandard)))
        for r in mine_rows:
            r.standard = all(std for _, std, _ in r.cells.values())
            r.note = "; ".join(dict.fromkeys(why for _, _, why in r.cells.values() if why))
        rows += mine_rows

    citations: list[dict] = []
    open_rows: dict[tuple, list[CompareRow]] = {}
    for e in published:
        col = by_key.get((e["benchmark"], lb.entry_version(e)))
        if col is None or not _is_number(e["metrics"].get(col.metric)):
            continue
        key = (e["model"]["name"], e["citation"]["short"], None if e["standard"] else e.get("variant"))
        if e["citation"] not in citations:
            citations.append(e["citation"])
        note = "; ".join(x for x in ("" if e["standard"] else e.get("variant", ""), e.get("remark", "")) if x)
        _place(open_rows.setdefault(key, []), lambda e=e, note=note: _new_published_row(e, note, rows), col,
               (float(e["metrics"][col.metric]), bool(e["standard"]), note))
    return Comparison(family, columns, rows, citations)


def _extra_row_label(title: str, label: str, n: int) -> str:
    """The model's first row is its name; a further row (a second config of one benchmark) is named by the
    result that opened it (``enc-a train_fraction=8``), else numbered."""
    if n == 0:
        return title
    return label if label != title else f"{title} #{n + 1}"


def _new_published_row(entry: dict, note: str, rows: list[CompareRow]) -> CompareRow:
    row = CompareRow(entry["model"]["name"], entry["model"]["architecture"], "published",
                     entry["citation"]["short"], bool(entry["standard"]), note, entry["citation"])
    rows.append(row)
    return row


# ---------------------------------------------------------------------------------------------------
# HTML

REPORT_CSS = """
main.report{max-width:100%}
main.report nav{font-size:.9rem;margin:.2rem 0 1rem} main.report nav a{margin-right:1rem}
.card{border:1px solid #d9dde5;border-radius:6px;padding:.7rem 1rem;margin:1rem 0;box-sizing:border-box}
.card h3{margin:.1rem 0 .5rem;font-size:1.05rem}
dl.facts{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.15rem 1rem;font-size:.85rem;
  margin:0 0 .8rem}
dl.facts dt{color:#5b6475} dl.facts dd{margin:0;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%;margin:.3rem 0}
main.report table.sortable th{vertical-align:bottom}
th small{display:block;font-weight:normal;color:#5b6475}
tr.measured td{background:#fff6dc}
.badge{display:inline-block;padding:0 .35rem;border-radius:3px;font-size:.8rem;white-space:nowrap}
.badge.standard{background:#e3f6e6;color:#1c5e2a} .badge.nonstandard{background:#fde9d4;color:#8a4b00}
td.why{max-width:30rem;font-size:.8rem;color:#5b6475}
table.compare td.why{min-width:10rem;max-width:18rem}
td.rowname small{display:block;color:#5b6475;font-style:normal;font-size:.75rem}
td.nowrap{white-space:nowrap}
.plots{display:flex;flex-wrap:wrap;gap:0 1.5rem} section.plot{max-width:100%}
main.report figure{display:block;max-width:100%;margin:.6rem 0}
table.compare th:first-child,table.compare td.rowname{position:sticky;left:0;z-index:1;background:#fff}
table.compare th:first-child{z-index:2;background:#f1f3f7} table.compare tr.measured td.rowname{background:#fff6dc}
main.report figure img{max-width:100%;height:auto}
ol.citations{font-size:.8rem;color:#5b6475}
"""


def _data_uri(path: Path, data: bytes | None = None) -> str:
    mime = IMAGE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes() if data is None else data).decode("ascii")


def _figure_html(src: str, caption: str) -> str:
    return (f'<figure><img src="{lb.esc(src)}" alt="{lb.esc(caption)}">'
            f"<figcaption>{lb.esc(caption)}</figcaption></figure>")


def _status_html(reasons: list[str]) -> str:
    if not reasons:
        return '<span class="badge standard">standard</span>'
    return f'<span class="badge nonstandard">non-standard {lb.NONSTANDARD_MARK}</span>'


def _num_cell(v: float, text: str | None = None, title: str = "") -> str:
    t = f' title="{lb.esc(title)}"' if title else ""
    return f'<td class="num" data-value="{float(v)!r}"{t}>{lb.esc(text if text is not None else f"{v:.2f}")}</td>'


def _weights_text(model: dict) -> str:
    """Where the weights came from, as the model block records it."""
    parts = [f"{k.removeprefix('weights_')}: {model[k]}" for k in sorted(model)
             if k.startswith("weights") and model[k] not in (None, "", [])]
    parts += [f"{k}: {model[k]}" for k in ("source_url", "url") if isinstance(model.get(k), str)]
    if model.get("loader") == "random":
        parts.append(f"random initialisation (seed {model.get('seed')}): a floor, not a trained encoder")
    if model.get("note"):
        parts.append(str(model["note"]))
    return "; ".join(parts) or "not recorded (the loader's own weights)"


def _features_text(g: ModelGroup) -> str:
    """Layer, final norm and position-embedding resampling; under ``--pos-interp auto`` the choice differs per
    benchmark, so every choice the runs made is named."""
    m = g.model
    parts = [f"{k}={m[k]}" for k in ("layer", "norm") if k in m]
    used = list(dict.fromkeys(str(it.result["model"].get("pos_interp")) for it in g.items))
    if m.get("pos_interp_choice") == "auto":
        parts.append(f"pos_interp=auto (per benchmark: {', '.join(used)})")
    elif "pos_interp" in m:
        parts.append(f"pos_interp={', '.join(used)}")
    return ", ".join(parts)


def _card_facts(g: ModelGroup) -> str:
    m = g.model
    n_params = m.get("n_parameters")
    arch = lb.architecture_label(m)
    facts = [("Architecture", f"{arch} (family {g.family})" if g.family else f"{arch} (no ViT family recognised)"),
             ("Patch size", m.get("patch_size")), ("Embedding dim", m.get("embed_dim")),
             ("Parameters", f"{n_params / 1e6:.1f} M" if isinstance(n_params, int) and n_params else n_params),
             ("Fingerprint", m.get("fingerprint")), ("Weights", _weights_text(m)),
             ("Loader", m.get("loader") or m.get("class")),
             ("Features", _features_text(g))]
    return '<dl class="facts">' + "".join(f"<dt>{lb.esc(k)}</dt><dd>{lb.esc(v)}</dd>" for k, v in facts
                                          if v not in (None, "")) + "</dl>"


def _runs_table(g: ModelGroup, table_id: str) -> str:
    head = ('<th data-type="text">Benchmark</th><th data-type="text">Protocol</th>'
            '<th data-type="text">Metric</th><th data-type="num">Value</th><th data-type="text">Other headline</th>'
            '<th data-type="text">Status</th><th data-type="text">Why non-standard</th>'
            '<th data-type="text">Result file</th>')
    rows = []
    for it in g.items:
        r = it.result
        metrics = r["metrics"]
        names = _metric_names(r["benchmark"], [it])
        main = main_metric(r["benchmark"], names)
        cells = [f'<td class="nowrap">{lb.esc(r["benchmark"])}</td>',
                 f'<td class="nowrap">{lb.esc(_version(r["benchmark"], r["config"]) or "")}</td>',
                 f'<td class="nowrap">{lb.esc(main or "")}</td>']
        cells.append(_num_cell(metrics[main], _with_spread(metrics, main)) if main in names else "<td></td>")
        others = " · ".join(f"{m} {_with_spread(metrics, m)}" for m in names if m != main)
        cells += [f"<td>{lb.esc(others)}</td>", f"<td>{_status_html(it.nonstandard)}</td>",
                  f'<td class="why">{lb.esc("; ".join(it.nonstandard))}</td>',
                  f'<td title="{lb.esc(it.path)}">{lb.esc(it.path.name)}</td>']
        rows.append(f'<tr class="{"nonstandard" if it.nonstandard else ""}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{table_id}" class="sortable runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _header_name(benchmark: str) -> str:
    """A benchmark name that may break after its hyphens in a narrow header (never inside a word)."""
    return "-<wbr>".join(lb.esc(part) for part in benchmark.split("-"))


def _comparison_html(cmp: Comparison, table_id: str) -> str:
    if not any(r.source == "published" for r in cmp.rows):
        return (f"<p>The leaderboard has no published {lb.esc(cmp.family)} row for these benchmarks: nothing to "
                "compare with.</p>")
    head = ('<th data-type="text">Model</th>'
            + "".join(f'<th data-type="num" data-col="{lb.esc(c.key)}">{_header_name(c.benchmark)}'
                      f"<small>{lb.esc(c.metric)}{' · ' + lb.esc(c.version) if c.version else ''}</small></th>"
                      for c in cmp.columns)
            + '<th data-type="text">Note</th>')
    body = []
    for r in cmp.rows:
        if r.source == "published":
            source = f"published [{cmp.citations.index(r.citation) + 1}]"
            note = r.note
        else:
            source = "this report"
            note = "" if r.standard else f"non-standard {lb.NONSTANDARD_MARK}: hover a value for why"
        cells = [f'<td class="rowname">{lb.esc(r.label)}<small>{lb.esc(r.architecture)} · {lb.esc(source)}'
                 "</small></td>"]
        for c in cmp.columns:
            if c in r.cells:
                v, standard, why = r.cells[c]
                cells.append(_num_cell(v, f"{v:.1f}" + ("" if standard else lb.NONSTANDARD_MARK), why))
            else:
                cells.append('<td class="num"></td>')
        cells.append(f'<td class="why">{lb.esc(note)}</td>')
        cls = "measured" if r.source == "measured" else "published"
        body.append(f'<tr class="{cls}{"" if r.standard else " nonstandard"}" data-source="{cls}">'
                    + "".join(cells) + "</tr>")
    notes = "".join(f'<li>{lb.esc(c["full"])} <a href="{lb.esc(c["url"])}">{lb.esc(c["url"])}</a></li>'
                    if c.get("url") else f"<li>{lb.esc(c['full'])}</li>" for c in cmp.citations)
    return (f'<div class="scroll"><table id="{table_id}" class="sortable compare"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            f"<p class=\"meta\">Each column is one benchmark's main metric under one protocol version (numbers of "
            f"different protocol code are never in one column). {lb.NONSTANDARD_MARK}: non-standard (hover for "
            f"why). Highlighted: the runs of this report.</p><ol class=\"citations\">{notes}</ol>")


def _models_section(groups: list[ModelGroup], doc: dict) -> str:
    """A card per model; after the cards of each architecture family, the published rows of that family."""
    parts = []
    families = list(dict.fromkeys(g.family for g in groups))
    for fam in families:
        for g in (g for g in groups if g.family == fam):
            i = groups.index(g)
            n_std = sum(1 for it in g.items if not it.nonstandard)
            parts.append(f'<section class="card" id="model-{i}"><h3>{lb.esc(g.title)}</h3>{_card_facts(g)}'
                         f'<p class="meta">{len(g.items)} runs: {n_std} standard, {len(g.items) - n_std} '
                         f"non-standard {lb.NONSTANDARD_MARK} (measured differently from the published "
                         "protocol: not comparable with published numbers)</p>"
                         + _runs_table(g, f"runs-{i}") + "</section>")
        if fam is None:
            parts.append("<p>No architecture family recognised for the models above (not a ViT of a known "
                         "size): no published rows to compare with.</p>")
            continue
        cmp = published_comparison(fam, groups, doc)
        parts.append(f'<h3 id="published-{slug(fam)}">Side by side with published {lb.esc(fam)} models</h3>'
                     + _comparison_html(cmp, f"compare-{slug(fam)}"))
    return "".join(parts)


def _results_table(items: list[ReportItem]) -> str:
    metric_cols: list[str] = []
    for it in items:
        for m in _metric_names(it.result["benchmark"], [it]):
            if m not in metric_cols:
                metric_cols.append(m)
    head = ('<th data-type="text">Result</th><th data-type="text">Benchmark</th>'
            + "".join(f'<th data-type="num">{lb.esc(m)}</th>' for m in metric_cols)
            + '<th data-type="text">Protocol</th><th data-type="text">Config</th><th data-type="text">Device</th>'
            '<th data-type="num">Wall time (s)</th><th data-type="text">Date</th>')
    rows = []
    for it in items:
        r, prov = it.result, it.result["provenance"]
        cells = [f"<td>{lb.esc(it.label)}</td>", f'<td class="nowrap">{lb.esc(r["benchmark"])}</td>']
        for m in metric_cols:
            v = r["metrics"].get(m)
            cells.append(_num_cell(v) if _is_number(v) else '<td class="num"></td>')
        protocol = "standard" if not it.nonstandard else f"non-standard {lb.NONSTANDARD_MARK}"
        cells.append(f'<td class="src nowrap" title="{lb.esc("; ".join(it.nonstandard))}">{lb.esc(protocol)}</td>')
        cells.append(f'<td title="{lb.esc(canonical_json(it.semantic))}">{config_hash(it.semantic)[:8]}</td>')
        cells.append(f"<td>{lb.esc(prov['device'])}</td>")
        total = float(prov["timings"]["total_s"])
        cells.append(_num_cell(total, f"{total:.1f}"))
        cells.append(f"<td>{lb.esc(prov['date'])}</td>")
        rows.append(f'<tr data-benchmark="{lb.esc(r["benchmark"])}" data-model="{lb.esc(r["model"]["name"])}" '
                    f'class="{"" if not it.nonstandard else "nonstandard"}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="results" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def result_paths(results: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """The result files to read: files as given, folders searched for ``*.json`` (sorted); the run summary
    ``densebench run`` writes beside its results is skipped. Returns (paths, warnings)."""
    paths, warnings = [], []
    for p in map(Path, results):
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*.json") if q.name != SUMMARY_NAME)
        elif p.name == SUMMARY_NAME:
            warnings.append(f"{p}: a run summary, not a result; left out")
        else:
            paths.append(p)
    return paths, warnings


def _pictures_section(items: list[ReportItem], warnings: list[str]) -> tuple[str, int]:
    pictures = []
    n_artifacts = 0
    for it in items:
        figs = []
        for caption, path in _artifacts(it):
            if path.suffix.lower() not in IMAGE_TYPES:
                warnings.append(f"{it.path}: artifact {path} is not an image; left out")
            elif not path.is_file():
                warnings.append(f"{it.path}: artifact {path} does not exist; left out")
                figs.append(f'<p class="missing">missing: {lb.esc(path)}</p>')
            else:
                figs.append(_figure_html(_data_uri(path), caption))
                n_artifacts += 1
        if figs:
            pictures.append(f"<h3>{lb.esc(it.label)} · {lb.esc(it.result['benchmark'])}</h3>" + "".join(figs))
    html = ('<h2 id="pictures">Pictures saved by the protocols</h2>' + "".join(pictures)) if pictures else ""
    return html, n_artifacts


def _artifacts(item: ReportItem) -> list[tuple[str, Path]]:
    raw = item.result["provenance"].get("artifacts") or []
    pairs = list(raw.items()) if isinstance(raw, dict) else [(Path(str(p)).name, p) for p in raw]
    out = []
    for caption, p in pairs:
        if isinstance(p, str):
            path = Path(p)
            out.append((str(caption), path if path.is_absolute() else item.path.parent / path))
    return out


def read_items(paths: Sequence[str | os.PathLike]) -> list[ReportItem]:
    """Read and integrity-check result files; each with its semantic config, why it is non-standard and its
    label."""
    items = []
    for p in map(Path, paths):
        result = read_result(p)
        semantic, reasons = _semantic(result)
        items.append(ReportItem(p, result, semantic=semantic, nonstandard=reasons))
    _assign_labels(items)
    return items


def write_report(results: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 title: str = "densebench report", leaderboard: str | os.PathLike | None = None,
                 overwrite: bool = False) -> ReportSummary:
    """Read (and integrity-check) the results (files, or folders of them), draw the plots into ``out`` and write
    ``out/index.html``. ``leaderboard``: where the published rows come from (default: the shipped one). A folder
    that already holds a report is refused unless ``overwrite``."""
    if not overwrite and (Path(out) / "index.html").exists():
        raise ResultError(f"{Path(out) / 'index.html'} already exists (an earlier report)",
                          hint="choose another --out, or pass --overwrite to replace it")
    paths, warnings = result_paths(results)
    if not paths:
        folders = [str(p) for p in map(Path, results) if Path(p).is_dir()]
        where = f": {', '.join(folders)} holds no result files (*.json)" if folders else " given"
        raise ResultError(f"no results{where}", hint="densebench report RESULT.json... (or a folder of densebench "
                                                      "results) --out DIR")
    from . import __version__

    items = read_items(paths)
    doc = lb.load_leaderboard(leaderboard or lb.default_leaderboard())
    out = Path(out)
    check_writable_folder(out, what="report folder", hint="pass --out DIR on a writable disk")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultError(f"cannot create the report folder {out} ({e.strerror or e})",
                          hint="pass --out DIR: a folder, or a path where one can be made") from None

    benches = sorted({it.result["benchmark"] for it in items}, key=lb.benchmark_sort_key)
    plots: list[Path] = []
    sections = []
    for bench in benches:
        group = [it for it in items if it.result["benchmark"] == bench]
        figs = []
        if _metric_names(bench, group):
            plots.append(out / f"bars-{slug(bench)}.png")
            data = _save_figure(bar_figure(bench, group), plots[-1])
            figs.append(_figure_html(_data_uri(plots[-1], data), f"{bench}: headline metrics per result"))
        series = fraction_series(group)
        if series:
            plots.append(out / f"fraction-{slug(bench)}.png")
            data = _save_figure(fraction_figure(bench, series), plots[-1])
            figs.append(_figure_html(_data_uri(plots[-1], data), f"{bench}: mIoU vs training fraction"))
        sections.append(f'<section class="plot"><h3 id="b-{slug(bench)}">{lb.esc(bench)}</h3>{"".join(figs)}'
                        "</section>")
    pictures, n_artifacts = _pictures_section(items, warnings)
    groups = model_groups(items)

    body = (
        f'<style>{REPORT_CSS}</style><main class="report">'
        f"<h1>{lb.esc(title)}</h1>"
        f'<p class="meta">{len(items)} results of {len(groups)} models · densebench {lb.esc(__version__)} · '
        "metrics in % · click a column header to sort</p>"
        '<nav><a href="#models">Models</a><a href="#all-results">All results</a><a href="#plots">Plots</a>'
        + ('<a href="#pictures">Pictures</a>' if pictures else "") + "</nav>"
        '<h2 id="models">Models</h2>' + _models_section(groups, doc)
        + '<h2 id="all-results">All results</h2><div class="filters">'
        + lb.html_select("Benchmark", benches, table_id="results", filter_attr="benchmark")
        + lb.html_select("Model", sorted({it.result["model"]["name"] for it in items}), table_id="results",
                         filter_attr="model")
        + "</div>" + _results_table(items)
        + '<h2 id="plots">Plots</h2><div class="plots">' + "".join(sections) + "</div>" + pictures + "</main>")
    index = out / "index.html"
    atomic_write_text(index, lb.html_page(title, body))
    return ReportSummary(index=index, plots=plots, n_artifacts=n_artifacts, warnings=warnings)
