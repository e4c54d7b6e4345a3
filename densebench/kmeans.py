"""Dataset-level clustering of patch tokens: streaming z-score + PCA, and faiss k-means with its knobs recorded.

The overclustering protocol (spec protocols.md §5) clusters *all* val tokens at once, which on COCO is
5M x D. The reference holds the whole float32 matrix, fits sklearn's StandardScaler in 100k chunks,
trains ``faiss.PCAMatrix`` on every token and then runs ``faiss.Kmeans``. Here the token matrix stays
the memory-mapped float16 feature cache and is read twice in row chunks. The fitting pass shifts each
chunk by a fixed per-dimension offset (the first chunk's mean, so values are near zero and nothing
cancels), and sums, per chunk in float32 and across chunks in float64, the values, their squares and
the chunk's Gram matrix; that gives the mean, the population variance (the z-score) and the covariance
of the standardised tokens (the PCA) in one read. The eigendecomposition is float64
``torch.linalg.eigh``; components are sign-fixed (largest-magnitude loading positive) so results do not
depend on the LAPACK build. The second pass projects; only the (N, pca_dim) float32 result is held.

faiss k-means silently trains on a random subsample of ``k * max_points_per_centroid`` points (256 per
centroid by default) and only *assigns* the rest; the published numbers were made that way, so the
default keeps it, but every ClusteringParameters field is recorded next to the number of points
actually used for training.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

# The one "faiss sees a GPU" check lives with the other faiss probes; re-exported for k-means callers.
from .retrieval import faiss_gpu_available  # noqa: F401

#: Elements (rows x dims) per chunk when streaming the token matrix (16 MB of float32).
CHUNK_ELEMENTS = 1 << 22

#: faiss' default ``max_points_per_centroid``; above k x this, k-means trains on a subsample.
FAISS_DEFAULT_MAX_POINTS = 256


def _row_chunks(n_rows: int, width: int, chunk_rows: int | None = None):
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _rows(x, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(x[start:stop])).to(device=device, dtype=dtype)   # a copy: memmaps are read-only


def is_constant_dimension(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """Dimensions whose variance is only rounding noise; they get scale 1 (as sklearn's StandardScaler).

    The bound is the float64 error of a variance computed from ``n`` samples around ``mean``, so a
    constant feature stays exactly centred instead of being divided by ~1e-17.
    """
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


@dataclass
class StandardPCA:
    """z = (x - mean) / scale; y = z @ components. ``components`` None = no PCA (y = z).

    z has zero mean by construction, so the projection needs no second centring (faiss' PCAMatrix
    subtracts the mean of z, which is zero up to rounding).
    """

    mean: np.ndarray                   # (D,) float64
    scale: np.ndarray                  # (D,) float64 population std; 1 for constant dims or without standardising
    components: np.ndarray | None      # (D, d) float64, columns by decreasing variance
    explained_variance: np.ndarray | None   # (d,) eigenvalues of cov(z) (population, 1/n)
    total_variance: float
    n_samples: int
    standardise: bool
    requested_dim: int | None

    @property
    def out_dim(self) -> int:
        return self.mean.shape[0] if self.components is None else self.components.shape[1]

    def transform(self, x, *, device: str | torch.device = "cpu", chunk_rows: int | None = None) -> np.ndarray:
        """(N, D) array-like (e.g. a float16 memmap) -> (N, d) C-contiguous float32, streamed in row chunks."""
        dev = torch.device(device)
        n = x.shape[0]
        out = np.empty((n, self.out_dim), dtype=np.float32)
        mean = torch.from_numpy(self.mean).to(dev, torch.float32)
        scale = torch.from_numpy(self.scale).to(dev, torch.float32)
        comps = None if self.components is None else torch.from_numpy(self.components).to(dev, torch.float32)
        for start, stop in _row_chunks(n, x.shape[1], chunk_rows):
            z = (_rows(x, start, stop, dev, torch.float32) - mean) / scale
            out[start:stop] = (z if comps is None else z @ comps).cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "standardise": "per-dimension z-score over all val tokens (population std; float32 sums per row chunk of "
                           "shifted values, float64 across chunks; constant dimensions get scale 1)"
                           if self.standardise else "none (centred only)",
            "n_samples": self.n_samples,
            "input_dim": int(self.mean.shape[0]),
            "constant_dims": int(np.sum(self.scale == 1.0) if self.standardise else 0),
            "pca_requested_dim": self.requested_dim,
            "pca_dim": self.out_dim if self.components is not None else None,
        }
        if self.components is not None:
            d.update(pca="torch.linalg.eigh of the float64 covariance of the standardised tokens (float32 chunk "
                         "Gram matrices summed in float64); no whitening; sign: largest loading positive",
                     explained_variance_ratio=float(self.explained_variance.sum() / self.total_variance)
                     if self.total_variance > 0 else 1.0)
        elif self.requested_dim is not None:
            d["pca"] = (f"skipped: --pca-dim {self.requested_dim} >= the feature width {self.mean.shape[0]}, so a PCA "
                        "would only rotate the tokens, which changes no k-means distance")
        else:
            d["pca"] = "none"
        return d


def fit_standard_pca(x, n_components: int | None, *, standardise: bool = True,
                     device: str | torch.device = "cpu", chunk_rows: int | None = None) -> StandardPCA:
    """Fit the z-score and the PCA on an (N, D) token matrix in one streaming read.

    ``n_components`` None (or >= D) keeps every dimension: with D <= d the PCA would only rotate the
    data, which leaves every Euclidean distance and so k-means unchanged; it is skipped and recorded.
    """
    n, dim = x.shape
    if n < 2:
        raise ConfigError(f"need at least 2 tokens to standardise and cluster, got {n}")
    dev = torch.device(device)
    pca_dim = None if n_components is None or n_components >= dim else int(n_components)
    shift = None
    s1 = torch.zeros(dim, dtype=torch.float64, device=dev)
    s2 = torch.zeros(dim, dtype=torch.float64, device=dev)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=dev) if pca_dim is not None else None
    for start, stop in _row_chunks(n, dim, chunk_rows):
        c = _rows(x, start, stop, dev, torch.float32)
        if shift is None:
            shift = c.mean(0)
        c -= shift
        s1 += c.sum(0).double()
        s2 += (c * c).sum(0).double()
        if gram is not None:
            gram += (c.T @ c).double()
    mean_c = s1 / n                                   # mean of the shifted values (small)
    var = (s2 / n - mean_c * mean_c).clamp_min(0)
    mean = (shift.double() + mean_c).cpu().numpy()
    if standardise:
        var_np = var.cpu().numpy()
        scale = np.where(is_constant_dimension(var_np, mean, n), 1.0, np.sqrt(var_np))
    else:
        scale = np.ones(dim)
    if pca_dim is None:
        return StandardPCA(mean, scale, None, None, 0.0, n, standardise, n_components)
    sc = torch.from_numpy(scale).to(dev)
    cov = (gram / n - torch.outer(mean_c, mean_c)) / torch.outer(sc, sc)      # covariance of z
    cov = (cov + cov.T) / 2
    evals, evecs = torch.linalg.eigh(cov)                 # ascending
    evals = evals.flip(0)[:pca_dim].clamp_min(0)
    comps = evecs.flip(1)[:, :pca_dim]
    pivot = comps.abs().argmax(0)
    signs = torch.sign(comps[pivot, torch.arange(pca_dim, device=dev)])
    signs[signs == 0] = 1
    comps = comps * signs
    return StandardPCA(mean, scale, comps.cpu().numpy(), evals.cpu().numpy(),
                       float(torch.trace(cov).clamp_min(0)), n, standardise, n_components)


# ------------------------------------------------------------------------------------------- k-means

@dataclass
class KMeansRun:
    labels: np.ndarray        # (N,) int64 nearest-centroid id of every point
    objective: float          # sum over all N points of the squared distance to their centroid (kept redo)
    seconds: float
    info: dict[str, Any]


#: faiss' default ClusteringParameters.min_points_per_centroid (below it faiss only warns).
FAISS_DEFAULT_MIN_POINTS = 39


def faiss_kmeans(x: np.ndarray, k: int, *, niter: int = 100, nredo: int = 5, seed: int = 0,
                 max_points_per_centroid: int | None = FAISS_DEFAULT_MAX_POINTS, gpu: bool = False) -> KMeansRun:
    """faiss k-means on ``x`` (N, d) float32, then every point assigned to its nearest centroid.

    ``max_points_per_centroid`` None = train on all N points (faiss otherwise trains on a random
    subsample of k x max_points_per_centroid when N is larger). ``info`` holds every
    ClusteringParameters field as set, the points used for training and faiss' version.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ConfigError(f"k-means with K={k} needs between 1 and {n} points (the number of tokens)",
                          hint=f"use K <= {n}")
    mpc = max_points_per_centroid if max_points_per_centroid is not None else max(1, math.ceil(n / k))
    # faiss uses min_points_per_centroid only to print a C-level stderr warning (n < 39 k); the condition is
    # recorded in ``info`` instead, so small runs (the synthetic suite) do not spam the terminal.
    km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=False, verbose=False,
                      max_points_per_centroid=int(mpc), min_points_per_centroid=1, gpu=bool(gpu))
    t0 = time.perf_counter()
    km.train(x)
    dist, labels = km.assign(x)
    seconds = time.perf_counter() - t0
    cp = {name: _plain(getattr(km.cp, name)) for name in dir(km.cp)
          if not name.startswith("_") and name not in ("this", "thisown") and not callable(getattr(km.cp, name))}
    cp["max_points_per_centroid"] = "all" if max_points_per_centroid is None else int(mpc)
    train_points = n if max_points_per_centroid is None else min(n, k * int(mpc))
    info = {"library": "faiss", "faiss_version": faiss.__version__, "k": k, "d": d, "n_points": n,
            "training_points": train_points, "subsampled": train_points < n,
            "below_min_points_per_centroid": n < k * FAISS_DEFAULT_MIN_POINTS,
            "gpu": bool(gpu), "omp_threads": faiss.omp_get_max_threads(), "parameters": cp}
    return KMeansRun(labels=labels.astype(np.int64), objective=float(dist.astype(np.float64).sum()),
                     seconds=seconds, info=info)


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)
