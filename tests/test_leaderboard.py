"""Leaderboard: shipped published numbers, submit (and every bad input), renderers, compare, CLI."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
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
from densebench.leaderboard.render import column_legend
from densebench.leaderboard.view import cell_text, is_best, metric_value, summary_text

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
# Views: one row per model, mean and rank, sorting, formats

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


#: A board small enough to rank by hand: (model, {benchmark: miou}, synthetic). enc-a's two benchmarks come from
#: two runs (two result files, two dates).
RANKED = [("enc-a", {"toy-linear": 60.0}, False, "2026-01-01T00:00:00+00:00"),
          ("enc-a", {"toy-incontext": 40.0}, False, "2026-01-05T00:00:00+00:00"),
          ("enc-b", {"toy-linear": 70.0, "toy-incontext": 40.0}, False, "2026-01-02T00:00:00+00:00"),
          ("enc-c", {"toy-linear": 50.0, "toy-incontext": 20.0}, False, "2026-01-03T00:00:00+00:00"),
          ("enc-d", {"toy-linear": 80.0}, False, "2026-01-04T00:00:00+00:00"),
          ("enc-syn", {"toy-linear": 99.0, "toy-incontext": 99.0}, True, "2026-01-06T00:00:00+00:00")]
#: By hand. Complete rows: a, b, c (d lacks toy-incontext; syn is non-standard: a mean, no rank).
#: toy-linear ranks among a, b, c: b 70 -> 1, a 60 -> 2, c 50 -> 3; toy-incontext: a and b tie at 40 -> 1.5 each,
#: c -> 3. Average rank: a (2 + 1.5) / 2 = 1.75, b (1 + 1.5) / 2 = 1.25, c (3 + 3) / 2 = 3.
#: Means: a 50, b 55, c 35, syn 99 (marked). Best: toy-linear 80 (d, standard even if incomplete), toy-incontext
#: 40 (a and b); syn's 99s are never best.
HAND_MEAN = {"enc-a": 50.0, "enc-b": 55.0, "enc-c": 35.0, "enc-d": None, "enc-syn": 99.0}
HAND_RANK = {"enc-a": 1.75, "enc-b": 1.25, "enc-c": 3.0, "enc-d": None, "enc-syn": None}
HAND_ORDER = {"mean": ["enc-syn", "enc-b", "enc-a", "enc-c", "enc-d"],
              "rank": ["enc-b", "enc-a", "enc-c", "enc-d", "enc-syn"],        # blanks last, standard first
              "model": ["enc-a", "enc-b", "enc-c", "enc-d", "enc-syn"],
              "toy-linear": ["enc-syn", "enc-d", "enc-b", "enc-a", "enc-c"],
              "toy-incontext": ["enc-syn", "enc-a", "enc-b", "enc-c", "enc-d"]}   # a, b tie: newest run first


@pytest.fixture
def ranked_board(toy, tmp_path):
    board = tmp_path / "ranked.json"
    files = []
    for i, (model, values, synthetic, date) in enumerate(RANKED):
        for bench, v in values.items():
            files.append(write(make_result(model=model, benchmark=bench, metrics={"miou": v}, synthetic=synthetic,
                                           date=date), tmp_path / f"r{i}-{bench}.json"))
    lb.submit(files, board, allow_nonstandard=True)
    return board


def _every_shown_entry(view) -> list[tuple]:
    """(entry id, benchmark, metric, value) of every cell and every alternative of a cell."""
    return [(e["id"], c.benchmark, c.metric, float(e["metrics"][c.metric]))
            for r in view.rows for c in view.columns
            for e in ([r.cells[c]] if c in r.cells else []) + r.alternatives.get(c, [])]


def test_view_puts_every_entry_in_exactly_one_row(mixed_board):
    view = lb.build_view(mixed_board)
    shown = _every_shown_entry(view)
    assert len(shown) == len(set(shown))
    assert set(shown) == _headline_cells(mixed_board)
    # best = the maximum over the *standard* entries of that benchmark+metric and protocol version
    for c, best in view.best.items():
        assert best == max(float(e["metrics"][c.metric]) for e in mixed_board["entries"]
                           if e["benchmark"] == c.benchmark and c.metric in e["metrics"] and e["standard"]
                           and lb.entry_version(e) == c.version)


def test_one_row_per_model_merges_runs_and_sources(mixed_board, ranked_board):
    view = lb.build_view(lb.load_leaderboard(ranked_board))
    enc_a = [r for r in view.rows if r.model == "enc-a"]
    assert len(enc_a) == 1                      # two runs of different benchmarks, one row
    assert {c.benchmark: e["metrics"]["miou"] for c, e in enc_a[0].cells.items()} == {
        "toy-linear": 60.0, "toy-incontext": 40.0}
    assert enc_a[0].fingerprint == fingerprint("enc-a") and enc_a[0].standard

    # Published: one row per model across sources; the non-standard variants are separate, marked rows.
    view = lb.build_view(mixed_board)
    dino = [r for r in view.rows if r.model == "dino_vits16"]
    standard = [r for r in dino if r.standard]
    assert [r.source for r in standard] == ["measured", "published"]     # measured weights are their own row
    published = standard[1]
    assert {c["short"] for c in published.citations} == {
        "open-hummingbird-eval README", "NeCo Table 2", "NeCo Table 1a", "NeCo Table 3",
        "SelfPatch paper, DAVIS-2017 table"}
    variants = sorted(r.note for r in dino if not r.standard)
    assert variants == ["ScaNN, 2 augmentation epochs, input 512, memory 1,024,000",
                        "ScaNN, 2 augmentation epochs, input 512, memory 102,400"]
    assert all(r.label == "dino_vits16 †" for r in dino if not r.standard)
    # Two sources of one cell: the first in file order is shown, the other kept; a different value is marked.
    neco = next(r for r in view.rows if r.model == "neco_dino_vits16" and r.standard)
    lin = next(c for c in view.columns if c.benchmark == "voc-linear")
    assert neco.cells[lin]["citation"]["short"] == "NeCo README" and neco.cells[lin]["metrics"]["miou"] == 65.8
    assert [a["metrics"]["miou"] for a in neco.alternatives[lin]] == [61.3]
    assert "65.8‡" in lb.render_markdown(mixed_board)
    agree = next(r for r in view.rows if r.model == "timet_vits16" and r.standard)
    assert [a["metrics"]["miou"] for a in agree.alternatives[lin]] == [66.3]     # same value: not marked
    assert "66.3‡" not in lb.render_markdown(mixed_board)


def test_a_synthetic_run_is_one_marked_row_and_never_best(ranked_board):
    doc = lb.load_leaderboard(ranked_board)
    view = lb.build_view(doc)
    syn = [r for r in view.rows if r.model == "enc-syn"]
    assert len(syn) == 1 and not syn[0].standard and syn[0].note == "measured on synthetic data"
    assert syn[0].label == "enc-syn †"
    lin, inc = view.columns
    assert view.best == {lin: 80.0, inc: 40.0}         # syn's 99s are the column maxima, but not standard
    best = {(r.model, c.benchmark) for r in view.rows for c in view.columns if is_best(view, r, c)}
    assert best == {("enc-d", "toy-linear"), ("enc-a", "toy-incontext"), ("enc-b", "toy-incontext")}
    # ... in every format
    md = lb.render_markdown(doc)
    assert "**80.0**" in md and "**40.0**" in md and "99.0†" in md and "**99.0" not in md
    cells = json.loads(lb.render_json(doc))
    flags = {(r["model"], label): cell["best"] for r in cells for label, cell in r["cells"].items()}
    assert flags[("enc-syn", "toy-linear")] is False and flags[("enc-syn", "toy-incontext")] is False
    assert {k for k, v in flags.items() if v} == best
    parser = _Cells()
    parser.feed(lb.render_html(doc))
    assert sorted(c["data-value"] for c in parser.cells if "best" in c["class"]) == ["40.0", "40.0", "80.0"]
    board = lb.render_table(doc, width=80)
    styled = [cell for table in board.tables for col in table.columns for cell in col._cells if "bold" in cell]
    assert sorted(styled) == ["[bold green]40.0[/]", "[bold green]40.0[/]", "[bold green]80.0[/]"]


def test_mean_and_rank_match_the_hand_computation(ranked_board):
    view = lb.build_view(lb.load_leaderboard(ranked_board))
    assert {r.model: r.mean for r in view.rows} == pytest.approx(HAND_MEAN)
    assert {r.model: r.rank for r in view.rows} == HAND_RANK
    assert {r.model: r.coverage for r in view.rows} == {"enc-a": 2, "enc-b": 2, "enc-c": 2, "enc-d": 1, "enc-syn": 2}
    one = lb.build_view(lb.load_leaderboard(ranked_board), benchmarks=["toy-linear"])   # every row is complete
    assert {r.model: r.mean for r in one.rows} == {"enc-a": 60.0, "enc-b": 70.0, "enc-c": 50.0, "enc-d": 80.0,
                                                   "enc-syn": 99.0}
    assert {r.model: r.rank for r in one.rows} == {"enc-a": 3.0, "enc-b": 2.0, "enc-c": 4.0, "enc-d": 1.0,
                                                   "enc-syn": None}


def test_mean_and_rank_match_scipy_on_a_random_board(toy, tmp_path):
    """An independent computation: numpy means and scipy's average ranks over the complete standard rows."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    values = rng.integers(200, 800, size=(7, 2)) / 10.0          # one decimal, so ties happen
    values[1, 1] = values[2, 1]
    files = [write(make_result(model=f"m{i}", benchmark=b, metrics={"miou": float(values[i, j])}),
                   tmp_path / f"m{i}{b}.json")
             for i in range(7) for j, b in enumerate(("toy-linear", "toy-incontext"))]
    files.append(write(make_result(model="partial", metrics={"miou": 99.9}), tmp_path / "p.json"))
    lb.submit(files, tmp_path / "b.json")
    view = lb.build_view(lb.load_leaderboard(tmp_path / "b.json"))
    got = {r.model: (r.mean, r.rank) for r in view.rows}
    ranks = np.stack([rankdata(-values[:, j], method="average") for j in range(2)], axis=1).mean(axis=1)
    for i in range(7):
        assert got[f"m{i}"][0] == pytest.approx(values[i].mean(), abs=1e-12)
        assert got[f"m{i}"][1] == pytest.approx(ranks[i], abs=1e-12)
    assert got["partial"] == (None, None)


def _order(text: str, fmt: str) -> list[str]:
    """The model names, in row order, of a rendered view."""
    if fmt == "csv":
        return pd.read_csv(io.StringIO(text))["model"].tolist()
    if fmt == "json":
        return [r["model"] for r in json.loads(text)]
    if fmt == "plain":
        return [line.split("\t")[0] for line in text.splitlines()[1:]]
    if fmt == "markdown":
        rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
        return [re.split(r"(?<!\\)\|", r)[1].strip().replace("\\_", "_").removesuffix(" †") for r in rows]
    if fmt == "html":
        return re.findall(r'<td class="model"[^>]*>([^<]*)</td>', text)
    blocks = _terminal_blocks(text)
    return [row[0].removesuffix(" †") for row in blocks[0]]


def _printed(board, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width)
    board.print(console)
    return console.file.getvalue()


@pytest.mark.parametrize("sort", sorted(HAND_ORDER))
def test_sort_order_in_every_format(ranked_board, sort):
    doc = lb.load_leaderboard(ranked_board)
    for fmt in lb.FORMATS:
        out = lb.render(doc, fmt, sort=sort, width=80)
        text = out if isinstance(out, str) else _printed(out)
        assert _order(text, fmt) == HAND_ORDER[sort], fmt
    # codes and column labels name the same column; an unknown name lists the accepted ones
    assert [r.model for r in lb.build_view(doc, sort=sort).rows] == HAND_ORDER[sort]
    with pytest.raises(ConfigError, match="unknown --sort column 'speed'") as info:
        lb.build_view(doc, sort="speed")
    assert "mean" in str(info.value) and "toy-linear" in str(info.value)


def test_html_page_sorting_hooks(ranked_board):
    page = lb.render_html(lb.load_leaderboard(ranked_board), sort="rank")
    assert '<th data-type="num" data-key="rank" data-order="asc"' in page          # smallest rank first
    assert re.search(r'data-key="rank"[^>]*aria-sort="ascending"', page)            # the order the page opened in
    by_column = lb.render_html(lb.load_leaderboard(ranked_board), sort="toy-linear")
    assert re.findall(r'<th [^>]*aria-sort="(\w+)"', by_column) == ["descending"]
    assert re.search(r'<th [^>]*data-bench="toy-linear"[^>]*aria-sort="descending"', by_column)
    # the full fingerprint in the model cell's tooltip; non-standard rows marked by class (and CSS)
    assert f'title="weights fingerprint {fingerprint("enc-a")}' in page
    assert re.search(r'<tr class="measured nonstandard"[^>]*><td class="model"[^>]*>enc-syn</td>', page)
    assert 'tr.nonstandard td.model::after' in page
    assert re.search(r'<td class="num mean" data-value="55.0">55.00</td><td class="num rank" data-value="1.25">'
                     r"1.25</td>", page)


def test_markdown_rendering(mixed_board):
    md = lb.render_markdown(mixed_board)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["Model", "Arch", "Source", "Mean", "Rank"] and header[-1] == "Note"
    body = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in lines[2:]]
    assert all(len(row) == len(header) for row in body)
    # one voc-incontext column per protocol version (the API shows every version unless asked)
    assert [h for h in header if h.startswith("voc-incontext")] == [
        "voc-incontext (hbird-1.1)", "voc-incontext (hbird-paper)", "voc-incontext (hbird-unknown)"]
    v11, unknown = header.index("voc-incontext (hbird-1.1)"), header.index("voc-incontext (hbird-unknown)")
    assert "70.2†" in {row[v11] for row in body} and "**77.0**" in {row[v11] for row in body}
    assert "**83.5**" in {row[unknown] for row in body}          # best bolded per version; non-standard marked
    for col in (v11, unknown):
        assert sum(1 for row in body if row[col].startswith("**")) == 1
    measured = [row for row in body if row[2].startswith("measured")]
    assert {row[0] for row in measured} == {"dino\\_vits16", "enc-syn †"}
    assert any(row[-1] == "measured on synthetic data" for row in measured)
    assert "<https://github.com/vpariza/NeCo/blob/393216026b4d045e2e0b803f70a7d89d9a58937e/README.md>" in md
    # no model has every column of the whole board: the note says so instead of describing empty columns
    assert "no model has all" in md and "only for models that have all" not in md
    linear = lb.render_markdown(mixed_board, benchmarks=["voc-linear", "ade20k-linear"])
    assert "only for models that have all 2" in linear and "no model has all" not in linear


def test_csv_and_json_hold_every_shown_value(mixed_board):
    view = lb.build_view(mixed_board)
    df = pd.read_csv(io.StringIO(lb.render_csv(mixed_board)))
    records = json.loads(lb.render_json(mixed_board))
    assert len(df) == len(records) == len(view.rows)
    for i, row in enumerate(view.rows):
        assert df["model"][i] == records[i]["model"] == row.model
        for c in view.columns:
            expected = metric_value(row.cells[c], c.metric) if c in row.cells else None
            assert records[i][c.label] == expected
            assert (pd.isna(df[c.label][i]) if expected is None else df[c.label][i] == expected)
            if c in row.cells:
                cell = records[i]["cells"][c.label]
                assert cell["entry"] == row.cells[c]["id"]
                assert [a["entry"] for a in cell["also"]] == [a["id"] for a in row.alternatives.get(c, [])]
    assert int(df[[c.label for c in view.columns]].notna().sum().sum()) == sum(len(r.cells) for r in view.rows)


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
    shown = [c["data-entry"] for c in parser.cells] + [x for c in parser.cells
                                                       for x in c.get("data-alternatives", "").split()]
    assert set(shown) == {e["id"] for e in mixed_board["entries"]}
    assert len(shown) == len(_headline_cells(mixed_board))          # each value once: a cell or an alternative
    assert parser.rows == len(lb.build_view(mixed_board).rows)
    for tag, attrs in parser.tags:                   # nothing the browser would fetch
        assert not (tag in ("script", "img", "iframe") and attrs.get("src"))
        assert not (tag == "link" and attrs.get("rel") != "icon")
    assert "default-src 'none'" in page
    assert 'data-filter="source"' in page and "data-column-filter" in page


def test_protocol_versions_auto_all_and_named(mixed_board):
    auto = lb.build_view(mixed_board, protocols="auto", benchmarks=["voc-incontext"])
    assert [(c.label, c.version) for c in auto.columns] == [("voc-incontext (hbird-1.1)", "hbird-1.1")]
    assert auto.hidden == [("voc-incontext", "hbird-paper", 1), ("voc-incontext", "hbird-unknown", 9)]
    assert "hbird-unknown (9 entries)" in lb.render_markdown(mixed_board, protocols="auto")
    everything = lb.build_view(mixed_board, protocols="all", benchmarks=["voc-incontext"])
    assert [c.version for c in everything.columns] == ["hbird-1.1", "hbird-paper", "hbird-unknown"]
    named = lb.build_view(mixed_board, protocols="hbird-unknown,hbird-paper", benchmarks=["voc-incontext",
                                                                                            "voc-linear"])
    assert [(c.benchmark, c.version) for c in named.columns] == [
        ("voc-incontext", "hbird-paper"), ("voc-incontext", "hbird-unknown"), ("voc-linear", "neco-leopart")]
    assert [c.code for c in named.columns] == ["VOC-ic\npaper", "VOC-ic\nunknown", "VOC-lin"]
    with pytest.raises(ConfigError, match="unknown protocol version 'hbird-9'"):
        lb.build_view(mixed_board, protocols="hbird-9")
    main = lb.build_view(mixed_board, protocols="auto", metrics="main", benchmarks=["overcluster"])
    assert [(c.benchmark, c.metric) for c in main.columns] == [("voc-overcluster", "miou@500"),
                                                               ("coco-things-overcluster", "miou@500")]


def test_filters_by_benchmark_group_and_source(mixed_board):
    view = lb.build_view(mixed_board, benchmarks=["voc-linear"], source="published")
    assert {c.benchmark for c in view.columns} == {"voc-linear"}
    assert all(r.source == "published" and r.cells for r in view.rows)
    linear = lb.build_view(mixed_board, benchmarks=["linear"])
    assert [c.benchmark for c in linear.columns] == ["voc-linear", "ade20k-linear", "coco-things-linear",
                                                     "coco-stuff-linear"]
    with pytest.raises(ConfigError, match="unknown benchmark 'voc-nope'"):
        lb.build_view(mixed_board, benchmarks=["voc-nope"])
    with pytest.raises(ConfigError, match="unknown format 'pdf'"):
        lb.render(mixed_board, "pdf")


# ---------------------------------------------------------------------------------------------------
# The terminal table at 80 columns

def _terminal_blocks(text: str) -> list[list[list[str]]]:
    """Body rows (lists of stripped cells) of every table block in rich's box drawing."""
    blocks: list[list[list[str]]] = []
    body = False
    for line in text.splitlines():
        if line.startswith("┏"):
            blocks.append([])
            body = False
        elif line.startswith("┡"):
            body = True
        elif line.startswith("└"):
            body = False
        elif body and line.startswith("│"):
            blocks[-1].append([c.strip() for c in line.strip().strip("│").split("│")])
    return blocks


def _assert_whole(text: str, view, width: int = 80) -> None:
    """Every row's name and every number of the view, un-cut, in its row of the printed blocks."""
    table_lines = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table_lines and max(len(line) for line in table_lines) <= width
    blocks = _terminal_blocks(text)
    assert all(len(b) == len(view.rows) for b in blocks)
    for i, row in enumerate(view.rows):
        printed = [b[i] for b in blocks]
        assert {p[0] for p in printed} == {row.label}                 # the model column, whole, in each block
        numbers = [cell for p in printed for cell in p[2:]]
        expected = [summary_text(row, w) for w in ("mean", "rank") if any(
            summary_text(r, w) for r in view.rows)]
        expected += [cell_text(view, row, c) for c in view.columns]
        assert numbers == expected


@pytest.mark.parametrize("options", [{}, {"protocols": "all", "metrics": "all"}])
def test_terminal_table_at_80_columns_keeps_names_and_numbers(mixed_board, options):
    view = lb.build_view(mixed_board, **options, sort="mean")
    text = _printed(lb.render_table(mixed_board, **options, sort="mean", width=80))
    _assert_whole(text, view)
    assert len(_terminal_blocks(text)) > 1
    for line in column_legend(view, 80):                 # every short code is explained
        assert line in text
    assert "<https://github.com/vpariza/NeCo/blob/393216026b4d045e2e0b803f70a7d89d9a58937e/README.md>" in text


def test_terminal_too_narrow_for_a_table_goes_vertical(ranked_board):
    doc = lb.load_leaderboard(ranked_board)
    view = lb.build_view(doc, sort="rank")
    lines = _printed(lb.render_table(doc, sort="rank", width=30), width=30).splitlines()
    assert not any(line[:1] in "┏┃┡│└" for line in lines)
    assert lines[1] == ("enc-b (" + fingerprint("enc-b")[7:19] + "): mean 55.00, rank 1.25, toy-linear 70.0, "
                        "toy-incontext 40.0")                      # toy codes coincide: the names are kept
    for row, line in zip(view.rows, lines[1:6]):
        assert line.startswith(f"{row.label} (") and all(cell_text(view, row, c) in line for c in view.columns)
    empty = _printed(lb.render_table(doc, source="published"))
    assert "no entries to show" in empty and "┏" not in empty


def test_cli_show_piped_at_80_columns_in_a_real_process():
    """`densebench leaderboard show` with stdout a pipe and COLUMNS=80: every name and number whole."""
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "densebench", "leaderboard", "show"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = lb.load_leaderboard(SHIPPED)
    view = lb.build_view(doc, protocols="auto", metrics="main", sort="mean")
    _assert_whole(proc.stdout, view)
    assert "VOC-ic/1.1 = voc-incontext miou (hbird-1.1)" in proc.stdout
    assert "hbird-unknown (9 entries)" in proc.stdout


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


def test_compare_formats_and_sort(toy, tmp_path):
    board = tmp_path / "board.json"
    runs = [("base", "toy-linear", 40.0), ("base", "toy-incontext", 30.0), ("post", "toy-linear", 47.5),
            ("post", "toy-incontext", 29.0)]
    lb.submit([write(make_result(model=m, benchmark=b, metrics={"miou": v}), tmp_path / f"{m}{b}.json")
               for m, b, v in runs], board)
    rows = lb.compare_models(lb.load_leaderboard(board), "base", "post")
    # default order: the benchmark table's; --sort delta: largest first
    assert [r["benchmark"] for r in rows] == ["toy-linear", "toy-incontext"]
    by_delta = json.loads(lb.render_comparison(rows, "base", "post", "json", sort="delta"))
    assert [(r["benchmark"], r["delta"]) for r in by_delta] == [("toy-linear", 7.5), ("toy-incontext", -1.0)]
    plain = lb.render_comparison(rows, "base", "post", "plain", sort="a").splitlines()
    assert plain[0].split("\t")[:5] == ["benchmark", "metric", "a", "b", "delta"]
    assert [line.split("\t")[0] for line in plain[1:]] == ["toy-linear", "toy-incontext"]
    page = lb.render_comparison(rows, "base", "post", "html", sort="delta")
    assert '<table id="compare" class="sortable">' in page and "default-src 'none'" in page
    assert re.findall(r'<td class="num" data-value="([^"]+)">[+-]', page) == ["7.5", "-1.0"]
    text = _printed(lb.render_comparison(rows, "base", "post", "table", sort="delta"))
    body = _terminal_blocks(text)[0]
    assert [r[:5] for r in body] == [["toy-linear", "miou", "40.0", "47.5", "+7.5"],
                                     ["toy-incontext", "miou", "30.0", "29.0", "-1.0"]]
    with pytest.raises(ConfigError, match="unknown --sort column 'speed'"):
        lb.render_comparison(rows, "base", "post", "csv", sort="speed")


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
    assert df["mean"].tolist() == [33.3] and df["rank"].tolist() == [1.0]

    html_out = tmp_path / "board.html"
    res = runner.invoke(cli, ["leaderboard", "show", str(board), "-f", "html", "-o", str(html_out)])
    assert res.exit_code == 0 and "<table id=\"board\"" in html_out.read_text()

    res = runner.invoke(cli, ["leaderboard", "show", str(board), "--format", "markdown",
                              "-b", "voc-linear,ade20k-linear", "--sort", "ade20k-linear"])
    assert res.exit_code == 0
    assert "| Model | Arch | Source | Mean | Rank | voc-linear | ade20k-linear | Note |" in res.output
    assert "| neco\\_vitb14 | ViT-B/14 | published [1] | 64.10 | 1.00 | 83.3 | **44.9** |" in res.output

    res = runner.invoke(cli, ["leaderboard", "show", "--format", "table", "--source", "published"],
                        env={"COLUMNS": "80"})
    assert res.exit_code == 0 and "dense-ssl" in res.output       # the shipped board by default
    assert max(len(line) for line in res.output.splitlines() if line[:1] in "┏┃┡│└") <= 80

    res = runner.invoke(cli, ["leaderboard", "show", str(board), "-f", "json", "-b", "toy-linear", "--sort", "rank"])
    assert json.loads(res.output)[0]["cells"]["toy-linear"]["value"] == 33.3

    res = runner.invoke(cli, ["leaderboard", "compare", "dino_vits16", "neco_dino_vits16", "-f", "markdown"])
    assert res.exit_code == 0 and "| voc-linear | miou | 50.2 | 61.3 | +11.1 | yes |" in res.output
    res = runner.invoke(cli, ["leaderboard", "compare", "dino_vits16", "neco_dino_vits16", "--sort", "delta"],
                        env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    body = _terminal_blocks(res.output)[0]
    deltas = [float(r[4]) for r in body if r[4]]
    assert deltas == sorted(deltas, reverse=True) == [30.8, 30.6, 18.5, 14.7, 11.1, 10.2]
    assert "[1] NeCo Table 3 (protocol neco-leopart)" in res.output


def test_cli_errors_are_densebench_errors(toy, cli, tmp_path):
    runner = CliRunner()
    tampered = make_result()
    tampered["metrics"]["miou"] = 1.0
    res = runner.invoke(cli, ["submit", str(write(tampered, tmp_path / "t.json")), "-l", str(tmp_path / "b.json")])
    assert isinstance(res.exception, ResultError) and "integrity" in res.exception.message
    for args in (["leaderboard", "show", "--format", "pdf"], ["leaderboard", "show", "--sort", "speed"],
                 ["leaderboard", "show", "--protocol", "hbird-9"], ["leaderboard", "show", "--metrics", "some"],
                 ["leaderboard", "compare", "dino_vits16", "neco_dino_vits16", "-f", "pdf"]):
        res = runner.invoke(cli, args)
        assert isinstance(res.exception, ConfigError), args


def test_main_exits_with_code_2_on_a_bad_leaderboard(tmp_path, capsys):
    cli_mod = pytest.importorskip("densebench.cli")
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    with pytest.raises(SystemExit) as info:
        cli_mod.main(["leaderboard", "show", str(bad)])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is not valid JSON" in err and "Traceback" not in err
