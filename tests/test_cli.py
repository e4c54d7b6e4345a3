"""`densebench run` end to end on the synthetic suite, and every bad input of issue 2 (exit 2, no traceback)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densebench.cli import main
from densebench.errors import ConfigError
from densebench.results import read_result

SMALL = ["--input-size", "64", "--augment-epochs", "1", "--quiet"]


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_run_writes_valid_result(synth_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                                    str(synth_root), *SMALL, "--output", str(out)], capsys)
    assert code == 0, stderr
    res = read_result(out)  # schema + integrity
    assert res["benchmark"] == "voc-incontext"
    assert res["config"]["input_size"] == 64 and res["config"]["augment_epochs"] == 1
    assert 0 <= res["metrics"]["miou"] <= 100
    assert res["metrics"]["miou"] >= res["metrics"]["miou_identity"] - 1e-9  # Hungarian can only help
    assert res["provenance"]["dataset"]["synthetic"] is True
    assert "voc-incontext" in stdout


def test_official_folder_and_data_home_give_the_same_result(synth_root, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for root, out in ((synth_root, a), (synth_root / "VOCSegmentation", b)):
        code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root", str(root),
                                *SMALL, "--output", str(out)], capsys)
        assert code == 0, err
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["metrics"] == rb["metrics"]


def test_existing_output_is_refused_and_untouched(synth_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("precious")
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                            str(synth_root), *SMALL, "--output", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_text() == "precious"


@pytest.mark.parametrize("args, needle", [
    (["--benchmark", "voc-nope"], "unknown benchmark"),
    (["--model", "no_such_model"], "no_such_model"),
    (["--memory-size", "lots"], "--memory-size"),
    (["--no-such-option", "3"], "--no-such-option"),
    (["--input-size", "70"], "multiple of the patch size"),
    (["--temperature", "0"], "--temperature"),
])
def test_bad_values_exit_2(synth_root, tmp_path, capsys, args, needle):
    base = {"--model": "pixels", "--benchmark": "voc-incontext"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["run", "--data-root", str(synth_root), "--quiet", "--output", str(tmp_path / "x.json")]
    for k, v in base.items():
        argv += [k, v]
    if "--input-size" not in base:
        argv += ["--input-size", "64"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_missing_data_root(tmp_path, capsys):
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                            str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err


def test_data_root_without_the_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                            str(tmp_path / "empty")], capsys)
    assert code == 2 and "VOCSegmentation" in err


def _copy_voc(synth_root, tmp_path):
    dst = tmp_path / "home"
    shutil.copytree(synth_root / "VOCSegmentation", dst / "VOCSegmentation")
    return dst


def _first_val_id(root):
    return (root / "VOCSegmentation" / "sets" / "val.txt").read_text().split()[0]


@pytest.mark.parametrize("damage", ["unreadable", "size", "labels"])
def test_damaged_files_exit_2_naming_the_file(synth_root, tmp_path, capsys, damage):
    home = _copy_voc(synth_root, tmp_path)
    vid = _first_val_id(home)
    img = home / "VOCSegmentation" / "images" / f"{vid}.jpg"
    mask = home / "VOCSegmentation" / "SegmentationClass" / f"{vid}.png"
    if damage == "unreadable":
        img.write_bytes(b"not a jpeg")
        needle = img.name
    elif damage == "size":
        m = Image.open(mask)
        m.resize((m.width + 3, m.height)).save(mask)
        needle = mask.name
    else:
        m = Image.open(mask)
        arr = np.array(m)
        arr[0:4, 0:4] = 77
        out = Image.fromarray(arr, mode="P")
        out.putpalette(m.getpalette())
        out.save(mask)
        needle = "77"
    out_file = tmp_path / "r.json"
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root", str(home),
                            *SMALL, "--no-cache", "--output", str(out_file)], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not out_file.exists()


def test_weights_that_do_not_fit_exit_2(synth_root, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "w.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(bad))
    code, _, err = run_cli(["run", "--model", "timm:vit_tiny_patch16_224", "--weights", str(bad), "--benchmark",
                            "voc-incontext", "--data-root", str(synth_root), *SMALL], capsys)
    assert code == 2 and "w.safetensors" in err and "Traceback" not in err


def test_console_script_exit_code_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "densebench"
    proc = subprocess.run([str(exe), "run", "--model", "pixels", "--benchmark", "voc-nope", "--data-root",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown benchmark" in proc.stderr and "Traceback" not in proc.stderr


def test_list_commands(capsys):
    code, out, _ = run_cli(["list", "benchmarks", "--options"], capsys)
    assert code == 0 and "voc-incontext" in out and "--memory-size" in out
    code, out, _ = run_cli(["list", "models"], capsys)
    assert code == 0 and "dinov2_vits14" in out


def test_run_without_output_writes_under_densebench_results(synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root",
                              str(synth_root), *SMALL], capsys)
    assert code == 0, err
    written = list((tmp_path / "densebench-results" / "pixels").glob("*/voc-incontext.json"))
    assert len(written) == 1
    assert read_result(written[0])["benchmark"] == "voc-incontext"


def test_feature_norm_flag_reaches_encoder_and_protocols(synth_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root", str(synth_root),
                            *SMALL, "--feature-norm", "off", "--output", str(out)], capsys)
    assert code == 0, err
    assert read_result(out)["model"]["norm"] is False
    out2 = tmp_path / "s.json"
    code, _, err = run_cli(["run", "--model", "pixels", "--benchmark", "spair-correspondence", "--data-root",
                            str(synth_root), "--input-size", "64", "--quiet", "--feature-norm", "on",
                            "--output", str(out2)], capsys)
    assert code == 0, err
    assert read_result(out2)["config"]["feature_norm"] is True


def test_benchmark_groups_expand_in_table_order():
    from densebench.benchmark_table import groups, select

    assert [s.name for s in select(["linear"])] == ["voc-linear", "ade20k-linear", "coco-things-linear",
                                                     "coco-stuff-linear"]
    assert [s.name for s in select(["voc"])] == ["voc-incontext", "voc-linear", "voc-overcluster"]
    assert [s.name for s in select(["voc-linear", "linear", "voc"])][:2] == ["voc-incontext", "voc-linear"]
    assert len(select(["all"])) == len(select(groups()))
    with pytest.raises(ConfigError, match="unknown benchmark or group 'lineer'"):
        select(["lineer"])


def test_several_models_write_one_folder_each_with_a_summary(synth_root, tmp_path, capsys):
    code, out, err = run_cli(["run", "--model", "pixels,random:vit_tiny_patch16_224", "--benchmark", "voc-incontext",
                              "--data-root", str(synth_root), *SMALL, "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    for model in ("pixels", "random_vit_tiny_patch16_224"):
        folder = tmp_path / "out" / model
        result = read_result(folder / "voc-incontext.json")
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["results"][0]["score"] == result.main_score and summary["command"][0]
        assert result["provenance"]["command"] and "git_dirty" in result["provenance"]


def test_benchmark_without_model_runs_the_builtin_models_on_just_those(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "-b", "spair-correspondence", "--quiet"], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "densebench-results").parts[0]
                     for p in (tmp_path / "densebench-results").glob("*/*/spair-correspondence.json"))
    assert written == ["pixels", "random_vit_small_patch16_224"]
    assert not list((tmp_path / "densebench-results").glob("*/*/voc-incontext.json"))
    assert "reduced settings of the embedded default" in out and "spair-correspondence: input_size=224" in out


def test_data_commands_take_the_data_root_flag_of_run(synth_root, capsys):
    """`data verify --data-root` as `run --data-root` (and `--root` as before) name the same folder."""
    got = [run_cli(["data", "verify", "voc", flag, str(synth_root)], capsys) for flag in ("--root", "--data-root")]
    assert got[0][0] == got[1][0] == 0 and got[0][1] == got[1][1] and str(synth_root) in got[0][1]
