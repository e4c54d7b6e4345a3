"""`densebench report`: plots, the in-context fraction curve, saved pictures, the HTML page."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from board_helpers import canonical_toy_config, install_toy_benchmarks, make_result, write
from PIL import Image
from typer.testing import CliRunner

from densebench import report
from densebench.errors import ResultError

# (train_fraction, fraction_seed, miou) for one encoder: two seeds at 1/128, one elsewhere, full set last.
FRACTION_RUNS = [(128, 42, 20.0), (128, 400, 24.0), (64, 42, 30.0), (8, 42, 41.0), (None, 42, 50.0)]


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (12, 8), colour).save(path)
    return path


@pytest.fixture
def result_files(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    runs = tmp_path / "runs"
    runs.mkdir()
    _png(runs / "clusters.png")
    files = [
        write(make_result(model="enc-a", metrics={"miou": 50.0}, artifacts={"cluster map": "clusters.png"}),
              runs / "a-linear.json"),
        write(make_result(model="enc-b", metrics={"miou": 62.5}, artifacts=["missing.png"]), runs / "b-linear.json"),
    ]
    for i, (fraction, seed, miou) in enumerate(FRACTION_RUNS):
        config = canonical_toy_config(train_fraction=fraction, fraction_seed=seed)
        files.append(write(make_result(model="enc-a", benchmark="toy-incontext", config=config,
                                       metrics={"miou": miou}), runs / f"a-incontext-{i}.json"))
    return files


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.values = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "tr" and "data-benchmark" in a:
            self.rows.append(a)
        if tag == "td" and "data-value" in a:
            self.values.append(float(a["data-value"]))


def test_fraction_series_groups_by_model_and_config(result_files):
    items = [report.ReportItem(p, r, semantic=report._semantic(r)[0])
             for p, r in ((p, report.read_result(p)) for p in result_files)]
    series = report.fraction_series(items)
    assert series == {"enc-a": [(1 / 128, [20.0, 24.0]), (1 / 64, [30.0]), (1 / 8, [41.0]), (1.0, [50.0])]}
    assert report.fraction_of({"train_fraction": None}) == 1.0
    assert report.fraction_of({"train_fraction": 8}) == 0.125


def test_report_writes_plots_and_a_self_contained_page(result_files, tmp_path):
    out = tmp_path / "report"
    summary = report.write_report(result_files, out)
    names = sorted(p.name for p in summary.plots)
    assert names == ["bars-toy-incontext.png", "bars-toy-linear.png", "fraction-toy-incontext.png"]
    for p in summary.plots:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
    assert summary.n_artifacts == 1
    assert len(summary.warnings) == 1 and "missing.png does not exist" in summary.warnings[0]

    html = summary.index.read_text()
    page = _Page()
    page.feed(html)
    assert len(page.rows) == len(result_files)
    # every image is embedded: the plots byte-for-byte, plus the protocol's saved picture
    embedded = [base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images]
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    for p in summary.plots:
        assert p.read_bytes() in embedded
    assert (result_files[0].parent / "clusters.png").read_bytes() in embedded
    assert len(embedded) == len(summary.plots) + 1
    assert "missing: " in html and "default-src 'none'" in html
    # metric cells carry the exact values, in result order
    miou = [50.0, 62.5] + [m for _, _, m in FRACTION_RUNS]
    assert page.values[0::2] == miou             # (miou, wall time) per row
    # labels tell the fraction runs apart by the config fields that vary
    assert "enc-a fraction_seed=400 train_fraction=128" in html


def test_report_marks_nonstandard_results(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    p = write(make_result(synthetic=True), tmp_path / "r.json")
    summary = report.write_report([p], tmp_path / "out")
    html = summary.index.read_text()
    assert re.search(r'title="measured on synthetic data">non-standard', html)
    assert [q.name for q in summary.plots] == ["bars-toy-linear.png"]       # one fraction: no curve


def test_report_refuses_a_tampered_result_and_writes_nothing(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    r = make_result()
    r["metrics"]["miou"] = 99.0
    with pytest.raises(ResultError, match="integrity"):
        report.write_report([write(r, tmp_path / "r.json")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_cli(result_files, tmp_path):
    from densebench.cli_board import register

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["report", *map(str, result_files), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "3 plots, 1 saved pictures" in text and "missing.png does not exist" in text
    assert (tmp_path / "r" / "index.html").is_file()
