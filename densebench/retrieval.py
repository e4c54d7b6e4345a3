"""Inner-product k-nearest-neighbour search over a memory bank of patch features.

The in-context protocol retrieves the k most similar memory patches for every query patch. The
reference uses approximate ScaNN or a faiss GPU flat index; densebench defaults to *exact* search so
that the score does not depend on an approximation (spec protocols.md §3.4, §8), behind one interface:

- ``torch``: chunked ``q @ keys.T`` + ``topk``; queries *and* keys are processed in blocks whose
  top-k lists are merged, so memory stays bounded whatever the bank size. fp32 on the CPU, fp16 keys
  and matmul on CUDA (half the memory; similarities carry ~1e-3 rounding).
- ``faiss``: ``IndexFlatIP`` (exact); ``GpuIndexFlatIP`` when faiss-gpu and CUDA are present.
- ``faiss-ivf``: IVF-Flat, approximate unless ``nprobe == nlist``; labelled as such in ``describe``.
- ``auto``: faiss flat when faiss imports, else torch; on CUDA torch fp16 unless faiss-gpu is present.

faiss is imported lazily, only when an index is built. Build indexes only after any DataLoader
workers have forked (or use the ``spawn`` start method): a faiss search in a child forked after the
parent ran an OpenMP region can hang on Linux (faiss #5206). faiss gets the same thread count as
torch (``faiss.omp_set_num_threads``) so the two do not oversubscribe the cores.

``Index.search`` returns torch tensors (similarities float32, indices int64) on the index's device,
sorted by decreasing similarity.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from . import precision
from .devices import resolve_device
from .errors import ConfigError, choices_message

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf")

# Score block (queries x keys) the torch backend materialises at once. On the CPU a 4M-entry block
# (16 MB) keeps the matmul output cache-friendly and was no slower than larger ones in
# bench/retrieval.py; on CUDA larger blocks (64M entries, 128 MB in fp16) keep the GPU busy.
DEFAULT_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
DEFAULT_KEY_CHUNK = {"cpu": 1 << 14, "cuda": 1 << 16}
# faiss GPU selection kernels cap k (faiss/gpu/utils/DeviceDefs.cuh).
FAISS_GPU_MAX_K = 2048


def _import_faiss():
    try:
        import faiss  # lazy: see the module docstring about fork and OpenMP
    except ImportError as exc:
        raise ConfigError("the faiss retrieval backend needs the faiss module, which is not installed",
                          hint="pip install faiss-cpu (or faiss-gpu for CUDA), "
                               "or use the torch retrieval backend") from exc
    return faiss


def faiss_available() -> bool:
    try:
        _import_faiss()
    except ConfigError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    faiss = _import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _sync_faiss_threads(faiss) -> int:
    n = torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    return n


def _to_numpy_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class Index(ABC):
    """Exact or approximate inner-product search; subclasses implement ``_search``."""

    backend = "base"

    def __init__(self, num_keys: int, dim: int, device: torch.device):
        self.num_keys = num_keys
        self.dim = dim
        self.device = device
        self.notes: list[str] = []
        self.requested_backend = self.backend

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k keys for each query: (sims (M, k) float32, idx (M, k) int64), best first.

        ``k`` larger than the bank is clamped to the bank size (with a warning and a note in
        ``describe``). An approximate index may return fewer than k hits: idx -1, sim -inf.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"number of neighbours must be a positive integer, got {k!r}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries have shape {tuple(queries.shape)}, but the memory bank holds "
                              f"{self.dim}-dimensional keys",
                              hint="queries and keys must come from the same encoder and layer")
        if k > self.num_keys:
            note = (f"k={k} neighbours requested but the memory bank holds {self.num_keys} keys; "
                    f"k clamped to {self.num_keys}")
            if note not in self.notes:
                self.notes.append(note)
            warnings.warn(note, stacklevel=2)
            k = self.num_keys
        if queries.shape[0] == 0:
            return (torch.empty((0, k), dtype=torch.float32, device=self.device),
                    torch.empty((0, k), dtype=torch.int64, device=self.device))
        return self._search(queries, int(k))

    @abstractmethod
    def _search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Search with a validated, already clamped ``k`` and at least one query."""

    def describe(self) -> dict[str, Any]:
        """What the result record needs to say how retrieval was done."""
        return {"backend": self.backend, "requested_backend": self.requested_backend, "exact": True,
                "device": str(self.device), "num_keys": self.num_keys, "dim": self.dim,
                "threads": torch.get_num_threads(), "notes": list(self.notes)}


class TorchIndex(Index):
    """Exact search by blocked matmul + top-k, merging per-key-block top-k lists."""

    backend = "torch"

    def __init__(self, keys: torch.Tensor, device: torch.device, fp16: bool,
                 query_chunk: int | None = None, key_chunk: int | None = None):
        super().__init__(keys.shape[0], keys.shape[1], device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.keys = keys.to(device=device, dtype=self.dtype).contiguous()
        self.key_chunk = int(key_chunk or min(self.num_keys, DEFAULT_KEY_CHUNK[device.type]))
        self.query_chunk = int(query_chunk or max(1, DEFAULT_BLOCK_ELEMENTS[device.type] // self.key_chunk))
        if self.key_chunk < 1 or self.query_chunk < 1:
            raise ConfigError(f"chunk sizes must be positive, got query_chunk={query_chunk}, "
                              f"key_chunk={key_chunk}")

    def _search(self, queries, k):
        q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
        q = q.to(device=self.device, dtype=self.dtype)
        m = q.shape[0]
        sims = torch.empty((m, k), dtype=torch.float32, device=self.device)
        idx = torch.empty((m, k), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            for q0 in range(0, m, self.query_chunk):
                qb = q[q0:q0 + self.query_chunk]
                best_s = best_i = None
                for k0 in range(0, self.num_keys, self.key_chunk):
                    scores = qb @ self.keys[k0:k0 + self.key_chunk].T
                    s, i = scores.topk(min(k, scores.shape[1]), dim=1)
                    i += k0
                    if best_s is None:
                        best_s, best_i = s, i
                    else:
                        s = torch.cat([best_s, s], dim=1)
                        i = torch.cat([best_i, i], dim=1)
                        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
                        best_i = i.gather(1, pos)
                sims[q0:q0 + qb.shape[0]] = best_s.float()
                idx[q0:q0 + qb.shape[0]] = best_i
        return sims, idx

    def describe(self):
        d = super().describe()
        d.update(dtype=str(self.dtype).replace("torch.", ""), query_chunk=self.query_chunk,
                 key_chunk=self.key_chunk)
        return d


class FaissIndex(Index):
    """faiss flat (exact) or IVF-Flat (approximate unless every list is probed) inner-product index."""

    def __init__(self, keys: np.ndarray, device: torch.device, fp16: bool, ivf: bool,
                 nlist: int | None, nprobe: int | None):
        super().__init__(keys.shape[0], keys.shape[1], device)
        faiss = _import_faiss()
        self._faiss = faiss
        self.threads = _sync_faiss_threads(faiss)
        self.fp16 = fp16
        self.backend = "faiss-ivf" if ivf else "faiss"
        self.nlist = self.nprobe = None
        self._gpu_res = None
        if device.type == "cuda":
            if not faiss_gpu_available():
                raise ConfigError("retrieval on CUDA with faiss needs faiss-gpu, but the installed faiss "
                                  "has no GPU support",
                                  hint="pip uninstall faiss-cpu && pip install faiss-gpu, or use the torch "
                                       "retrieval backend (exact, fp16 on CUDA)")
            self._gpu_res = faiss.StandardGpuResources()
        elif fp16:
            raise ConfigError("fp16 faiss search is only available on CUDA (faiss-gpu)",
                              hint="drop the fp16 option on the CPU")
        d = self.dim
        if ivf:
            self.nlist, self.nprobe = _ivf_params(self.num_keys, nlist, nprobe)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            # Few points per list only trigger a warning; the user chose nlist knowingly.
            index.cp.min_points_per_centroid = 1
            index.train(keys)
            index.add(keys)
            index.nprobe = self.nprobe
            self._quantizer = quantizer
            if self._gpu_res is not None:
                co = faiss.GpuClonerOptions()
                co.useFloat16 = fp16
                index = faiss.index_cpu_to_gpu(self._gpu_res, device.index or 0, index, co)
                index.nprobe = self.nprobe
        elif self._gpu_res is not None:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = device.index or 0
            cfg.useFloat16 = fp16
            index = faiss.GpuIndexFlatIP(self._gpu_res, d, cfg)
            index.add(keys)
        else:
            index = faiss.IndexFlatIP(d)
            index.add(keys)
        self.index = index

    def _search(self, queries, k):
        if self._gpu_res is not None and k > FAISS_GPU_MAX_K:
            raise ConfigError(f"faiss-gpu supports at most k={FAISS_GPU_MAX_K} neighbours, got k={k}",
                              hint="use fewer neighbours or the torch backend")
        self.threads = _sync_faiss_threads(self._faiss)
        dist, ids = self.index.search(_to_numpy_f32(queries), k)
        sims = torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32))
        idx = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        missing = idx < 0
        if bool(missing.any()):
            sims[missing] = -math.inf
        return sims.to(self.device), idx.to(self.device)

    def describe(self):
        d = super().describe()
        d.update(dtype="float16" if self.fp16 else "float32", threads=self.threads,
                 faiss_version=getattr(self._faiss, "__version__", "unknown"), gpu=self._gpu_res is not None)
        if self.backend == "faiss-ivf":
            d.update(exact=self.nprobe >= self.nlist, nlist=self.nlist, nprobe=self.nprobe)
        return d


def _ivf_params(n: int, nlist: int | None, nprobe: int | None) -> tuple[int, int]:
    """Defaults: nlist ~ 4 sqrt(N) with >= 39 training points per list (faiss' own minimum), and
    nprobe = nlist/16 (the 32-of-512 leaves ratio of the reference ScaNN setting)."""
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    if not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= n:
        raise ConfigError(f"IVF nlist must be an integer in [1, {n}] (the number of keys), got {nlist!r}")
    if nprobe is None:
        nprobe = max(1, math.ceil(nlist / 16))
    if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ConfigError(f"IVF nprobe must be an integer in [1, nlist={nlist}], got {nprobe!r}",
                          hint="nprobe = nlist makes IVF exact")
    return int(nlist), int(nprobe)


def build_index(keys: torch.Tensor | np.ndarray, backend: str = "auto", device: str | torch.device = "cpu",
                nlist: int | None = None, nprobe: int | None = None, *, fp16: bool | None = None,
                query_chunk: int | None = None, key_chunk: int | None = None) -> Index:
    """An inner-product index over ``keys`` (N, D); see the module docstring for the backends.

    ``fp16`` defaults to True for the torch backend on CUDA and False elsewhere (faiss-gpu stores
    fp32 unless asked, as the reference does). ``nlist``/``nprobe`` apply to ``faiss-ivf`` only;
    ``query_chunk``/``key_chunk`` to ``torch`` only (defaults bound the score block: 4M entries on
    the CPU, 64M on CUDA).
    Call this after DataLoader workers have forked (faiss/OpenMP fork hang).
    """
    if backend not in BACKENDS:
        raise ConfigError(choices_message("retrieval backend", backend, BACKENDS))
    if keys.ndim != 2:
        raise ConfigError(f"memory-bank keys must be a 2-D (N, D) array, got shape {tuple(keys.shape)}")
    if keys.shape[0] == 0:
        raise ConfigError("the memory bank is empty (0 keys), so there is nothing to retrieve from",
                          hint="check the training split / fraction list and the memory size")
    if (nlist is not None or nprobe is not None) and backend != "faiss-ivf":
        raise ConfigError(f"nlist/nprobe only apply to the faiss-ivf backend, not {backend!r}")
    dev = torch.device(resolve_device(str(device)))
    requested = backend
    if backend == "auto":
        if dev.type == "cuda":
            backend = "faiss" if faiss_gpu_available() else "torch"
        else:
            backend = "faiss" if faiss_available() else "torch"
    if backend == "torch":
        use_fp16 = precision.fp16_search(dev.type) if fp16 is None else bool(fp16)
        if use_fp16 and dev.type != "cuda":
            raise ConfigError("fp16 retrieval with the torch backend needs CUDA",
                              hint="drop the fp16 option on the CPU")
        t = keys if isinstance(keys, torch.Tensor) else torch.from_numpy(np.asarray(keys))
        if not t.is_floating_point():
            raise ConfigError(f"memory-bank keys must be floating point, got {t.dtype}")
        index: Index = TorchIndex(t.detach(), dev, use_fp16, query_chunk=query_chunk, key_chunk=key_chunk)
    else:
        if query_chunk is not None or key_chunk is not None:
            raise ConfigError(f"query_chunk/key_chunk only apply to the torch backend, not {backend!r}")
        index = FaissIndex(_to_numpy_f32(keys), dev, bool(fp16), ivf=backend == "faiss-ivf", nlist=nlist,
                           nprobe=nprobe)
    index.requested_backend = requested
    return index
