"""Streaming segmentation and keypoint metrics.

Every segmentation protocol (in-context retrieval, linear probe, overclustering) reduces to one
confusion matrix of ground-truth class x predicted id, pooled over the whole dataset (spec
protocols.md §1). Matching (identity, Hungarian, many-to-one) and the IoU that follows are computed
from that matrix alone, so no protocol ever keeps per-pixel lists: the reference implementations
spend most of their metric time building such lists and scanning all pixels once per
(cluster, class) pair. Like torchmetrics, state is accumulated with ``update`` and read once.

``PCKAccumulator`` does the same for SPair-71k keypoint correspondence (spec §6.4-6.5): it keeps
per-(category, viewpoint bucket) counts of correct and visible keypoints, not the keypoints.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import ConfigError, DataError, choices_message

# Denominator clamp of the reference PredsmIoU (NeCo:experiments/utils.py, HB eval_metrics.py).
IOU_EPS = 1e-8

MATCHING_MODES = ("hungarian", "identity", "many-to-one")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


class ConfusionMatrix:
    """Pooled ground-truth x prediction pixel counts, updated batch by batch.

    ``num_pred`` may differ from ``num_classes`` (K clusters vs C classes for overclustering).
    Pixels whose target equals ``ignore_index`` are dropped before counting. Each ``update`` costs
    one ``bincount`` on the inputs' device; the int64 counts live on ``device``.
    """

    def __init__(self, num_classes: int, num_pred: int | None = None, ignore_index: int | None = None,
                 device: str | torch.device = "cpu"):
        num_pred = num_classes if num_pred is None else num_pred
        for name, value in (("num_classes", num_classes), ("num_pred", num_pred)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}",
                                  hint="pass the number of ground-truth classes / predicted ids")
        self.num_classes = int(num_classes)
        self.num_pred = int(num_pred)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.device = torch.device(device)
        self._counts = torch.zeros(self.num_classes * self.num_pred, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        self._counts.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``pred`` and ``target`` are integer maps of the same (any) shape."""
        pred_t, target_t = _as_tensor(pred), _as_tensor(target)
        if pred_t.shape != target_t.shape:
            raise ConfigError(f"prediction shape {tuple(pred_t.shape)} differs from ground-truth shape "
                              f"{tuple(target_t.shape)}",
                              hint="resize predictions to the mask resolution before updating the metric")
        if pred_t.is_floating_point() or target_t.is_floating_point():
            raise ConfigError("confusion matrix inputs must be integer label maps, got "
                              f"{pred_t.dtype} / {target_t.dtype}",
                              hint="take the argmax of the logits and pass class ids")
        if pred_t.device != target_t.device:
            pred_t = pred_t.to(target_t.device)
        pred_t = pred_t.reshape(-1).long()
        target_t = target_t.reshape(-1).long()
        if self.ignore_index is not None:
            keep = target_t != self.ignore_index
            pred_t, target_t = pred_t[keep], target_t[keep]
        if target_t.numel() == 0:
            return
        self._check_range(target_t, self.num_classes, "ground-truth label")
        self._check_range(pred_t, self.num_pred, "predicted id")
        counts = torch.bincount(target_t * self.num_pred + pred_t, minlength=self._counts.numel())
        self._counts += counts.to(self.device)

    def _check_range(self, values: torch.Tensor, n: int, what: str) -> None:
        lo, hi = torch.aminmax(values)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            ignore = "" if self.ignore_index is None else f" and is not the ignore index {self.ignore_index}"
            raise DataError(f"{what} {bad} is outside [0, {n}){ignore}",
                            hint="check the dataset's number of classes and ignore index, "
                                 "or the number of predicted ids the metric was built with")

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker or shard); returns self."""
        if (other.num_classes, other.num_pred) != (self.num_classes, self.num_pred):
            raise ConfigError(f"cannot merge a {other.num_classes}x{other.num_pred} confusion matrix into a "
                              f"{self.num_classes}x{self.num_pred} one")
        self._counts += other._counts.to(self.device)
        return self

    @property
    def matrix(self) -> np.ndarray:
        """(num_classes, num_pred) int64 counts: rows = ground truth, columns = prediction."""
        return self._counts.reshape(self.num_classes, self.num_pred).cpu().numpy().copy()

    @property
    def num_pixels(self) -> int:
        return int(self._counts.sum())


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_c = TP/(TP+FP+FN) for a square (C, C) matrix; classes never seen or predicted get 0."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"IoU needs a square (C, C) confusion matrix, got shape {conf.shape}; "
                         "match predictions to classes first (remap_confusion)")
    tp = np.diag(conf)
    denom = conf.sum(axis=1) + conf.sum(axis=0) - tp
    return tp / np.maximum(denom, IOU_EPS)


def pairwise_iou(conf: np.ndarray) -> np.ndarray:
    """(C, K) IoU of ground-truth class c with predicted id k, as if k were relabelled c."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - conf
    return conf / np.maximum(union, IOU_EPS)


def match_hungarian(conf: np.ndarray) -> np.ndarray:
    """One-to-one matching maximising the summed IoU; returns mapping[pred id] = gt id.

    Predicted ids left without a partner (K > C) map to class 0, as the reference PredsmIoU does.
    """
    conf = np.asarray(conf)
    rows, cols = linear_sum_assignment(1.0 - pairwise_iou(conf))
    mapping = np.zeros(conf.shape[1], dtype=np.int64)
    mapping[cols] = rows
    return mapping


def match_many_to_one(conf: np.ndarray) -> np.ndarray:
    """Each predicted id goes to its majority class (highest precision TP/(TP+FP)).

    Within a column the precision denominator is constant, so the argmax of the raw counts is the
    argmax of the precision, computed exactly in integers. ``argmax`` picks the first maximum, so ties
    go to the lowest class id, and empty clusters (all-zero column) go to class 0.
    """
    conf = np.asarray(conf)
    return np.argmax(conf, axis=0).astype(np.int64)


def identity_mapping(conf: np.ndarray) -> np.ndarray:
    """mapping[k] = k; predictions are already class ids (linear probe, in-context retrieval)."""
    conf = np.asarray(conf)
    if conf.shape[1] > conf.shape[0]:
        raise ConfigError(f"identity matching needs at most as many predicted ids as classes, got "
                          f"{conf.shape[1]} predicted ids for {conf.shape[0]} classes",
                          hint="use matching='hungarian' or 'many-to-one' for clusterings")
    return np.arange(conf.shape[1], dtype=np.int64)


def remap_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(C, C) matrix after relabelling predicted id k as class mapping[k]: sums columns.

    Relabelling pixels and then counting gives exactly this matrix, so matching never needs pixels.
    """
    conf = np.asarray(conf)
    mapping = np.asarray(mapping, dtype=np.int64)
    n_classes, n_pred = conf.shape
    if mapping.shape != (n_pred,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({n_pred},)")
    if n_pred and (mapping.min() < 0 or mapping.max() >= n_classes):
        raise ValueError(f"mapping values must lie in [0, {n_classes})")
    out = np.zeros((n_classes, n_classes), dtype=conf.dtype)
    np.add.at(out.T, mapping, conf.T)
    return out


def mean_iou(iou: np.ndarray, exclude: Iterable[int] = ()) -> float:
    """Unweighted mean IoU in percent over all classes except ``exclude`` (absent classes count as 0)."""
    iou = np.asarray(iou, dtype=np.float64)
    keep = np.ones(iou.shape[0], dtype=bool)
    keep[list(exclude)] = False
    if not keep.any():
        raise ConfigError("every class is excluded from the mean IoU")
    return float(iou[keep].mean() * 100.0)


def miou_class_counts(iou: np.ndarray, exclude: Iterable[int] = (0,)) -> dict[str, float]:
    """Both means, labelled by how many classes they average: {"miou_<C>": .., "miou_<C-n>": ..}.

    For ADE20K (label 0 = "other" is the ignore label) the published numbers average 151 classes, class
    0 contributing IoU 0, i.e. 150/151 of the 150-class mean; report both (spec §1, §8).
    """
    exclude = sorted({int(e) for e in exclude})
    n = int(np.asarray(iou).shape[0])
    return {f"miou_{n}": mean_iou(iou), f"miou_{n - len(exclude)}": mean_iou(iou, exclude)}


def segmentation_scores(conf: np.ndarray, matching: str = "hungarian",
                        class_names: Sequence[str] | None = None, ignore_class: int | None = None,
                        exclude: Iterable[int] = ()) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy (all in percent) of a (C, K) confusion matrix.

    ``matching`` relabels predicted ids first: "hungarian" (the published in-context and K=C
    clustering score), "identity" (linear probe), "many-to-one" (overclustering). ``miou`` averages all
    C classes as the reference does, minus any ids in ``exclude`` (matching still sees every class);
    with ``ignore_class`` (e.g. ADE20K's 0) the dict also carries both labelled means
    (``miou_<C>``, ``miou_<C-1>``).
    """
    if matching not in MATCHING_MODES:
        raise ConfigError(choices_message("matching mode", matching, MATCHING_MODES))
    conf = np.asarray(conf)
    n_classes = conf.shape[0]
    if class_names is not None and len(class_names) != n_classes:
        raise ConfigError(f"{len(class_names)} class names given for a confusion matrix with "
                          f"{n_classes} classes",
                          hint="pass one name per ground-truth class, in class-id order")
    if matching == "hungarian":
        mapping = match_hungarian(conf)
    elif matching == "many-to-one":
        mapping = match_many_to_one(conf)
    else:
        mapping = identity_mapping(conf)
    matched = remap_confusion(conf, mapping)
    iou = iou_per_class(matched)
    exclude = sorted({int(e) for e in exclude})
    if any(not 0 <= e < n_classes for e in exclude):
        raise ConfigError(f"exclude={exclude} names classes outside [0, {n_classes})")
    names = [str(n) for n in class_names] if class_names is not None else [str(c) for c in range(n_classes)]
    total = int(matched.sum())
    scores: dict[str, Any] = {
        "miou": mean_iou(iou, exclude),
        "per_class_iou": {name: float(v * 100.0) for name, v in zip(names, iou)},
        "pixel_accuracy": float(np.trace(matched) / total * 100.0) if total else 0.0,
        "matching": matching,
        "mapping": [int(m) for m in mapping],
        "num_pixels": total,
    }
    if ignore_class is not None:
        if not 0 <= ignore_class < n_classes:
            raise ConfigError(f"ignore_class {ignore_class} is not a class id in [0, {n_classes})")
        scores.update(miou_class_counts(iou, exclude=[ignore_class]))
    return scores


# --------------------------------------------------------------------------------------------- PCK

PCK_GROUPINGS = ("category", "viewpoint")


def threshold_label(alpha: float) -> str:
    """How a PCK threshold appears in metric names: 0.1 -> ``0.10``, 0.125 -> ``0.125``."""
    return f"{alpha:.2f}" if round(alpha, 2) == alpha else f"{alpha:g}"


def _as_1d(x: Any, n: int, name: str) -> np.ndarray:
    """Broadcast a per-pair scalar or a per-keypoint array to shape (n,)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        return np.full(n, arr.item(), dtype=object if arr.dtype.kind in "OUS" else arr.dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}; expected a scalar or ({n},)")
    return arr


def _plain(value: Any) -> Hashable:
    return value.item() if isinstance(value, np.generic) else value


class PCKAccumulator:
    """Percentage of correct keypoints, streamed pair by pair (probe3d's SPair-71k protocol).

    A keypoint is correct iff ||pred - true|| / scale < alpha (strict), with ``scale`` the target's
    normaliser (the longest bounding-box side in the coordinates of ``pred``/``true``). The ratio is
    compared, as the reference does, so that a distance of exactly alpha*scale is never counted by
    floating-point rounding. Only keypoints with ``visible`` (visible in both images) count.

    ``compute`` pools keypoints within a category, then takes the unweighted mean over categories,
    overall and per viewpoint bucket (only categories that have keypoints in that bucket). Without
    "category" in ``by`` all keypoints are pooled instead.
    """

    def __init__(self, thresholds: Sequence[float] = (0.10,), by: Sequence[str] = ("category", "viewpoint")):
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds or any(not (t > 0) for t in thresholds):
            raise ConfigError(f"PCK thresholds must be positive numbers, got {thresholds!r}",
                              hint="for example 0.05,0.10,0.15")
        unknown = [b for b in by if b not in PCK_GROUPINGS]
        if unknown:
            raise ConfigError(choices_message("PCK grouping", unknown[0], PCK_GROUPINGS))
        self.thresholds = thresholds
        self.by = tuple(by)
        # (category, bucket) -> [correct per threshold..., visible count]
        self._counts: dict[tuple[Hashable, Hashable], np.ndarray] = {}

    def reset(self) -> None:
        self._counts.clear()

    def update(self, pred_xy: Any, true_xy: Any, scale: Any, visible: Any, category: Any = None,
               bucket: Any = None) -> None:
        """Add the keypoints of one pair or batch: (N, 2) locations, scale/visible/category/bucket
        as per-keypoint (N,) arrays or one scalar for all."""
        pred = np.asarray(pred_xy.detach().cpu() if isinstance(pred_xy, torch.Tensor) else pred_xy,
                          dtype=np.float64)
        true = np.asarray(true_xy.detach().cpu() if isinstance(true_xy, torch.Tensor) else true_xy,
                          dtype=np.float64)
        if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != true.shape:
            raise ValueError(f"pred_xy {pred.shape} and true_xy {true.shape} must both be (N, 2)")
        n = pred.shape[0]
        if n == 0:
            return
        scale_a = _as_1d(scale, n, "scale").astype(np.float64)
        vis = _as_1d(visible, n, "visible").astype(bool)
        cats = _as_1d(category if "category" in self.by else None, n, "category")
        buckets = _as_1d(bucket if "viewpoint" in self.by else None, n, "bucket")
        if vis.any() and not np.all(np.isfinite(scale_a[vis]) & (scale_a[vis] > 0)):
            raise DataError("a PCK normaliser (target bounding-box size) is zero, negative or not finite",
                            hint="check the target bounding box of this pair's annotation")
        err = np.linalg.norm(pred - true, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = err / scale_a
        correct = ratio[None, :] < np.asarray(self.thresholds)[:, None]   # (T, N)
        for cat in _unique(cats[vis]):
            in_cat = vis & _equal(cats, cat)
            for b in _unique(buckets[in_cat]):
                sel = in_cat & _equal(buckets, b)
                key = (_plain(cat), _plain(b))
                row = np.append(correct[:, sel].sum(axis=1), sel.sum()).astype(np.int64)
                self._counts[key] = self._counts.get(key, 0) + row

    def compute(self) -> dict[str, Any]:
        """{"pck@0.10": %, "pck@0.10_vp<b>": %, "per_category": {"pck@0.10": {cat: %}},
        "num_keypoints": {cat: n}, "num_categories": n} for every threshold and bucket."""
        if not self._counts:
            raise DataError("no visible keypoints were accumulated, so PCK is undefined",
                            hint="check that the pairs have keypoints visible in both images")
        t = len(self.thresholds)
        per_cat: dict[Hashable, np.ndarray] = {}
        per_cat_bucket: dict[Hashable, dict[Hashable, np.ndarray]] = {}
        for (cat, b), row in self._counts.items():
            per_cat[cat] = per_cat.get(cat, 0) + row
            if b is not None:
                per_cat_bucket.setdefault(b, {})
                per_cat_bucket[b][cat] = per_cat_bucket[b].get(cat, 0) + row

        def macro(groups: dict[Hashable, np.ndarray]) -> np.ndarray:
            return np.mean([row[:t] / row[t] for row in groups.values()], axis=0) * 100.0

        out: dict[str, Any] = {}
        overall = macro(per_cat)
        by_bucket = {b: macro(groups) for b, groups in sorted(per_cat_bucket.items(), key=_by_name)}
        for i, alpha in enumerate(self.thresholds):
            name = f"pck@{threshold_label(alpha)}"
            out[name] = float(overall[i])
            for b, vals in by_bucket.items():
                out[f"{name}_vp{b}"] = float(vals[i])
        if "category" in self.by:
            out["per_category"] = {
                f"pck@{threshold_label(alpha)}": {str(c): float(row[i] / row[t] * 100.0)
                                                  for c, row in sorted(per_cat.items(), key=_by_name)}
                for i, alpha in enumerate(self.thresholds)}
            out["num_keypoints"] = {str(c): int(row[t]) for c, row in sorted(per_cat.items(), key=_by_name)}
            out["num_categories"] = len(per_cat)
        else:
            out["num_keypoints"] = int(sum(row[t] for row in per_cat.values()))
        return out


def _by_name(item: tuple[Hashable, Any]) -> str:
    return str(item[0])


def _unique(values: np.ndarray) -> list:
    """Distinct values in first-seen order; works for object arrays holding None or strings."""
    seen: dict = {}
    for v in values.tolist():
        seen.setdefault(v, None)
    return list(seen)


def _equal(values: np.ndarray, v: Any) -> np.ndarray:
    if v is None:
        return np.array([x is None for x in values.tolist()], dtype=bool)
    return values == v
