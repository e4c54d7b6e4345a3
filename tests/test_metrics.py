"""Metrics vs independent computations: per-pixel loops, brute-force matching, sklearn, hand-built PCK."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from densebench.errors import ConfigError, DataError
from densebench.metrics import (
    ConfusionMatrix,
    PCKAccumulator,
    iou_per_class,
    match_hungarian,
    match_many_to_one,
    mean_iou,
    miou_class_counts,
    pairwise_iou,
    remap_confusion,
    segmentation_scores,
)

IGNORE = 255


def _random_batch(rng, shape, n_classes, n_pred, ignore_frac=0.2):
    target = rng.integers(0, n_classes, size=shape)
    target[rng.random(shape) < ignore_frac] = IGNORE
    pred = rng.integers(0, n_pred, size=shape)
    return pred, target


def _brute_confusion(batches, n_classes, n_pred, ignore=IGNORE):
    conf = np.zeros((n_classes, n_pred), dtype=np.int64)
    for pred, target in batches:
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
            if t == ignore:
                continue
            conf[t, p] += 1
    return conf


def _pixel_iou(pred, target, n_classes, ignore=IGNORE):
    """IoU from pixel sets: |P∩G| / |P∪G| per class, valid pixels only."""
    valid = target != ignore
    p, t = pred[valid], target[valid]
    out = np.zeros(n_classes)
    for c in range(n_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        out[c] = inter / union if union else 0.0
    return out


# ------------------------------------------------------------------------------------ confusion


@pytest.mark.parametrize("n_classes,n_pred", [(4, 4), (3, 6), (5, 2)])
def test_confusion_matrix_matches_per_pixel_loop(n_classes, n_pred):
    rng = np.random.default_rng(n_classes * 10 + n_pred)
    batches = [_random_batch(rng, (2, 7, 9), n_classes, n_pred) for _ in range(3)]
    cm = ConfusionMatrix(n_classes, n_pred, ignore_index=IGNORE)
    for i, (pred, target) in enumerate(batches):
        # mix numpy, torch and narrow dtypes: the matrix must not care
        if i == 0:
            cm.update(pred, target)
        elif i == 1:
            cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        else:
            cm.update(pred.astype(np.uint8), target.astype(np.uint8))
    expected = _brute_confusion(batches, n_classes, n_pred)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.num_pixels == sum(int((t != IGNORE).sum()) for _, t in batches)


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(1)
    pred, target = _random_batch(rng, (40, 40), 6, 6)
    cm = ConfusionMatrix(6, ignore_index=IGNORE)
    cm.update(pred, target)
    valid = target != IGNORE
    np.testing.assert_array_equal(cm.matrix, sk_confusion_matrix(target[valid], pred[valid], labels=range(6)))


def test_confusion_matrix_merge_equals_single_stream():
    rng = np.random.default_rng(2)
    batches = [_random_batch(rng, (5, 5), 3, 4) for _ in range(4)]
    whole, a, b = (ConfusionMatrix(3, 4, ignore_index=IGNORE) for _ in range(3))
    for i, (p, t) in enumerate(batches):
        whole.update(p, t)
        (a if i % 2 else b).update(p, t)
    np.testing.assert_array_equal(a.merge(b).matrix, whole.matrix)
    a.reset()
    assert a.matrix.sum() == 0
    with pytest.raises(ConfigError):
        whole.merge(ConfusionMatrix(3, 5))


def test_confusion_matrix_without_ignore_counts_everything():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_rejects_bad_inputs():
    cm = ConfusionMatrix(3, ignore_index=IGNORE)
    with pytest.raises(DataError, match="ground-truth label 7"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(DataError, match="predicted id 3"):
        cm.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(DataError, match="predicted id -1"):
        cm.update(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(ConfigError, match="shape"):
        cm.update(np.zeros((2, 3), dtype=int), np.zeros((3, 2), dtype=int))
    with pytest.raises(ConfigError, match="integer"):
        cm.update(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ConfigError):
        ConfusionMatrix(0)
    # an out-of-range prediction on an ignored pixel is dropped, not an error
    cm.update(np.array([9]), np.array([IGNORE]))
    assert cm.num_pixels == 0


# ------------------------------------------------------------------------------------ IoU


def test_iou_per_class_matches_numpy_and_pixel_sets():
    rng = np.random.default_rng(3)
    pred, target = _random_batch(rng, (30, 30), 5, 5)
    pred[pred == 4] = 3            # class 4 never predicted
    target[target == 2] = IGNORE    # class 2 never in GT: IoU 0 (only false positives)
    cm = ConfusionMatrix(5, ignore_index=IGNORE)
    cm.update(pred, target)
    conf = cm.matrix.astype(np.float64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    np.testing.assert_allclose(iou_per_class(cm.matrix), tp / np.maximum(tp + fp + fn, 1e-8))
    np.testing.assert_allclose(iou_per_class(cm.matrix), _pixel_iou(pred, target, 5))
    assert iou_per_class(cm.matrix)[2] == 0.0


def test_iou_of_absent_class_is_zero_and_counts_in_mean():
    conf = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    iou = iou_per_class(conf)
    np.testing.assert_array_equal(iou, [1.0, 1.0, 0.0])
    assert mean_iou(iou) == pytest.approx(200.0 / 3)
    with pytest.raises(ValueError):
        iou_per_class(np.zeros((3, 4)))


# ------------------------------------------------------------------------------------ matching


def _best_assignment_value(iou: np.ndarray) -> float:
    """Brute force: the largest summed IoU over all one-to-one partial assignments."""
    n_classes, n_pred = iou.shape
    best = -1.0
    if n_pred <= n_classes:
        for classes in itertools.permutations(range(n_classes), n_pred):
            best = max(best, sum(iou[c, k] for k, c in enumerate(classes)))
    else:
        for preds in itertools.permutations(range(n_pred), n_classes):
            best = max(best, sum(iou[c, k] for c, k in enumerate(preds)))
    return best


@pytest.mark.parametrize("n_classes,n_pred", [(3, 3), (4, 4), (5, 5), (3, 5), (5, 3), (4, 2)])
@pytest.mark.parametrize("seed", range(4))
def test_hungarian_equals_brute_force(n_classes, n_pred, seed):
    rng = np.random.default_rng(seed * 100 + n_classes * 10 + n_pred)
    # structured predictions: each pred id prefers some class, so matching is non-trivial
    target = rng.integers(0, n_classes, size=400)
    prefer = rng.integers(0, n_pred, size=n_classes)
    pred = np.where(rng.random(400) < 0.6, prefer[target], rng.integers(0, n_pred, size=400))
    cm = ConfusionMatrix(n_classes, n_pred)
    cm.update(pred, target)
    conf = cm.matrix
    mapping = match_hungarian(conf)
    # IoU of class c with pred id k from the pixel sets, independent of the module's formulas
    iou = np.array([[np.sum((target == c) & (pred == k)) / np.sum((target == c) | (pred == k))
                     for k in range(n_pred)] for c in range(n_classes)])
    np.testing.assert_allclose(pairwise_iou(conf), iou)
    if n_pred <= n_classes:
        assert len(set(mapping.tolist())) == n_pred       # injective: a full one-to-one assignment
        ours = sum(iou[mapping[k], k] for k in range(n_pred))
    else:
        # every class has exactly one partner except class 0, which also receives the unmatched ids;
        # its matched partner is the best of those (any other choice could be swapped for a better one)
        assert sorted(set(mapping.tolist())) == list(range(n_classes))
        for c in range(1, n_classes):
            assert (mapping == c).sum() == 1
        ours = sum(iou[mapping[k], k] for k in range(n_pred) if mapping[k] != 0)
        ours += max(iou[0, k] for k in range(n_pred) if mapping[k] == 0)
    assert ours == pytest.approx(_best_assignment_value(iou), abs=1e-12)


def test_hungarian_recovers_a_planted_permutation():
    rng = np.random.default_rng(7)
    target = rng.integers(0, 5, size=(20, 20))
    perm = np.array([3, 0, 4, 1, 2])
    pred = perm[target]                     # pred id perm[c] means class c
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    mapping = match_hungarian(cm.matrix)
    np.testing.assert_array_equal(mapping[perm], np.arange(5))
    scores = segmentation_scores(cm.matrix, "hungarian")
    assert scores["miou"] == pytest.approx(100.0)
    assert segmentation_scores(cm.matrix, "identity")["miou"] < 100.0


def _brute_majority(pred, target, n_pred):
    mapping = []
    for k in range(n_pred):
        counts = Counter(target[pred == k].tolist())
        if not counts:
            mapping.append(0)
            continue
        top = max(counts.values())
        mapping.append(min(c for c, n in counts.items() if n == top))
    return np.array(mapping)


@pytest.mark.parametrize("seed", range(5))
def test_many_to_one_is_majority_class_per_cluster(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 4, size=300)
    pred = rng.integers(0, 9, size=300)
    pred[pred == 8] = 7                    # cluster 8 empty -> class 0
    cm = ConfusionMatrix(4, 9)
    cm.update(pred, target)
    mapping = match_many_to_one(cm.matrix)
    np.testing.assert_array_equal(mapping, _brute_majority(pred, target, 9))
    assert mapping[8] == 0


def test_many_to_one_ties_go_to_lowest_class():
    # cluster 0: classes 1 and 2 tie (2 px each) -> 1; cluster 1: classes 0 and 3 tie -> 0
    target = np.array([1, 1, 2, 2, 3, 3, 0, 0])
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    cm = ConfusionMatrix(4, 2)
    cm.update(pred, target)
    np.testing.assert_array_equal(match_many_to_one(cm.matrix), [1, 0])


def test_identity_matching_is_plain_iou():
    rng = np.random.default_rng(11)
    pred, target = _random_batch(rng, (25, 25), 4, 4)
    cm = ConfusionMatrix(4, ignore_index=IGNORE)
    cm.update(pred, target)
    scores = segmentation_scores(cm.matrix, "identity", class_names=["a", "b", "c", "d"])
    pix = _pixel_iou(pred, target, 4)
    assert scores["mapping"] == [0, 1, 2, 3]
    assert scores["miou"] == pytest.approx(pix.mean() * 100)
    assert list(scores["per_class_iou"]) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(list(scores["per_class_iou"].values()), pix * 100)
    valid = target != IGNORE
    assert scores["pixel_accuracy"] == pytest.approx(np.mean(pred[valid] == target[valid]) * 100)
    with pytest.raises(ConfigError, match="identity"):
        segmentation_scores(np.ones((3, 5)), "identity")


@pytest.mark.parametrize("matching", ["hungarian", "many-to-one"])
@pytest.mark.parametrize("n_pred", [3, 4, 7])
def test_remapped_confusion_iou_equals_pixel_remap(matching, n_pred):
    rng = np.random.default_rng(n_pred)
    pred, target = _random_batch(rng, (3, 16, 16), 4, n_pred)
    cm = ConfusionMatrix(4, n_pred, ignore_index=IGNORE)
    cm.update(pred, target)
    scores = segmentation_scores(cm.matrix, matching)
    mapping = np.array(scores["mapping"])
    relabelled = mapping[pred]              # relabel every pixel first, then count
    direct = ConfusionMatrix(4, ignore_index=IGNORE)
    direct.update(relabelled, target)
    np.testing.assert_array_equal(remap_confusion(cm.matrix, mapping), direct.matrix)
    pix = _pixel_iou(relabelled, target, 4)
    assert scores["miou"] == pytest.approx(pix.mean() * 100)


def test_ade20k_151_vs_150_means():
    rng = np.random.default_rng(5)
    n = 151
    target = rng.integers(0, n, size=(4, 32, 32))        # 0 = "other" = ignore
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, n, size=target.shape))
    cm = ConfusionMatrix(n, ignore_index=0)
    cm.update(pred, target)
    scores = segmentation_scores(cm.matrix, "identity", ignore_class=0)
    assert scores["per_class_iou"]["0"] == 0.0
    assert scores["miou_151"] == scores["miou"]
    assert scores["miou_151"] == pytest.approx(scores["miou_150"] * 150 / 151, rel=1e-12)
    pix = _pixel_iou(pred, target, n, ignore=0)
    assert scores["miou_150"] == pytest.approx(pix[1:].mean() * 100)
    assert segmentation_scores(cm.matrix, "identity", exclude=[0])["miou"] == scores["miou_150"]
    both = miou_class_counts(iou_per_class(cm.matrix), exclude=[0])
    assert both == {"miou_151": scores["miou_151"], "miou_150": scores["miou_150"]}


def test_segmentation_scores_rejects_bad_options():
    conf = np.eye(3, dtype=np.int64)
    with pytest.raises(ConfigError, match="accepted: hungarian, identity, many-to-one"):
        segmentation_scores(conf, "greedy")
    with pytest.raises(ConfigError, match="class names"):
        segmentation_scores(conf, class_names=["a"])
    with pytest.raises(ConfigError):
        segmentation_scores(conf, ignore_class=3)
    with pytest.raises(ConfigError, match="exclude"):
        segmentation_scores(conf, exclude=[5])


# ------------------------------------------------------------------------------------ PCK


def test_pck_threshold_is_strict_and_uses_scale():
    acc = PCKAccumulator(thresholds=(0.10,))
    true = np.zeros((4, 2))
    # scale 30: alpha*scale = 3 exactly. errors 2.9 (in), 3.0 (boundary: out), 3.1 (out), 0 (in)
    pred = np.array([[2.9, 0.0], [0.0, 3.0], [3.1, 0.0], [0.0, 0.0]])
    acc.update(pred, true, scale=30.0, visible=np.ones(4, bool), category="cat", bucket=0)
    out = acc.compute()
    assert out["pck@0.10"] == pytest.approx(50.0)
    # a 3-4-5 triangle: error 5 with scale 50 sits on the 0.1 boundary -> incorrect
    acc2 = PCKAccumulator(thresholds=(0.10,))
    acc2.update(np.array([[3.0, 4.0]]), np.zeros((1, 2)), scale=50.0, visible=True, category="c")
    assert acc2.compute()["pck@0.10"] == 0.0
    # boundaries at other thresholds: 0.375 / 3.75 == 0.10 exactly, 0.375 / 2.5 == 0.15 exactly
    acc3 = PCKAccumulator(thresholds=(0.10, 0.15))
    acc3.update(np.array([[0.375, 0.0], [0.0, 0.375]]), np.zeros((2, 2)), scale=np.array([3.75, 2.5]),
                visible=True, category="c")
    out3 = acc3.compute()
    assert out3["pck@0.10"] == 0.0
    assert out3["pck@0.15"] == 50.0        # 0.375 / 3.75 = 0.10 < 0.15; 0.375 / 2.5 = 0.15 is not


def test_pck_counts_only_keypoints_visible_in_both_images():
    acc = PCKAccumulator()
    pred = np.array([[0.0, 0.0], [100.0, 100.0], [100.0, 100.0]])
    true = np.zeros((3, 2))
    acc.update(pred, true, scale=10.0, visible=np.array([True, False, False]), category="dog", bucket=1)
    out = acc.compute()
    assert out["pck@0.10"] == 100.0
    assert out["num_keypoints"] == {"dog": 1}


def test_pck_macro_mean_over_categories_and_buckets():
    acc = PCKAccumulator(thresholds=(0.05, 0.10, 0.15))
    z = np.zeros((1, 2))

    def err(e):
        return np.array([[e, 0.0]])

    # category "a": bucket 0 has 3 keypoints (errors 0, 0.07, 0.2 at scale 1); bucket 2 one keypoint (0.12)
    for e in (0.0, 0.07, 0.2):
        acc.update(err(e), z, scale=1.0, visible=True, category="a", bucket=0)
    acc.update(err(0.12), z, scale=1.0, visible=True, category="a", bucket=2)
    # category "b": bucket 0 with one pair of two keypoints (0.01 correct, 0.5 wrong)
    acc.update(np.array([[0.01, 0.0], [0.5, 0.0]]), np.zeros((2, 2)), scale=1.0, visible=[True, True],
               category="b", bucket=0)
    out = acc.compute()
    # pooled per category: a -> @0.05: 1/4, @0.10: 2/4, @0.15: 3/4 ; b -> 1/2 at every threshold
    assert out["per_category"]["pck@0.10"] == {"a": 50.0, "b": 50.0}
    assert out["per_category"]["pck@0.05"] == {"a": 25.0, "b": 50.0}
    assert out["pck@0.05"] == pytest.approx((25 + 50) / 2)
    assert out["pck@0.10"] == pytest.approx(50.0)
    assert out["pck@0.15"] == pytest.approx((75 + 50) / 2)
    # bucket 0: a = 2/3 @0.10, b = 1/2 -> macro mean; bucket 2: only category a (0.12 -> wrong at 0.10)
    assert out["pck@0.10_vp0"] == pytest.approx((200 / 3 + 50) / 2)
    assert out["pck@0.10_vp2"] == 0.0
    assert out["pck@0.15_vp2"] == 100.0
    assert "pck@0.10_vp1" not in out       # no pairs in bucket 1: not reported, not zero
    assert out["num_keypoints"] == {"a": 4, "b": 2}
    assert out["num_categories"] == 2


def test_pck_per_keypoint_arrays_and_pooled_mode():
    acc = PCKAccumulator(by=())
    pred = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    acc.update(torch.tensor(pred), torch.zeros(3, 2), scale=np.array([1.0, 1.0, 1.0]),
               visible=np.ones(3, bool),
               category=np.array(["x", "y", "y"]))
    out = acc.compute()   # pooled over keypoints, not categories: 2/3
    assert out["pck@0.10"] == pytest.approx(200 / 3)
    assert out["num_keypoints"] == 3


def test_pck_bad_inputs():
    with pytest.raises(ConfigError):
        PCKAccumulator(thresholds=(0.0,))
    with pytest.raises(ConfigError, match="accepted"):
        PCKAccumulator(by=("instance",))
    acc = PCKAccumulator()
    with pytest.raises(DataError, match="no visible keypoints"):
        acc.compute()
    with pytest.raises(DataError, match="bounding-box"):
        acc.update(np.zeros((1, 2)), np.zeros((1, 2)), scale=0.0, visible=True, category="a")
    with pytest.raises(ValueError):
        acc.update(np.zeros((2, 3)), np.zeros((2, 3)), scale=1.0, visible=True)
