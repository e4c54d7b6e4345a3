"""The HTML leaderboard and report in a real headless Chromium, driven through the DevTools protocol.

Chromium talks DevTools over a pipe (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4,
NUL-separated JSON), so no port, no websocket package and no network are involved. The checks: the
page loads with no console error or exception, makes no request other than file:/data:, shows every
entry, and a real mouse click on a header reorders the rows. Without a browser the tests skip.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from board_helpers import canonical_toy_config, install_toy_benchmarks, make_result, write

import densebench
from densebench import leaderboard as lb
from densebench import report

SHIPPED = Path(densebench.__file__).resolve().parents[1] / "leaderboards" / "dense-ssl.json"


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


_TRAMPOLINE = ("import fcntl, os, sys; r, w = [fcntl.fcntl(int(a), fcntl.F_DUPFD, 10) for a in sys.argv[1:3]]; "
               "os.dup2(r, 3); os.dup2(w, 4); os.execv(sys.argv[3], sys.argv[3:])")


class DevTools:
    """A minimal DevTools-protocol client for one page, over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path, timeout: float = 90.0):
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 "--window-size=1400,900", "about:blank"]
        # Chromium expects the pipe on fds 3 and 4: a tiny Python trampoline moves our ends there, then
        # execs the browser (no preexec_fn, and no shell: dash cannot redirect fds above 9).
        self.proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w),
                                      binary, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, path: Path) -> None:
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"JS error in test expression: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element."""
        box = self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                      "el.scrollIntoView({block: 'center', inline: 'center'}); const r = el.getBoundingClientRect(); "
                      "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries (CSP violations land here)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path):
    tools = DevTools(CHROMIUM, tmp_path / "profile")
    yield tools
    tools.close()


def _assert_clean(browser: DevTools) -> None:
    assert browser.problems() == []
    urls = browser.requested_urls()
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls


def _column(browser: DevTools, table: str, index: int) -> list[float | None]:
    """The data-value of column ``index`` for every body row, in DOM order (None = empty cell)."""
    return browser.js(f"Array.from(document.querySelectorAll('#{table} tbody tr')).map(tr => {{ "
                      f"const v = tr.cells[{index}].getAttribute('data-value'); "
                      "return v === null ? null : parseFloat(v); })")


def _sorted_like(values: list, descending: bool) -> bool:
    present = [v for v in values if v is not None]
    if values[: len(present)] != present:          # empty cells must all be at the end
        return False
    return present == sorted(present, reverse=descending)


def test_leaderboard_page_loads_shows_every_entry_and_sorts(monkeypatch, tmp_path, browser):
    install_toy_benchmarks(monkeypatch)
    board = tmp_path / "board.json"
    board.write_bytes(SHIPPED.read_bytes())
    lb.submit([write(make_result(model="enc-new", benchmark="toy-linear", metrics={"miou": 42.0}), tmp_path / "a.json"),
               write(make_result(model="enc-syn", synthetic=True, metrics={"miou": 7.0}), tmp_path / "b.json")],
              board, allow_nonstandard=True)
    doc = lb.load_leaderboard(board)
    page = tmp_path / "board.html"
    page.write_text(lb.render_html(doc))
    browser.open(page)

    view = lb.build_view(doc)
    assert browser.js("document.querySelectorAll('#board tbody tr').length") == len(view.rows)
    shown = browser.js("Array.from(document.querySelectorAll('td[data-entry]')).map(td => td.dataset.entry)")
    assert set(shown) == {e["id"] for e in doc["entries"]}
    texts = browser.js("Array.from(document.querySelectorAll('#board tbody tr')).map(tr => tr.cells[0].textContent)")
    assert {"enc-new", "enc-syn", "neco_dinov2_vits14"} <= set(texts)

    # A numeric column: the first click sorts best-first, the second ascending; empty cells stay last.
    idx = browser.js("Array.from(document.querySelectorAll('#board thead th'))"
                     ".findIndex(th => th.dataset.bench === 'voc-incontext')")
    before = _column(browser, "board", idx)
    assert not _sorted_like(before, descending=True)
    browser.click('#board thead th[data-bench="voc-incontext"]')
    after = _column(browser, "board", idx)
    assert _sorted_like(after, descending=True) and sorted(map(str, after)) == sorted(map(str, before))
    assert after[0] == 77.0          # the first voc-incontext column is the hbird-1.1 one (one column per version)
    assert browser.js("document.querySelector('#board thead th[data-bench=\"voc-incontext\"]')"
                      ".getAttribute('aria-sort')") == "descending"
    browser.click('#board thead th[data-bench="voc-incontext"]')
    assert _sorted_like(_column(browser, "board", idx), descending=False)

    # A text column sorts alphabetically.
    browser.click("#board thead th:first-child")
    names = browser.js("Array.from(document.querySelectorAll('#board tbody tr'))"
                       ".map(tr => tr.cells[0].textContent.trim().toLowerCase())")
    assert names == sorted(names)

    # Filters: source, then benchmark (hides other benchmark columns and rows without a value).
    browser.js("(() => { const s = document.getElementById('f-board-source'); s.value = 'measured'; "
               "s.dispatchEvent(new Event('change')); })()")
    visible = browser.js("Array.from(document.querySelectorAll('#board tbody tr')).filter(tr => !tr.hidden)"
                         ".map(tr => tr.dataset.source)")
    assert visible == ["measured", "measured"]
    browser.js("(() => { const s = document.getElementById('f-board-source'); s.value = ''; "
               "s.dispatchEvent(new Event('change')); const b = document.getElementById('f-board-benchmark'); "
               "b.value = 'voc-linear'; b.dispatchEvent(new Event('change')); })()")
    visible_rows = browser.js("Array.from(document.querySelectorAll('#board tbody tr'))"
                              ".filter(tr => !tr.hidden).length")
    expected = sum(1 for r in view.rows if any(c.benchmark == "voc-linear" for c in r.cells))
    assert visible_rows == expected
    shown_benches = browser.js("Array.from(document.querySelectorAll('#board thead th[data-bench]'))"
                               ".filter(th => !th.hidden).map(th => th.dataset.bench)")
    assert shown_benches == ["voc-linear"]
    _assert_clean(browser)


def test_report_page_loads_with_its_images_and_sorts(monkeypatch, tmp_path, browser):
    install_toy_benchmarks(monkeypatch)
    from PIL import Image

    runs = tmp_path / "runs"
    runs.mkdir()
    Image.new("RGB", (10, 6), (10, 200, 40)).save(runs / "matches.png")
    files = [write(make_result(model="enc-a", metrics={"miou": 31.0}, artifacts=["matches.png"]), runs / "a.json"),
             write(make_result(model="enc-b", metrics={"miou": 64.0}), runs / "b.json"),
             write(make_result(model="enc-c", metrics={"miou": 12.5}), runs / "c.json")]
    for i, fraction in enumerate((128, 8, None)):
        files.append(write(make_result(model="enc-a", benchmark="toy-incontext",
                                       config=canonical_toy_config(train_fraction=fraction),
                                       metrics={"miou": 20.0 + 10 * i}), runs / f"f{i}.json"))
    summary = report.write_report(files, tmp_path / "report")
    browser.open(summary.index)

    assert browser.js("document.querySelectorAll('#results tbody tr').length") == len(files)
    images = browser.js("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) == len(summary.plots) + 1
    assert all(done and width > 0 for done, width in images)
    idx = browser.js("Array.from(document.querySelectorAll('#results thead th'))"
                     ".findIndex(th => th.textContent === 'miou')")
    browser.click(f"#results thead th:nth-child({idx + 1})")
    values = _column(browser, "results", idx)
    assert values == sorted(values, reverse=True) == [64.0, 40.0, 31.0, 30.0, 20.0, 12.5]
    _assert_clean(browser)
