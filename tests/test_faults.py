"""Issue 13's fault cases through the CLI: bad options, data, weights, outputs, leaderboards, concurrency.

Each case runs ``densebench``'s ``main()`` (the CLI entry point with its error printer, in-process) or the
console script in subprocesses (concurrent runs), and asserts the exit code, no traceback, a message
naming the value and the fix, and that no file was created or changed. Refusals that must come before
any work also assert that no backbone forward ran (the extraction entry point is replaced by a trap).
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_cli import SMALL, run_cli

import densebench.protocols.common as protocol_common
from densebench.results import read_result

RUN = ["run", "--model", "pixels", "--benchmark", "voc-incontext", "--augment-epochs", "1", "--quiet"]


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` with its size, mtime and mode; folders by mode only (a write check's probe
    file, created and removed, touches a folder's mtime but leaves nothing)."""
    out = {}
    for root in roots:
        for p in [Path(root), *Path(root).rglob("*")]:
            st = p.lstat()
            out[str(p)] = stat.S_IMODE(st.st_mode) if p.is_dir() else (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def no_forward(monkeypatch):
    """Make any feature extraction fail the test: the refusal must come before the first forward."""
    def trap(*args, **kwargs):
        raise AssertionError("features were extracted before the bad input was refused")

    monkeypatch.setattr(protocol_common, "extract", trap)


@pytest.fixture(scope="module")
def result_file(synth_root, tmp_path_factory):
    """A valid, integrity-hashed result (no feature cache: module fixtures run outside the isolated cache)."""
    import densebench

    path = tmp_path_factory.mktemp("result") / "r.json"
    densebench.evaluate("pixels", benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False,
                        output=path, progress=False, input_size=64, augment_epochs=1)
    return path


def _voc_copy(synth_root: Path, tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(synth_root / "VOCSegmentation", root / "VOCSegmentation")
    return root


def _val_id(root: Path) -> str:
    return json.loads((root / "VOCSegmentation" / "densebench_manifest.json").read_text())["splits"]["val"][0]


def _manifest(doc):
    def make(tmp, synth):
        root = _voc_copy(synth, tmp)
        (root / "VOCSegmentation" / "densebench_manifest.json").write_text(json.dumps(doc(root)))
        return root
    return make


def _synth_val_null(root: Path) -> dict:
    doc = json.loads((root / "VOCSegmentation" / "densebench_manifest.json").read_text())
    doc["splits"]["val"] = None
    return doc


def _text_weights(tmp: Path) -> str:
    (tmp / "w.pth").write_text("hello world\n")
    return str(tmp / "w.pth")


def _weights_folder(tmp: Path) -> str:
    (tmp / "weights").mkdir()
    return str(tmp / "weights")


def _a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("in the way")
    return tmp / "afile"


def _folder_named_json(tmp: Path) -> Path:
    (tmp / "r.json").mkdir()
    return tmp / "r.json"


def _binary(tmp: Path) -> Path:
    (tmp / "bin.json").write_bytes(bytes(range(128, 256)) * 4)
    return tmp / "bin.json"


def _folder(tmp: Path) -> Path:
    (tmp / "results").mkdir()
    return tmp / "results"


# (case id, argv from (tmp, data root, result file), texts the error must contain, texts it must not)
# ``data root`` is the synthetic suite unless the case makes its own damaged copy first.
PRE_WORK = [
    ("query-chunk", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64", "--query-chunk", "-3"],
     ["--query-chunk", "-3", ">= 0"], []),
    ("batch-size", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64", "--batch-size", "0"],
     ["--batch-size", "0", ">= 1"], []),
    ("num-workers", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64", "--num-workers", "-1"],
     ["--num-workers", "-1", ">= 0"], []),
    ("input-size", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "99999984"],
     ["--input-size", "99999984", "[1, 4096]"], []),
    ("markup-in-path", lambda t, d, r: [*RUN, "--data-root", str(t / "exp[v2]" / "data")],
     ["exp[v2]/data", "does not exist", "fix:"], []),
    ("emoji-code", lambda t, d, r: [*RUN, "--data-root", d, "--model", ":smile:"],
     ["':smile:'", "fix:"], ["\N{SMILING FACE WITH OPEN MOUTH AND SMILING EYES}"]),
    ("closing-tag", lambda t, d, r: [*RUN, "--data-root", d, "--model", "[/bold]"],
     ["'[/bold]'", "fix:"], []),
    ("manifest-list", lambda t, d, r: [*RUN, "--data-root", str(_manifest(lambda root: [1, 2, 3])(t, Path(d))),
                                       "--input-size", "64"],
     ["densebench_manifest.json", "holds a list", "fix:", "densebench synth"], []),
    ("manifest-null-split", lambda t, d, r: [*RUN, "--data-root", str(_manifest(_synth_val_null)(t, Path(d))),
                                             "--input-size", "64"],
     ["densebench_manifest.json", "splits.val is null", "fix:"], []),
    ("weights-text", lambda t, d, r: [*RUN, "--data-root", d, "--model", "timm:vit_tiny_patch16_224",
                                      "--weights", _text_weights(t), "--input-size", "64"],
     ["w.pth", "is a text file", "'hello world'", "fix:"], [": 101"]),
    ("weights-folder", lambda t, d, r: [*RUN, "--data-root", d, "--model", "timm:vit_tiny_patch16_224",
                                        "--weights", _weights_folder(t), "--input-size", "64"],
     ["weights", "is a folder", "fix:"], ["does not exist"]),
    ("output-under-file", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64",
                                           "--output", str(_a_file(t) / "r.json")],
     ["afile", "is a file, not a folder", "fix:"], []),
    ("output-is-folder", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64",
                                          "--output", str(_folder_named_json(t)), "--overwrite"],
     ["r.json", "is a folder", "fix:"], []),
    ("cache-under-file", lambda t, d, r: [*RUN, "--data-root", d, "--input-size", "64",
                                          "--cache-dir", str(_a_file(t) / "cache")],
     ["feature cache", "afile", "fix:", "--no-cache"], []),
    ("submit-binary", lambda t, d, r: ["submit", str(_binary(t)), "--leaderboard", str(t / "board.json")],
     ["bin.json", "not a text file", "fix:"], []),
    ("submit-folder", lambda t, d, r: ["submit", str(_folder(t)), "--leaderboard", str(t / "board.json")],
     ["results", "is a folder", "fix:"], []),
    ("report-binary", lambda t, d, r: ["report", str(_binary(t)), "--out", str(t / "report")],
     ["bin.json", "not a text file", "fix:"], []),
    ("report-folder", lambda t, d, r: ["report", str(_folder(t)), "--out", str(t / "report")],
     ["results", "holds no result files", "fix:"], []),
    ("leaderboard-folder", lambda t, d, r: ["submit", r, "--allow-nonstandard", "--leaderboard", str(_folder(t))],
     ["results", "is a folder", "fix:"], []),
]


@pytest.mark.parametrize("make, needles, absent", [c[1:] for c in PRE_WORK], ids=[c[0] for c in PRE_WORK])
def test_bad_input_is_refused_before_work(make, needles, absent, synth_root, result_file, tmp_path, capsys,
                                          monkeypatch, no_forward):
    monkeypatch.chdir(tmp_path)
    argv = make(tmp_path, str(synth_root), str(result_file))
    if argv[0] == "run" and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out" / "r.json")]
    before = snapshot(tmp_path, result_file.parent)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    for text in needles:
        assert text in err, (text, err)
    for text in absent:
        assert text not in err, (text, err)
    assert snapshot(tmp_path, result_file.parent) == before


@pytest.mark.parametrize("damage", ["truncated-mask", "listed-without-files"])
def test_damaged_data_names_the_file_and_the_fix(damage, synth_root, tmp_path, capsys):
    root = _voc_copy(synth_root, tmp_path)
    vid = _val_id(root)
    if damage == "truncated-mask":
        mask = root / "VOCSegmentation" / "SegmentationClass" / f"{vid}.png"
        data = mask.read_bytes()
        mask.write_bytes(data[: len(data) // 2])
        needles = [f"{vid}.png", "cannot be read", "fix:", "re-extract"]
    else:
        (root / "VOCSegmentation" / "images" / f"{vid}.jpg").unlink()
        needles = [f"{vid}.jpg", "does not exist", "fix:", "is in the split list", "restore it"]
    before = snapshot(tmp_path)
    code, out, err = run_cli([*RUN, "--data-root", str(root), "--input-size", "64", "--output",
                              str(tmp_path / "r.json")], capsys)
    assert code == 2 and "Traceback" not in out + err
    for text in needles:
        assert text in err, (text, err)
    assert snapshot(tmp_path) == before


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder that refuses new files: a 0555 folder, or (as root, who ignores modes) the read-only /sys.
    For the 0555 folder a leaderboard already lives in it, as in the issue's case."""
    def refuses(folder: Path) -> bool:
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return True
        os.close(fd)
        os.unlink(probe)
        return False

    folder = tmp_path / "readonly"
    folder.mkdir()
    (folder / "board.json").write_text(json.dumps({"schema_version": 1, "name": "b", "description": "",
                                                   "entries": []}))
    folder.chmod(0o555)
    try:
        if refuses(folder):
            yield folder
            return
        for candidate in (Path("/sys"), Path("/proc")):
            if candidate.is_dir() and refuses(candidate):
                yield candidate
                return
        pytest.skip("no folder here refuses new files")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "submit", "report"])
def test_unwritable_folder_is_refused_before_work(command, unwritable_dir, synth_root, result_file, tmp_path,
                                                  capsys, no_forward):
    argv = {"run": [*RUN, "--data-root", str(synth_root), *SMALL, "--output", str(unwritable_dir / "r.json")],
            "submit": ["submit", str(result_file), "--allow-nonstandard", "--leaderboard",
                       str(unwritable_dir / "board.json")],
            "report": ["report", str(result_file), "--out", str(unwritable_dir / "report")]}[command]
    board = unwritable_dir / "board.json"
    before = board.read_bytes() if board.is_file() else None
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in out + err
    assert str(unwritable_dir) in err and "not writable" in err and "fix:" in err
    assert not (unwritable_dir / "board.json.lock").exists()
    assert not (unwritable_dir / "r.json").exists() and not (unwritable_dir / "report").exists()
    assert (board.read_bytes() if board.is_file() else None) == before


def test_write_failure_after_the_run_keeps_the_result(synth_root, tmp_path, capsys, monkeypatch):
    import densebench.api

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(densebench.api, "write_result", disk_full)
    target = tmp_path / "out" / "r.json"
    target.parent.mkdir()
    code, out, err = run_cli([*RUN, "--data-root", str(synth_root), *SMALL, "--output", str(target)], capsys)
    assert code == 2 and "Traceback" not in out + err
    saved = list(target.parent.glob("r.unsaved-*.json"))
    assert len(saved) == 1 and not target.exists()
    assert os.strerror(errno.ENOSPC) in err and str(saved[0]) in err and "fix:" in err
    kept = read_result(saved[0])  # schema + integrity: the computed result, whole
    assert kept.benchmark == "voc-incontext" and kept.config["input_size"] == 64


def test_concurrent_runs_to_one_output_one_wins_nothing_lost(synth_root, tmp_path):
    exe = Path(sys.executable).parent / "densebench"
    target = tmp_path / "r.json"
    argv = [str(exe), *RUN, "--data-root", str(synth_root), *SMALL, "--no-cache", "--output", str(target)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in outcomes) == [0, 2], outcomes
    loser = next(err for code, _, err in outcomes if code == 2)
    assert "Traceback" not in "".join(o + e for _, o, e in outcomes)
    assert str(target) in loser and "already exists" in loser and "fix:" in loser
    winner = read_result(target)
    for saved in tmp_path.glob("r.unsaved-*.json"):  # the loser computed it too: kept, and equal
        assert str(saved) in loser
        assert read_result(saved).metrics == winner.metrics
    assert {p.name for p in tmp_path.iterdir()} <= {"r.json"} | {p.name for p in tmp_path.glob("r.unsaved-*")}


def test_written_files_honour_the_umask_and_keep_a_shared_mode(synth_root, result_file, tmp_path, capsys):
    board = tmp_path / "board.json"
    board.write_text(json.dumps({"schema_version": 1, "name": "lab", "description": "", "entries": []}))
    board.chmod(0o664)
    old = os.umask(0o022)
    try:
        code, _, err = run_cli([*RUN, "--data-root", str(synth_root), *SMALL, "--output",
                                str(tmp_path / "r.json")], capsys)
        assert code == 0, err
        code, _, err = run_cli(["submit", str(result_file), "--allow-nonstandard", "--leaderboard", str(board)],
                               capsys)
        assert code == 0, err
        code, _, err = run_cli(["report", str(result_file), "--out", str(tmp_path / "report")], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    mode = {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("r.json", "board.json", "report/index.html")}
    assert mode == {"r.json": 0o644, "board.json": 0o664, "report/index.html": 0o644}
    assert len(json.loads(board.read_text())["entries"]) == 1


def test_symlinked_leaderboard_is_written_and_locked_at_its_target(result_file, tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "board.json"
    target.write_text(json.dumps({"schema_version": 1, "name": "lab", "description": "", "entries": []}))
    target.chmod(0o664)
    link = tmp_path / "board.json"
    link.symlink_to(target)
    code, out, err = run_cli(["submit", str(result_file), "--allow-nonstandard", "--leaderboard", str(link)], capsys)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target.resolve()
    entries = json.loads(target.read_text())["entries"]
    assert [e["benchmark"] for e in entries] == ["voc-incontext"]
    assert (shared / "board.json.lock").exists() and not (tmp_path / "board.json.lock").exists()
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
