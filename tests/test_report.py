"""`densebench report`: model cards beside the published rows of the same architecture family, plots (± std over
seeds, non-standard hatched), the in-context fraction curve, saved pictures with a class legend, the HTML page,
file modes."""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from board_helpers import canonical_toy_config, install_toy_benchmarks, make_result, write
from PIL import Image
from typer.testing import CliRunner

from densebench import leaderboard as lb
from densebench import pictures, report
from densebench.data.voc import voc_palette
from densebench.errors import ResultError
from densebench.results import integrity_hash

SHIPPED = Path(report.__file__).resolve().parents[1] / "leaderboards" / "dense-ssl.json"
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
    """Images, result rows, and the data-value of every numeric cell per table id."""

    def __init__(self):
        super().__init__()
        self.images, self.rows = [], []
        self.values: dict[str, list[float]] = {}
        self.row_cells: dict[str, list[list[float | None]]] = {}
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.row_cells[self._table] = []
        if tag == "img":
            self.images.append(a)
        if tag == "tr" and "data-benchmark" in a:
            self.rows.append(a)
        if tag == "tr" and self._table is not None:
            self.row_cells[self._table].append([])
        if tag == "td" and self._table is not None and self.row_cells[self._table]:
            value = float(a["data-value"]) if "data-value" in a else None
            self.row_cells[self._table][-1].append(value)
            if value is not None:
                self.values.setdefault(self._table, []).append(value)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def test_fraction_series_groups_by_model_and_config(result_files):
    series = report.fraction_series(report.read_items(result_files))
    assert series == {"enc-a": [(1 / 128, [20.0, 24.0]), (1 / 64, [30.0]), (1 / 8, [41.0]), (1.0, [50.0])]}
    assert report.fraction_of({"train_fraction": None}) == 1.0
    assert report.fraction_of({"train_fraction": 8}) == 0.125
    # the curve's error bar at 1/128 is the population std of the two seeds: |20 - 24| / 2
    fig = report.fraction_figure("toy-incontext", series)
    (container,) = fig.axes[0].containers
    segments = container.lines[2][0].get_segments()
    (low, high) = [float(y) for _, y in segments[0]]
    assert (low, high) == pytest.approx((22.0 - 2.0, 22.0 + 2.0))


def test_report_writes_plots_and_a_self_contained_page(result_files, tmp_path):
    out = tmp_path / "report"
    summary = report.write_report(result_files, out)
    names = sorted(p.name for p in summary.plots)
    assert names == ["bars-toy-incontext.png", "bars-toy-linear.png", "fraction-toy-incontext.png"]
    for p in summary.plots:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width >= 800 and im.height > 200
    assert summary.n_artifacts == 1
    assert len(summary.warnings) == 1 and "missing.png does not exist" in summary.warnings[0]

    html = summary.index.read_text()
    page = _parse(html)
    assert len(page.rows) == len(result_files)
    # every image is embedded: the plots byte-for-byte, plus the protocol's saved picture
    embedded = [base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images]
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    for p in summary.plots:
        assert p.read_bytes() in embedded
    assert (result_files[0].parent / "clusters.png").read_bytes() in embedded
    assert len(embedded) == len(summary.plots) + 1
    assert "missing: " in html and "default-src 'none'" in html
    # the results table's metric cells carry the exact values, in result order: (miou, wall time) per row
    miou = [50.0, 62.5] + [m for _, _, m in FRACTION_RUNS]
    assert page.values["results"][0::2] == miou
    # labels tell the fraction runs apart by the config fields that vary
    assert "enc-a fraction_seed=400 train_fraction=128" in html
    # one card per model, each with its runs (enc-a: 1 linear + 5 in-context runs; enc-b: 1)
    assert len(page.row_cells["runs-0"]) - 1 == 6 and len(page.row_cells["runs-1"]) - 1 == 1
    assert page.values["runs-1"] == [62.5]


def test_report_marks_nonstandard_results(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    p = write(make_result(synthetic=True), tmp_path / "r.json")
    summary = report.write_report([p], tmp_path / "out")
    html = summary.index.read_text()
    assert re.search(r'title="measured on synthetic data">non-standard', html)
    assert '<td class="why">measured on synthetic data</td>' in html          # the card says why
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


def test_folders_are_searched_and_run_summaries_skipped(result_files, tmp_path):
    runs = result_files[0].parent
    (runs / "summary.json").write_text(json.dumps({"command": ["densebench", "run"]}))
    paths, warnings = report.result_paths([runs])
    assert paths == sorted(result_files) and warnings == []
    paths, warnings = report.result_paths([result_files[0], runs / "summary.json"])
    assert paths == [result_files[0]]
    assert warnings == [f"{runs / 'summary.json'}: a run summary, not a result; left out"]
    summary = report.write_report([runs], tmp_path / "out")
    assert len(_parse(summary.index.read_text()).rows) == len(result_files)


# ---------------------------------------------------------------------------------------------------
# Bars: ± std over seeds, non-standard hatched

def _pop_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_metric_spread_prefers_per_seed_values():
    seeds = [61.25, 64.5, 59.0, 66.75, 63.0]
    assert report.metric_spread({"m": 62.9, "m_seeds": seeds, "m_std": 123.0}, "m") == (
        pytest.approx(_pop_std(seeds), abs=1e-12), 5)
    assert report.metric_spread({"m": 1.0, "m_std": 0.75}, "m") == (0.75, None)     # recorded std, count unknown
    assert report.metric_spread({"m": 1.0, "m_seeds": [1.0]}, "m") == (None, 1)     # one seed: no spread
    assert report.metric_spread({"m": 1.0, "m_std": 0.0}, "m") == (None, None)
    assert report.metric_spread({"m": 1.0}, "m") == (None, None)


def test_bar_chart_draws_values_std_and_hatches_nonstandard(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    seeds = [40.0, 44.0, 45.5]
    long_name = "a-very-long-encoder-name-with-a-checkpoint-suffix_after_neco_training_epoch_25"
    results = [make_result(model=long_name, metrics={"miou": float(np.mean(seeds)), "miou_seeds": seeds}),
               make_result(model="enc-syn", synthetic=True, metrics={"miou": 30.0})]
    items = report.read_items([write(r, tmp_path / f"r{i}.json") for i, r in enumerate(results)])
    bars = report.bar_data("toy-linear", items)
    assert [(b.label, b.metric, b.standard) for b in bars] == [(long_name, "miou", True), ("enc-syn", "miou", False)]
    assert bars[0].value == pytest.approx(sum(seeds) / 3) and bars[0].std == pytest.approx(_pop_std(seeds))
    assert bars[1].std is None

    fig = report.bar_figure("toy-linear", items)
    ax = fig.axes[0]
    drawn = [(p.get_width(), p.get_hatch()) for p in ax.patches]
    assert drawn == [(pytest.approx(bars[0].value), None), (30.0, "///")]
    (err,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    (segment,) = err.lines[2][0].get_segments()
    xs = sorted(float(x) for x, _ in segment)
    assert xs == pytest.approx([bars[0].value - bars[0].std, bars[0].value + bars[0].std])
    # horizontal bars: the long label is wrapped on the y axis, never rotated or cut
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].replace("\n", "") == long_name and max(len(line) for line in labels[0].split("\n")) <= 30
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["non-standard (why: results table)", "± std over seeds"]
    annotations = [t.get_text() for t in ax.texts]
    assert annotations == [f"{bars[0].value:.1f} ± {bars[0].std:.1f}", "30.0"]


# ---------------------------------------------------------------------------------------------------
# Model cards and the published rows of the same architecture family

@pytest.mark.parametrize("model, family", [
    ({"architecture": "ViT-S/14 +4 reg", "patch_size": 14}, "ViT-S"),
    ({"architecture": "ViT-g/14", "patch_size": 14}, "ViT-g"),
    ({"arch": "vit_small_patch16_224", "patch_size": 16, "embed_dim": 384}, "ViT-S"),
    ({"arch": "vit_base_patch14_reg4_dinov2", "patch_size": 14, "embed_dim": 768}, "ViT-B"),
    ({"arch": "dinov2_vitl14", "patch_size": 14}, "ViT-L"),
    ({"arch": "facebook/dinov2-small", "patch_size": 14}, "ViT-S"),
    ({"arch": "my_vit", "patch_size": 16, "embed_dim": 768}, "ViT-B"),
    ({"patch_size": 16, "embed_dim": 1024}, "ViT-L"),
    ({"arch": "pixels-v1", "patch_size": 16, "embed_dim": 16}, None),
    ({"patch_size": 8, "embed_dim": 100}, None),
])
def test_architecture_family(model, family):
    assert report.architecture_family(model) == family


def _vit_s_result(benchmark: str, miou: float) -> dict:
    """A result of a ViT-S/16 (timm arch name, no ``architecture`` field) on a real benchmark."""
    r = make_result(model="my-vits", benchmark=benchmark, metrics={"miou": miou})
    r["model"]["arch"] = "vit_small_patch16_224"
    r["integrity"] = integrity_hash(r)
    return r


def test_card_sits_beside_every_published_vit_s_row_of_the_shipped_board(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    p = write(_vit_s_result("voc-linear", 33.5), tmp_path / "r.json")
    summary = report.write_report([p], tmp_path / "out")
    html = summary.index.read_text()

    # expected straight from the JSON file: published voc-linear entries whose architecture is a ViT-S
    raw = json.loads(SHIPPED.read_text())["entries"]
    expected = sorted((e["model"]["name"], e["metrics"]["miou"]) for e in raw if e["source"] == "published"
                      and e["benchmark"] == "voc-linear" and e["model"]["architecture"].startswith("ViT-S/"))
    assert len(expected) > 10
    cmp = report.published_comparison("ViT-S", report.model_groups(report.read_items([p])),
                                      lb.load_leaderboard(SHIPPED))
    assert [(c.benchmark, c.version, c.metric) for c in cmp.columns] == [("voc-linear", "neco-leopart", "miou")]
    (col,) = cmp.columns
    got = sorted((r.label, r.cells[col][0]) for r in cmp.rows if r.source == "published")
    assert got == expected
    (mine,) = [r for r in cmp.rows if r.source == "measured"]
    assert mine.cells[col][0] == 33.5 and not mine.standard          # the toy config is not voc-linear's canonical
    assert all(not r.architecture.startswith("ViT-B") for r in cmp.rows)

    # the page: the card's facts, and the comparison table holds exactly these values
    assert "vit_small_patch16_224 (family ViT-S)" in html and r'sha256:' in html
    page = _parse(html)
    assert sorted(page.values["compare-ViT-S"]) == sorted([33.5] + [v for _, v in expected])
    assert "Side by side with published ViT-S models" in html
    assert "dino_vitb16" not in html


def _published(template: dict, name: str, arch: str, benchmark: str, miou: float, *, protocol: str = "toy-a",
               standard: bool = True, variant: str = "as published") -> dict:
    e = copy.deepcopy(template)
    e["model"].update(name=name, architecture=arch, patch_size=int(arch.split("/")[1][:2]))
    e.update(benchmark=benchmark, protocol=protocol, standard=standard, variant=variant, metrics={"miou": miou})
    e["citation"] = {"short": "Paper X", "full": "Someone et al., Paper X, Table 1", "url": None}
    e["id"] = lb.published_entry_id("Paper X", name, benchmark, variant)
    return e


def test_comparison_columns_split_by_protocol_version_and_mark_variants(monkeypatch, tmp_path):
    install_toy_benchmarks(monkeypatch)
    template = json.loads(SHIPPED.read_text())["entries"][0]
    doc = lb.new_leaderboard("test")
    doc["entries"] = [
        _published(template, "peer-s16", "ViT-S/16", "toy-linear", 70.0),
        _published(template, "peer-s16", "ViT-S/16", "toy-incontext", 55.0),
        _published(template, "peer-s14", "ViT-S/14", "toy-linear", 61.0, protocol="other-code"),
        _published(template, "peer-s14", "ViT-S/14", "toy-linear", 58.0, standard=False, variant="memory 1,000"),
        _published(template, "peer-b16", "ViT-B/16", "toy-linear", 90.0),
    ]
    board = tmp_path / "board.json"
    lb.write_leaderboard(doc, board)
    config = canonical_toy_config(protocol="toy-a")          # the version the measured runs record
    runs = [write(make_result(model="mine", config=config, metrics={"miou": 40.0}), tmp_path / "a.json"),
            write(make_result(model="mine", benchmark="toy-incontext", config=config, metrics={"miou": 45.0}),
                  tmp_path / "b.json"),
            write(make_result(model="pix", config=config, metrics={"miou": 5.0}), tmp_path / "c.json")]
    pix = json.loads(runs[2].read_text())
    pix["model"].update(arch="pixels-v1", embed_dim=16)
    pix["integrity"] = integrity_hash(pix)
    runs[2].write_text(json.dumps(pix))
    groups = report.model_groups(report.read_items(runs))
    assert [(g.name, g.family) for g in groups] == [("mine", "ViT-S"), ("pix", None)]

    cmp = report.published_comparison("ViT-S", groups, lb.load_leaderboard(board))
    assert [(c.benchmark, c.version) for c in cmp.columns] == [("toy-linear", "toy-a"), ("toy-linear", "other-code"),
                                                               ("toy-incontext", "toy-a")]
    table = {(r.label, r.source, r.standard): {(c.benchmark, c.version): r.cells[c][0] for c in r.cells}
             for r in cmp.rows}
    assert table == {
        ("mine", "measured", True): {("toy-linear", "toy-a"): 40.0, ("toy-incontext", "toy-a"): 45.0},
        ("peer-s16", "published", True): {("toy-linear", "toy-a"): 70.0, ("toy-incontext", "toy-a"): 55.0},
        ("peer-s14", "published", True): {("toy-linear", "other-code"): 61.0},
        ("peer-s14", "published", False): {("toy-linear", "toy-a"): 58.0},
    }
    assert [r.note for r in cmp.rows if not r.standard] == ["memory 1,000"]

    html = report.write_report(runs, tmp_path / "out", leaderboard=board).index.read_text()
    assert "58.0" + lb.NONSTANDARD_MARK in html and "peer-b16" not in html
    assert "no ViT family recognised" in html and "no published rows to compare with" in html

    # the CLI: --leaderboard picks the board; an existing report is refused, --overwrite replaces it
    from densebench.cli import main

    def cli(*extra):
        try:
            main(["report", *map(str, runs), "--out", str(tmp_path / "cli"), *extra])
        except SystemExit as e:
            return e.code
        return 0

    assert cli("--leaderboard", str(board)) == 0
    first = (tmp_path / "cli" / "index.html").read_text()
    assert "58.0" + lb.NONSTANDARD_MARK in first
    assert cli("--leaderboard", str(board)) == 2
    assert (tmp_path / "cli" / "index.html").read_text() == first       # untouched
    assert cli("--overwrite") == 0
    assert "58.0" + lb.NONSTANDARD_MARK not in (tmp_path / "cli" / "index.html").read_text()   # the shipped board


# ---------------------------------------------------------------------------------------------------
# Saved pictures: larger, with a legend of the classes shown

def test_label_panels_are_large_with_a_legend_of_the_classes_shown(tmp_path):
    names = ["background", "aeroplane", "bicycle", "bird", "boat"]
    gt = np.zeros((2, 40, 60), dtype=np.uint8)
    gt[0, 5:20, 5:30] = 1
    gt[0, 30:, :] = 255
    gt[1, :, 30:] = 3
    pred = np.zeros_like(gt)
    pred[0, 5:20, 5:40] = 2                 # a class the ground truth does not have
    pred[0, 30:, :] = 4                     # under ignored pixels: drawn as ignored, so not in the legend
    images = [(f"img{i}", Image.new("RGB", (90, 60), (120, 120, 120))) for i in range(2)]
    paths = pictures.render_label_panels(tmp_path / "pics", "voc", images, gt, [("prediction", pred)], 255,
                                         class_names=names)
    pal = np.asarray(voc_palette()).reshape(256, 3)
    drawn0 = [gt[0], np.where(gt[0] == 255, 255, pred[0])]
    entries = pictures.legend_entries(drawn0, 255, names)
    assert [(e.value, e.name) for e in entries] == [(0, "background"), (1, "aeroplane"), (2, "bicycle"),
                                                    (255, "ignored (not scored)")]
    assert [e.colour for e in entries] == [tuple(pal[v]) for v in (0, 1, 2, 255)]
    assert [(e.value, e.name) for e in pictures.legend_entries([np.array([[-1, 7]])], None)] == [
        (-1, "unmatched"), (7, "label 7")]

    with Image.open(paths[0]) as im:
        assert im.height >= 320 + 2 * pictures.FONT_SIZE
        tile_w = round(320 * 60 / 40)                     # tiles keep the maps' aspect ratio (60 x 40)
        assert im.width == 3 * tile_w + 2 * 4
        px = np.asarray(im.convert("RGB"))
    legend = px[pictures.FONT_SIZE + 8 + 320 + 8:]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert {e.colour for e in entries} <= colours
    assert tuple(pal[4]) not in colours and tuple(pal[3]) not in colours


def test_pictures_and_report_files_get_the_umask_mode(result_files, tmp_path):
    old = os.umask(0o002)
    try:
        summary = report.write_report(result_files, tmp_path / "out")
        (pic,) = pictures.render_label_panels(tmp_path / "pics", "p", [("a", Image.new("RGB", (8, 8)))],
                                              np.zeros((1, 8, 8), np.uint8), [], None)
        match = pictures.draw_matches(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), np.zeros((1, 2)),
                                      np.zeros((1, 2)), np.zeros((1, 2)), np.ones(1, bool), np.ones(1, bool),
                                      tmp_path / "m" / "match.png")
    finally:
        os.umask(old)
    for p in [summary.index, *summary.plots, Path(pic), match]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o664, p
    assert sorted(q.name for q in (tmp_path / "out").iterdir()) == sorted(
        ["index.html", *(q.name for q in summary.plots)])                  # no temporary file left behind
