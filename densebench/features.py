"""Batched feature extraction with an on-disk, memory-mapped cache.

The backbone forward is the only cost that must be paid (DESIGN principle 2): every image view is
pushed through the encoder once, reduced to what a protocol keeps (full patch grids, or a sampled
memory bank), and stored as raw little-endian arrays that later runs memory-map. The cache key is
the sha256 of everything that determines the stored bytes: encoder fingerprint and feature settings,
dataset manifest hash and split, the view (transform) description, the reducer and a format version.
A second run with the same key performs zero backbone forwards.

The cache itself (checksums, resumable shards, per-entry locks, housekeeping) lives in
:mod:`densebench.cache`; its names are re-exported here. docs/cache.md describes the guarantees.
"""

from __future__ import annotations

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
from .progress import progress_bar

#: view(index, image, mask) -> (image tensor (3, H, W) normalised, mask tensor (H', W') uint8/long)
View = Callable[[int, Any, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
#: reduce(features (B, h, w, D) float on device, masks (B, H', W'), indices (B,)) -> {name: np.ndarray rows}
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, np.ndarray]]


class _ViewDataset(Dataset):
    """Views ``start..len(dataset)-1`` of ``dataset`` (``start`` > 0 when resuming), with their dataset index."""

    def __init__(self, dataset, view: View, start: int = 0):
        self.dataset, self.view, self.start = dataset, view, int(start)

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        i = self.start + i
        # Views are many small tensor ops: one thread is 10-50x faster than a thread pool that has to wake
        # up (or fight another process) for every op. DataLoader workers already run single-threaded.
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            _, image, mask = self.dataset[i]
            img, m = self.view(i, image, mask)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return img, m, i


def default_reducer(features: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor) -> dict[str, np.ndarray]:
    """Keep full patch grids as float16 and the view's mask as uint8."""
    return {"features": features.to(torch.float16).cpu().numpy(),
            "masks": masks.to(torch.uint8).cpu().numpy()}


@dataclass
class ExtractionStats:
    forward_s: float = 0.0      # time inside encoder calls (the unavoidable cost)
    extraction_s: float = 0.0   # whole extraction loop, data loading included
    images_forwarded: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    entries: list[str] = field(default_factory=list)
    views_reused: int = 0       # views taken from complete shards of an interrupted run (not forwarded again)
    entries_rebuilt: int = 0    # damaged entries discarded (one warning each) and extracted again
    lock_wait_s: float = 0.0    # time spent waiting for another process extracting the same entry

    def as_dict(self) -> dict[str, Any]:
        return {"forward_s": round(self.forward_s, 4), "extraction_s": round(self.extraction_s, 4),
                "images_forwarded": self.images_forwarded, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "entries": self.entries, "views_reused": self.views_reused,
                "entries_rebuilt": self.entries_rebuilt, "lock_wait_s": round(self.lock_wait_s, 4)}


def extract(encoder, dataset, view: View, *, key_parts: dict[str, Any], cache: FeatureCache | None,
            device: str | torch.device = "cpu", batch_size: int = 16, num_workers: int = 0,
            reducer: Reducer = default_reducer, layer: int | None = None, norm: bool | None = None,
            desc: str = "extracting", progress: bool = True, stats: ExtractionStats | None = None,
            ) -> dict[str, np.ndarray]:
    """Run ``encoder`` over every view of ``dataset`` once and return the reduced arrays (memory-mapped when cached).

    ``key_parts`` must describe the view and the reducer completely; the encoder's feature key and
    the dataset manifest are added here. With an enabled cache: a sound entry is returned without a
    forward; a damaged one is reported (one warning), discarded and rebuilt; the entry is built under
    its lock (a concurrent process waits, then loads it); an interrupted earlier extraction of the same
    entry is resumed from its last complete shard (``stats.views_reused``).
    """
    stats = stats if stats is not None else ExtractionStats()
    parts = {
        "encoder": encoder.feature_key(layer, norm),
        "dataset": {"name": dataset.name, "split": dataset.split, "manifest": dataset.manifest_hash()},
        **key_parts,
    }
    key = cache_key(parts)
    stats.entries.append(key[:16])
    if cache is None or not cache.enabled:
        if cache is not None:
            cache.misses += 1
        stats.cache_misses += 1
        return _extract(encoder, dataset, view, CacheWriter(None, key, parts), device=device,
                        batch_size=batch_size, num_workers=num_workers, reducer=reducer, layer=layer, norm=norm,
                        desc=desc, progress=progress, stats=stats)

    cache.clean_orphans()
    discarded = cache.discarded
    hit = cache.load(key)
    if hit is None:
        def _say_waiting() -> None:
            if progress:
                from .progress import console
                console.print(f"{desc}: waiting for another densebench process building the same features",
                              highlight=False)

        stats.lock_wait_s += cache.acquire(key, on_wait=_say_waiting)
        try:
            hit = cache.load(key)   # built by another process while we waited?
            if hit is None:
                cache.misses += 1
                stats.cache_misses += 1
                stats.entries_rebuilt += cache.discarded - discarded
                info = {"model": getattr(encoder, "name", None), "dataset": getattr(dataset, "name", None),
                        "split": getattr(dataset, "split", None), "desc": desc, "n_views": len(dataset)}
                writer = CacheWriter(cache, key, parts, info)
                if writer.start:
                    stats.views_reused += writer.start
                return _extract(encoder, dataset, view, writer, device=device, batch_size=batch_size,
                                num_workers=num_workers, reducer=reducer, layer=layer, norm=norm, desc=desc,
                                progress=progress, stats=stats)
        finally:
            cache.release(key)
    cache.hits += 1
    stats.cache_hits += 1
    stats.entries_rebuilt += cache.discarded - discarded
    return hit


def _extract(encoder, dataset, view: View, writer: CacheWriter, *, device, batch_size: int, num_workers: int,
             reducer: Reducer, layer, norm, desc: str, progress: bool, stats: ExtractionStats) -> dict[str, np.ndarray]:
    """The forward loop over views ``writer.start..``, feeding ``writer``; commits it (or aborts on any error)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    start = writer.start
    checked = False
    t0 = time.perf_counter()
    try:
        with progress_bar(desc, total=len(dataset), enabled=progress) as advance:
            if start:
                advance(start)
            if start < len(dataset):
                loader = DataLoader(_ViewDataset(dataset, view, start), batch_size=batch_size, shuffle=False,
                                    num_workers=num_workers, pin_memory=cuda, persistent_workers=False)
                encoder.eval().to(device)
                if cuda:
                    encoder.to(memory_format=torch.channels_last)
                for images, masks, indices in loader:
                    images = images.to(device, non_blocking=cuda)
                    if cuda:
                        images = images.contiguous(memory_format=torch.channels_last)
                    tf = time.perf_counter()
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                        feats = encoder(images, layer=layer, norm=norm).float()
                    if cuda:
                        torch.cuda.synchronize(device)
                    stats.forward_s += time.perf_counter() - tf
                    stats.images_forwarded += images.shape[0]
                    with torch.inference_mode():
                        for name, rows in reducer(feats, masks.to(device), indices).items():
                            writer.append(name, rows)
                    writer.end_batch(images.shape[0])
                    advance(images.shape[0])
                    if not checked:   # one batch tells the bytes per view: refuse now rather than at 95 %
                        checked = True
                        writer.check_space(len(dataset))
        out = writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats.extraction_s += time.perf_counter() - t0
    return out
