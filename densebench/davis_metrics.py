"""The DAVIS-2017 semi-supervised metrics, as the official ``davis2017-evaluation`` package computes them.

* Region similarity J: the IoU of one object's predicted and true masks in one frame; 1 when both are empty.
* Boundary F: the F-measure of the one-pixel boundaries of both masks (``seg2bmap``), a boundary pixel
  counting as matched when a boundary pixel of the other mask lies within ``ceil(bound_th * image
  diagonal)`` pixels (a disk, ``x² + y² <= r²``; 8 px at 854x480 with the official ``bound_th`` 0.008).
* Per object: mean, recall (fraction of frames above 0.5) and decay (mean of the first quarter of the frames
  minus the last quarter, the official binning) over the evaluated frames, which in the semi-supervised task
  are all frames but the first (given) and the last.
* Objects of a sequence are the ids 1..max of its first annotation; void (255) counts as background, exactly
  as the official reader does before it looks for void, so void pixels are never excluded.
* Global: J-Mean is the mean over all objects of all sequences, F-Mean likewise, J&F their mean.

The boundary matching uses exact integer squared distances (a KD-tree query) instead of the official
``cv2.dilate`` with ``skimage.morphology.disk``: the same set of matched pixels, without either dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: The official boundary tolerance (fraction of the image diagonal).
BOUND_TH = 0.008


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """J (IoU) of boolean masks ``(..., H, W)`` per leading index; 1 where both masks are empty."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and prediction {pred.shape} differ in shape")
    inter = np.sum(gt & pred, axis=(-2, -1))
    union = np.sum(gt | pred, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return np.asarray(j, dtype=np.float64)


def boundary_map(seg: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a binary mask, offset half a pixel towards the origin (the official seg2bmap).

    A pixel is a boundary pixel when it differs from its right, lower or lower-right neighbour (pixels
    outside the image count as background); in the last row only the right neighbour counts, in the last
    column only the lower one, and the bottom-right pixel never is one.
    """
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(shape: Sequence[int], bound_th: float = BOUND_TH) -> float:
    """The matching radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * diagonal)."""
    return float(bound_th) if bound_th >= 1 else float(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _matched(points: np.ndarray, others: np.ndarray, radius: float) -> int:
    """How many of ``points`` (N, 2) have a point of ``others`` within ``radius`` (squared distances exact)."""
    if len(points) == 0 or len(others) == 0:
        return 0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(others).query(points, k=1, distance_upper_bound=radius + 1.0)
    found = np.isfinite(dist)
    return int(np.sum(np.rint(dist[found] ** 2) <= radius * radius))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one frame's binary masks (the official ``f_measure`` cases included)."""
    gt_b, fg_b = boundary_map(gt), boundary_map(pred)
    n_gt, n_fg = int(gt_b.sum()), int(fg_b.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0           # precision 1, recall 0 (or the reverse): F = 0
    radius = boundary_radius(gt.shape, bound_th)
    gt_pts, fg_pts = np.argwhere(gt_b), np.argwhere(fg_b)
    precision = _matched(fg_pts, gt_pts, radius) / n_fg
    recall = _matched(gt_pts, fg_pts, radius) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame values, as the official ``db_statistics``.

    Recall is the fraction of frames above 0.5; decay bins the frames into four by
    ``round(linspace(1, n, 5) + 1e-10) - 1`` and subtracts the last bin's mean from the first's.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    first, last = v[ids[0]:ids[1] + 1], v[ids[3]:ids[4] + 1]
    return mean, recall, float(np.nanmean(first) - np.nanmean(last))


def object_masks(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """(T, H, W) label maps -> (n_objects, T, H, W) boolean masks of ids 1..n_objects (255 is background)."""
    labels = np.asarray(labels)
    return labels[None] == np.arange(1, n_objects + 1).reshape(-1, *([1] * labels.ndim))


@dataclass
class DavisAccumulator:
    """Per-object J and F over sequences, streamed one sequence at a time; :meth:`compute` gives percent."""

    bound_th: float = BOUND_TH
    per_object: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    sequences: dict[str, list[str]] = field(default_factory=dict)

    def update(self, sequence: str, gt: np.ndarray, pred: np.ndarray) -> None:
        """Score one sequence: ``gt`` and ``pred`` are (T, H, W) label maps of all its frames.

        The objects are the ids 1..max of the first annotation; the first and last frames are not scored.
        """
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"{sequence}: annotation {gt.shape} and prediction {pred.shape} differ in shape")
        first = np.where(gt[0] == 255, 0, gt[0])
        n_objects = int(first.max())
        gt = np.where(gt == 255, 0, gt)[1:-1]
        pred = pred[1:-1]
        names = []
        for k, (g, p) in enumerate(zip(object_masks(gt, n_objects), object_masks(pred, n_objects)), start=1):
            j = region_similarity(g, p).tolist()
            f = [boundary_f(g[t], p[t], self.bound_th) for t in range(len(g))]
            name = f"{sequence}_{k}"
            self.per_object[name] = (j, f)
            names.append(name)
        self.sequences[sequence] = names

    def compute(self) -> dict:
        """Global J&F, J and F mean / recall / decay, per sequence and per object (all in percent)."""
        stats = {name: (davis_statistics(j), davis_statistics(f)) for name, (j, f) in self.per_object.items()}
        if not stats:
            raise ValueError("no object was scored")
        j = np.array([s[0] for s in stats.values()]) * 100
        f = np.array([s[1] for s in stats.values()]) * 100
        out = {"j_and_f": float((np.mean(j[:, 0]) + np.mean(f[:, 0])) / 2),
               "j_mean": float(np.mean(j[:, 0])), "j_recall": float(np.mean(j[:, 1])),
               "j_decay": float(np.mean(j[:, 2])), "f_mean": float(np.mean(f[:, 0])),
               "f_recall": float(np.mean(f[:, 1])), "f_decay": float(np.mean(f[:, 2]))}
        out["per_object_j"] = {n: 100 * s[0][0] for n, s in stats.items()}
        out["per_object_f"] = {n: 100 * s[1][0] for n, s in stats.items()}
        seq_j = {q: float(np.mean([out["per_object_j"][n] for n in ns])) for q, ns in self.sequences.items() if ns}
        seq_f = {q: float(np.mean([out["per_object_f"][n] for n in ns])) for q, ns in self.sequences.items() if ns}
        out["per_sequence_j_and_f"] = {q: (seq_j[q] + seq_f[q]) / 2 for q in seq_j}
        out["per_sequence_j_mean"] = seq_j
        out["per_sequence_f_mean"] = seq_f
        return out
