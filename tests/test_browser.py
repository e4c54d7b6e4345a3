"""The HTML leaderboard and report in a real headless Chromium, driven by Playwright.

Playwright launches the system Chromium by path (``DENSEBENCH_CHROMIUM``, else ``chromium`` & co. on PATH; never
a downloaded browser), so no network is involved. The checks, at 1280 and 1920 px wide: the page loads with no
console error or exception (CSP violations included), makes no request other than file:/data:, shows every
entry, a real mouse click on a header reorders the rows, nothing overflows the viewport sideways, every image is
decoded and fits, and a full-page screenshot (kept under pytest's tmp_path) shows a page, not a blank one.
Without Playwright or a browser the tests skip. The leaderboard assertions are generic (rows present, a header
click sorts) so that they hold whatever the page's columns are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from board_helpers import canonical_toy_config, install_toy_benchmarks, make_result, write
from PIL import Image

import densebench
from densebench import leaderboard as lb
from densebench import pictures, report

SHIPPED = Path(densebench.__file__).resolve().parents[1] / "leaderboards" / "dense-ssl.json"
WIDTHS = (1280, 1920)


def _find_chromium() -> str | None:
    explicit = os.environ.get("DENSEBENCH_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (apt-get install chromium, or set "
                                                "DENSEBENCH_CHROMIUM to a Chrome/Chromium binary)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu"])
        yield browser
        browser.close()


class Tab:
    """One page at one viewport width, recording console problems and every request it makes."""

    def __init__(self, browser, width: int):
        self.width = width
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "assert") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path) -> None:
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def assert_clean(self) -> None:
        assert self.problems == []
        assert self.requests and all(u.startswith(("file:", "data:")) for u in self.requests), self.requests

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab_at(chromium):
    tabs = []

    def make(width: int) -> Tab:
        tabs.append(Tab(chromium, width))
        return tabs[-1]

    yield make
    for t in tabs:
        t.close()


_LAYOUT = """() => {
  const vw = document.documentElement.clientWidth;
  return {
    viewport: vw, scrollWidth: document.documentElement.scrollWidth,
    images: Array.from(document.images).map(i => {
      const r = i.getBoundingClientRect();
      return {complete: i.complete, natural: i.naturalWidth, width: r.width, left: r.left, right: r.right};
    }),
  };
}"""


def _check_layout_and_screenshot(tab: Tab, shot: Path, min_images: int = 0) -> dict:
    """No sideways overflow; every image decoded and within the viewport; a full-page screenshot that is as wide
    as the viewport and has content (not a blank page)."""
    layout = tab.js(_LAYOUT)
    assert layout["viewport"] == tab.width
    assert layout["scrollWidth"] <= tab.width, f"page is {layout['scrollWidth']} px wide at a {tab.width} px viewport"
    assert len(layout["images"]) >= min_images
    for img in layout["images"]:
        assert img["complete"] and img["natural"] > 0, img
        assert 0 < img["width"] <= tab.width and img["left"] >= 0 and img["right"] <= tab.width + 0.5, img
    assert tab.page.locator("table").first.is_visible()
    tab.page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.width == tab.width and im.height >= 900
        px = np.asarray(im.convert("L"))
    assert (px < 200).mean() > 0.005            # text, rules and plots: not a blank page
    return layout


def _column_values(tab: Tab, table: str, index: int) -> list[float | None]:
    """The data-value of column ``index`` for every body row, in DOM order (None = empty cell)."""
    return tab.js("([t, i]) => Array.from(document.querySelector(t).tBodies[0].rows).map(tr => {"
                  " const c = tr.cells[i]; const v = c ? c.getAttribute('data-value') : null;"
                  " return v === null ? null : parseFloat(v); })", [table, index])


def _sorted_like(values: list, descending: bool) -> bool:
    present = [v for v in values if v is not None]
    if values[: len(present)] != present:          # empty cells must all be at the end
        return False
    return present == sorted(present, reverse=descending)


def _unsorted_numeric_column(tab: Tab, table: str) -> int:
    """A header index whose column has >= 3 distinct numbers in neither ascending nor descending order."""
    n = tab.js("t => document.querySelector(t).tHead.rows[0].cells.length", table)
    for i in range(n):
        values = _column_values(tab, table, i)
        if len({v for v in values if v is not None}) >= 3 and not (
                _sorted_like(values, True) or _sorted_like(values, False)):
            return i
    raise AssertionError(f"{table}: no numeric column to sort")


def _click_header_sorts(tab: Tab, table: str, index: int) -> None:
    """A real mouse click on the header sorts the column one way, a second click the other way; the rows move
    with their cells (same multiset of values)."""
    header = tab.page.locator(f"{table} thead tr").first.locator("th").nth(index)
    before = _column_values(tab, table, index)
    header.click()
    first = _column_values(tab, table, index)
    header.click()
    second = _column_values(tab, table, index)
    assert sorted(map(str, first)) == sorted(map(str, before)) == sorted(map(str, second))
    assert {_sorted_like(first, True), _sorted_like(second, False)} == {True} or \
        {_sorted_like(first, False), _sorted_like(second, True)} == {True}
    assert first != before


@pytest.mark.parametrize("width", WIDTHS)
def test_leaderboard_page(monkeypatch, tmp_path, tab_at, width):
    install_toy_benchmarks(monkeypatch)
    board = tmp_path / "board.json"
    board.write_bytes(SHIPPED.read_bytes())
    lb.submit([write(make_result(model="enc-new", benchmark="toy-linear", metrics={"miou": 42.0}), tmp_path / "a.json"),
               write(make_result(model="enc-syn", synthetic=True, metrics={"miou": 7.0}), tmp_path / "b.json")],
              board, allow_nonstandard=True)
    doc = lb.load_leaderboard(board)
    page = tmp_path / "board.html"
    page.write_text(lb.render_html(doc))
    tab = tab_at(width)
    tab.open(page)

    table = "table.sortable"
    assert tab.js(f"document.querySelector('{table}').tBodies[0].rows.length") > 0
    text = tab.js(f"document.querySelector('{table}').textContent")
    assert sorted(n for n in {e["model"]["name"] for e in doc["entries"]} if n not in text) == []  # every entry
    _check_layout_and_screenshot(tab, tmp_path / f"leaderboard-{width}.png")

    _click_header_sorts(tab, table, _unsorted_numeric_column(tab, table))
    model_th = tab.js(f"Array.from(document.querySelector('{table}').tHead.rows[0].cells)"
                      ".findIndex(th => th.textContent.trim().startsWith('Model'))")
    if model_th >= 0:                                      # a text column sorts alphabetically
        tab.page.locator(f"{table} thead tr").first.locator("th").nth(model_th).click()
        names = tab.js(f"Array.from(document.querySelector('{table}').tBodies[0].rows)"
                       f".map(tr => tr.cells[{model_th}].textContent.trim().toLowerCase())")
        assert names == sorted(names)

    # Row filters (select[data-filter]): each choice keeps exactly the rows carrying it.
    for sel in tab.js("Array.from(document.querySelectorAll('select[data-filter]'))"
                      ".filter(s => s.options.length > 1).map(s => s.id)"):
        choice = tab.js(f"document.getElementById('{sel}').options[1].value")
        tab.page.select_option(f"#{sel}", choice)
        shown = tab.js(f"(() => {{ const s = document.getElementById('{sel}'); const t = document.getElementById("
                       "s.dataset.table); return Array.from(t.tBodies[0].rows).filter(tr => !tr.hidden)"
                       ".map(tr => tr.getAttribute('data-' + s.dataset.filter)); })()")
        assert shown and set(shown) == {choice}
        tab.page.select_option(f"#{sel}", "")
    tab.assert_clean()


@pytest.fixture
def report_files(monkeypatch, tmp_path) -> list[Path]:
    """Toy results (one carrying a saved picture wider than a 1280 px viewport), an in-context fraction curve,
    a ViT-S result on voc-linear (beside the shipped published rows) and an overclustering one with 5 seeds."""
    install_toy_benchmarks(monkeypatch)
    runs = tmp_path / "runs"
    runs.mkdir()
    gt = np.zeros((1, 64, 64), np.uint8)
    gt[0, 10:40, 10:50] = 1
    panels = [(f"K={k}", np.roll(gt, k, axis=2)) for k in (3, 9)]
    (picture,) = pictures.render_label_panels(runs, "toy", [("x", Image.new("RGB", (64, 64), (90, 140, 60)))], gt,
                                              panels, None, class_names=["background", "thing"])
    files = [write(make_result(model="enc-a", metrics={"miou": 31.0}, artifacts=[picture]), runs / "a.json"),
             write(make_result(model="enc-b", metrics={"miou": 64.0}), runs / "b.json"),
             write(make_result(model="enc-c", synthetic=True, metrics={"miou": 12.5}), runs / "c.json")]
    for i, fraction in enumerate((128, 8, None)):
        files.append(write(make_result(model="enc-a", benchmark="toy-incontext",
                                       config=canonical_toy_config(train_fraction=fraction),
                                       metrics={"miou": 20.0 + 10 * i}), runs / f"f{i}.json"))
    seeds = [60.5, 63.0, 61.75, 64.25, 62.0]
    files.append(write(make_result(model="enc-a", benchmark="voc-overcluster",
                                   metrics={"miou@500": float(np.mean(seeds)), "miou@500_seeds": seeds,
                                            "miou@gt": 20.0, "miou@gt_std": 1.5}), runs / "oc.json"))
    files.append(write(make_result(model="enc-a", benchmark="voc-linear", metrics={"miou": 45.0}), runs / "vl.json"))
    return files


@pytest.mark.parametrize("width", WIDTHS)
def test_report_page(report_files, tmp_path, tab_at, width):
    summary = report.write_report(report_files, tmp_path / "report")
    tab = tab_at(width)
    tab.open(summary.index)

    assert tab.js("document.querySelectorAll('#results tbody tr').length") == len(report_files)
    layout = _check_layout_and_screenshot(tab, tmp_path / f"report-{width}.png", min_images=len(summary.plots) + 1)
    assert len(layout["images"]) == len(summary.plots) + 1
    picture = max(layout["images"], key=lambda i: i["natural"])
    assert picture["natural"] > 1280                   # wider than the narrow viewport: scaled down to fit it there
    assert picture["width"] < picture["natural"] if width == 1280 else picture["width"] >= picture["natural"]
    for plot in summary.plots:
        with Image.open(plot) as im:
            assert im.width >= 800                                          # plots are drawn large enough to read

    # the ViT-S card sits beside the shipped ViT-S rows: its own row first, then the published ones
    cmp = "#compare-ViT-S"
    assert tab.page.locator(cmp).is_visible()
    sources = tab.js(f"Array.from(document.querySelector('{cmp}').tBodies[0].rows).map(tr => tr.dataset.source)")
    assert sources[0] == "measured" and sources.count("published") > 10

    idx = tab.js("Array.from(document.querySelectorAll('#results thead th'))"
                 ".findIndex(th => th.textContent === 'miou')")
    tab.page.locator("#results thead th").nth(idx).click()
    values = [v for v in _column_values(tab, "#results", idx) if v is not None]
    assert values == sorted(values, reverse=True) == [64.0, 45.0, 40.0, 31.0, 30.0, 20.0, 12.5]
    _click_header_sorts(tab, cmp, _unsorted_numeric_column(tab, cmp))
    tab.assert_clean()
