"""Leaderboard: shipped published numbers, submit (and every bad input), renderers, compare, CLI."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import typer
from board_helpers import canonical_toy_config, fingerprint, install_toy_benchmarks, make_result, write
from rich.console import Console
from typer.testing import CliRunner

import densebench
from densebench import leaderboard as lb
from densebench import results as results_mod
from densebench.errors import ConfigError, ResultError

SHIPPED = Path(densebench.__file__).resolve().parents[1] / "leaderboards" / "dense-ssl.json"
SPEC = Path(densebench.__file__).resolve().parents[2] / "shared" / "spec" / "protocols.md"


@pytest.fixture
def toy(monkeypatch):
    install_toy_benchmarks(monkeypatch)


def _headline_cells(doc: dict) -> set[tuple]:
    """(entry id, benchmark, metric, value) for every value a leaderboard view must show."""
    out = set()
    for e in doc["entries"]:
        for m in lb.headline_metrics(e["benchmark"]) or e["metrics"]:
            if m in e["metrics"]:
                out.add((e["id"], e["benchmark"], m, float(e["metrics"][m])))
    return out


# ---------------------------------------------------------------------------------------------------
# The shipped leaderboard

def test_shipped_leaderboard_is_valid_and_found_through_the_package():
    assert lb.default_leaderboard().resolve() == SHIPPED.resolve()
    doc = lb.load_leaderboard(SHIPPED)
    assert doc["name"] == "dense-ssl" and len(doc["entries"]) == 154
    for e in doc["entries"]:
        assert e["source"] == "published"
        assert e["citation"]["full"] and e["variant"]
        assert e["id"] == lb.published_entry_id(e["citation"]["short"], e["model"]["name"], e["benchmark"],
                                                e["variant"])


def _spec_table(text: str, heading: str) -> list[list[str]]:
    """Body rows of the first Markdown table after the line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    return rows[2:]


@pytest.mark.skipif(not SPEC.is_file(), reason=f"the protocol spec is not at {SPEC}")
def test_published_numbers_are_exactly_the_spec_tables():
    """Rebuild every published (source, model, benchmark, metric, value) from spec §7 and compare sets:
    nothing mistyped, nothing invented, disagreeing sources both present."""
    text = SPEC.read_text()
    expected = set()
    hb_names = {("ViT-S/16", "dino"): "dino_vits16", ("ViT-B/16", "dino"): "dino_vitb16",
                ("ViT-S/14", "dinov2"): "dinov2_vits14", ("ViT-B/14", "dinov2"): "dinov2_vitb14",
                ("ViT-L/14", "dinov2"): "dinov2_vitl14", ("ViT-G/14", "dinov2"): "dinov2_vitg14"}
    rows = _spec_table(text, "### 7.1")
    assert len(rows) == 6
    for arch, model, m2, m3, m4, paper in rows:
        name = hb_names[(arch, model)]
        for v in (m2, m3, m4):
            expected.add(("open-hummingbird-eval README", name, "voc-incontext", "miou", float(v)))
        if paper != "-":
            expected.add(("Hummingbird paper (via open-hummingbird-eval README)", name, "voc-incontext", "miou",
                          float(paper)))

    readme_names = ["neco_dinov2_vits14", "neco_dinov2r_xr_vits14", "neco_dinov2r_vits14", "neco_dinov2_vitb14",
                    "neco_dinov2r_xr_vitb14", "neco_dinov2r_vitb14", "neco_dino_vits16", "neco_timetuning_vits16",
                    "neco_leopart_vits16"]
    rows = _spec_table(text, "### 7.2")
    assert len(rows) == len(readme_names)
    for name, (_, _, k500, nn, lin) in zip(readme_names, rows):
        expected |= {("NeCo README", name, "voc-overcluster", "miou@500", float(k500)),
                     ("NeCo README", name, "voc-incontext", "miou", float(nn)),
                     ("NeCo README", name, "voc-linear", "miou", float(lin))}

    t2_names = ["dino_vits16", "timet_vits16", "ibot_vits16", "croc_vits16", "cribo_vits16", "dinov2_vits14_reg",
                "neco_vits14", "dino_vitb16", "mae_vitb16", "ibot_vitb16", "cribo_vitb16", "dinov2_vitb14_reg",
                "neco_vitb14"]
    rows = _spec_table(text, "**Table 2, linear")
    assert len(rows) == len(t2_names)
    for name, row in zip(t2_names, rows):
        for bench, v in zip(("coco-things-linear", "coco-stuff-linear", "voc-linear", "ade20k-linear"), row[2:]):
            expected.add(("NeCo Table 2", name, bench, "miou", float(v)))

    t1_names = ["dino_vits16", "ibot_vits16", "croc_vits16", "timet_vits16", "dinov2_vits14_reg", "cribo_vits16",
                "neco_vits14"]
    rows = _spec_table(text, "**Table 1a")
    assert len(rows) == len(t1_names)
    for name, row in zip(t1_names, rows):
        for i, metric in enumerate(("miou@gt", "miou@300", "miou@500")):
            expected.add(("NeCo Table 1a", name, "voc-overcluster", metric, float(row[1 + i])))
            expected.add(("NeCo Table 1a", name, "coco-things-overcluster", metric, float(row[4 + i])))

    t3_names = [("ibot_vits16", "neco_ibot_vits16"), ("dino_vits16", "neco_dino_vits16"),
                ("timet_vits16", "neco_timetuning_vits16"), ("leopart_vits16", "neco_leopart_vits16"),
                ("cribo_vits16", "neco_cribo_vits16")]
    rows = _spec_table(text, "**Table 3")
    assert len(rows) == len(t3_names)
    for names, row in zip(t3_names, rows):
        cells = [tuple(float(x) for x in c.split("→")) for c in row[1:]]
        for stage, name in enumerate(names):
            expected |= {("NeCo Table 3", name, "voc-overcluster", "miou@gt", cells[0][stage]),
                         ("NeCo Table 3", name, "voc-overcluster", "miou@500", cells[1][stage]),
                         ("NeCo Table 3", name, "voc-linear", "miou", cells[2][stage]),
                         # cells[3] is the COCO-Things "K=21" column: ambiguous (12 classes), left out
                         ("NeCo Table 3", name, "coco-things-overcluster", "miou@500", cells[4][stage]),
                         ("NeCo Table 3", name, "coco-things-linear", "miou", cells[5][stage])}

    doc = lb.load_leaderboard(SHIPPED)
    # spec §7 covers the four image protocols; the DAVIS rows come from the SelfPatch paper (not in the spec).
    shipped = {(e["citation"]["short"], e["model"]["name"], e["benchmark"], m, float(v))
               for e in doc["entries"] for m, v in e["metrics"].items() if e["benchmark"] != "davis-propagation"}
    assert shipped == expected
    # Disagreeing sources are both kept: README vs Table 3 for NeCo-on-DINO linear, Table 1a vs README K=500...
    assert ("NeCo README", "neco_dino_vits16", "voc-linear", "miou", 65.8) in shipped
    assert ("NeCo Table 3", "neco_dino_vits16", "voc-linear", "miou", 61.3) in shipped
    # Only the canonical memory size (10,240,000) is standard among the open-hummingbird-eval rows.
    for e in doc["entries"]:
        if e["citation"]["short"] == "open-hummingbird-eval README":
            assert e["standard"] == ("10,240,000" in e["variant"])


# ---------------------------------------------------------------------------------------------------
# Submitting

def test_submit_adds_a_standard_entry_with_provenance(toy, tmp_path):
    result = make_result(metrics={"miou": 61.25, "miou_identity": 60.0, "per_class_iou": {"a": 1.0}})
    board = tmp_path / "board.json"
    done = lb.submit([write(result, tmp_path / "r.json")], board)
    assert [s.action for s in done] == ["added"]
    doc = lb.load_leaderboard(board)
    (e,) = doc["entries"]
    assert e["source"] == "measured" and e["standard"] is True and e["nonstandard_reasons"] == []
    assert e["metrics"] == {"miou": 61.25, "miou_identity": 60.0}          # scalar metrics only
    assert e["model"] == {"name": "enc-a", "architecture": "ViT-S/16", "patch_size": 16,
                          "n_parameters": 21_665_664, "fingerprint": fingerprint("enc-a"), "source_url": None}
    assert e["result_integrity"] == result["integrity"]
    assert e["wall_time_s"] == 2.25 and e["hardware"]["device"] == "cpu"
    # The identity hash covers the semantic config: the protocol's own fields minus non-semantic ones.
    semantic = {k: v for k, v in canonical_toy_config().items()
                if k not in ("batch_size", "num_workers", "memory_rows")}
    assert e["config"] == semantic
    assert e["config_hash"] == results_mod.config_hash(semantic) == e["canonical_config_hash"]


def test_non_semantic_fields_do_not_make_a_result_nonstandard_or_new(toy, tmp_path):
    board = tmp_path / "board.json"
    lb.submit([write(make_result(), tmp_path / "a.json")], board)
    other = make_result(config=canonical_toy_config(batch_size=64, num_workers=4), metrics={"miou": 51.0})
    with pytest.raises(ResultError, match="already has enc-a on toy-linear"):
        lb.submit([write(other, tmp_path / "b.json")], board)


def test_duplicate_refused_then_replaced(toy, tmp_path):
    board = tmp_path / "board.json"
    lb.submit([write(make_result(), tmp_path / "a.json")], board)
    before = board.read_bytes()
    again = write(make_result(metrics={"miou": 55.0}), tmp_path / "b.json")
    with pytest.raises(ResultError, match="--replace"):
        lb.submit([again], board)
    assert board.read_bytes() == before
    done = lb.submit([again], board, replace=True)
    assert done[0].action == "replaced"
    (e,) = lb.load_leaderboard(board)["entries"]
    assert e["metrics"]["miou"] == 55.0


def test_same_measurement_twice_in_one_submit_is_refused(toy, tmp_path):
    a = write(make_result(), tmp_path / "a.json")
    b = write(make_result(metrics={"miou": 1.0}), tmp_path / "b.json")
    with pytest.raises(ResultError, match="same measurement"):
        lb.submit([a, b], tmp_path / "board.json")
    assert not (tmp_path / "board.json").exists()


@pytest.mark.parametrize("changes, synthetic, reason", [
    ({"memory_size": 5}, False, "memory_size=5 (canonical 1000)"),
    ({"input_size": 448}, False, "input_size=448 (canonical 512)"),
    ({}, True, "measured on synthetic data"),
])
def test_nonstandard_needs_allow_and_is_marked(toy, tmp_path, changes, synthetic, reason):
    board = tmp_path / "board.json"
    path = write(make_result(config=canonical_toy_config(**changes), synthetic=synthetic), tmp_path / "r.json")
    with pytest.raises(ResultError, match=re.escape(reason)) as info:
        lb.submit([path], board)
    assert "--allow-nonstandard" in info.value.hint
    assert not board.exists()
    lb.submit([path], board, allow_nonstandard=True)
    (e,) = lb.load_leaderboard(board)["entries"]
    assert e["standard"] is False and reason in e["nonstandard_reasons"]
    assert e["config_hash"] != e["canonical_config_hash"] or synthetic


def test_canonical_auto_fields_resolve_by_patch_size(toy, tmp_path):
    """The canonical input size is 'by patch size' (None); a /14 result at 504 is standard."""
    r = make_result(patch_size=14, config=canonical_toy_config(patch_size=14))
    assert r["config"]["input_size"] == 504
    entry = lb.entry_from_result(r)
    assert entry["standard"] and entry["model"]["architecture"] == "ViT-S/14"


def test_missing_config_field_is_nonstandard(toy):
    config = canonical_toy_config()
    del config["memory_size"]
    entry = lb.entry_from_result(make_result(config=config))
    assert entry["nonstandard_reasons"] == ["memory_size missing (canonical 1000)"]


def test_tampered_result_is_refused_and_board_untouched(toy, tmp_path):
    board = tmp_path / "board.json"
    lb.submit([write(make_result(model="enc-b"), tmp_path / "b.json")], board)
    before = board.read_bytes()
    tampered = make_result()
    tampered["metrics"]["miou"] = 99.9                     # edited after `densebench run` hashed it
    with pytest.raises(ResultError, match="integrity check"):
        lb.submit([write(tampered, tmp_path / "t.json")], board)
    assert board.read_bytes() == before


def test_one_bad_result_means_nothing_is_added(toy, tmp_path):
    board = tmp_path / "board.json"
    good = write(make_result(model="enc-good"), tmp_path / "good.json")
    bad = make_result(model="enc-bad")
    bad["config"]["memory_size"] = 1
    with pytest.raises(ResultError, match="integrity"):
        lb.submit([good, write(bad, tmp_path / "bad.json")], board)
    assert not board.exists()


def test_unknown_result_schema_version_is_refused(toy, tmp_path):
    r = make_result()
    r["schema_version"] = 1  # the pre-`derived` format
    with pytest.raises(ResultError, match="schema_version 1"):
        lb.submit([write(r, tmp_path / "r.json")], tmp_path / "board.json")


def test_result_for_a_benchmark_this_densebench_does_not_know(tmp_path):
    r = make_result(benchmark="nosuch-linear")
    with pytest.raises(ResultError, match="'nosuch-linear' is not known"):
        lb.submit([write(r, tmp_path / "r.json")], tmp_path / "board.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    (json.dumps({"schema_version": 1, "name": "x", "description": "", "entries": [{"id": "m-0"}]}),
     "does not match the leaderboard schema"),
    (json.dumps({"schema_version": 7, "name": "x", "description": "", "entries": []}), "schema_version 7"),
])
def test_invalid_leaderboard_file_is_refused_and_left_untouched(toy, tmp_path, content, message):
    board = tmp_path / "board.json"
    board.write_text(content)
    with pytest.raises(ResultError, match=message):
        lb.submit([write(make_result(), tmp_path / "r.json")], board)
    assert board.read_text() == content


def test_schema_rejects_a_measured_entry_without_provenance(toy, tmp_path):
    doc = lb.new_leaderboard("x")
    entry = lb.entry_from_result(make_result())
    del entry["result_integrity"]
    doc["entries"].append(entry)
    with pytest.raises(ResultError, match="result_integrity"):
        lb.validate_leaderboard(doc)


def test_duplicate_ids_in_a_file_are_refused(toy):
    doc = lb.new_leaderboard("x")
    entry = lb.entry_from_result(make_result())
    doc["entries"] += [entry, dict(entry)]
    with pytest.raises(ResultError, match="same id"):
        lb.validate_leaderboard(doc)


def _submit_worker(args):
    board, paths, barrier = args
    barrier.wait(timeout=60)
    for p in paths:
        lb.submit([p], board)


def test_concurrent_submits_from_two_processes_both_land(toy, tmp_path):
    board = tmp_path / "board.json"
    paths = [[write(make_result(model=f"enc-{w}-{i}"), tmp_path / f"r{w}{i}.json") for i in range(4)]
             for w in range(2)]
    ctx = multiprocessing.get_context("fork")       # children inherit the toy benchmarks
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_submit_worker, args=((board, paths[w], barrier),)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    names = sorted(e["model"]["name"] for e in lb.load_leaderboard(board)["entries"])
    assert names == sorted(f"enc-{w}-{i}" for w in range(2) for i in range(4))


def test_full_disk_mid_write_leaves_the_old_file_byte_identical(toy, tmp_path, monkeypatch):
    board = tmp_path / "board.json"
    lb.submit([write(make_result(model="enc-old"), tmp_path / "old.json")], board)
    before = board.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(results_mod.os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
    with pytest.raises(ResultError, match="No space left on device.*left unchanged") as info:
        lb.submit([write(make_result(model="enc-new"), tmp_path / "new.json")], board)
    assert "free disk space" in info.value.hint
    monkeypatch.undo()
    assert board.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".board")) == []


# ---------------------------------------------------------------------------------------------------
# Rendering

@pytest.fixture
def mixed_board(toy, tmp_path):
    """The shipped published rows plus measured rows (one standard, one non-standard)."""
    board = tmp_path / "board.json"
    board.write_bytes(SHIPPED.read_bytes())
    lb.submit([write(make_result(model="dino_vits16", benchmark="toy-incontext", metrics={"miou": 80.5}),
                     tmp_path / "a.json"),
               write(make_result(model="enc-syn", synthetic=True, metrics={"miou": 12.0}), tmp_path / "b.json")],
              board, allow_nonstandard=True)
    return lb.load_leaderboard(board)


def test_view_puts_every_entry_in_exactly_one_row(mixed_board):
    view = lb.build_view(mixed_board)
    shown = [(e["id"], c.benchmark, c.metric, float(e["metrics"][c.metric]))
             for r in view.rows for c, e in r.cells.items()]
    assert len(shown) == len(set(shown))
    assert set(shown) == _headline_cells(mixed_board)
    # best = the maximum over all entries of that benchmark+metric and protocol version, computed independently
    for c, best in view.best.items():
        assert best == max(float(e["metrics"][c.metric]) for e in mixed_board["entries"]
                           if e["benchmark"] == c.benchmark and c.metric in e["metrics"]
                           and lb.entry_version(e) == c.version)


def test_markdown_rendering(mixed_board):
    md = lb.render_markdown(mixed_board)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["Model", "Arch", "Source"] and header[-1] == "Note"
    body = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in lines[2:]]
    assert all(len(row) == len(header) for row in body)
    # one voc-incontext column per protocol version: like is compared with like
    assert [h for h in header if h.startswith("voc-incontext")] == [
        "voc-incontext (hbird-1.1)", "voc-incontext (hbird-paper)", "voc-incontext (hbird-unknown)"]
    v11, unknown = header.index("voc-incontext (hbird-1.1)"), header.index("voc-incontext (hbird-unknown)")
    assert "70.2†" in {row[v11] for row in body} and "**77.0**" in {row[v11] for row in body}
    assert "**83.5**" in {row[unknown] for row in body}          # best bolded per version; non-standard marked
    for col in (v11, unknown):
        assert sum(1 for row in body if row[col].startswith("**")) == 1
    measured = [row for row in body if row[2].startswith("measured")]
    assert {row[0] for row in measured} == {"dino\\_vits16", "enc-syn"}
    assert any("measured on synthetic data" in row[-1] for row in measured)
    assert "<https://github.com/vpariza/NeCo/blob/393216026b4d045e2e0b803f70a7d89d9a58937e/README.md>" in md


def test_csv_rendering_matches_the_entries(mixed_board):
    df = pd.read_csv(io.StringIO(lb.render_csv(mixed_board)))
    view = lb.build_view(mixed_board)
    assert len(df) == len(view.rows)
    found = set()
    for e in mixed_board["entries"]:
        origin = e["citation"]["short"] if e["source"] == "published" else lb.short_fingerprint(
            e["model"]["fingerprint"])
        for m in lb.headline_metrics(e["benchmark"]) or e["metrics"]:
            if m not in e["metrics"]:
                continue
            label = next(c.label for c in view.columns
                         if c.benchmark == e["benchmark"] and c.metric == m and c.version == lb.entry_version(e))
            hits = df[(df["model"] == e["model"]["name"]) & (df["origin"] == origin) & (df[label] == e["metrics"][m])]
            assert len(hits) >= 1, (e["id"], m)
            found.add((e["id"], m))
    assert int(df[[c.label for c in view.columns]].notna().sum().sum()) == len(_headline_cells(mixed_board))


def test_rich_table_highlights_the_best_value_per_column(mixed_board):
    table = lb.render_table(mixed_board, benchmarks=["voc-incontext", "voc-linear", "toy-linear"])
    text_cols = {col.header.replace("\n", " "): list(col.cells) for col in table.columns}
    incontext = text_cols["voc incontext hbird-unknown miou"]
    assert [c for c in incontext if "bold green" in c] == ["[bold green]83.5[/]"]
    assert [c for c in text_cols["voc incontext hbird-1.1 miou"] if "bold green" in c] == ["[bold green]77.0[/]"]
    linear = text_cols["voc linear miou"]
    assert [c for c in linear if "bold green" in c] == ["[bold green]84.5[/]"]
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    out = console.file.getvalue()
    assert "published [1]" in out and "measured (" in out and "NeCo README" in out


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.tags, self.rows = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "td" and "data-entry" in a:
            self.cells.append(a)
        if tag == "tr" and "data-source" in a:
            self.rows += 1


def test_html_is_self_contained_and_holds_every_entry(mixed_board):
    page = lb.render_html(mixed_board)
    parser = _Cells()
    parser.feed(page)
    assert {c["data-entry"] for c in parser.cells} == {e["id"] for e in mixed_board["entries"]}
    assert len(parser.cells) == len(_headline_cells(mixed_board))
    assert parser.rows == len(lb.build_view(mixed_board).rows)
    for tag, attrs in parser.tags:                   # nothing the browser would fetch
        assert not (tag in ("script", "img", "iframe") and attrs.get("src"))
        assert not (tag == "link" and attrs.get("rel") != "icon")
    assert "default-src 'none'" in page
    assert 'data-filter="source"' in page and "data-column-filter" in page


def test_filters_by_benchmark_and_source(mixed_board):
    view = lb.build_view(mixed_board, benchmarks=["voc-linear"], source="published")
    assert {c.benchmark for c in view.columns} == {"voc-linear"}
    assert all(r.source == "published" and r.cells for r in view.rows)
    with pytest.raises(ConfigError, match="unknown benchmark 'voc-nope'"):
        lb.build_view(mixed_board, benchmarks=["voc-nope"])
    with pytest.raises(ConfigError, match="unknown format 'pdf'"):
        lb.render(mixed_board, "pdf")


# ---------------------------------------------------------------------------------------------------
# Compare

def test_compare_measured_models_pairs_equal_configs(toy, tmp_path):
    board = tmp_path / "board.json"
    base = [make_result(model="base", metrics={"miou": 40.0}),
            make_result(model="base", benchmark="toy-incontext", metrics={"miou": 30.0}),
            make_result(model="base", config=canonical_toy_config(memory_size=7), metrics={"miou": 10.0})]
    post = [make_result(model="post", metrics={"miou": 47.5}),
            make_result(model="post", config=canonical_toy_config(memory_size=7), metrics={"miou": 12.0})]
    lb.submit([write(r, tmp_path / f"r{i}.json") for i, r in enumerate(base + post)], board,
              allow_nonstandard=True)
    rows = lb.compare_models(lb.load_leaderboard(board), "base", "post")
    by_bench = {(r["benchmark"], r["metric"]): r for r in rows}
    lin = by_bench[("toy-linear", "miou")]
    assert (lin["a"], lin["b"], lin["delta"], lin["same_protocol"]) == (40.0, 47.5, 7.5, True)
    inc = by_bench[("toy-incontext", "miou")]
    assert (inc["a"], inc["b"], inc["delta"]) == (30.0, None, None)
    md = lb.render_comparison(rows, "base", "post", "markdown")
    assert "| toy-linear | miou | 40.0 | 47.5 | +7.5 | yes |" in md
    df = pd.read_csv(io.StringIO(lb.render_comparison(rows, "base", "post", "csv")))
    assert df.loc[df.benchmark == "toy-linear", "delta"].item() == pytest.approx(7.5)


def test_compare_published_prefers_the_same_source_table():
    rows = lb.compare_models(lb.load_leaderboard(SHIPPED), "dino_vits16", "neco_dino_vits16")
    lin = next(r for r in rows if r["benchmark"] == "voc-linear")
    assert lin["a_from"] == lin["b_from"] == "NeCo Table 3" and lin["same_protocol"]
    assert lin["delta"] == pytest.approx(61.3 - 50.2)
    inc = next(r for r in rows if r["benchmark"] == "voc-incontext")
    assert not inc["same_protocol"] and inc["a_from"] == "open-hummingbird-eval README"
    assert inc["delta"] == pytest.approx(61.3 - 46.6)      # the standard (10,240,000) row is preferred


def test_compare_model_lookup_errors_and_fingerprints(toy, tmp_path):
    board = tmp_path / "board.json"
    lb.submit([write(make_result(model="twin", fp=fingerprint("x1")), tmp_path / "a.json"),
               write(make_result(model="twin", fp=fingerprint("y2")), tmp_path / "b.json")], board)
    doc = lb.load_leaderboard(board)
    with pytest.raises(ResultError, match="2 different weights"):
        lb.compare_models(doc, "twin", "twin")
    with pytest.raises(ResultError, match="no leaderboard entry for model 'twim'") as info:
        lb.compare_models(doc, "twim", "twin")
    assert "twin" in info.value.hint
    prefix_a, prefix_b = lb.short_fingerprint(fingerprint("x1"))[:8], lb.short_fingerprint(fingerprint("y2"))[:8]
    rows = lb.compare_models(doc, prefix_a, prefix_b)
    assert rows[0]["delta"] == 0.0 and rows[0]["same_protocol"]
    full_a, bare_b = fingerprint("x1"), fingerprint("y2").split(":", 1)[1]
    assert lb.compare_models(doc, full_a, bare_b) == rows
    with pytest.raises(ResultError, match="no leaderboard entry"):
        lb.compare_models(doc, prefix_a[:5], prefix_b)          # too short to be a fingerprint prefix


# ---------------------------------------------------------------------------------------------------
# CLI (a local app, as densebench.cli would build it)

@pytest.fixture
def cli():
    from densebench.cli_board import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_submit_show_compare(toy, cli, tmp_path):
    runner = CliRunner()
    board = tmp_path / "board.json"
    board.write_bytes(SHIPPED.read_bytes())
    a = write(make_result(model="enc-a", metrics={"miou": 33.3}), tmp_path / "a.json")
    res = runner.invoke(cli, ["submit", str(a), "--leaderboard", str(board)])
    assert res.exit_code == 0, res.output
    assert "added enc-a on toy-linear (miou=33.30)" in res.output and "155 entries" in res.output

    res = runner.invoke(cli, ["leaderboard", "show", str(board), "--format", "csv", "--benchmark", "toy-linear"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(io.StringIO(res.output))
    assert df["toy-linear"].tolist() == [33.3] and df["model"].tolist() == ["enc-a"]

    html_out = tmp_path / "board.html"
    res = runner.invoke(cli, ["leaderboard", "show", str(board), "-f", "html", "-o", str(html_out)])
    assert res.exit_code == 0 and "<table id=\"board\"" in html_out.read_text()

    res = runner.invoke(cli, ["leaderboard", "show", str(board), "--format", "markdown",
                              "-b", "voc-linear,ade20k-linear"])
    assert res.exit_code == 0 and "| Model | Arch | Source | voc-linear | ade20k-linear | Note |" in res.output

    res = runner.invoke(cli, ["leaderboard", "show", "--format", "table", "--source", "published"])
    assert res.exit_code == 0 and "dense-ssl" in res.output       # the shipped board by default

    res = runner.invoke(cli, ["leaderboard", "compare", "dino_vits16", "neco_dino_vits16", "-f", "markdown"])
    assert res.exit_code == 0 and "| voc-linear | miou | 50.2 | 61.3 | +11.1 | yes |" in res.output


def test_cli_errors_are_densebench_errors(toy, cli, tmp_path):
    runner = CliRunner()
    tampered = make_result()
    tampered["metrics"]["miou"] = 1.0
    res = runner.invoke(cli, ["submit", str(write(tampered, tmp_path / "t.json")), "-l", str(tmp_path / "b.json")])
    assert isinstance(res.exception, ResultError) and "integrity" in res.exception.message
    res = runner.invoke(cli, ["leaderboard", "show", "--format", "pdf"])
    assert isinstance(res.exception, ConfigError)


def test_main_exits_with_code_2_on_a_bad_leaderboard(tmp_path, capsys):
    cli_mod = pytest.importorskip("densebench.cli")
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    with pytest.raises(SystemExit) as info:
        cli_mod.main(["leaderboard", "show", str(bad)])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is not valid JSON" in err and "Traceback" not in err
