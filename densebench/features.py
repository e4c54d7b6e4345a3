"""Batched feature extraction with an on-disk, memory-mapped cache.

The backbone forward is the only cost that must be paid (DESIGN principle 2): every image view is
pushed through the encoder once, reduced to what a protocol keeps (full patch grids, or a sampled
memory bank), and stored as raw little-endian arrays that later runs memory-map. A cache key is the
sha256 of exactly what the stored bytes depend on:

* **full patch grids** of a standard segmentation split (``SegmentationDataset``) are two entries: the
  image features, keyed by the encoder's feature key, the *images* alone (paths + size + mtime, or their
  bytes with ``verify_data``) and the image part of the view; and the view's masks, keyed by the dataset
  (family, split, manifest of images and masks) and the geometric part of the view. COCO-Things and
  COCO-Stuff (same images, other masks) therefore share one extraction, and a rewritten mask costs a
  re-read of the masks, not a forward pass;
* anything a **reducer** computes from features and masks together (the in-context memory bank), and
  datasets or views that cannot be split, are one entry keyed by the encoder, the dataset manifest, the
  view and the reducer.

The data path: DataLoader workers (default: the usable cores, up to 8, see :func:`default_workers`) read
and decode, and run the view's CPU part (crops on uint8, colour jitter on the crop); a view's last per-pixel
steps (:class:`~densebench.transforms.DeviceFinish`: uint8 -> float, normalisation, padding) run on the
batch on the device; the main thread only feeds the encoder, and a writer thread reduces (on CPU) or waits
for the asynchronous device-to-host copies into pinned buffers (on CUDA), then checksums and writes the
shards. Views are deterministic per (seed, epoch, image): features do not depend on the worker count.

The cache itself (checksums, resumable shards, per-entry locks, housekeeping) lives in
:mod:`densebench.cache`; its names are re-exported here. docs/cache.md describes the guarantees.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache import (  # noqa: F401  (re-exported: the cache's public names)
    CACHE_FORMAT,
    CacheError,
    CacheWriter,
    FeatureCache,
    cache_key,
    estimate_entry_bytes,
)
from . import distributed, precision
from .errors import ConfigError
from .progress import progress_bar

#: view(index, image, mask) -> (image tensor (3, H, W) normalised, mask tensor (H', W') uint8/long). The
#: views of densebench.transforms also offer image(), mask(), finish, describe_image() and describe_mask().
View = Callable[[int, Any, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
#: reduce(features (B, h, w, D) float on device, masks (B, H', W'), indices (B,)) -> {name: rows}, rows being
#: tensors (on the device: copied back asynchronously) or numpy arrays; an optional boolean ``_keep`` row mask
#: drops rows from every array before storing (so a device reducer never waits for a row count).
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]
KEEP = "_keep"

#: The automatic worker count never exceeds this (more rarely helps one GPU and costs memory per worker).
MAX_AUTO_WORKERS = 8
#: A pass starts at most one worker per this many views: starting a worker process costs about as much as
#: reading that many small images, so short passes (the synthetic suite, a resumed tail) run in-process.
VIEWS_PER_WORKER = 64
_EMPTY = torch.zeros(0, dtype=torch.uint8)


def default_workers() -> int:
    """DataLoader workers when a protocol's ``num_workers`` is automatic: the usable cores, at most 8; under
    torchrun / srun the cores are divided among the processes of this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores // distributed.local_world_size()))


@dataclass
class ExtractionStats:
    forward_s: float = 0.0      # time inside encoder calls (the unavoidable cost)
    extraction_s: float = 0.0   # whole extraction loop, data loading included
    images_forwarded: int = 0
    cache_hits: int = 0         # extractions served wholly from the cache (no forward, nothing read)
    cache_misses: int = 0       # extractions that computed something (forwards, or only masks)
    entries: list[str] = field(default_factory=list)
    views_reused: int = 0       # views taken from complete shards of an interrupted run (not forwarded again)
    entries_rebuilt: int = 0    # damaged entries discarded (one warning each) and extracted again
    lock_wait_s: float = 0.0    # time spent waiting for another process extracting the same entry
    masks_read: int = 0         # views whose masks were computed in a masks-only pass (no forward)

    def as_dict(self) -> dict[str, Any]:
        return {"forward_s": round(self.forward_s, 4), "extraction_s": round(self.extraction_s, 4),
                "images_forwarded": self.images_forwarded, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "entries": self.entries, "views_reused": self.views_reused,
                "entries_rebuilt": self.entries_rebuilt, "lock_wait_s": round(self.lock_wait_s, 4),
                "masks_read": self.masks_read}


# ---------------------------------------------------------------------------------------------------
# What the images alone are, and reading one half of a standard dataset item

def splittable(dataset, view) -> bool:
    """Whether ``dataset`` reads its items the standard way (so images and masks can be read apart) and
    ``view`` comes in parts: then image features and masks are separate cache entries."""
    from .data.base import SegmentationDataset

    return (isinstance(dataset, SegmentationDataset)
            and type(dataset).__getitem__ is SegmentationDataset.__getitem__
            and all(hasattr(view, a) for a in ("image", "mask", "describe_image", "describe_mask")))


def image_manifest(dataset) -> str:
    """Identity of a standard dataset's images, in order, and nothing else (no family, split or masks).

    Each image enters as its path, size and ``st_mtime_ns``, or with ``verify_data`` (as for
    ``manifest_hash``) as its bytes alone, so the same files opened as two dataset families (COCO-Things
    and COCO-Stuff) have one identity. Memoised per dataset object and mode.
    """
    from .data.base import _verify_data_default, files_manifest

    content = _verify_data_default(dataset, None)
    ident = (content, str(dataset.root), tuple(dataset.ids))
    memo = dataset.__dict__.setdefault("_image_manifest_memo", {})
    hit = memo.get(content)
    if hit is not None and hit[0] == ident:
        return hit[1]
    paths = [dataset.image_path(id_) for id_ in dataset.ids]
    items = [("" if content else str(p), [p]) for p in paths]
    digest = files_manifest(f"images|rgb|{'content' if content else 'stat'}-v1", items, verify_data=content)
    memo[content] = (ident, digest)
    return digest


def read_image(dataset, i: int):
    """Item ``i``'s image alone (PIL RGB) from a standard dataset."""
    from .data.base import open_image

    return open_image(dataset.image_path(dataset.ids[i]))


def read_mask(dataset, i: int) -> np.ndarray:
    """Item ``i``'s mask alone, in the label space, checked against its image's size (read from the header)."""
    from PIL import Image

    from .data.base import open_mask
    from .errors import DataError

    id_ = dataset.ids[i]
    mask = dataset.map_mask(open_mask(dataset.mask_path(id_)), id_)
    try:
        with Image.open(dataset.image_path(id_)) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - an unreadable image is reported by the pass that decodes it
        return mask
    if mask.shape != (height, width):
        raise DataError(f"mask {dataset.mask_path(id_)} is {mask.shape[1]}x{mask.shape[0]} but image "
                        f"{dataset.image_path(id_)} is {width}x{height}",
                        hint="image and mask of one id must have the same size")
    return mask


# ---------------------------------------------------------------------------------------------------
# What a worker computes per item (module-level classes: picklable for any start method)

def _finished(view, img: torch.Tensor, here: bool) -> torch.Tensor:
    finish = getattr(view, "finish", None)
    return finish(img[None])[0] if here and finish is not None else img


@dataclass
class _ImagePart:
    dataset: Any
    view: Any
    finish_here: bool

    def __call__(self, i: int):
        return _finished(self.view, self.view.image(i, read_image(self.dataset, i)), self.finish_here), _EMPTY


@dataclass
class _MaskPart:
    dataset: Any
    view: Any

    def __call__(self, i: int):
        return _EMPTY, self.view.mask(i, read_mask(self.dataset, i))


@dataclass
class _WholeItem:
    dataset: Any
    view: Any
    finish_here: bool

    def __call__(self, i: int):
        _, image, mask = self.dataset[i]
        if hasattr(self.view, "image") and hasattr(self.view, "mask"):
            return _finished(self.view, self.view.image(i, image), self.finish_here), self.view.mask(i, mask)
        return self.view(i, image, mask)


class _Items(Dataset):
    """Items ``start..len(dataset)-1`` of one pass: (image or empty, mask or empty, dataset index)."""

    def __init__(self, n: int, make, start: int = 0):
        self.n, self.make, self.start = n, make, int(start)

    def __len__(self) -> int:
        return self.n - self.start

    def __getitem__(self, i: int):
        i = self.start + i
        # Views are many small tensor ops: one thread is 10-50x faster than a thread pool that has to wake
        # up (or fight another process) for every op. DataLoader workers already run single-threaded.
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            img, m = self.make(i)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return img, m, i


# ---------------------------------------------------------------------------------------------------
# Reducers of the passes

def default_reducer(features: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
    """Keep full patch grids as float16 and the view's mask as uint8."""
    return {"features": features.to(torch.float16), "masks": masks.to(torch.uint8)}


def _features_only(features: torch.Tensor, masks, indices) -> dict[str, Any]:
    return {"features": features.to(torch.float16)}


def _masks_only(features, masks: torch.Tensor, indices) -> dict[str, Any]:
    return {"masks": masks.to(torch.uint8)}


def _nbytes(rows) -> int:
    return int(rows.numel() * rows.element_size()) if torch.is_tensor(rows) else int(np.asarray(rows).nbytes)


def _host(rows):
    """Start copying device rows into a pinned host buffer (asynchronously); host data is returned as is."""
    if torch.is_tensor(rows) and rows.device.type == "cuda":
        buf = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        buf.copy_(rows, non_blocking=True)
        return buf
    return rows


# ---------------------------------------------------------------------------------------------------
# The writer thread

class _Sink:
    """Stores what each batch reduces to on a writer thread, so that the main thread only feeds the encoder.

    On CUDA the main thread queues the reduction on the device and copies its results into pinned host
    buffers asynchronously; the writer thread waits for that batch's event. On CPU the writer thread runs
    the reduction itself. The writer thread owns the CacheWriter until :meth:`close` returns.
    """

    def __init__(self, writer: CacheWriter, reduce: Reducer, n_views: int, stats: ExtractionStats, cuda: bool,
                 depth: int = 4):
        self.writer, self.reduce, self.n_views, self.stats, self.cuda = writer, reduce, n_views, stats, cuda
        self.error: BaseException | None = None
        self.checked = False
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name="densebench-cache-writer", daemon=True)
        self.thread.start()

    def put(self, feats, masks: torch.Tensor, indices: torch.Tensor, timing=None, release=None) -> None:
        """Queue one batch. ``release``: the input batch, handed over so that freeing it (unmapping a worker's
        shared memory, tens of MB) happens on the writer thread, not the main one."""
        if self.cuda:
            dev = feats.device if feats is not None else torch.device("cuda")
            with torch.inference_mode():
                out = self.reduce(feats, masks.to(dev, non_blocking=True), indices)
            payload = {name: _host(rows) for name, rows in out.items()}
            event = torch.cuda.Event()
            event.record()
            item = (payload, len(indices), event, timing, release)
        else:
            item = ((feats, masks, indices), len(indices), None, timing, release)
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Store every queued batch, stop the thread, and raise what failed on it."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue   # failed: drain until close()
            try:
                self._store(*item[:4])
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            del item

    def _store(self, payload, n: int, event, timing) -> None:
        if event is None:
            feats, masks, indices = payload
            with torch.inference_mode():
                payload = self.reduce(feats, masks, indices)
        else:
            event.synchronize()
        if timing is not None:   # CUDA events around the forward
            self.stats.forward_s += timing[0].elapsed_time(timing[1]) / 1000.0
        arrays = {name: rows.numpy() if torch.is_tensor(rows) else np.asarray(rows) for name, rows in payload.items()}
        keep = arrays.pop(KEEP, None)
        for name, rows in arrays.items():
            self.writer.append(name, rows if keep is None else rows[keep])
        self.writer.end_batch(n)
        if not self.checked:   # one batch tells the bytes per view: a second check of the free space
            self.checked = True
            self.writer.check_space(self.n_views)


# ---------------------------------------------------------------------------------------------------
# Extraction

@dataclass
class _Engine:
    """One ``extract`` call: the encoder, data and settings every pass and cache entry of it shares."""

    encoder: Any
    dataset: Any
    view: Any
    cache: FeatureCache | None
    device: torch.device
    batch_size: int
    num_workers: int
    layer: int | None
    norm: bool | None
    desc: str
    progress: bool
    stats: ExtractionStats

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def encoder_key(self) -> dict:
        """The encoder's feature key plus how the forward computes (``--precision``: fp16 autocast on CUDA and
        fp32 on the CPU give slightly different features), so one never reuses the other's entry."""
        return {**self.encoder.feature_key(self.layer, self.norm), "compute": precision.resolved(self.device.type)}

    def info(self, **more) -> dict:
        return {"model": getattr(self.encoder, "name", None), "dataset": getattr(self.dataset, "name", None),
                "split": getattr(self.dataset, "split", None), "desc": self.desc, "n_views": len(self.dataset),
                **more}

    # --- one cache entry ---------------------------------------------------------------------------
    def entry(self, parts: dict, info: dict, make, reduce: Reducer, *, forward: bool,
              desc: str) -> tuple[dict, bool]:
        """``(arrays, computed)``: the entry's arrays from the cache, or computed (views through ``make``, the
        encoder when ``forward``, then ``reduce``). Under torchrun / srun each rank computes its slice of the
        views as a part entry and the parts are assembled into this one (:meth:`_sharded`)."""
        group = distributed.current()
        if group.enabled:
            return self._sharded(group, parts, info, make, reduce, forward=forward, desc=desc)
        return self._entry(parts, info, lambda w: self.run(w, make, reduce, forward=forward, desc=desc))

    def _entry(self, parts: dict, info: dict, build: Callable[[CacheWriter], dict]) -> tuple[dict, bool]:
        """``(arrays, computed)``: the entry's arrays from the cache, or built by ``build(writer)`` under the
        entry's lock (resuming an interrupted build; a damaged entry is reported, discarded and rebuilt)."""
        key = cache_key(parts)
        self.stats.entries.append(key[:16])
        cache = self.cache
        if cache is None or not cache.enabled:
            if cache is not None:
                cache.misses += 1
            return build(CacheWriter(None, key, parts)), True
        cache.clean_orphans()
        discarded = cache.discarded
        hit = cache.load(key)
        if hit is None:
            self.stats.lock_wait_s += cache.acquire(key, on_wait=self._say_waiting)
            try:
                hit = cache.load(key)   # built by another process while we waited?
                if hit is None:
                    cache.misses += 1
                    self.stats.entries_rebuilt += cache.discarded - discarded
                    return build(CacheWriter(cache, key, parts, info)), True
            finally:
                cache.release(key)
        cache.hits += 1
        self.stats.entries_rebuilt += cache.discarded - discarded
        return hit, False

    def _sharded(self, group, parts: dict, info: dict, make, reduce: Reducer, *, forward: bool,
                 desc: str) -> tuple[dict, bool]:
        """A distributed extraction: every rank agrees whether the entry exists; if not, rank r computes views
        ``shard(n)`` as a part entry (resumable on its own), and once every part is complete rank 0 assembles
        them into the entry (the bytes copied once, checksums carried over) for every rank to load."""
        cache = self.cache
        if cache is None or not cache.enabled:
            raise ConfigError("a distributed run (torchrun / srun) hands features between its processes through "
                              "the feature cache, which --no-cache turns off",
                              hint="drop --no-cache and give every process the same --cache-dir on a shared disk")
        key, n = cache_key(parts), len(self.dataset)
        cache.clean_orphans()
        hit = cache.load(key)
        if all(group.gather(hit is not None, f"{desc}: cache lookup")):
            self.stats.entries.append(key[:16])
            cache.hits += 1
            return hit, False
        # in whole batches, so that every batch holds the views a single process would batch together (the
        # same features bit for bit, whatever a batched kernel does with its batch size)
        b_lo, b_hi = group.shard(-(-n // self.batch_size))
        lo, hi = min(n, b_lo * self.batch_size), min(n, b_hi * self.batch_size)
        part_parts = {**parts, "part": {"views": [lo, hi], "of": n}}
        part_info = {**info, "n_views": hi - lo, "part": f"views {lo}..{hi} of {n} (rank {group.rank})"}
        group.stage = f"{desc}: extracting views {lo}..{hi}"
        self._entry(part_parts, part_info, lambda w: self.run(w, make, reduce, forward=forward, desc=desc,
                                                                span=(lo, hi)))
        self.stats.entries[-1] = key[:16]   # the part goes away; the result names the entry it becomes
        part_keys = group.gather(cache_key(part_parts), f"{desc}: extraction")
        if group.is_main:
            group.stage = f"{desc}: assembling the cache entry"
            cache.assemble(key, parts, {**info, "n_views": n}, part_keys)
        group.sync(f"{desc}: assembling the cache entry")
        out = cache.load(key)
        if out is None:
            raise CacheError(f"feature cache entry {key[:16]} assembled by rank 0 cannot be read on rank {group.rank}",
                             hint="every process needs the same --cache-dir on a disk they all see")
        return out, True

    def _say_waiting(self) -> None:
        if self.progress:
            from .progress import console
            console.print(f"{self.desc}: waiting for another densebench process building the same features",
                          highlight=False)

    # --- one pass over the data ----------------------------------------------------------------------
    def run(self, writer: CacheWriter, make, reduce: Reducer, *, forward: bool, desc: str,
            span: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Views ``span`` (default: all; ``writer.start`` of them already done) through ``make`` (in workers),
        the encoder when ``forward``, and ``reduce`` into ``writer``; commits it, or keeps its complete views
        for a resume (on any error)."""
        lo, hi = span if span is not None else (0, len(self.dataset))
        start = lo + writer.start
        if forward:
            self.stats.views_reused += writer.start
        else:
            self.stats.masks_read += hi - start
        t0 = time.perf_counter()
        try:
            with progress_bar(desc, total=hi - lo, enabled=self.progress) as advance:
                if writer.start:
                    advance(writer.start)
                if start < hi:
                    self._pass(writer, _Items(hi, make, start), reduce, forward, advance)
            out = writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.stats.extraction_s += time.perf_counter() - t0
        return out

    def _pass(self, writer: CacheWriter, items: _Items, reduce: Reducer, forward: bool, advance) -> None:
        finish = getattr(self.view, "finish", None) if self.cuda else None   # on CPU the workers finish
        writer.reserve(self._bytes_per_view(items, reduce, forward, finish) * len(items))
        workers = min(self.num_workers, len(items) // VIEWS_PER_WORKER)
        device_side = self.cuda and forward   # a masks-only pass stays on the host
        loader = DataLoader(items, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                            pin_memory=device_side)
        batches = iter(loader)   # workers fork here, before the writer thread exists
        if forward:
            self.encoder.eval().to(self.device)
            if self.cuda:
                self.encoder.to(memory_format=torch.channels_last)
        sink = _Sink(writer, reduce, len(items), self.stats, device_side)
        group = distributed.current()
        polled = time.monotonic()
        try:   # on the extraction's GPU: events and streams are those of the current device
            with torch.cuda.device(self.device) if device_side else contextlib.nullcontext():
                for images, masks, indices in batches:
                    feats, timing = self._forward(images, finish) if forward else (None, None)
                    sink.put(feats, masks, indices, timing, release=images)
                    del images, masks, feats
                    advance(len(indices))
                    if group.enabled and time.monotonic() - polled > 2.0:   # another rank failed: stop now
                        polled = time.monotonic()
                        group.check_abort()
        finally:
            sink.close()

    def _forward(self, images: torch.Tensor, finish) -> tuple[torch.Tensor, tuple | None]:
        x = images.to(self.device, non_blocking=self.cuda)
        if finish is not None:
            x = finish(x)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[0].record()
        else:
            timing, t0 = None, time.perf_counter()
        dtype = precision.autocast_dtype(self.device.type)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            feats = self.encoder(x, layer=self.layer, norm=self.norm).float()
        if timing is not None:
            timing[1].record()
        else:
            self.stats.forward_s += time.perf_counter() - t0
        self.stats.images_forwarded += int(x.shape[0])
        return feats, timing

    def _bytes_per_view(self, items: _Items, reduce: Reducer, forward: bool, finish) -> int:
        """What one view stores, before the first forward: the reducer's output for the first view to do,
        with zero features of the encoder's grid in place of the forward (padded rows included)."""
        img, mask = items[0][:2]
        feats = None
        if forward:
            x = finish(img[None]) if finish is not None else img[None]
            p = self.encoder.patch_size
            feats = torch.zeros(1, x.shape[-2] // p, x.shape[-1] // p, int(self.encoder.embed_dim))
        with torch.inference_mode():
            out = reduce(feats, mask[None], torch.tensor([items.start]))
        return sum(_nbytes(rows) for name, rows in out.items() if name != KEEP)


def extract(encoder, dataset, view: View, *, key_parts: dict[str, Any] | None = None, cache: FeatureCache | None,
            device: str | torch.device = "cpu", batch_size: int = 16, num_workers: int = 0,
            reducer: Reducer | None = None, layer: int | None = None, norm: bool | None = None,
            desc: str = "extracting", progress: bool = True, stats: ExtractionStats | None = None,
            ) -> dict[str, np.ndarray]:
    """Run ``encoder`` over every view of ``dataset`` once and return the reduced arrays (memory-mapped when cached).

    Without ``reducer``: ``{"features": (N, h, w, D) float16, "masks": (N, H', W') uint8}``; for a standard
    segmentation split and a view of :mod:`densebench.transforms` these are two entries (image features,
    keyed without masks; masks, keyed without the encoder), each computed only when missing: masks in a
    cheap masks-only pass. With a ``reducer`` (or a dataset / view that cannot be split): one entry keyed
    by encoder, dataset manifest, view and reducer. ``key_parts`` adds to the keys (its ``view`` and
    ``reduce`` replace the view's and reducer's own descriptions in a single entry's key).

    With an enabled cache: a sound entry is returned without work; a damaged one is reported (one warning),
    discarded and rebuilt; an entry is built under its lock (a concurrent process waits, then loads it); an
    interrupted build is resumed from its last complete shard (``stats.views_reused``); an extraction the
    cache's disk cannot hold is refused before the first forward (:class:`CacheError`).
    """
    stats = stats if stats is not None else ExtractionStats()
    eng = _Engine(encoder=encoder, dataset=dataset, view=view, cache=cache, device=torch.device(device),
                  batch_size=int(batch_size), num_workers=int(num_workers), layer=layer, norm=norm, desc=desc,
                  progress=progress, stats=stats)
    key_parts = dict(key_parts or {})
    if reducer is None and splittable(dataset, view):
        return _extract_split(eng, {k: v for k, v in key_parts.items() if k not in ("view", "reduce")})
    if "view" not in key_parts:
        key_parts["view"] = view.describe()
    if "reduce" not in key_parts:
        key_parts["reduce"] = "full-f16" if reducer is None else reducer.describe()
    parts = {"encoder": eng.encoder_key(),
             "dataset": {"name": dataset.name, "split": dataset.split, "manifest": dataset.manifest_hash()},
             **key_parts}
    make = _WholeItem(dataset, view, finish_here=not eng.cuda)
    reduce = reducer if reducer is not None else default_reducer
    out, computed = eng.entry(parts, eng.info(), make, reduce, forward=True, desc=desc)
    stats.cache_misses += computed
    stats.cache_hits += not computed
    return out


def _extract_split(eng: _Engine, extra: dict) -> dict[str, np.ndarray]:
    """Full grids of a standard split: the masks entry (checked first: cheap, and it reports bad masks
    before any forward), then the image-features entry."""
    ds, view = eng.dataset, eng.view
    mask_parts = {"entry": "view-masks", "view": view.describe_mask(), **extra,
                  "dataset": {"name": ds.name, "split": ds.split, "manifest": ds.manifest_hash()}}
    kind = view.describe_mask().get("view", "?")
    masks, masks_computed = eng.entry(mask_parts, eng.info(model="(masks)", view=f"{kind}/masks"), _MaskPart(ds, view),
                                      _masks_only, forward=False, desc=f"{eng.desc} (masks)")
    feat_parts = {"entry": "image-features", "encoder": eng.encoder_key(),
                  "images": {"manifest": image_manifest(ds), "n": len(ds)}, "view": view.describe_image(),
                  "reduce": "full-f16", **extra}
    make = _ImagePart(ds, view, finish_here=not eng.cuda)
    feats, feats_computed = eng.entry(feat_parts, eng.info(), make, _features_only, forward=True, desc=eng.desc)
    computed = masks_computed or feats_computed
    eng.stats.cache_misses += computed
    eng.stats.cache_hits += not computed
    return {"features": feats["features"], "masks": masks["masks"]}
