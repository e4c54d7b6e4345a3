"""`densebench reproduce` on the synthetic suite: a result re-measured here either matches or is reported.

The integrity hash cannot catch an edit whose hash was recomputed; reproduce re-runs the recorded model,
benchmark and config and compares every metric, so such an edit shows up as the exact edited delta.
"""

import json

import pytest
from test_cli import SMALL, run_cli

from densebench.reproduce import compare_metrics, flat_metrics, reproduce
from densebench.results import integrity_hash, read_result


@pytest.fixture
def recorded(synth_root, tmp_path, capsys):
    path = tmp_path / "r.json"
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                            str(synth_root), *SMALL, "--output", str(path)], capsys)
    assert code == 0, err
    return path


def _edited(path, tmp_path, edit):
    """The result with ``edit`` applied and its integrity hash recomputed: it passes every file check."""
    doc = json.loads(path.read_text())
    edit(doc)
    doc["integrity"] = integrity_hash(doc)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    read_result(out)  # schema + integrity: the hash is no defence against this edit
    return out


def test_untouched_result_reproduces_exactly(recorded, synth_root, tmp_path, capsys):
    rep = reproduce(recorded, data_root=synth_root, progress=False)
    original = read_result(recorded)
    assert rep.reproduced and not rep.config_differences
    assert rep.measured.metrics == original.metrics  # one machine, same recipe: the same numbers
    assert rep.measured.model["fingerprint"] == original.model["fingerprint"]
    assert {c.name for c in rep.checks} == set(flat_metrics(original.metrics))
    assert "per_class_iou/aeroplane" in {c.name for c in rep.checks}
    code, out, err = run_cli(["reproduce", str(recorded), "--data-root", str(synth_root), "--quiet", "--no-cache"],
                             capsys)  # fresh forwards this time
    assert code == 0, err
    assert "reproduced" in out and "not reproduced" not in out
    assert f"{original.metrics['miou']:.2f}" in out


@pytest.mark.parametrize("delta, tolerance, code", [(3.0, 0.5, 1), (0.4, 0.5, 0), (0.6, 0.5, 1), (0.6, 1.0, 0)])
def test_edited_and_rehashed_metric(delta, tolerance, code, recorded, synth_root, tmp_path, capsys):
    miou = read_result(recorded).metrics["miou"]

    def edit(doc):
        doc["metrics"]["miou"] += delta

    edited = _edited(recorded, tmp_path, edit)
    got, out, err = run_cli(["reproduce", str(edited), "--data-root", str(synth_root), "--tolerance", str(tolerance),
                             "--quiet"], capsys)
    assert got == code, out + err
    assert "Traceback" not in out + err
    line = next(row for row in out.splitlines() if " miou " in row)
    assert f"{miou + delta:.2f}" in line and f"{miou:.2f}" in line and f"{-delta:+.2f}" in line
    assert ("not reproduced" in out) == (code == 1)


def test_edited_per_class_value_is_caught(recorded, synth_root, tmp_path, capsys):
    def edit(doc):
        doc["metrics"]["per_class_iou"]["background"] -= 5.0

    got, out, err = run_cli(["reproduce", str(_edited(recorded, tmp_path, edit)), "--data-root", str(synth_root),
                             "--quiet"], capsys)
    assert got == 1, out + err
    assert "per_class_iou/background" in out and "not reproduced" in out


def test_other_weights_are_an_error(recorded, synth_root, tmp_path, capsys):
    def edit(doc):
        doc["model"]["fingerprint"] = "pixels-v1:p16:other"
        doc["provenance"]["encoder_fingerprint"] = "pixels-v1:p16:other"

    got, out, err = run_cli(["reproduce", str(_edited(recorded, tmp_path, edit)), "--data-root", str(synth_root),
                             "--quiet"], capsys)
    assert got == 2 and "Traceback" not in out + err
    assert "pixels-v1:p16:other" in err and "fix:" in err and "--weights" in err


@pytest.mark.parametrize("tolerance", ["-1", "nan"])
def test_bad_tolerance_is_refused(tolerance, recorded, synth_root, capsys):
    got, _, err = run_cli(["reproduce", str(recorded), "--data-root", str(synth_root), "--tolerance", tolerance],
                          capsys)
    assert got == 2 and "--tolerance" in err and tolerance in err


def test_metric_comparison_flattens_and_pairs_every_value():
    recorded = {"miou": 50.0, "per_class": {"a": 10.0, "b": None}, "pck": [1.0, 2.0], "note": "x"}
    measured = {"miou": 50.25, "per_class": {"a": 10.0, "b": 3.0}, "pck": [1.0], "extra": 7.0}
    checks = {c.name: c for c in compare_metrics(recorded, measured)}
    assert list(checks) == ["miou", "per_class/a", "per_class/b", "pck/0", "pck/1", "extra"]
    assert checks["miou"].delta == 0.25 and checks["miou"].within(0.25) and not checks["miou"].within(0.2)
    assert not checks["per_class/b"].within(100)          # null on one side only
    assert not checks["pck/1"].within(100) and not checks["extra"].within(100)   # missing on one side
    assert checks["per_class/a"].within(0.0)
