"""A feature cache you can trust: damaged entries are detected and rebuilt, changed data changes the key,
killed runs resume and leave nothing behind, concurrent runs compute each entry once, a full disk is
refused up front, and `densebench cache` manages it all."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densebench.cache import CACHE_FORMAT, CacheError, FeatureCache, estimate_entry_bytes
from densebench.data.base import SegmentationDataset
from densebench.features import ExtractionStats, extract
from densebench.transforms import ResizeView
from test_features import MeanColourEncoder  # noqa: F401  (also imported by the subprocess workers below)

TESTS = Path(__file__).resolve().parent
VIEW = ResizeView(16)
KP = {"view": VIEW.describe()}


class TinySeg:
    """``n`` random images with masks in memory; ``delay`` seconds per item (a slow disk)."""

    name, split, num_classes, ignore_index, synthetic = "tiny", "val", 3, 255, True

    def __init__(self, n=5, delay=0.0):
        rng = np.random.default_rng(0)
        self.delay = delay
        self.items = [(f"id{i}", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
                       rng.integers(0, 3, (20, 24), dtype=np.uint8)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return self.items[i]

    def manifest_hash(self):
        return f"tiny-manifest-{len(self.items)}"


class FileSeg(SegmentationDataset):
    """A real on-disk SegmentationDataset: ``images/<id>.png`` and ``masks/<id>.png`` (stored uncompressed, so
    rewriting a file with other pixels keeps its size)."""

    def image_path(self, id_):
        return self.root / "images" / f"{id_}.png"

    def mask_path(self, id_):
        return self.root / "masks" / f"{id_}.png"


def write_file_seg(root: Path, n=4, seed=0) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / f"id{i}.png",
                                                                               compress_level=0)
        Image.fromarray(rng.integers(0, 3, (20, 24), dtype=np.uint8)).save(root / "masks" / f"id{i}.png",
                                                                          compress_level=0)


def open_file_seg(root: Path, n=4) -> FileSeg:
    return FileSeg(name="fileseg", split="val", root=root, ids=[f"id{i}" for i in range(n)], num_classes=3,
                   ignore_index=255, class_names=["a", "b", "c"])


def rewrite_same_size(path: Path, array: np.ndarray) -> None:
    """Rewrite ``path`` with other pixels of the same size; make sure its mtime moved (coarse clocks)."""
    before = path.stat()
    for _ in range(50):
        Image.fromarray(array).save(path, compress_level=0)
        if path.stat().st_mtime_ns != before.st_mtime_ns:
            break
        time.sleep(0.01)
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns != before.st_mtime_ns


def run(ds, cache, *, view=VIEW, batch_size=2, enc=None):
    enc = enc or MeanColourEncoder()
    stats = ExtractionStats()
    out = extract(enc, ds, view, key_parts={"view": view.describe()}, cache=cache, batch_size=batch_size,
                  progress=False, stats=stats)
    return {k: np.array(v) for k, v in out.items()}, stats


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert x.dtype == b[k].dtype and x.shape == b[k].shape, k
        np.testing.assert_array_equal(x, b[k])


def entry_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "features").rglob("meta.json"))


def leftovers(root: Path) -> list[Path]:
    """Anything of an unfinished write: partial folders, dot folders, temporary files."""
    return [p for p in (root / "features").rglob("*")
            if p.name.endswith(".partial") or p.name.startswith(".") or ".tmp-" in p.name
            or p.name == "progress.json"]


# ------------------------------------------------------------------------------------------------
# damaged entries


def _flip(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x10]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGE = {
    "bit-flip": lambda d: _flip(d / "features.bin", keep_mtime=False),
    "bit-flip-same-mtime": lambda d: _flip(d / "features.bin", keep_mtime=True),
    "truncated": lambda d: os.truncate(d / "masks.bin", (d / "masks.bin").stat().st_size - 7),
    "longer": lambda d: _append(d / "masks.bin", b"\0" * 3),
    "missing-block": lambda d: (d / "features.bin").unlink(),
    "broken-meta": lambda d: (d / "meta.json").write_text('{"arrays": {"features": '),
    "meta-not-dict": lambda d: (d / "meta.json").write_text("[1, 2]"),
    "missing-meta": lambda d: (d / "meta.json").unlink(),
    "meta-wrong-shape": lambda d: _edit_meta(d, lambda m: m["arrays"]["features"]["shape"].__setitem__(0, 6)),
    "meta-bad-name": lambda d: _edit_meta(d, lambda m: m["arrays"].__setitem__("../masks", m["arrays"].pop("masks"))),
    "meta-no-blocks": lambda d: _edit_meta(d, lambda m: m["arrays"]["masks"].pop("blocks")),
}


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _edit_meta(d: Path, change) -> None:
    meta = json.loads((d / "meta.json").read_text())
    change(meta)
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_reported_once_discarded_and_rebuilt(tmp_path, caplog, damage):
    ds = TinySeg()
    reference, _ = run(ds, FeatureCache(None))
    first, s1 = run(ds, FeatureCache(tmp_path))
    assert s1.cache_misses == 1 and s1.images_forwarded == 5
    assert_same(first, reference)
    (entry,) = entry_dirs(tmp_path)
    DAMAGE[damage](entry)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="densebench.cache"):
        again, s2 = run(ds, FeatureCache(tmp_path))   # the next run: a new cache object
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "\n" not in msg and "damaged" in msg and "rebuilt" in msg
    assert s2.entries_rebuilt == 1 and s2.cache_misses == 1 and s2.images_forwarded == 5
    assert_same(again, reference)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="densebench.cache"):
        third, s3 = run(ds, FeatureCache(tmp_path))
    assert not caplog.records
    assert s3.cache_hits == 1 and s3.images_forwarded == 0 and s3.entries_rebuilt == 0
    assert_same(third, reference)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["features-bit-flip", "masks-truncated", "features-broken-meta"])
def test_damage_to_either_entry_of_a_split_extraction_is_rebuilt(tmp_path, caplog, damage):
    """Image features and masks are two entries (tests/test_cache_sharing.py): each is checked on its own."""
    write_file_seg(tmp_path / "data")
    ds, cache = open_file_seg(tmp_path / "data"), FeatureCache(tmp_path / "cache")
    first, s1 = run(ds, cache)
    assert s1.images_forwarded == 4 and s1.masks_read == 4 and len(entry_dirs(tmp_path / "cache")) == 2
    kind, what = damage.split("-", 1)
    [d] = [d for d in entry_dirs(tmp_path / "cache")
           if (json.loads((d / "meta.json").read_text())["info"]["model"] == "(masks)") == (kind == "masks")]
    DAMAGE[{"bit-flip": "bit-flip-same-mtime", "truncated": "truncated", "broken-meta": "broken-meta"}[what]](d)
    with caplog.at_level(logging.WARNING, logger="densebench.cache"):
        again, s2 = run(open_file_seg(tmp_path / "data"), FeatureCache(tmp_path / "cache"))
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    assert s2.entries_rebuilt == 1
    assert (s2.images_forwarded, s2.masks_read) == ((4, 0) if kind == "features" else (0, 4))
    assert_same(again, first)
    assert_same(again, run(open_file_seg(tmp_path / "data"), FeatureCache(None))[0])


def test_same_cache_object_notices_damage_after_its_first_load(tmp_path, caplog):
    ds, cache = TinySeg(), FeatureCache(tmp_path)
    reference, _ = run(ds, cache)
    run(ds, cache)                                        # verified once, memoised
    _flip(entry_dirs(tmp_path)[0] / "features.bin", keep_mtime=False)
    with caplog.at_level(logging.WARNING, logger="densebench.cache"):
        again, stats = run(ds, cache)
    assert stats.entries_rebuilt == 1 and stats.images_forwarded == 5 and len(caplog.records) == 1
    assert_same(again, reference)


def test_meta_records_a_checksum_per_block(tmp_path):
    ds = TinySeg(n=7)
    run(ds, FeatureCache(tmp_path, shard_images=2))
    meta = json.loads((entry_dirs(tmp_path)[0] / "meta.json").read_text())
    assert meta["format"] == CACHE_FORMAT and meta["shards"] == 4 and meta["info"]["n_images"] == 7
    feats = meta["arrays"]["features"]
    assert feats["checksum"] == "crc32" and [b["rows"] for b in feats["blocks"]] == [2, 2, 2, 1]
    assert sum(b["nbytes"] for b in feats["blocks"]) == feats["nbytes"] == 7 * 2 * 2 * 6 * 2


def test_loaded_entry_supports_the_protocols_indexing(tmp_path):
    ds = TinySeg(n=7)
    reference, _ = run(ds, FeatureCache(None))
    out = extract(MeanColourEncoder(), ds, VIEW, key_parts=KP, cache=FeatureCache(tmp_path, shard_images=2),
                  batch_size=2, progress=False)
    for name, arr in out.items():
        assert isinstance(arr, np.memmap)
        idx = np.array([0, 3, 4, 6])
        np.testing.assert_array_equal(np.asarray(arr[idx]), reference[name][idx])
        np.testing.assert_array_equal(np.asarray(arr[2:5]), reference[name][2:5])


# ------------------------------------------------------------------------------------------------
# the dataset manifest


def test_rewritten_mask_of_the_same_size_changes_the_manifest_and_rereads_the_masks(tmp_path):
    root = tmp_path / "data"
    write_file_seg(root)
    cache = FeatureCache(tmp_path / "cache")
    ds = open_file_seg(root)
    h0 = ds.manifest_hash()
    before, s0 = run(ds, cache)
    assert s0.images_forwarded == 4

    new_mask = (np.asarray(Image.open(root / "masks" / "id2.png")) + 1) % 3
    rewrite_same_size(root / "masks" / "id2.png", new_mask.astype(np.uint8))
    assert ds.manifest_hash() == h0, "memoised per dataset object"
    ds2 = open_file_seg(root)                 # the next run
    assert ds2.manifest_hash() != h0
    after, s1 = run(ds2, cache)
    # image features depend on the images only: reused; the masks entry is keyed by the manifest: re-read
    assert s1.cache_misses == 1 and s1.images_forwarded == 0 and s1.masks_read == 4, "the old masks must not be used"
    reference, _ = run(open_file_seg(root), FeatureCache(None))
    assert_same(after, reference)
    assert not np.array_equal(before["masks"], after["masks"])


def test_rewritten_image_of_the_same_size_changes_the_manifest_and_the_features(tmp_path):
    root = tmp_path / "data"
    write_file_seg(root)
    cache = FeatureCache(tmp_path / "cache")
    h0 = open_file_seg(root).manifest_hash()
    before, _ = run(open_file_seg(root), cache)
    img = np.asarray(Image.open(root / "images" / "id1.png"))
    rewrite_same_size(root / "images" / "id1.png", (255 - img).astype(np.uint8))
    ds2 = open_file_seg(root)
    assert ds2.manifest_hash() != h0
    after, s1 = run(ds2, cache)
    assert s1.images_forwarded == 4
    reference, _ = run(open_file_seg(root), FeatureCache(None))
    assert_same(after, reference)
    assert not np.array_equal(before["features"], after["features"])


def test_manifest_memo_is_per_object_and_subsets_start_fresh(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_file_seg(root)
    ds = open_file_seg(root)
    h = ds.manifest_hash()
    calls = []
    real = Path.stat

    def counting_stat(self, *a, **kw):
        calls.append(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", counting_stat)
    assert ds.manifest_hash() == h and not calls, "the second call must not stat the files"
    sub = ds.subset(["id0", "id1"])
    hs = sub.manifest_hash()
    assert hs != h and calls, "a subset must not reuse its parent's memo"
    monkeypatch.undo()
    assert hs == open_file_seg(root, n=2).manifest_hash()
    assert ds.manifest_hash() == h and ds.manifest_hash(refresh=True) == h
    import copy

    renamed = copy.copy(ds)           # a shallow copy carries the memo; another split must not reuse it
    renamed.split = "train"
    assert renamed.manifest_hash() != h


def test_verify_data_hashes_contents(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_file_seg(root)
    stat0, content0 = open_file_seg(root).manifest_hash(), open_file_seg(root).manifest_hash(verify_data=True)
    assert stat0 != content0
    # touch: new mtime, same bytes -> the stat manifest changes, the content manifest does not
    p = root / "masks" / "id0.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_file_seg(root).manifest_hash() != stat0
    assert open_file_seg(root).manifest_hash(verify_data=True) == content0
    # same size, same mtime, other bytes (a restored backup): only content hashing sees it
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    m = np.asarray(Image.open(p))
    Image.fromarray(((m + 1) % 3).astype(np.uint8)).save(p, compress_level=0)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_file_seg(root).manifest_hash() == stat0
    assert open_file_seg(root).manifest_hash(verify_data=True) != content0
    ds = open_file_seg(root)
    ds.verify_data = True
    assert ds.manifest_hash() == open_file_seg(root).manifest_hash(verify_data=True)
    monkeypatch.setenv("DENSEBENCH_VERIFY_DATA", "1")
    assert open_file_seg(root).manifest_hash() == ds.manifest_hash()


# ------------------------------------------------------------------------------------------------
# interrupted extractions

def exploding_at(index: int, message: str):
    """A view that fails on image ``index``: an extraction interrupted there."""
    def view(i, image, mask):
        if i == index:
            raise RuntimeError(message)
        return VIEW(i, image, mask)
    return view


def test_error_mid_extraction_keeps_complete_shards_and_the_rerun_resumes(tmp_path):
    ds = TinySeg(n=7)
    reference, _ = run(ds, FeatureCache(None))
    enc = MeanColourEncoder()
    with pytest.raises(RuntimeError):
        extract(enc, ds, exploding_at(5, "disk on fire"), key_parts=KP,
                cache=FeatureCache(tmp_path, shard_images=2), batch_size=2, progress=False)
    assert not entry_dirs(tmp_path)
    out, stats = run(ds, FeatureCache(tmp_path, shard_images=2))
    assert stats.views_reused == 4 and stats.images_forwarded == 3
    assert stats.as_dict()["views_reused"] == 4
    assert_same(out, reference)
    assert not leftovers(tmp_path)


def test_damaged_shard_of_an_interrupted_run_is_recomputed(tmp_path, caplog):
    ds = TinySeg(n=7)
    reference, _ = run(ds, FeatureCache(None))
    with pytest.raises(RuntimeError):
        extract(MeanColourEncoder(), ds, exploding_at(6, "killed"), key_parts=KP,
                cache=FeatureCache(tmp_path, shard_images=2), batch_size=2, progress=False)
    (partial,) = (tmp_path / "features").glob("*/*.partial")
    prog = json.loads((partial / "progress.json").read_text())
    assert [s["images"] for s in prog["shards"]] == [[0, 2], [2, 4], [4, 6]]
    # damage the second shard's features; also leave a torn write and a stray temporary file behind
    off = prog["shards"][1]["arrays"]["features"]["offset"]
    with open(partial / "features.bin", "r+b") as f:
        f.seek(off + 3)
        f.write(b"\xff")
    with open(partial / "masks.bin", "ab") as f:
        f.write(b"torn batch")
    (partial / "progress.json.tmp-999999").write_text("{")
    with caplog.at_level(logging.WARNING, logger="densebench.cache"):
        out, stats = run(ds, FeatureCache(tmp_path, shard_images=2))
    assert len(caplog.records) == 1 and "shard 2 fails its crc32" in caplog.records[0].getMessage()
    assert stats.views_reused == 2 and stats.images_forwarded == 5
    assert_same(out, reference)
    assert not leftovers(tmp_path)


_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_cache_trust import MeanColourEncoder, TinySeg
    from densebench.features import ExtractionStats, FeatureCache, extract
    from densebench.transforms import ResizeView

    root, out, n, delay, tag = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    sizes = [int(s) for s in sys.argv[6].split(",")]
    barrier = sys.argv[7:]
    (out / f"ready-{{tag}}").touch()
    while not all((out / f"ready-{{b}}").exists() for b in barrier):
        time.sleep(0.01)
    cache = FeatureCache(root, shard_images=2)
    stats = ExtractionStats()
    for size in sizes:
        view = ResizeView(size)
        res = extract(MeanColourEncoder(), TinySeg(n, delay), view, key_parts={{"view": view.describe()}},
                      cache=cache, batch_size=2, progress=False, stats=stats)
        for k, v in res.items():
            np.save(out / f"{{tag}}-{{size}}-{{k}}.npy", np.asarray(v))
    (out / f"stats-{{tag}}.json").write_text(json.dumps(stats.as_dict()))
""")


def _worker(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(TESTS)))
    return script


def _spawn(script, root, out, n, delay, tag, sizes="16", barrier=()):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(root), str(out), str(n), str(delay), tag, sizes,
                             *barrier], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_during_extraction_then_rerun_resumes_without_orphans(tmp_path, sig):
    root, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    n = 12
    proc = _spawn(_worker(tmp_path), root, out, n, 0.15, "killed")
    deadline = time.time() + 120
    shards = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            for prog in (root / "features").glob("*/*.partial/progress.json") if root.exists() else []:
                try:
                    shards = len(json.loads(prog.read_text())["shards"])
                except (OSError, ValueError, KeyError):
                    pass
            if shards >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()
        assert shards >= 2
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -sig
    assert not entry_dirs(root) and list((root / "features").glob("*/*.partial"))

    cache = FeatureCache(root, shard_images=2)
    out_arrays, stats = run(TinySeg(n), cache)
    assert stats.views_reused >= 4 and stats.images_forwarded == n - stats.views_reused < n
    reference, _ = run(TinySeg(n), FeatureCache(None))
    assert_same(out_arrays, reference)
    assert not leftovers(root)
    _, s2 = run(TinySeg(n), cache)
    assert s2.images_forwarded == 0 and s2.cache_hits == 1


def test_two_processes_on_one_cache_compute_each_entry_once(tmp_path):
    root, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    script = _worker(tmp_path)
    n, sizes = 6, "16,24"
    procs = [_spawn(script, root, out, n, 0.03, tag, sizes, barrier=("a", "b")) for tag in ("a", "b")]
    for p in procs:
        p.wait(timeout=180)
        assert p.returncode == 0, p.stdout.read().decode()
    stats = [json.loads((out / f"stats-{t}.json").read_text()) for t in ("a", "b")]
    assert sum(s["images_forwarded"] for s in stats) == 2 * n, stats   # two entries, each forwarded once
    assert sum(s["cache_misses"] for s in stats) == 2 and sum(s["cache_hits"] for s in stats) == 2
    for size in (16, 24):
        reference, _ = run(TinySeg(n), FeatureCache(None), view=ResizeView(size))
        for k in ("features", "masks"):
            a, b = np.load(out / f"a-{size}-{k}.npy"), np.load(out / f"b-{size}-{k}.npy")
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, reference[k])
    assert len(entry_dirs(root)) == 2 and not leftovers(root)


def test_orphans_of_dead_runs_are_cleaned_on_the_next_run(tmp_path):
    ds = TinySeg()
    cache = FeatureCache(tmp_path)
    run(ds, cache)
    sub = entry_dirs(tmp_path)[0].parent
    # a format-1 temporary folder untouched for two hours, one just written (maybe alive)
    old = sub / ".0123abcd-xyz"
    old.mkdir()
    (old / "features.bin").write_bytes(b"x")
    for p in (old / "features.bin", old):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    young = sub / ".4567abcd-xyz"
    young.mkdir()
    # a partial with no complete shard, one stale beyond the ttl, one fresh and resumable
    empty = sub / f"{'a' * 64}.partial"
    empty.mkdir()
    (empty / "features.bin").write_bytes(b"torn")
    stale = sub / f"{'b' * 64}.partial"
    stale.mkdir()
    (stale / "progress.json").write_text(json.dumps({"shards": [{"images": [0, 2]}],
                                                     "updated": time.time() - 10 * 86400}))
    os.utime(stale, (time.time() - 10 * 86400, time.time() - 10 * 86400))
    fresh = sub / f"{'c' * 64}.partial"
    fresh.mkdir()
    (fresh / "progress.json").write_text(json.dumps({"shards": [{"images": [0, 2]}], "updated": time.time()}))
    run(TinySeg(n=3), FeatureCache(tmp_path))   # the next run, another entry
    assert not old.exists() and not empty.exists() and not stale.exists()
    assert young.exists() and fresh.exists()


def test_an_owned_partial_is_never_cleaned(tmp_path):
    import filelock

    key = "d" * 64
    cache = FeatureCache(tmp_path)
    part = cache._partial_dir(key)
    part.mkdir(parents=True)
    held = filelock.FileLock(str(cache._lock_path(key)))
    held.acquire()
    try:
        assert cache.clean_orphans() == [] and part.exists()
    finally:
        held.release()
    assert cache.clean_orphans(force=True) == [part] and not part.exists()


# ------------------------------------------------------------------------------------------------
# free space


def test_check_space_refuses_with_the_estimate_and_the_fixes(tmp_path, monkeypatch):
    est = estimate_entry_bytes(10582, 32 * 32, 384, "float16", extra_bytes_per_image=448 * 448)
    assert est == 10582 * (32 * 32 * 384 * 2 + 448 * 448)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("densebench.cache.shutil.disk_usage", lambda p: usage(100 << 30, 99 << 30, 1 << 30))
    cache = FeatureCache(tmp_path / "not" / "yet")
    with pytest.raises(CacheError) as e:
        cache.check_space(est)
    text = str(e.value)
    assert "9.7 GiB" in text and "1.0 GiB free" in text
    for fix in ("--cache-dir", "densebench cache prune", "--no-cache"):
        assert fix in text
    cache.check_space(100 << 20)                 # fits, with the spare 256 MiB
    FeatureCache(None).check_space(10**15)        # a disabled cache needs no space


@pytest.mark.parametrize("split", [False, True], ids=["one-entry", "features+masks"])
def test_extraction_that_will_not_fit_is_refused_before_the_first_forward(tmp_path, monkeypatch, split):
    if split:
        write_file_seg(tmp_path / "data", n=7)
        ds = open_file_seg(tmp_path / "data", n=7)
    else:
        ds = TinySeg(n=7)
    # room for the masks (7 x 16 x 16 bytes) but not for the features (7 x 4 x 4 x 64 float16)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("densebench.cache.shutil.disk_usage", lambda p: usage(1 << 30, 1 << 30, 7 * 16 * 16 + 100))
    cache = FeatureCache(tmp_path / "cache", min_free_bytes=0)
    enc = MeanColourEncoder(patch=4, dim=64)
    with pytest.raises(CacheError, match="--no-cache") as e:
        extract(enc, ds, VIEW, key_parts=KP, cache=cache, batch_size=2, progress=False)
    expect = 7 * 4 * 4 * 64 * 2 + (0 if split else 7 * 16 * 16)     # one entry holds the masks too
    assert f"needs about {expect / 1024:.1f} KiB" in str(e.value)
    assert enc.images_forwarded == 0 and leftovers(tmp_path / "cache") == []
    assert len(entry_dirs(tmp_path / "cache")) == int(split)    # the masks entry fitted
    monkeypatch.undo()
    out, stats = run(ds, FeatureCache(tmp_path / "cache"))
    assert stats.views_reused == 0 and stats.images_forwarded == 7
    assert_same(out, run(ds, FeatureCache(None))[0])


# ------------------------------------------------------------------------------------------------
# densebench cache


def _cli():
    import typer

    from densebench.cli_cache import register

    app = typer.Typer()

    @app.callback()
    def _root():
        """test app"""

    register(app)
    return app


def test_cache_cli_ls_du_verify_prune_path(tmp_path):
    from typer.testing import CliRunner

    ds = TinySeg()
    run(ds, FeatureCache(tmp_path))
    run(ds, FeatureCache(tmp_path), view=ResizeView(24))
    legacy = tmp_path / "features" / "ab" / ("ab" + "0" * 62)
    legacy.mkdir(parents=True)
    (legacy / "meta.json").write_text(json.dumps({"arrays": {"features": {"dtype": "<f2", "shape": [1, 2]}}}))
    (legacy / "features.bin").write_bytes(b"\0" * 4)
    app, runner, cd = _cli(), CliRunner(), ["--cache-dir", str(tmp_path)]

    res = runner.invoke(app, ["cache", "ls", *cd, "--json"])
    assert res.exit_code == 0, res.output
    items = json.loads(res.output)
    entries = [i for i in items if i["kind"] == "entry"]
    assert len(entries) == 2 and [i["kind"] for i in items].count("legacy") == 1
    assert {(e["model"], e["dataset"], e["split"], e["view"], e["rows"]) for e in entries} == {
        ("meancolour", "tiny", "val", "resize", 5)}
    assert all(e["size_bytes"] > 0 and e["created"] for e in entries)
    res = runner.invoke(app, ["cache", "ls", *cd])
    assert res.exit_code == 0 and entries[0]["key"][:12] in res.output

    res = runner.invoke(app, ["cache", "du", *cd, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["by_model"]["meancolour"]["entries"] == 2
    assert runner.invoke(app, ["cache", "du", *cd]).exit_code == 0
    # scripts: csv / plain / markdown carry the same rows, sizes in bytes where a program reads them
    import csv
    import io

    res = runner.invoke(app, ["cache", "du", *cd, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(res.output)))
    by_model = json.loads(runner.invoke(app, ["cache", "du", *cd, "--json"]).output)["by_model"]
    assert {r["model"]: int(r["size"]) for r in rows} == {m: v["bytes"] for m, v in by_model.items()}
    res = runner.invoke(app, ["cache", "ls", *cd, "-f", "plain"])
    lines = res.output.strip().splitlines()
    assert lines[0].split("\t")[:2] == ["key", "kind"] and len(lines) == 1 + len(items)
    assert {ln.split("\t")[0] for ln in lines[1:]} == {i["key"][:12] for i in items}
    res = runner.invoke(app, ["cache", "ls", *cd, "-f", "xml"])   # main() turns it into exit 2
    assert "unknown --format 'xml'" in str(res.exception)

    res = runner.invoke(app, ["cache", "path", *cd])
    assert res.output.strip() == str(tmp_path)
    res = runner.invoke(app, ["cache", "path", entries[0]["key"][:10], *cd])
    assert res.exit_code == 0 and res.output.strip() == entries[0]["path"]

    res = runner.invoke(app, ["cache", "verify", *cd])
    assert res.exit_code == 0, res.output
    _flip(Path(entries[0]["path"]) / "features.bin", keep_mtime=True)
    res = runner.invoke(app, ["cache", "verify", *cd])
    assert res.exit_code == 1 and "damaged" in res.output and "checksum" in res.output
    res = runner.invoke(app, ["cache", "verify", *cd, "--delete"])
    assert res.exit_code == 1 and not Path(entries[0]["path"]).exists()
    assert runner.invoke(app, ["cache", "verify", *cd]).exit_code == 0

    res = runner.invoke(app, ["cache", "prune", *cd])
    assert res.exit_code != 0                                  # nothing said: refuse
    res = runner.invoke(app, ["cache", "prune", *cd, "--model", "meancol", "--dry-run", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["removed"]) == 1
    assert Path(entries[1]["path"]).exists()
    res = runner.invoke(app, ["cache", "prune", *cd, "--older-than", "1", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["removed"] == []
    res = runner.invoke(app, ["cache", "prune", *cd, "--max-size", "0", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["removed"]) == 2   # the entry and the legacy one
    assert not list((tmp_path / "features").glob("*/*/meta.json"))


# ------------------------------------------------------------------------------------------------
# --verify-data


def test_verify_data_option_hashes_contents_through_the_api_and_the_cli(synth_root, tmp_path, capsys, monkeypatch):
    from densebench.api import evaluate
    from densebench.cli import main
    from densebench.data import open_dataset
    from densebench.results import read_result

    monkeypatch.delenv("DENSEBENCH_VERIFY_DATA", raising=False)
    val = open_dataset("voc", synth_root, "val")
    content, stat = val.manifest_hash(verify_data=True), val.manifest_hash(verify_data=False)
    assert content != stat
    opts = dict(data_root=synth_root, cache_dir=tmp_path / "c", progress=False, input_size=64, clusters="gt", seeds=1)
    plain = evaluate("pixels", benchmarks=["voc-overcluster"], **opts)[0]
    checked = evaluate("pixels", benchmarks=["voc-overcluster"], verify_data=True, **opts)[0]
    assert plain["provenance"]["dataset"]["manifest_hash"] == stat
    assert checked["provenance"]["dataset"]["manifest_hash"] == content
    assert checked["metrics"] == plain["metrics"]
    assert "DENSEBENCH_VERIFY_DATA" not in os.environ, "the switch is restored after the run"

    out = tmp_path / "r.json"
    args = ["run", "--model", "pixels", "-b", "voc-overcluster", "--data-root", str(synth_root), "--input-size", "64",
            "--clusters", "gt", "--seeds", "1", "--cache-dir", str(tmp_path / "c"), "--verify-data", "--quiet",
            "--output", str(out)]
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    assert read_result(out)["provenance"]["dataset"]["manifest_hash"] == content
