"""The on-disk feature cache: checksummed, resumable, locked entries (see docs/cache.md).

Layout under ``<root>/features/<key[:2]>/``::

    <key>/meta.json, <name>.bin      a committed entry: one raw little-endian array per name
    <key>.partial/progress.json, <name>.bin
                                     an extraction in progress (or interrupted): complete shards so far
    <key>.lock                       the entry's file lock (flock: released by the kernel when its owner dies)

* **Checksums.** Arrays are written in shards (every ``shard_bytes`` / ``shard_images`` / ``shard_seconds``,
  at batch boundaries); each shard's bytes of each array get a CRC-32, recorded in ``progress.json`` as the
  shard completes and carried into ``meta.json`` as that array's blocks. ``load`` checks sizes and every
  block's CRC before handing out memory maps. A damaged, truncated, missing-block, broken-meta or incomplete
  entry is reported in one ``logging`` warning (logger ``densebench.cache``), discarded and rebuilt.
* **Resume.** Shards are appended to the same ``<name>.bin`` files, so a resumed extraction truncates them to
  the last complete shard and carries on; committing is writing ``meta.json`` and renaming the folder, no copy.
* **Locks.** Extraction of an entry happens under its lock: concurrent processes compute it once, the others
  wait and then load it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from .errors import DenseBenchError

CACHE_FORMAT = 2
CHECKSUM = "crc32"
_READ_CHUNK = 16 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_LEGACY_TMP_RE = re.compile(r"^\.[0-9a-f]{8}-")   # format-1 writers: tempfile.mkdtemp(prefix=".<key8>-")
_RESERVED = {"meta", "progress"}

log = logging.getLogger("densebench.cache")

FIXES = ("point --cache-dir (or $DENSEBENCH_CACHE) at a disk with more room, free space with "
         "`densebench cache prune --older-than DAYS` (or --max-size GB), or run with --no-cache")


class CacheError(DenseBenchError):
    """The feature cache cannot take an entry (disk full, lock not obtained)."""


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def estimate_entry_bytes(n_images: int, rows_per_image: int, dim: int, dtype: Any = np.float16, *,
                         extra_bytes_per_image: int = 0) -> int:
    """Bytes an entry of ``n_images`` views takes: ``rows_per_image`` rows of ``dim`` values of ``dtype`` each,
    plus ``extra_bytes_per_image`` (e.g. the view's uint8 mask, H*W). Metadata is negligible.

    A full-grid ViT-S/14 entry at 448 px: ``estimate_entry_bytes(n, 32 * 32, 384, extra_bytes_per_image=448 * 448)``.
    """
    item = np.dtype(dtype).itemsize
    return int(n_images) * (int(rows_per_image) * int(dim) * item + int(extra_bytes_per_image))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crc_range(f, offset: int, nbytes: int, buf: bytearray) -> int:
    """CRC-32 of ``nbytes`` bytes of open binary file ``f`` from ``offset`` (short read -> raises EOFError)."""
    f.seek(offset)
    crc, left, view = 0, nbytes, memoryview(buf)
    while left:
        n = f.readinto(view[:min(left, len(buf))])
        if not n:
            raise EOFError
        crc = zlib.crc32(view[:n], crc)
        left -= n
    return crc


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid())}


def owner_alive(owner: dict | None) -> bool | None:
    """Whether the process recorded in ``owner`` still runs (None: cannot tell, another host)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", 0) or 0)
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = owner.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)   # same pid, later process: the owner is gone


def _validate_name(name: str) -> None:
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise ValueError(f"cache array name {name!r} is not a plain file name")


@dataclass
class EntryInfo:
    """One item of the cache directory, as ``densebench cache ls`` shows it."""

    key: str
    path: Path
    kind: str                       # "entry", "partial" (resumable extraction) or "legacy" (format 1, never read)
    size_bytes: int
    created: float | None
    last_used: float | None
    model: str = "?"
    dataset: str = "?"
    split: str = "?"
    view: str = "?"
    rows: int | None = None         # views (images) in the entry / complete so far
    format: int | None = None
    problem: str | None = None      # set by FeatureCache.verify_entry
    owner_alive: bool | None = None # partial only: whether the process that writes it still runs
    meta: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "kind": self.kind, "size_bytes": self.size_bytes,
                "created": self.created, "last_used": self.last_used, "model": self.model,
                "dataset": self.dataset, "split": self.split, "view": self.view, "rows": self.rows,
                "format": self.format, "problem": self.problem, "owner_alive": self.owner_alive}


def _describe(meta: dict) -> dict:
    """Human labels (model, dataset, split, view) from an entry's meta / progress record."""
    info = meta.get("info") or {}
    parts = meta.get("key_parts") or {}
    enc = parts.get("encoder") if isinstance(parts.get("encoder"), dict) else {}
    ds = parts.get("dataset") if isinstance(parts.get("dataset"), dict) else {}
    view = parts.get("view")
    view_kind = view.get("view", "?") if isinstance(view, dict) else (str(view) if view is not None else "?")
    reduce = parts.get("reduce")
    if isinstance(reduce, dict):
        reduce = reduce.get("reducer") or reduce.get("kind")
    if reduce and reduce != "full-f16":
        view_kind = f"{view_kind}/{reduce}"
    return {"model": str(info.get("model") or enc.get("fingerprint") or "?"),
            "dataset": str(info.get("dataset") or ds.get("name") or "?"),
            "split": str(info.get("split") or ds.get("split") or "?"),
            "view": str(info.get("view") or view_kind)}


class _Damaged(Exception):
    """What is wrong with a cache entry (one line)."""


def _read_meta(d: Path) -> list[tuple]:
    """The array specs ``(name, dtype, shape, nbytes, blocks)`` of entry folder ``d``; raises _Damaged."""
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise _Damaged("meta.json is missing (incomplete entry)")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = meta["arrays"]
        if not isinstance(arrays, dict):
            raise TypeError("'arrays' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(f"meta.json is unreadable ({type(e).__name__}: {str(e)[:80]})") from None
    if meta.get("format") != CACHE_FORMAT:
        raise _Damaged(f"meta.json has format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    return [_array_spec(name, info) for name, info in arrays.items()]


def _array_spec(name, info) -> tuple:
    try:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
            raise ValueError(f"bad array name {name!r}")
        dtype = np.dtype(info["dtype"])
        shape = tuple(int(s) for s in info["shape"])
        nbytes = int(info["nbytes"])
        blocks = [(int(b["offset"]), int(b["nbytes"]), int(b["crc32"])) for b in info["blocks"]]
    except (KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"meta.json describes array {name!r} incompletely ({type(e).__name__}: {str(e)[:60]})") \
            from None
    if any(s < 0 for s in shape) or int(np.prod(shape)) * dtype.itemsize != nbytes:
        raise _Damaged(f"meta.json gives array {name} shape {shape} that does not match its {nbytes} bytes")
    pos = 0
    for off, nb, _ in blocks:
        if off != pos or nb < 0:
            raise _Damaged(f"meta.json lists non-contiguous blocks for array {name}")
        pos += nb
    if pos != nbytes:
        raise _Damaged(f"meta.json's blocks of array {name} cover {pos} of its {nbytes} bytes")
    return name, dtype, shape, nbytes, blocks


def _open_array(d: Path, spec: tuple, buf: bytearray | None) -> np.ndarray:
    """Check one array's file (size; every block's CRC when ``buf`` is given) and memory-map it."""
    name, dtype, shape, nbytes, blocks = spec
    path = d / f"{name}.bin"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        raise _Damaged(f"block file {name}.bin is missing") from None
    if size != nbytes:
        what = "truncated" if size < nbytes else "longer than recorded"
        raise _Damaged(f"{name}.bin is {what} ({size} of {nbytes} bytes)")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    if buf is not None:
        try:
            with open(path, "rb") as f:
                for i, (off, nb, crc) in enumerate(blocks):
                    if _crc_range(f, off, nb, buf) != crc:
                        raise _Damaged(f"{name}.bin block {i + 1}/{len(blocks)} (bytes {off}..{off + nb}) "
                                       f"fails its {CHECKSUM} checksum")
        except (OSError, EOFError) as e:
            raise _Damaged(f"{name}.bin cannot be read ({type(e).__name__}: {e})") from None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class FeatureCache:
    """A directory of feature cache entries (see the module docstring for the layout and guarantees).

    ``FeatureCache(None)`` is a disabled cache (everything in memory). Options: ``verify`` (CRC-check
    every block when an entry is first loaded by this object; False checks sizes only), shard thresholds
    (a shard closes at the first batch boundary past ``shard_bytes``, ``shard_images`` or ``shard_seconds``),
    ``lock_timeout`` (seconds to wait for another process's extraction; None waits for ever),
    ``min_free_bytes`` (kept free by :meth:`check_space`), ``partial_ttl_s`` (an interrupted extraction
    whose owner is gone is kept this long for a resume) and ``check_free_space`` (``extract`` checks, after
    its first batch, that the rest of the entry fits: :meth:`check_space`).
    """

    def __init__(self, root: str | os.PathLike | None, *, verify: bool = True, shard_bytes: int = 256 << 20,
                 shard_images: int | None = None, shard_seconds: float | None = 300.0,
                 lock_timeout: float | None = None, min_free_bytes: int = 256 << 20,
                 partial_ttl_s: float = 3 * 86400.0, check_free_space: bool = True):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0
        self.discarded = 0
        self.verify = verify
        self.shard_bytes = shard_bytes
        self.shard_images = shard_images
        self.shard_seconds = shard_seconds
        self.lock_timeout = lock_timeout
        self.min_free_bytes = min_free_bytes
        self.partial_ttl_s = partial_ttl_s
        self.check_free_space = check_free_space
        self._locks: dict[str, filelock.BaseFileLock] = {}
        self._verified: dict[str, tuple] = {}
        self._cleaned = False

    @property
    def enabled(self) -> bool:
        return self.root is not None

    # --- paths -------------------------------------------------------------------------------------
    @property
    def features_dir(self) -> Path:
        assert self.root is not None
        return self.root / "features"

    def _dir(self, key: str) -> Path:
        return self.features_dir / key[:2] / key

    def _partial_dir(self, key: str) -> Path:
        return self.features_dir / key[:2] / f"{key}.partial"

    def _lock_path(self, key: str) -> Path:
        return self.features_dir / key[:2] / f"{key}.lock"

    def lock(self, key: str) -> filelock.BaseFileLock:
        """The entry's lock (one reentrant object per key and cache object)."""
        lk = self._locks.get(key)
        if lk is None:
            self._lock_path(key).parent.mkdir(parents=True, exist_ok=True)
            lk = self._locks[key] = filelock.FileLock(str(self._lock_path(key)))
        return lk

    def acquire(self, key: str, on_wait=None) -> float:
        """Take the entry's lock, waiting for another process's extraction; returns the seconds waited."""
        lk = self.lock(key)
        try:
            lk.acquire(timeout=0)
            return 0.0
        except filelock.Timeout:
            pass
        if on_wait is not None:
            on_wait()
        log.info("waiting for another process building feature cache entry %s", key[:16])
        t0 = time.perf_counter()
        try:
            lk.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout)
        except filelock.Timeout:
            raise CacheError(f"feature cache entry {key[:16]} stayed locked by another process for "
                             f"{self.lock_timeout:.0f} s ({self._lock_path(key)})",
                             hint="wait for the other densebench run to finish, or use another --cache-dir "
                                  "or --no-cache") from None
        return time.perf_counter() - t0

    def release(self, key: str) -> None:
        self.lock(key).release()

    # --- reading -----------------------------------------------------------------------------------
    def _signature(self, d: Path, names) -> tuple:
        sig = []
        for n in ("meta.json", *(f"{x}.bin" for x in names)):
            try:
                st = (d / n).stat()
                sig.append((n, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                sig.append((n, None))
        return tuple(sig)

    def _open(self, key: str, *, verify: bool | None = None) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(arrays, None) for a sound entry, (None, None) when there is none, (None, problem) when damaged."""
        verify = self.verify if verify is None else verify
        d = self._dir(key)
        if not d.is_dir():
            return None, None
        try:
            specs = _read_meta(d)
            sig = self._signature(d, [s[0] for s in specs])
            crc = verify and self._verified.get(key) != sig
            buf = bytearray(min(_READ_CHUNK, max([s[3] for s in specs] + [1]))) if crc else None
            out = {spec[0]: _open_array(d, spec, buf) for spec in specs}
        except _Damaged as e:
            return None, str(e)
        if verify:
            self._verified[key] = sig
        try:
            os.utime(d)   # "last used", for `densebench cache prune --older-than`
        except OSError:
            pass
        return out, None

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The entry's arrays (memory maps) after checking it, or None. A damaged entry is reported in one
        warning and discarded (under its lock), so the caller rebuilds it."""
        if not self.enabled:
            return None
        arrays, problem = self._open(key)
        if problem is None:
            return arrays
        self.acquire(key)
        try:
            arrays, problem = self._open(key)   # another process may have rebuilt it meanwhile
            if problem is None:
                return arrays
            self._discard(key, problem)
            return None
        finally:
            self.release(key)

    def _discard(self, key: str, problem: str) -> None:
        d = self._dir(key)
        label = ""
        try:
            lab = _describe(json.loads((d / "meta.json").read_text()))
            label = f" ({lab['model']}, {lab['dataset']}/{lab['split']}, {lab['view']})"
        except (OSError, ValueError, AttributeError, TypeError):
            label = ""   # the meta is what is broken: no labels
        log.warning("feature cache entry %s%s is damaged: %s; discarded, it will be rebuilt (%s)",
                    key[:16], label, problem, d)
        self._verified.pop(key, None)
        shutil.rmtree(d, ignore_errors=True)
        self.discarded += 1

    def verify_entry(self, key: str) -> str | None:
        """Full check of a committed entry (sizes and every block's checksum): the problem, or None."""
        self._verified.pop(key, None)
        arrays, problem = self._open(key, verify=True)
        if problem is None and arrays is None:
            return "no such entry"
        return problem

    # --- writing -----------------------------------------------------------------------------------
    def check_space(self, estimated_bytes: int) -> None:
        """Raise :class:`CacheError` when the cache's disk cannot take ``estimated_bytes`` more and keep
        ``min_free_bytes`` free. A disabled cache always passes."""
        if not self.enabled:
            return
        probe = self.root
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if int(estimated_bytes) + int(self.min_free_bytes) > free:
            raise CacheError(f"the feature cache at {self.root} needs about {human_bytes(estimated_bytes)} for "
                             f"this extraction but its disk has {human_bytes(free)} free "
                             f"(keeping {human_bytes(self.min_free_bytes)} spare)", hint=FIXES)

    def _publish(self, tmp: Path, key: str, meta: dict) -> dict[str, np.ndarray]:
        """Write ``meta.json`` into the finished folder ``tmp`` and rename it into place as entry ``key``
        (caller holds the entry's lock); returns the entry's arrays."""
        try:
            _atomic_json(tmp / "meta.json", meta)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"the disk of the feature cache at {self.root} filled up while writing entry "
                                 f"{key[:16]}", hint=FIXES) from e
            raise
        final = self._dir(key)
        if final.exists():   # a damaged or foreign entry; we hold the lock, so nobody is building it
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        (final / "progress.json").unlink(missing_ok=True)
        self._verified[key] = self._signature(final, list(meta["arrays"]))   # just written and fsynced
        out, problem = self._open(key)
        if problem is not None:   # pragma: no cover - only a concurrent tamper gets here
            raise CacheError(f"feature cache entry {key[:16]} is unreadable right after writing: {problem}")
        return out

    def assemble(self, key: str, parts: dict[str, Any], info: dict, part_keys: list[str]) -> dict[str, np.ndarray]:
        """Entry ``key`` as the concatenation, in order, of the committed entries ``part_keys`` (the ranks'
        slices of a distributed extraction); the parts are removed afterwards.

        Each array's bytes are copied once (``os.copy_file_range`` where the kernel offers it, in bounded
        chunks otherwise) and its blocks' checksums carry over from the parts, shifted, so nothing is
        re-hashed. Done under the entry's lock; an entry that already exists is returned as it is."""
        self.acquire(key)
        try:
            hit = self.load(key)
            if hit is not None:
                return hit
            metas = []
            for pk in part_keys:
                d = self._dir(pk)
                try:
                    metas.append((d, json.loads((d / "meta.json").read_text()), _read_meta(d)))
                except (OSError, ValueError, _Damaged) as e:
                    raise CacheError(f"part {pk[:16]} of distributed feature cache entry {key[:16]} is missing or "
                                     f"damaged ({e})", hint="run again: the missing part is extracted again") from None
            tmp = self._partial_dir(key)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            arrays = _concatenate_parts(tmp, metas)
            n_images = sum(int((m.get("info") or {}).get("n_images", 0)) for _, m, _ in metas)
            meta = {"format": CACHE_FORMAT, "key": key, "arrays": arrays, "key_parts": parts,
                    "info": {**info, "n_images": n_images}, "created": time.time(),
                    "started": min(float(m.get("started", time.time())) for _, m, _ in metas),
                    "shards": sum(int(m.get("shards", 0)) for _, m, _ in metas), "assembled_from": len(part_keys)}
            out = self._publish(tmp, key, meta)
        finally:
            self.release(key)
        for pk in part_keys:
            shutil.rmtree(self._dir(pk), ignore_errors=True)
            self._verified.pop(pk, None)
        return out

    # --- housekeeping ------------------------------------------------------------------------------
    def _try_lock(self, key: str) -> filelock.BaseFileLock | None:
        """The entry's lock taken without waiting (a fresh lock object, so our own holds count as busy)."""
        try:
            lk = filelock.FileLock(str(self._lock_path(key)))
            lk.acquire(timeout=0)
            return lk
        except (filelock.Timeout, OSError):
            return None

    def clean_orphans(self, *, force: bool = False) -> list[Path]:
        """Remove what killed runs left behind; returns the removed paths. Run once per cache object by
        ``extract`` (``force`` runs it again).

        * an interrupted extraction (``<key>.partial``) whose lock is free, i.e. whose owner process is gone,
          when it holds no complete shard (nothing to resume) or is older than ``partial_ttl_s``;
          otherwise it stays so that the next run of that entry resumes from it;
        * temporary folders of format-1 writers (``.<key8>-*``) untouched for an hour;
        * stray ``*.tmp-<pid>`` files of dead processes inside partial folders (also done on resume).
        """
        if not self.enabled or (self._cleaned and not force):
            return []
        self._cleaned = True
        removed: list[Path] = []
        fdir = self.features_dir
        if not fdir.is_dir():
            return removed
        now = time.time()
        for sub in fdir.iterdir():
            if not sub.is_dir():
                continue
            try:
                children = list(sub.iterdir())
            except OSError:
                continue
            for p in children:
                name = p.name
                try:
                    if _LEGACY_TMP_RE.match(name) and p.is_dir():
                        newest = max([p.stat().st_mtime] + [c.stat().st_mtime for c in p.iterdir()])
                        if now - newest > 3600:
                            shutil.rmtree(p, ignore_errors=True)
                            removed.append(p)
                    elif (name.endswith(".partial") and p.is_dir() and _KEY_RE.match(name[:-8])
                          and self._clean_partial(name[:-8], p, now)):
                        removed.append(p)
                    elif force and name.endswith(".lock") and _KEY_RE.match(name[:-5]) and p.is_file():
                        self._clean_lock(name[:-5], p, now)
                except OSError:
                    continue
        if removed:
            log.info("removed %d leftover cache folder(s) of interrupted runs", len(removed))
        return removed

    def _clean_lock(self, key: str, p: Path, now: float) -> None:
        """Remove the lock file of an entry that no longer exists (forced cleaning, i.e. ``cache prune``)."""
        if self._dir(key).exists() or self._partial_dir(key).exists() or now - p.stat().st_mtime < 3600:
            return
        lk = self._try_lock(key)
        if lk is None:
            return
        try:
            if not self._dir(key).exists() and not self._partial_dir(key).exists():
                p.unlink(missing_ok=True)
        finally:
            lk.release()

    def _clean_partial(self, key: str, p: Path, now: float) -> bool:
        lk = self._try_lock(key)
        if lk is None:
            return False   # its owner is alive (it holds the lock)
        try:
            prog = _read_progress(p)
            shards = prog.get("shards") if prog else None
            updated = float(prog.get("updated", 0)) if prog else 0.0
            if not shards or now - max(updated, p.stat().st_mtime) > self.partial_ttl_s:
                shutil.rmtree(p, ignore_errors=True)
                return True
            return False
        finally:
            lk.release()

    def iter_entries(self) -> Iterator[EntryInfo]:
        """Every committed entry, partial extraction and legacy entry under the root."""
        if not self.enabled or not self.features_dir.is_dir():
            return
        for sub in sorted(self.features_dir.iterdir()):
            if not sub.is_dir():
                continue
            for p in sorted(sub.iterdir()):
                if not p.is_dir():
                    continue
                name = p.name
                if _KEY_RE.match(name):
                    kind, key, meta_file = "entry", name, p / "meta.json"
                elif name.endswith(".partial") and _KEY_RE.match(name[:-8]):
                    kind, key, meta_file = "partial", name[:-8], p / "progress.json"
                else:
                    continue
                try:
                    files = [f for f in p.iterdir() if f.is_file()]
                    size = sum(f.stat().st_size for f in files)
                    last_used = p.stat().st_mtime
                except OSError:
                    continue
                meta: dict = {}
                try:
                    meta = json.loads(meta_file.read_text())
                    if not isinstance(meta, dict):
                        meta = {}
                except (OSError, ValueError):
                    pass
                fmt = meta.get("format")
                if kind == "entry" and fmt is None and "arrays" in meta:
                    fmt = 1
                if kind == "entry" and fmt == 1:
                    kind = "legacy"
                created = meta.get("created")
                if kind == "partial":
                    shards = meta.get("shards") or []
                    rows = shards[-1]["images"][1] if shards else 0
                    created = meta.get("started", created)
                    last_used = meta.get("updated", last_used)
                else:
                    rows = (meta.get("info") or {}).get("n_images")
                    if rows is None:
                        arrays = meta.get("arrays") or {}
                        first = next(iter(arrays.values()), None)
                        rows = int(first["shape"][0]) if isinstance(first, dict) and first.get("shape") else None
                alive = owner_alive(meta.get("owner")) if kind == "partial" else None
                yield EntryInfo(key=key, path=p, kind=kind, size_bytes=size, created=created, last_used=last_used,
                                rows=rows, format=fmt, owner_alive=alive, meta=meta, **_describe(meta))

    def remove(self, entry: EntryInfo, *, wait: bool = False) -> bool:
        """Delete an entry or partial extraction under its lock; False when another process holds it."""
        if wait:
            self.acquire(entry.key)
            lk = self.lock(entry.key)
        else:
            lk = self._try_lock(entry.key)
            if lk is None:
                return False
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            self._verified.pop(entry.key, None)
            return not entry.path.exists()
        finally:
            lk.release()


def _copy_bytes(src: Path, dst, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` to the open file ``dst`` (in the kernel where it can; bounded memory)."""
    with open(src, "rb") as f:
        left = nbytes
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    done = os.copy_file_range(f.fileno(), dst.fileno(), min(left, 1 << 30))
                    if done <= 0:
                        break
                    left -= done
            except OSError:
                f.seek(nbytes - left)
        while left:
            chunk = f.read(min(left, _READ_CHUNK))
            if not chunk:
                raise CacheError(f"{src} ended {left} bytes early while assembling a feature cache entry")
            dst.write(chunk)
            left -= len(chunk)


def _concatenate_parts(tmp: Path, metas: list[tuple[Path, dict, list[tuple]]]) -> dict:
    """Write each array of the parts, in order, into ``tmp/<name>.bin``; returns the assembled ``arrays``
    block of meta.json (the parts' checksummed blocks, offsets shifted)."""
    names = list(dict.fromkeys(spec[0] for _, _, specs in metas for spec in specs))
    arrays = {}
    for name in names:
        specs = [next((s for s in specs if s[0] == name), None) for _, _, specs in metas]
        kinds = {(s[1].str, s[2][1:]) for s in specs if s is not None}
        if len(kinds) != 1:
            raise CacheError(f"the parts of a distributed feature cache entry disagree on array {name}: {kinds}")
        dtype, tail = kinds.pop()
        blocks, offset, rows = [], 0, 0
        with open(tmp / f"{name}.bin", "wb") as out:
            for (d, meta, _), spec in zip(metas, specs):
                if spec is None:
                    continue
                raw = meta["arrays"][name]["blocks"]
                for b in raw:
                    blocks.append({"offset": offset + int(b["offset"]), "nbytes": int(b["nbytes"]),
                                   "rows": int(b.get("rows", 0)), "crc32": int(b["crc32"])})
                if spec[3]:
                    _copy_bytes(d / f"{name}.bin", out, spec[3])
                offset += spec[3]
                rows += spec[2][0]
            out.flush()
            os.fsync(out.fileno())
        arrays[name] = {"dtype": dtype, "shape": [rows, *tail], "nbytes": offset, "checksum": CHECKSUM,
                        "blocks": blocks}
    return arrays


def _read_progress(d: Path) -> dict | None:
    try:
        prog = json.loads((d / "progress.json").read_text())
        return prog if isinstance(prog, dict) else None
    except (OSError, ValueError):
        return None


class CacheWriter:
    """Appends row blocks per array name in shards; ``commit()`` publishes the entry atomically.

    With an enabled cache the writer works in ``<key>.partial/``: it resumes from the complete shards an
    interrupted run left there (``start`` is the first view still to compute), and ``commit`` writes
    ``meta.json`` and renames the folder into place. Callers must hold the entry's lock (``extract`` does).
    ``end_batch(n)`` marks ``n`` more views complete and closes a shard when one is due. With a disabled
    cache (or ``cache=None``) rows are kept in memory.
    """

    def __init__(self, cache: FeatureCache | None, key: str, parts: dict[str, Any], info: dict | None = None):
        self.cache = cache
        self.key = key
        self.parts = parts
        self.info = dict(info or {})
        self.arrays: dict[str, dict] = {}          # name -> {"dtype", "shape"} (public, as before)
        self._mem: dict[str, list[np.ndarray]] = {}
        self.tmp: Path | None = None               # the partial folder (None: in memory)
        self.start = 0                              # views taken from complete shards of an earlier run
        self.shards: list[dict] = []
        self._files: dict[str, Any] = {}
        self._cur: dict[str, dict] = {}            # name -> {"offset", "nbytes", "rows", "crc"} of the open shard
        self._snap: dict[str, tuple[int, int, int]] = {}
        self._images = 0                            # complete views so far
        self._snap_images = 0
        self._shard_start = 0
        self._own_shards = 0                        # shards written by this writer (not resumed)
        self._shard_t0 = time.monotonic()
        self._started = time.time()
        if cache is not None and cache.enabled:
            self.tmp = cache._partial_dir(key)
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._resume()

    # --- resume ------------------------------------------------------------------------------------
    def _resume(self) -> None:
        d = self.tmp
        for f in d.iterdir():
            if ".tmp-" in f.name:
                f.unlink(missing_ok=True)
        prog = _read_progress(d)
        kept: list[dict] = []
        if prog is not None and prog.get("key") == self.key and prog.get("format") == CACHE_FORMAT:
            kept = self._valid_shards(prog.get("shards") or [])
            limit = self.info.get("n_views")
            if limit is not None:   # a dataset whose manifest hash does not cover its length
                kept = [sh for sh in kept if sh["images"][1] <= int(limit)]
            self._started = float(prog.get("started", self._started))
        elif any(d.iterdir()):
            log.warning("partial feature cache extraction %s has an unreadable progress.json; starting it over",
                        self.key[:16])
        # truncate every array file to the kept shards; drop files of arrays no kept shard has
        ends: dict[str, int] = {}
        for sh in kept:
            for name, a in sh["arrays"].items():
                ends[name] = a["offset"] + a["nbytes"]
                self.arrays.setdefault(name, {"dtype": a["dtype"], "shape": [0, *a["tail"]]})
                self.arrays[name]["shape"][0] += a["rows"]
        for f in d.glob("*.bin"):
            name = f.name[:-4]
            if name not in ends:
                f.unlink(missing_ok=True)
            elif f.stat().st_size != ends[name]:
                with open(f, "r+b") as fh:
                    fh.truncate(ends[name])
        self.shards = kept
        self.start = kept[-1]["images"][1] if kept else 0
        self._images = self._snap_images = self._shard_start = self.start
        for name, end in ends.items():
            self._cur[name] = {"offset": end, "nbytes": 0, "rows": 0, "crc": 0}
            self._snap[name] = (0, 0, 0)
        self._write_progress()   # drops shards found unsound; records this process as the owner

    def _valid_shards(self, shards: list) -> list[dict]:
        """The longest prefix of recorded shards that is consistent and whose bytes pass their checksums."""
        kept: list[dict] = []
        ends: dict[str, int] = {}
        tails: dict[str, tuple] = {}
        buf = bytearray(_READ_CHUNK) if self.cache is not None and self.cache.verify else None
        files: dict[str, Any] = {}
        try:
            for i, sh in enumerate(shards):
                try:
                    rec = self._check_shard(sh, kept[-1]["images"][1] if kept else 0, ends, tails, files, buf)
                except _Damaged as e:
                    log.warning("partial feature cache extraction %s: shard %d %s; resuming after the %d sound "
                                "shard(s) before it", self.key[:16], i + 1, e, len(kept))
                    break
                for name, a in rec["arrays"].items():
                    ends[name] = a["offset"] + a["nbytes"]
                kept.append(rec)
        finally:
            for f in files.values():
                f.close()
        return kept

    def _check_shard(self, sh, img: int, ends: dict, tails: dict, files: dict, buf) -> dict:
        try:
            a0, a1 = (int(x) for x in sh["images"])
            arrays = {str(n): {"dtype": np.dtype(str(a["dtype"])).str, "tail": [int(t) for t in a["tail"]],
                               "rows": int(a["rows"]), "offset": int(a["offset"]),
                               "nbytes": int(a["nbytes"]), "crc32": int(a["crc32"])}
                      for n, a in sh["arrays"].items()}
        except (KeyError, TypeError, ValueError):
            raise _Damaged("is described incompletely") from None
        if a0 != img or a1 < a0:
            raise _Damaged("does not continue the shard before it")
        for name, a in arrays.items():
            if not _NAME_RE.match(name) or name in _RESERVED:
                raise _Damaged(f"has a bad array name {name!r}")
            sig = (a["dtype"], tuple(a["tail"]))
            if tails.setdefault(name, sig) != sig or a["offset"] != ends.get(name, 0):
                raise _Damaged(f"does not continue array {name}")
            if a["rows"] * int(np.prod(a["tail"])) * np.dtype(a["dtype"]).itemsize != a["nbytes"]:
                raise _Damaged(f"has inconsistent sizes for array {name}")
            if a["nbytes"]:
                self._check_shard_bytes(name, a, files, buf)
        return {"images": [a0, a1], "arrays": arrays}

    def _check_shard_bytes(self, name: str, a: dict, files: dict, buf) -> None:
        f = files.get(name)
        if f is None:
            try:
                f = files[name] = open(self.tmp / f"{name}.bin", "rb")  # noqa: SIM115 - closed by _valid_shards
            except FileNotFoundError:
                raise _Damaged(f"has lost {name}.bin") from None
        try:
            if os.fstat(f.fileno()).st_size < a["offset"] + a["nbytes"]:
                raise _Damaged(f"is cut short in {name}.bin")
            if buf is not None and _crc_range(f, a["offset"], a["nbytes"], buf) != a["crc32"]:
                raise _Damaged(f"fails its {CHECKSUM} checksum in {name}.bin")
        except (OSError, EOFError):
            raise _Damaged(f"cannot be read from {name}.bin") from None

    # --- writing -----------------------------------------------------------------------------------
    def append(self, name: str, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        info = self.arrays.get(name)
        if info is None:
            _validate_name(name)
            info = self.arrays[name] = {"dtype": rows.dtype.str, "shape": [0, *rows.shape[1:]]}
        elif list(rows.shape[1:]) != info["shape"][1:] or rows.dtype.str != info["dtype"]:
            raise ValueError(f"cache array {name}: rows {rows.dtype}{rows.shape} do not match {info}")
        info["shape"][0] += rows.shape[0]
        if self.tmp is None:
            self._mem.setdefault(name, []).append(rows)
            return
        cur = self._cur.get(name)
        if cur is None:
            cur = self._cur[name] = {"offset": 0, "nbytes": 0, "rows": 0, "crc": 0}
            self._snap[name] = (0, 0, 0)
        data = memoryview(rows.reshape(-1)).cast("B") if rows.size else b""
        if len(data):
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = open(self.tmp / f"{name}.bin", "ab")  # noqa: SIM115 - open until commit
            try:
                f.write(data)
            except OSError as e:
                self._raise_if_full(e)
                raise
            cur["crc"] = zlib.crc32(data, cur["crc"])
        cur["nbytes"] += len(data)
        cur["rows"] += rows.shape[0]

    def end_batch(self, n_images: int) -> None:
        """``n_images`` more views are completely appended; close a shard when one is due."""
        self._images += int(n_images)
        self._snap_images = self._images
        self._snap = {n: (c["rows"], c["nbytes"], c["crc"]) for n, c in self._cur.items()}
        if self.tmp is None or self.cache is None:
            return
        pending = sum(c["nbytes"] for c in self._cur.values())
        c = self.cache
        if ((c.shard_bytes and pending >= c.shard_bytes)
                or (c.shard_images and self._images - self._shard_start >= c.shard_images)
                or (c.shard_seconds and time.monotonic() - self._shard_t0 >= c.shard_seconds)):
            self._close_shard()

    def reserve(self, estimated_bytes: int) -> None:
        """Before the first forward: refuse (CacheError) when the ``estimated_bytes`` still to write will not fit
        on the cache's disk (see :meth:`FeatureCache.check_space`). In memory, or with the check off: no-op."""
        if self.tmp is None or self.cache is None or not self.cache.check_free_space:
            return
        self.cache.check_space(int(estimated_bytes))

    def check_space(self, n_views: int) -> None:
        """After some views: refuse (CacheError) when the rest of the ``n_views`` will not fit on the disk."""
        if self.tmp is None or self.cache is None or not self.cache.check_free_space:
            return
        done = self._images - self.start
        if done <= 0 or n_views <= self._images:
            return
        written = sum(c["nbytes"] for c in self._cur.values()) + sum(
            a["nbytes"] for sh in self.shards[len(self.shards) - self._own_shards:] for a in sh["arrays"].values())
        self.cache.check_space(int(written / done * (n_views - self._images)))

    def _raise_if_full(self, e: OSError) -> None:
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"the disk of the feature cache at {self.cache.root} filled up while writing entry "
                             f"{self.key[:16]} (complete shards are kept for a resume)", hint=FIXES) from e

    def _write_progress(self) -> None:
        prog = {"format": CACHE_FORMAT, "key": self.key, "key_parts": self.parts, "info": self.info,
                "owner": _owner(), "started": self._started, "updated": time.time(), "checksum": CHECKSUM,
                "shards": self.shards}
        _atomic_json(self.tmp / "progress.json", prog)

    def _close_shard(self) -> None:
        """Make the views completed so far a durable shard (fsync the data, then record it)."""
        if self._snap_images == self._shard_start and not any(s[1] for s in self._snap.values()):
            return
        try:
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
            arrays = {}
            for name, (rows, nbytes, crc) in self._snap.items():
                info = self.arrays[name]
                arrays[name] = {"dtype": info["dtype"], "tail": list(info["shape"][1:]), "rows": rows,
                                "offset": self._cur[name]["offset"], "nbytes": nbytes, "crc32": crc}
            self.shards.append({"images": [self._shard_start, self._snap_images], "arrays": arrays})
            self._own_shards += 1
            self._write_progress()
        except OSError as e:
            self._raise_if_full(e)
            raise
        for name, (rows, nbytes, _crc) in self._snap.items():
            cur = self._cur[name]
            cur["offset"] += nbytes
            cur["nbytes"] -= nbytes
            cur["rows"] -= rows
            cur["crc"] = 0   # only valid when nothing was appended past the snapshot (always at batch ends)
            self._snap[name] = (0, 0, 0)
        self._shard_start = self._snap_images
        self._shard_t0 = time.monotonic()

    def commit(self) -> dict[str, np.ndarray]:
        if self.tmp is None:
            return {name: np.concatenate(parts) for name, parts in self._mem.items()}
        if any((c["rows"], c["nbytes"]) != self._snap.get(n, (0, 0, 0))[:2] for n, c in self._cur.items()):
            # rows appended without end_batch() (a caller that does not count views): they are complete
            self._snap = {n: (c["rows"], c["nbytes"], c["crc"]) for n, c in self._cur.items()}
        self._close_shard()
        for f in self._files.values():
            f.close()
        self._files = {}
        arrays = {}
        total_images = self.shards[-1]["images"][1] if self.shards else 0
        for name, info in self.arrays.items():
            blocks = [{"offset": sh["arrays"][name]["offset"], "nbytes": sh["arrays"][name]["nbytes"],
                       "rows": sh["arrays"][name]["rows"], "crc32": sh["arrays"][name]["crc32"]}
                      for sh in self.shards if name in sh["arrays"]]
            rows = sum(b["rows"] for b in blocks)
            nbytes = sum(b["nbytes"] for b in blocks)
            arrays[name] = {"dtype": info["dtype"], "shape": [rows, *info["shape"][1:]], "nbytes": nbytes,
                            "checksum": CHECKSUM, "blocks": blocks}
            path = self.tmp / f"{name}.bin"
            if path.exists() and path.stat().st_size != nbytes:
                with open(path, "r+b") as fh:
                    fh.truncate(nbytes)
        info = {**self.info, "n_images": total_images}
        meta = {"format": CACHE_FORMAT, "key": self.key, "arrays": arrays, "key_parts": self.parts, "info": info,
                "created": time.time(), "started": self._started, "shards": len(self.shards)}
        tmp, self.tmp = self.tmp, None
        try:
            return self.cache._publish(tmp, self.key, meta)
        except BaseException:
            self.tmp = tmp
            raise

    def abort(self) -> None:
        """Stop writing. Complete views are kept as a last shard, so a rerun resumes after them; a partial
        folder with no complete shard is removed."""
        if self.tmp is None:
            self._mem.clear()
            return
        try:
            self._close_shard()
        except (OSError, CacheError) as e:   # e.g. the disk is full: the shards already recorded stay valid
            log.debug("could not record the last shard of %s: %s", self.key[:16], e)
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files = {}
        if not self.shards:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
