"""`--limit N`: a smoke test of real data on the first N items of every split, recorded and non-standard."""

from __future__ import annotations

import pytest
from test_cli import run_cli

from densebench import data
from densebench.leaderboard.entries import check_config
from densebench.results import read_result


def test_open_dataset_cuts_every_split_to_its_first_items(synth_root):
    full = data.open_dataset("voc", synth_root, "train")
    with data.limited(3):
        cut = data.open_dataset("voc", synth_root, "train")
        pairs = data.open_dataset("spair", synth_root, "test")
        davis = data.open_dataset("davis", synth_root, "val")
    assert cut.ids == full.ids[:3] and cut.manifest_hash() != full.manifest_hash()
    all_pairs = data.open_dataset("spair", synth_root, "test")
    assert pairs.pair_names == all_pairs.pair_names[:3] and len(pairs.pairs) == 3
    used = {p[k] for p in pairs.pairs for k in ("src_id", "trg_id")}
    assert set(pairs.ids) == used                                   # only the images those pairs use
    all_davis = data.open_dataset("davis", synth_root, "val")
    assert davis.sequences == all_davis.sequences[:3]
    for seq in davis.sequences:                                     # whole sequences, never cut short
        assert davis.frame_ids(seq) == all_davis.frame_ids(seq)
    assert data.open_dataset("voc", synth_root, "train").ids == full.ids   # only inside the block


def test_limit_runs_on_the_first_images_and_is_non_standard(synth_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(["run", "-m", "pixels", "-b", "voc-incontext", "--data-root", str(synth_root),
                                    "--input-size", "64", "--augment-epochs", "1", "--limit", "4", "-q",
                                    "-o", str(out)], capsys)
    assert code == 0, stderr
    res = read_result(out)
    assert res["config"]["limit"] == 4
    assert res["provenance"]["dataset"]["n_val"] == 4
    assert res["provenance"]["cache"]["images_forwarded"] == 8     # 4 memory-bank views + 4 queries
    assert "--limit 4" in stdout and "non-standard" in stdout
    _, _, reasons = check_config(res.to_dict() if hasattr(res, "to_dict") else dict(res))
    assert any("limit" in r for r in reasons), reasons


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_limit_is_refused_before_any_work(synth_root, tmp_path, capsys, value):
    code, _, stderr = run_cli(["run", "-m", "pixels", "-b", "voc-incontext", "--data-root", str(synth_root),
                               "--limit", value, "-q", "-o", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "--limit" in stderr
    assert not (tmp_path / "r.json").exists()


def test_results_recorded_before_limit_existed_stay_standard():
    from densebench.benchmark_table import get_benchmark

    spec = get_benchmark("voc-incontext")
    canonical = spec.canonical_config({"name": "x", "patch_size": 16})
    old = {k: v for k, v in canonical.items() if k != "limit"}
    assert spec.resolve_canonical(old, {"name": "x", "patch_size": 16}) == canonical
