"""Batched feature extraction with an on-disk, memory-mapped cache.

The backbone forward is the only cost that must be paid (DESIGN principle 2): every image view is
pushed through the encoder once, reduced to what a protocol keeps (full patch grids, or a sampled
memory bank), and stored as raw little-endian arrays that later runs memory-map. The cache key is
the sha256 of everything that determines the stored bytes: encoder fingerprint and feature settings,
dataset manifest hash and split, the view (transform) description, the reducer and a format version.
A second run with the same key performs zero backbone forwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .progress import progress_bar

CACHE_FORMAT = 1

#: view(index, image, mask) -> (image tensor (3, H, W) normalised, mask tensor (H', W') uint8/long)
View = Callable[[int, Any, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
#: reduce(features (B, h, w, D) float on device, masks (B, H', W'), indices (B,)) -> {name: np.ndarray rows}
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, np.ndarray]]


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    """A directory of cache entries ``<root>/features/<key[:2]>/<key>/{meta.json, <array>.bin}``.

    Entries are written into a temporary directory and renamed into place when complete, so an
    interrupted extraction never leaves a half entry that a later run would trust.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _dir(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "features" / key[:2] / key

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        if not self.enabled:
            return None
        d = self._dir(key)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        out: dict[str, np.ndarray] = {}
        for name, info in meta["arrays"].items():
            shape = tuple(info["shape"])
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype=info["dtype"])
            else:
                out[name] = np.memmap(d / f"{name}.bin", dtype=info["dtype"], mode="r", shape=shape)
        return out

    def writer(self, key: str, parts: dict[str, Any]) -> CacheWriter:
        return CacheWriter(self, key, parts)

    def size_bytes(self) -> int:
        if not self.enabled or not self.root.exists():
            return 0
        return sum(f.stat().st_size for f in self.root.rglob("*.bin"))


class CacheWriter:
    """Appends row blocks per array name; ``commit()`` publishes the entry atomically."""

    def __init__(self, cache: FeatureCache | None, key: str, parts: dict[str, Any]):
        self.cache = cache
        self.key = key
        self.parts = parts
        self.arrays: dict[str, dict] = {}
        self._mem: dict[str, list[np.ndarray]] = {}
        self.tmp: Path | None = None
        if cache is not None and cache.enabled:
            final = cache._dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=final.parent))
        self._files: dict[str, Any] = {}

    def append(self, name: str, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        info = self.arrays.get(name)
        if info is None:
            info = self.arrays[name] = {"dtype": rows.dtype.str, "shape": [0, *rows.shape[1:]]}
        elif list(rows.shape[1:]) != info["shape"][1:] or rows.dtype.str != info["dtype"]:
            raise ValueError(f"cache array {name}: rows {rows.dtype}{rows.shape} do not match {info}")
        info["shape"][0] += rows.shape[0]
        if self.tmp is None:
            self._mem.setdefault(name, []).append(rows)
        else:
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = open(self.tmp / f"{name}.bin", "wb")
            f.write(rows.tobytes())

    def commit(self) -> dict[str, np.ndarray]:
        if self.tmp is None:
            return {name: np.concatenate(parts) for name, parts in self._mem.items()}
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {"arrays": self.arrays, "key_parts": self.parts, "created": time.time()}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        final = self.cache._dir(self.key)
        if final.exists():  # a concurrent run finished first: keep its entry
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, final)
        return self.cache.load(self.key)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _ViewDataset(Dataset):
    def __init__(self, dataset, view: View):
        self.dataset, self.view = dataset, view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
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

    def add(self, other: ExtractionStats) -> None:
        self.forward_s += other.forward_s
        self.extraction_s += other.extraction_s
        self.images_forwarded += other.images_forwarded
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.entries += other.entries

    def as_dict(self) -> dict[str, Any]:
        return {"forward_s": round(self.forward_s, 4), "extraction_s": round(self.extraction_s, 4),
                "images_forwarded": self.images_forwarded, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "entries": self.entries}


def extract(encoder, dataset, view: View, *, key_parts: dict[str, Any], cache: FeatureCache | None,
            device: str | torch.device = "cpu", batch_size: int = 16, num_workers: int = 0,
            reducer: Reducer = default_reducer, layer: int | None = None, norm: bool | None = None,
            desc: str = "extracting", progress: bool = True, stats: ExtractionStats | None = None,
            ) -> dict[str, np.ndarray]:
    """Run ``encoder`` over every view of ``dataset`` once and return the reduced arrays (memory-mapped when cached).

    ``key_parts`` must describe the view and the reducer completely; the encoder's feature key and
    the dataset manifest are added here.
    """
    stats = stats if stats is not None else ExtractionStats()
    parts = {
        "encoder": encoder.feature_key(layer, norm),
        "dataset": {"name": dataset.name, "split": dataset.split, "manifest": dataset.manifest_hash()},
        **key_parts,
    }
    key = cache_key(parts)
    stats.entries.append(key[:16])
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            cache.hits += 1
            stats.cache_hits += 1
            return hit
        cache.misses += 1
    stats.cache_misses += 1

    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = DataLoader(_ViewDataset(dataset, view), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=cuda, persistent_workers=False)
    encoder.eval().to(device)
    if cuda:
        encoder.to(memory_format=torch.channels_last)
    writer = CacheWriter(cache, key, parts)
    t0 = time.perf_counter()
    try:
        with progress_bar(desc, total=len(dataset), enabled=progress) as advance:
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
                advance(images.shape[0])
        out = writer.commit()
    except BaseException:
        writer.abort()
        raise
    stats.extraction_s += time.perf_counter() - t0
    return out
