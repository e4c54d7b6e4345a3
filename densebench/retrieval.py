"""Inner-product k-nearest-neighbour search over a memory bank of patch features.

The in-context protocol retrieves the k most similar memory patches for every query patch. The
reference uses approximate ScaNN or a faiss GPU flat index; densebench defaults to *exact* search so
that the score does not depend on an approximation (spec protocols.md §3.4, §8), behind one interface:

- ``torch``: blocked ``q @ keys.T`` + ``topk``. A search call walks the bank once, block by block
  (``key_chunk`` keys), and multiplies each bank block with every block of ``query_chunk`` queries,
  merging per-block top-k lists (a similarity does not depend on the blocking: the last query block is
  padded to at least ``MIN_QUERY_CHUNK`` rows, and the in-context protocol pads every call to whole
  blocks). On the CPU the keys stay where they are: the cache's memory-mapped float16 arrays are searched
  in place, one block converted to float32 at a time (no copy of the bank). On CUDA they are streamed,
  block by block, into one preallocated device tensor: float16 (``--precision auto``, half the memory;
  similarities carry ~1e-3 rounding) or float32.
- ``faiss``: ``IndexFlatIP`` (exact, float32 storage: twice the float16 bank in host memory);
  ``GpuIndexFlatIP`` when faiss-gpu and CUDA are present, float16 storage unless ``--precision fp32``.
  Keys are added in blocks.
- ``faiss-ivf``: IVF-Flat, approximate unless ``nprobe == nlist``; labelled as such in ``describe``.
- ``auto``: ``torch`` on every device (it reads the bank in place on the CPU, keeps it in float16 on a GPU,
  and returns the canonical tie order the sharded in-context search relies on); faiss when asked for.

The torch backend returns the **canonical** top-k: by decreasing similarity, equal similarities by
increasing key index (the first k keys in that order). So a search split into other blocks, or over a bank
sharded across processes and merged with :func:`merge_topk`, returns the same lists. faiss's lists are put
in that order too, but which of several keys tied at the k-th place faiss keeps is its own choice.

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
from collections.abc import Sequence
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
# Fewer query rows than this take another BLAS path (MKL's small-M kernels round differently).
MIN_QUERY_CHUNK = 16
# Host bytes per block when keys are streamed to a device or added to faiss.
STREAM_BYTES = 64 << 20
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


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


class StackedRows:
    """Several (n_i, ...) arrays read as their row concatenation, without concatenating them.

    The memory bank is one cache entry per augmentation epoch: its arrays stay memory-mapped and are read a
    block of rows at a time (:meth:`block`), gathered by index (``rows[idx]``) or streamed into one device
    tensor (:meth:`to`). :meth:`shard` restricts it to rows ``[lo, hi)`` (a process's share of the bank);
    indices are then relative to ``lo``. Parts are numpy arrays (memory maps included) or torch tensors.
    """

    def __init__(self, parts: Sequence[np.ndarray | torch.Tensor], lo: int = 0, hi: int | None = None):
        self.parts = [p.detach() if isinstance(p, torch.Tensor) else p for p in parts]
        if not self.parts:
            raise ConfigError("the memory bank has no arrays")
        tails = {tuple(p.shape[1:]) for p in self.parts}
        if len(tails) != 1:
            raise ConfigError(f"memory-bank arrays disagree on their row shape: {sorted(tails)}")
        self._starts = [0]
        for p in self.parts:
            self._starts.append(self._starts[-1] + int(p.shape[0]))
        hi = self._starts[-1] if hi is None else int(hi)
        if not 0 <= lo <= hi <= self._starts[-1]:
            raise ConfigError(f"rows [{lo}, {hi}) are outside the {self._starts[-1]} rows of the bank")
        self.lo, self.hi, self.tail = int(lo), hi, tails.pop()
        first = self.parts[0]
        self.dtype = first.dtype if isinstance(first, torch.Tensor) else torch.from_numpy(
            np.zeros(0, dtype=first.dtype)).dtype

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.tail)

    @property
    def ndim(self) -> int:
        return 1 + len(self.tail)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.tail, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def shard(self, lo: int, hi: int) -> StackedRows:
        """Rows ``[lo, hi)`` of this one (no copy)."""
        return StackedRows(self.parts, self.lo + lo, self.lo + hi)

    def _pieces(self, a: int, b: int):
        for j, p in enumerate(self.parts):
            lo, hi = max(a, self._starts[j]), min(b, self._starts[j + 1])
            if lo < hi:
                yield p, lo - self._starts[j], hi - self._starts[j]

    def block(self, a: int, b: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` as a tensor of ``dtype`` (default: as stored): a view of a tensor part when nothing
        needs converting, else a copy of those rows only."""
        dtype = dtype or self.dtype
        out = []
        for p, lo, hi in self._pieces(self.lo + a, self.lo + b):
            if isinstance(p, torch.Tensor):
                out.append(p[lo:hi].to(dtype))
            else:
                out.append(torch.from_numpy(np.array(p[lo:hi], dtype=_numpy_dtype(dtype))))
        if not out:
            return torch.empty((0, *self.tail), dtype=dtype)
        return out[0] if len(out) == 1 else torch.cat(out)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows at ``idx`` (an integer tensor of any shape, relative to this slice), on ``idx``'s device."""
        flat = idx.reshape(-1).cpu().numpy().astype(np.int64) + self.lo
        out = np.empty((flat.size, *self.tail), dtype=_numpy_dtype(self.dtype))
        for j, p in enumerate(self.parts):
            sel = np.flatnonzero((flat >= self._starts[j]) & (flat < self._starts[j + 1]))
            if sel.size:
                rows = flat[sel] - self._starts[j]
                out[sel] = p[torch.from_numpy(rows)].cpu().numpy() if isinstance(p, torch.Tensor) else p[rows]
        return torch.from_numpy(out).view(*idx.shape, *self.tail).to(idx.device)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One preallocated tensor on ``device``, filled block by block: the host holds one block at a time."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=device)
        step = max(1, STREAM_BYTES // max(1, self.row_bytes))
        for a in range(0, len(self), step):
            b = min(len(self), a + step)
            out[a:b].copy_(self.block(a, b))
        return out


def as_rows(keys: torch.Tensor | np.ndarray | StackedRows) -> StackedRows:
    return keys if isinstance(keys, StackedRows) else StackedRows([keys])


# ---------------------------------------------------------------------------------------------------
# The canonical top-k: decreasing similarity, equal similarities by increasing key index

def topk_order(sims: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (Q, ≤k) of each row's canonical top-k among candidate lists ``sims``/``idx`` (Q, m), in order.

    Candidates padded with similarity -inf (index -1) come last. Any split of the keys into blocks or shards
    whose candidate lists each hold that part's canonical top-k gives the same answer."""
    by_index = idx.argsort(dim=1, stable=True)
    by_sim = sims.gather(1, by_index).argsort(dim=1, descending=True, stable=True)[:, :k]
    return by_index.gather(1, by_sim)


def merge_topk(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical top-k of candidate lists (Q, m): (sims, idx) of width min(k, m), best first."""
    pos = topk_order(sims, idx, k)
    return sims.gather(1, pos), idx.gather(1, pos)


def block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's canonical top-k candidates of a (Q, n) score block: (sims float32, column indices), in no
    particular order. ``topk`` alone may pick any of several keys tied at the k-th value; rows where such a
    tie straddles the boundary are redone exactly (lowest indices first)."""
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        s, i = scores, torch.arange(k, device=scores.device).expand(scores.shape[0], k).clone()
    else:
        s, i = scores.topk(k + 1, dim=1)     # the (k+1)-th equal to the k-th: a tie straddles the boundary
        over = s[:, k] == s[:, k - 1]
        s, i = s[:, :k].contiguous(), i[:, :k].contiguous()
        if bool(over.any()):
            rows = over.nonzero()[:, 0]
            sub, b = scores[rows], s[rows, k - 1:]
            above, tie = sub > b, sub == b
            take = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
            cols = take.nonzero()[:, 1].view(-1, k)
            s[rows], i[rows] = sub.gather(1, cols), cols
    return s.float(), i


def choose_backend(requested: str, device_type: str) -> tuple[str, str]:
    """The backend ``requested`` resolves to on ``device_type``, and why (recorded as ``auto_choice``).

    ``auto`` is the torch backend everywhere: on CUDA its float16 keys take half the memory of faiss-gpu's
    default float32 index (and need no faiss-gpu); on the CPU it searches the cache's memory-mapped float16
    bank in place, where faiss would hold a float32 copy (twice the bank); and its canonical tie order lets a
    bank sharded across processes merge exactly. It was as fast as faiss IndexFlatIP in bench/retrieval.py."""
    if requested != "auto":
        return requested, "requested"
    if device_type == "cuda":
        return "torch", "auto: keys in one device tensor (float16 unless --precision fp32), streamed from the cache"
    return "torch", "auto: the memory-mapped float16 bank searched in place, a block at a time"


class Index(ABC):
    """Exact or approximate inner-product search; subclasses implement ``_search``."""

    backend = "base"

    def __init__(self, num_keys: int, dim: int, device: torch.device):
        self.num_keys = num_keys
        self.dim = dim
        self.device = device
        self.notes: list[str] = []
        self.requested_backend = self.backend
        self.auto_choice = "requested"

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
        return {"backend": self.backend, "requested_backend": self.requested_backend,
                "auto_choice": self.auto_choice, "exact": True, "device": str(self.device),
                "num_keys": self.num_keys, "dim": self.dim, "threads": torch.get_num_threads(),
                "notes": list(self.notes)}


class TorchIndex(Index):
    """Exact search by blocked matmul + top-k over the bank where it lies (see the module docstring)."""

    backend = "torch"

    def __init__(self, keys: torch.Tensor | np.ndarray | StackedRows, device: torch.device, fp16: bool,
                 query_chunk: int | None = None, key_chunk: int | None = None):
        rows = as_rows(keys)
        super().__init__(len(rows), rows.shape[1], device)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.key_chunk = int(key_chunk or min(self.num_keys, DEFAULT_KEY_CHUNK[device.type]))
        self.query_chunk = int(query_chunk or max(1, DEFAULT_BLOCK_ELEMENTS[device.type] // self.key_chunk))
        if self.key_chunk < 1 or self.query_chunk < 1:
            raise ConfigError(f"chunk sizes must be positive, got query_chunk={query_chunk}, "
                              f"key_chunk={key_chunk}")
        if device.type == "cpu":   # searched in place: a block converted at a time (a view when already fp32)
            self._rows, self.keys = rows, None
            self.storage = "in place" if rows.dtype == self.dtype else \
                f"in place, {str(rows.dtype).replace('torch.', '')} blocks converted"
        else:                      # one preallocated device tensor, filled block by block
            self._rows, self.keys = None, rows.to(device, self.dtype)
            self.storage = "device tensor"

    def _key_block(self, a: int, b: int) -> torch.Tensor:
        return self.keys[a:b] if self._rows is None else self._rows.block(a, b, self.dtype)

    def _search(self, queries, k):
        q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
        q = q.to(device=self.device, dtype=self.dtype)
        m, qc = q.shape[0], self.query_chunk
        n_blocks = -(-m // qc)
        short = MIN_QUERY_CHUNK - (m - (n_blocks - 1) * qc)
        if short > 0:   # a last block of a few rows would take BLAS's small-matrix path (other rounding)
            q = torch.cat([q, q[-1:].expand(short, -1)])   # copies of a real row: a zero row ties everywhere
        best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_blocks
        with torch.inference_mode():
            for k0 in range(0, self.num_keys, self.key_chunk):
                kt = self._key_block(k0, min(self.num_keys, k0 + self.key_chunk)).T
                for j in range(n_blocks):
                    s, i = block_topk(q[j * qc:(j + 1) * qc if j + 1 < n_blocks else None] @ kt, k)
                    i += k0
                    if best[j] is not None:
                        s, i = torch.cat([best[j][0], s], dim=1), torch.cat([best[j][1], i], dim=1)
                    best[j] = merge_topk(s, i, k)
            sims = torch.cat([b[0] for b in best])[:m]
            idx = torch.cat([b[1] for b in best])[:m]
        return sims, idx

    def describe(self):
        d = super().describe()
        d.update(dtype=str(self.dtype).replace("torch.", ""), storage=self.storage, query_chunk=self.query_chunk,
                 key_chunk=self.key_chunk)
        return d


class FaissIndex(Index):
    """faiss flat (exact) or IVF-Flat (approximate unless every list is probed) inner-product index."""

    def __init__(self, keys: torch.Tensor | np.ndarray | StackedRows, device: torch.device, fp16: bool, ivf: bool,
                 nlist: int | None, nprobe: int | None):
        rows = as_rows(keys)
        super().__init__(len(rows), rows.shape[1], device)
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
            index.train(_to_numpy_f32(rows.block(0, self.num_keys, torch.float32)))
            self._add(index, rows)
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
            cfg.useFloat16 = fp16   # float16 storage: half the memory of faiss-gpu's float32 default
            index = faiss.GpuIndexFlatIP(self._gpu_res, d, cfg)
            self._add(index, rows)
        else:
            index = faiss.IndexFlatIP(d)
            self._add(index, rows)
        self.index = index

    @staticmethod
    def _add(index, rows: StackedRows) -> None:
        """Add the keys a block at a time (host memory: the index's own storage plus one float32 block)."""
        step = max(1, STREAM_BYTES // (4 * rows.shape[1]))
        for a in range(0, len(rows), step):
            index.add(_to_numpy_f32(rows.block(a, min(len(rows), a + step), torch.float32)))

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
        sims, idx = merge_topk(sims, idx, k)   # equal similarities in index order, as the torch backend
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


def build_index(keys: torch.Tensor | np.ndarray | StackedRows, backend: str = "auto",
                device: str | torch.device = "cpu", nlist: int | None = None, nprobe: int | None = None, *,
                fp16: bool | None = None, query_chunk: int | None = None, key_chunk: int | None = None) -> Index:
    """An inner-product index over ``keys`` (N, D): an array, a tensor, or the :class:`StackedRows` of a memory
    bank (never concatenated); see the module docstring for the backends.

    ``fp16`` (float16 keys) defaults to ``--precision``'s choice: True on CUDA under ``auto`` / fp16 / bf16
    (torch and faiss-gpu alike), False on the CPU. ``nlist``/``nprobe`` apply to ``faiss-ivf`` only;
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
    backend, why = choose_backend(backend, dev.type)
    use_fp16 = precision.fp16_search(dev.type) if fp16 is None else bool(fp16)
    rows = as_rows(keys)
    if backend == "torch":
        if use_fp16 and dev.type != "cuda":
            raise ConfigError("fp16 retrieval with the torch backend needs CUDA",
                              hint="drop the fp16 option on the CPU")
        if not rows.dtype.is_floating_point:
            raise ConfigError(f"memory-bank keys must be floating point, got {rows.dtype}")
        index: Index = TorchIndex(rows, dev, use_fp16, query_chunk=query_chunk, key_chunk=key_chunk)
    else:
        if query_chunk is not None or key_chunk is not None:
            raise ConfigError(f"query_chunk/key_chunk only apply to the torch backend, not {backend!r}")
        index = FaissIndex(rows, dev, use_fp16, ivf=backend == "faiss-ivf", nlist=nlist, nprobe=nprobe)
    index.requested_backend, index.auto_choice = requested, why
    return index
