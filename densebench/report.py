"""``densebench report``: one static HTML page (plus the PNG plots) for a set of result files.

What a user looks at after a run: a sortable table of every result, a bar chart per benchmark, the
in-context mIoU against the training fraction when several fractions were run, and the pictures the
protocols saved (``provenance.artifacts``: a list of paths, or a {caption: path} mapping, relative to
the result file). The HTML embeds every image as a data: URI, so the page is one self-contained file
that makes no network request; the plots are also written as PNG files next to it.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import leaderboard as lb
from .errors import ResultError
from .paths import slug
from .results import atomic_write_text, canonical_json, check_writable_folder, config_hash, read_result

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
#: In-context config fields that select the training subset: they vary along the fraction curve.
FRACTION_FIELDS = frozenset({"train_fraction", "fraction_seed", "train_list"})


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


def _assign_labels(items: list[ReportItem]) -> None:
    """Model name, plus the weights fingerprint when one name has several, plus the config fields that
    differ between results of the same benchmark: short labels that still tell the bars apart."""
    fps_by_name: dict[str, set] = {}
    for it in items:
        fps_by_name.setdefault(it.result["model"]["name"], set()).add(it.result["model"]["fingerprint"])
    by_bench: dict[str, list[ReportItem]] = {}
    for it in items:
        by_bench.setdefault(it.result["benchmark"], []).append(it)
    for group in by_bench.values():
        keys = sorted({k for it in group for k in it.semantic})
        varying = [k for k in keys if len({canonical_json(it.semantic.get(k)) for it in group}) > 1]
        seen: dict[str, int] = {}
        for it in group:
            name = it.result["model"]["name"]
            parts = [name]
            if len(fps_by_name[name]) > 1:
                parts.append(f"[{lb.short_fingerprint(it.result['model']['fingerprint'])[:8]}]")
            parts += [f"{k}={_fmt_value(it.semantic.get(k))}" for k in varying]
            label = " ".join(parts)
            seen[label] = seen.get(label, 0) + 1
            it.label = label if seen[label] == 1 else f"{label} #{seen[label]}"


def _metric_names(benchmark: str, items: list[ReportItem]) -> list[str]:
    reported = {k for it in items for k, v in it.result["metrics"].items() if isinstance(v, (int, float))}
    wanted = lb.headline_metrics(benchmark) or sorted(reported)
    return [m for m in wanted if m in reported]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def bar_chart(benchmark: str, items: list[ReportItem], path: Path) -> Path:
    """Grouped bars: one group per result, one bar per headline metric, values written on the bars."""
    metrics = _metric_names(benchmark, items)
    n = len(items)
    fig = _figure(max(4.0, 1.1 * n * max(1, len(metrics)) + 1.5), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(n)]
        vals = [it.result["metrics"].get(m) for it in items]
        heights = [v if isinstance(v, (int, float)) else 0.0 for v in vals]
        bars = ax.bar(xs, heights, width=width * 0.95, label=m)
        for bar, v in zip(bars, vals):
            if isinstance(v, (int, float)):
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(n), [it.label for it in items], rotation=20 if n > 2 else 0, ha="right" if n > 2 else "center",
                  fontsize=8)
    top = max([v for it in items for m in metrics if isinstance(v := it.result["metrics"].get(m), (int, float))],
              default=1.0)
    ax.set_ylim(0, max(1.0, top) * 1.15)
    ax.set_ylabel("score (%)")
    ax.set_title(benchmark)
    if len(metrics) > 1:
        ax.legend(fontsize=8)
    fig.savefig(path, format="png")
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


def fraction_plot(benchmark: str, series: dict[str, list[tuple[float, list[float]]]], path: Path) -> Path:
    """mIoU against the training fraction (log2 axis, 1/128 ... 1); several seeds -> mean with min-max bars."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    for label, points in series.items():
        xs = [x for x, _ in points]
        means = [sum(v) / len(v) for _, v in points]
        lo = [m - min(v) for m, (_, v) in zip(means, points)]
        hi = [max(v) - m for m, (_, v) in zip(means, points)]
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(ticks, [("1" if x == 1 else f"1/{round(1 / x)}") for x in ticks])
    ax.set_xlabel("fraction of the training split in the memory bank")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{benchmark}: mIoU vs training fraction")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    return path


def _artifacts(item: ReportItem) -> list[tuple[str, Path]]:
    raw = item.result["provenance"].get("artifacts") or []
    pairs = list(raw.items()) if isinstance(raw, dict) else [(Path(str(p)).name, p) for p in raw]
    out = []
    for caption, p in pairs:
        if isinstance(p, str):
            path = Path(p)
            out.append((str(caption), path if path.is_absolute() else item.path.parent / path))
    return out


def _data_uri(path: Path) -> str:
    mime = IMAGE_TYPES[path.suffix.lower()]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure_html(src: str, caption: str) -> str:
    return (f'<figure><img src="{lb.esc(src)}" alt="{lb.esc(caption)}">'
            f"<figcaption>{lb.esc(caption)}</figcaption></figure>")


def _results_table(items: list[ReportItem]) -> str:
    metric_cols: list[str] = []
    for it in items:
        for m in _metric_names(it.result["benchmark"], [it]):
            if m not in metric_cols:
                metric_cols.append(m)
    head = ('<th data-type="text">Result</th><th data-type="text">Model</th><th data-type="text">Benchmark</th>'
            + "".join(f'<th data-type="num">{lb.esc(m)}</th>' for m in metric_cols)
            + '<th data-type="text">Protocol</th><th data-type="text">Config</th><th data-type="text">Device</th>'
            '<th data-type="num">Wall time (s)</th><th data-type="text">Date</th>')
    rows = []
    for it in items:
        r, prov = it.result, it.result["provenance"]
        cells = [f"<td>{lb.esc(it.label)}</td>", f"<td>{lb.esc(r['model']['name'])}</td>",
                 f"<td>{lb.esc(r['benchmark'])}</td>"]
        for m in metric_cols:
            v = r["metrics"].get(m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                cells.append(f'<td class="num" data-value="{float(v)!r}">{v:.2f}</td>')
            else:
                cells.append('<td class="num"></td>')
        protocol = "standard" if not it.nonstandard else f"non-standard {lb.NONSTANDARD_MARK}"
        cells.append(f'<td class="src" title="{lb.esc("; ".join(it.nonstandard))}">{lb.esc(protocol)}</td>')
        cells.append(f'<td title="{lb.esc(canonical_json(it.semantic))}">{config_hash(it.semantic)[:8]}</td>')
        cells.append(f"<td>{lb.esc(prov['device'])}</td>")
        total = float(prov["timings"]["total_s"])
        cells.append(f'<td class="num" data-value="{total!r}">{total:.1f}</td>')
        cells.append(f"<td>{lb.esc(prov['date'])}</td>")
        rows.append(f'<tr data-benchmark="{lb.esc(r["benchmark"])}" data-model="{lb.esc(r["model"]["name"])}" '
                    f'class="{"" if not it.nonstandard else "nonstandard"}">' + "".join(cells) + "</tr>")
    return (f'<table id="results" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def write_report(results: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 title: str = "densebench report") -> ReportSummary:
    """Read (and integrity-check) the results, draw the plots into ``out`` and write ``out/index.html``."""
    if not results:
        raise ResultError("no result files given", hint="densebench report RESULT.json... --out DIR")
    from . import __version__

    items = []
    for p in map(Path, results):
        result = read_result(p)
        semantic, reasons = _semantic(result)
        items.append(ReportItem(p, result, semantic=semantic, nonstandard=reasons))
    _assign_labels(items)
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
            plots.append(bar_chart(bench, group, out / f"bars-{slug(bench)}.png"))
            figs.append(_figure_html(_data_uri(plots[-1]), f"{bench}: headline metrics per result"))
        series = fraction_series(group)
        if series:
            plots.append(fraction_plot(bench, series, out / f"fraction-{slug(bench)}.png"))
            figs.append(_figure_html(_data_uri(plots[-1]), f"{bench}: mIoU vs training fraction"))
        sections.append(f'<h2 id="b-{slug(bench)}">{lb.esc(bench)}</h2>' + "".join(figs))

    warnings: list[str] = []
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

    body = (
        f"<h1>{lb.esc(title)}</h1>"
        f'<p class="meta">{len(items)} results · densebench {lb.esc(__version__)} · metrics in % · click a column '
        "header to sort</p>"
        '<div class="filters">'
        + lb.html_select("Benchmark", benches, table_id="results", filter_attr="benchmark")
        + lb.html_select("Model", sorted({it.result["model"]["name"] for it in items}), table_id="results",
                         filter_attr="model")
        + "</div>" + _results_table(items) + "".join(sections)
        + (("<h2>Pictures saved by the protocols</h2>" + "".join(pictures)) if pictures else ""))
    index = out / "index.html"
    atomic_write_text(index, lb.html_page(title, body))
    return ReportSummary(index=index, plots=plots, n_artifacts=n_artifacts, warnings=warnings)
