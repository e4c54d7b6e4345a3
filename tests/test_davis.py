"""DAVIS-2017 label propagation: the official metric against brute force, DINO's propagation against a literal
loop and the reference's own tensor code, the official layout, and end-to-end runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densebench.benchmark_table import get_benchmark
from densebench.data import available, find_root, open_dataset
from densebench.data.verify import prepare_instructions, verify
from densebench.data.voc import voc_palette
from densebench.davis_metrics import (
    DavisAccumulator,
    boundary_f,
    boundary_map,
    boundary_radius,
    davis_statistics,
    region_similarity,
)
from densebench.encoders import load_encoder
from densebench.errors import DataError
from densebench.features import FeatureCache
from densebench.protocols import davis as dv

# ------------------------------------------------------------------------------------------------ metric


def _blobs(rng, h, w, n=2):
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 * rng.uniform(0.3, 3) < r * r
        if rng.uniform() < 0.3:
            m ^= rng.uniform(size=(h, w)) < 0.05
        out.append(m)
    return out


def test_region_similarity_is_the_per_pixel_iou():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(1, 20, 2)
        a, b = rng.uniform(size=(2, h, w)) < rng.uniform(0, 1, 2)[:, None, None]
        inter = union = 0
        for y in range(h):
            for x in range(w):
                inter += bool(a[y, x] and b[y, x])
                union += bool(a[y, x] or b[y, x])
        assert region_similarity(a, b) == pytest.approx(1.0 if union == 0 else inter / union, abs=1e-12)
    empty = np.zeros((3, 4, 5), bool)
    np.testing.assert_array_equal(region_similarity(empty, empty), [1.0, 1.0, 1.0])   # both empty: 1


def _brute_boundary(seg: np.ndarray) -> np.ndarray:
    """seg2bmap spelled per pixel: differs from its right, lower or lower-right neighbour (0 outside); last row
    only right, last column only lower, the corner never."""
    h, w = seg.shape
    out = np.zeros((h, w), bool)

    def at(y, x):
        return bool(seg[y, x]) if y < h and x < w else False

    for y in range(h):
        for x in range(w):
            v = bool(seg[y, x])
            if y == h - 1 and x == w - 1:
                out[y, x] = False
            elif y == h - 1:
                out[y, x] = v != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = v != at(y + 1, x)
            else:
                out[y, x] = v != at(y, x + 1) or v != at(y + 1, x) or v != at(y + 1, x + 1)
    return out


def _brute_f(gt: np.ndarray, pred: np.ndarray, bound_th: float) -> float:
    gb, pb = _brute_boundary(gt), _brute_boundary(pred)
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * math.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2))
    gpts, ppts = list(zip(*np.nonzero(gb))), list(zip(*np.nonzero(pb)))
    if not ppts and not gpts:
        return 1.0
    if not ppts or not gpts:
        return 0.0

    def matched(src, dst):
        return sum(any((y - v) ** 2 + (x - u) ** 2 <= r * r for v, u in dst) for y, x in src)

    p, rec = matched(ppts, gpts) / len(ppts), matched(gpts, ppts) / len(gpts)
    return 0.0 if p + rec == 0 else 2 * p * rec / (p + rec)


def test_boundary_map_and_f_measure_match_brute_force():
    rng = np.random.default_rng(1)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(2, 28, 2))
        a, b = _blobs(rng, h, w)
        if t % 10 == 0:
            a[:] = False
        np.testing.assert_array_equal(boundary_map(a), _brute_boundary(a))
        th = [0.008, 0.05, 0.12, 2, 3.0][t % 5]
        assert boundary_f(a, b, th) == pytest.approx(_brute_f(a, b, th), abs=1e-12), (h, w, th)


def test_boundary_tolerance_is_a_disk_of_ceil_th_times_the_diagonal():
    h, w = 100, 150                                  # diagonal 180.3 px: ceil(0.008 * 180.3) = 2
    assert boundary_radius((h, w)) == 2 and boundary_radius((480, 854)) == 8
    gt = np.zeros((h, w), bool)
    gt[30:70, 40:100] = True
    for shift, want_perfect in ((0, True), (1, True), (2, True), (3, False)):
        pred = np.roll(gt, shift, axis=1)
        f = boundary_f(gt, pred)
        assert (f == 1.0) == want_perfect, (shift, f)
        assert f == pytest.approx(_brute_f(gt, pred, 0.008), abs=1e-12)
    # a diagonal offset of (2, 2) is 2.83 px away: outside the radius-2 disk, though within a 5x5 square
    diag = np.roll(np.roll(gt, 2, axis=0), 2, axis=1)
    assert boundary_f(gt, diag) < 1.0
    assert boundary_f(gt, np.zeros_like(gt)) == 0.0 and boundary_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_statistics_follow_the_official_binning():
    v = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    mean, recall, decay = davis_statistics(v)
    # n = 8: round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7]: first bin v[0:3], last bin v[5:8]
    assert mean == pytest.approx(v.mean())
    assert recall == pytest.approx(4 / 8)
    assert decay == pytest.approx(v[0:3].mean() - v[5:8].mean())
    assert davis_statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))
    assert davis_statistics([0.6, 0.2])[2] == pytest.approx(0.4)        # bins [v0], [v0 v1], [v1], [v1]


def test_accumulator_scores_objects_of_the_first_frame_without_first_and_last_frames():
    rng = np.random.default_rng(2)
    t, h, w = 5, 12, 16
    gt = rng.integers(0, 3, (t, h, w)).astype(np.uint8)
    gt[0, 0, 0], gt[0, 0, 1] = 1, 2
    gt[2, 3, 3] = 3                                  # id 3 is not in the first frame: not an object
    gt[1, 5, 5] = 255                                # void counts as background
    pred = rng.integers(0, 3, (t, h, w)).astype(np.uint8)
    pred[0] = 0                                      # first and last frames are never scored
    pred[-1] = 0
    acc = DavisAccumulator()
    acc.update("seq", gt, pred)
    out = acc.compute()
    assert set(out["per_object_j"]) == {"seq_1", "seq_2"}
    js, fs = [], []
    for k in (1, 2):
        g = np.where(gt == 255, 0, gt)[1:-1] == k
        p = pred[1:-1] == k
        js.append(np.mean([(g[i] & p[i]).sum() / (g[i] | p[i]).sum() for i in range(len(g))]) * 100)
        fs.append(np.mean([_brute_f(g[i], p[i], 0.008) for i in range(len(g))]) * 100)
        assert out["per_object_j"][f"seq_{k}"] == pytest.approx(js[-1])
    assert out["j_mean"] == pytest.approx(np.mean(js)) and out["f_mean"] == pytest.approx(np.mean(fs))
    assert out["j_and_f"] == pytest.approx((np.mean(js) + np.mean(fs)) / 2)
    assert out["per_sequence_j_and_f"]["seq"] == pytest.approx(out["j_and_f"])


# --------------------------------------------------------------------------------------------- frames


def test_reference_size_rounds_the_long_side_down_to_64():
    assert dv.reference_size(480, 854) == (480, 832)
    assert dv.reference_size(480, 910) == (480, 896)
    assert dv.reference_size(854, 480) == (832, 480)        # portrait: the width becomes 480
    assert dv.reference_size(480, 480) == (480, 448)        # square: read_frame makes the height 480


def test_cv2_linear_resize_reproduces_opencv():
    """Golden values from cv2.resize (OpenCV 5.1, INTER_LINEAR) of this image; the emulation also matched
    OpenCV bit for bit on 300 random size pairs (see docs/davis.md)."""
    img = ((np.arange(7 * 11 * 3).reshape(7, 11, 3) * 37) % 256).astype(np.uint8)
    assert dv.cv2_linear_resize(img, 3, 5)[..., 0].tolist() == [
        [95, 67, 174, 128, 133], [146, 134, 122, 110, 98], [110, 115, 70, 177, 148]]
    up = dv.cv2_linear_resize(img, 9, 14)[..., 0]
    assert up[0].tolist() == [0, 75, 162, 186, 81, 168, 100, 86, 128, 14, 92, 179, 184, 86]
    assert up[-1].tolist() == [158, 59, 64, 152, 230, 116, 157, 144, 76, 163, 58, 81, 169, 244]
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (48, 85, 3), dtype=np.uint8)
    np.testing.assert_array_equal(dv.cv2_linear_resize(big, 48, 85), big)        # same size: a copy
    half = torch.from_numpy(big).permute(2, 0, 1)[None].float()
    ref = F.interpolate(half, size=(48, 64), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(dv.cv2_linear_resize(big, 48, 64).astype(float) - ref).max() <= 0.51   # rounding only


def test_frame_view_is_the_reference_read_frame():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (60, 107, 3), dtype=np.uint8)
    view = dv.DavisFrameView(60, 64, 14, dv.DINO_VIDEO_MEAN, dv.DINO_VIDEO_STD)
    x, _ = view(0, Image.fromarray(rgb))
    # read_frame literally: BGR image, cv2.resize, float32 / 255, BGR->RGB, CHW, color_normalize (sub_, div_)
    bgr = rgb[:, :, ::-1]
    th, tw = dv.reference_size(60, 107, 60, 64)
    img = dv.cv2_linear_resize(np.ascontiguousarray(bgr), th, tw).astype(np.float32) / 255.0
    img = torch.from_numpy(np.transpose(img[:, :, ::-1].copy(), (2, 0, 1))).float()
    for t, m, s in zip(img, [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]):
        t.sub_(m)
        t.div_(s)
    # a /14 patch embedding sees whole patches only: 60x64 -> 56x56
    assert tuple(x.shape) == (3, 56, 56)
    torch.testing.assert_close(x, img[:, :56, :56], rtol=0, atol=0)


def test_first_frame_labels_are_the_nearest_downsampled_one_hot():
    ann = np.zeros((40, 60), np.uint8)
    ann[5:20, 10:30] = 1
    ann[22:38, 35:58] = 3
    ann[0:3, 0:3] = 255
    lab = dv.first_frame_labels(ann, (4, 6))
    small = np.asarray(Image.fromarray(np.where(ann == 255, 0, ann)).resize((6, 4), Image.Resampling.NEAREST))
    assert lab.shape == (4, 4, 6)                   # channels 0..3 (id 2 absent but still a channel)
    np.testing.assert_array_equal(lab.argmax(0).numpy(), small)
    assert torch.all(lab.sum(0) == 1) and lab[2].sum() == 0


# ------------------------------------------------------------------------------------------ propagation


def _literal_step(target, keys, labels, temperature, topk, size, h, w):
    """One query at a time, float64: exp(cos / T) to every context patch within the neighbourhood, keep the
    values >= the k-th largest, normalise, weight the labels."""
    n, k, _ = keys.shape
    c = labels.shape[1]
    out = np.zeros((c, target.shape[0]))
    for q in range(target.shape[0]):
        qy, qx = divmod(q, w)
        vals = []
        for ctx in range(n):
            for key in range(k):
                ky, kx = divmod(key, w)
                near = size == 0 or (abs(ky - qy) <= size and abs(kx - qx) <= size)
                vals.append((math.exp(float(np.dot(target[q], keys[ctx, key])) / temperature) if near else 0.0,
                             ctx, key))
        kth = sorted((v for v, _, _ in vals), reverse=True)[min(topk, len(vals)) - 1]
        kept = [(v, ctx, key) for v, ctx, key in vals if v >= kth]
        total = sum(v for v, _, _ in kept)
        for v, ctx, key in kept:
            out[:, q] += v / total * labels[ctx, :, key]
    return out


def _reference_label_propagation(feat_tar, list_frame_feats, list_segs, size, topk, h, w):
    """DINO's label_propagation (eval_video_segmentation.py) with its own tensor operations."""
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size > 0:
        mask = torch.zeros(h, w, h, w)
        for i in range(h):
            for j in range(w):
                for p in range(2 * size + 1):
                    for q in range(2 * size + 1):
                        if 0 <= i - size + p < h and 0 <= j - size + q < w:
                            mask[i, j, i - size + p, j - size + q] = 1
        aff *= mask.reshape(h * w, h * w).unsqueeze(0).repeat(ncontext, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, c, h, w = segs.shape
    segs = segs.reshape(nmb_context, c, -1).transpose(2, 1).reshape(-1, c).T
    return torch.mm(segs, aff).reshape(1, c, h, w)


@pytest.mark.parametrize("size, topk, chunk", [(1, 4, 0), (0, 5, 5), (2, 3, 7)])
def test_propagation_step_matches_a_literal_loop_and_the_reference(size, topk, chunk):
    g = torch.Generator().manual_seed(size + topk)
    h, w, n, d, c = 3, 4, 3, 8, 3
    target = F.normalize(torch.randn(h * w, d, generator=g), dim=-1)
    keys = F.normalize(torch.randn(n, h * w, d, generator=g), dim=-1)
    labels = torch.softmax(torch.randn(n, c, h * w, generator=g) * 3, dim=1)
    mask = dv.neighbourhood_mask(h, w, size) if size else None
    got = dv.propagate_step(target, keys, labels, temperature=0.1, topk=topk, mask=mask, chunk=chunk)
    want = _literal_step(target.double().numpy(), keys.double().numpy(), labels.double().numpy(), 0.1, topk,
                         size, h, w)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    ref = _reference_label_propagation(target, [k.T for k in keys], [lab.reshape(1, c, h, w) for lab in labels],
                                       size, topk, h, w)
    torch.testing.assert_close(got.reshape(1, c, h, w), ref, rtol=1e-5, atol=1e-6)


def test_propagate_sequence_uses_the_first_frame_and_the_last_n_soft_labels():
    g = torch.Generator().manual_seed(5)
    t_len, h, w, d = 7, 3, 3, 6
    feats = F.normalize(torch.randn(t_len, h, w, d, generator=g), dim=-1)
    first = torch.softmax(torch.randn(2, h, w, generator=g), 0)
    got = list(dv.propagate_sequence(feats, first, n_last=2, neighbourhood=1, topk=3, temperature=0.1))
    flat = feats.reshape(t_len, h * w, d)
    mask = dv.neighbourhood_mask(h, w, 1)
    queue = []                                       # the reference's queue.Queue(n_last): (frame, soft labels)
    for t in range(1, t_len):
        ctx = [0] + [i for i, _ in queue]
        labels = torch.stack([first.reshape(2, -1)] + [s for _, s in queue])
        soft = dv.propagate_step(flat[t], flat[ctx], labels, temperature=0.1, topk=3, mask=mask)
        if len(queue) == 2:
            queue.pop(0)
        queue.append((t, soft))
        torch.testing.assert_close(got[t - 1], soft.reshape(2, h, w), rtol=0, atol=0)
    assert len(got) == t_len - 1


def test_prediction_upsamples_normalises_each_channel_and_resizes_nearest():
    g = torch.Generator().manual_seed(6)
    soft = torch.rand(3, 2, 3, generator=g)
    soft[2] = 0                                      # an all-zero channel stays 0
    pred = dv.labels_to_prediction(soft, 4, (10, 13))
    up = F.interpolate(soft[None], scale_factor=4, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    for ch in range(3):                              # the reference's norm_mask, literally
        m = up[ch]
        if m.max() > 0:
            m = m - m.min()
            up[ch] = m / m.max()
    want = np.asarray(Image.fromarray(up.argmax(0).numpy().astype(np.uint8)).resize((13, 10), 0))
    np.testing.assert_array_equal(pred, want)
    assert dv.channel_minmax(torch.full((1, 2, 2), 0.3)).abs().max() == 0   # constant channel: 0, not NaN


# --------------------------------------------------------------------------------------- official layout


def _write_davis(root, sequences, split="val", size=(64, 96), frames=4, static=None, extra=()):
    """A DAVIS tree written by hand in the official layout (palette PNG annotations, ImageSets/2017)."""
    h, w = size
    rng = np.random.default_rng(7)
    for seq in list(sequences) + list(extra):
        for d in ("JPEGImages", "Annotations"):
            (root / d / "480p" / seq).mkdir(parents=True, exist_ok=True)
        image = static[0] if static else None
        for t in range(frames):
            img = image if image is not None else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            lab = static[1] if static else np.zeros((h, w), np.uint8)
            if not static:
                lab[4 + t:20 + t, 8:30] = 1
                lab[30:50, 40 + 2 * t:70 + 2 * t] = 2
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", quality=95)
            pim = Image.fromarray(lab, "P")
            pim.putpalette(voc_palette())
            pim.save(root / "Annotations" / "480p" / seq / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{s}\n" for s in sequences))
    return root


def test_reading_the_official_layout(tmp_path):
    root = _write_davis(tmp_path / "DAVIS", ["bmx", "apple"], extra=["not-listed"])
    assert find_root("davis", tmp_path) == root and "davis" in available(tmp_path)
    ds = open_dataset("davis", tmp_path, "val")
    assert ds.sequences == ["bmx", "apple"]                       # split-list order, unlisted folder ignored
    assert ds.frames["bmx"] == ["00000", "00001", "00002", "00003"]
    assert ds.ids[:2] == ["bmx/00000", "bmx/00001"] and len(ds) == 8
    id_, image, mask = ds[1]
    assert id_ == "bmx/00001" and image.size == (96, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1, 2} and mask[5, 10] == 1
    ann = ds.annotations("apple")
    assert ann.shape == (4, 64, 96) and ann[3, 35, 60] == 2
    one = ds.sequence("apple")
    assert one.ids == ["apple/00000", "apple/00001", "apple/00002", "apple/00003"]
    assert one.manifest_hash() != ds.sequence("bmx").manifest_hash()
    assert open_dataset("davis", tmp_path, "val", id_list=["apple"]).sequences == ["apple"]
    (problem,) = verify("davis", tmp_path, splits=("val",))       # a hand-made tree: only the count is off
    assert "has 2 ids; the published split has 30" in problem.message
    (root / "Annotations" / "480p" / "apple" / "00002.png").unlink()
    problems = verify("davis", tmp_path, splits=("val",))
    assert len(problems) == 2 and any("00002.png" in p.path and "missing" in p.message for p in problems)
    with pytest.raises(DataError, match="ImageSets/2017/train.txt"):
        open_dataset("davis", tmp_path, "train")
    text = prepare_instructions("davis")
    assert "https://data.vision.ee.ethz.ch/csergi/share/davis/DAVIS-2017-trainval-480p.zip" in text
    assert "ImageSets/2017" in text


def test_a_missing_annotation_is_refused_before_any_forward(tmp_path):
    root = _write_davis(tmp_path / "DAVIS", ["bmx"])
    (root / "Annotations" / "480p" / "bmx" / "00003.png").unlink()
    enc = load_encoder("pixels")
    spec = get_benchmark("davis-propagation")
    with pytest.raises(DataError, match="no annotation"):
        spec.run(enc, tmp_path, spec.default_config(short_side=64), progress=False)
    assert enc.images_forwarded == 0


# ------------------------------------------------------------------------------------------ end to end


def test_a_static_sequence_keeps_the_first_masks_with_a_random_vit(tmp_path):
    """Identical frames, objects on the 16-px grid, frames already at the reference size: every frame's
    features equal the first frame's, so propagation must hand the first masks on almost unchanged."""
    p, h, w = 16, 128, 192
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = np.zeros((h, w), np.uint8)
    lab[2 * p:5 * p, 1 * p:4 * p] = 1
    lab[4 * p:7 * p, 7 * p:11 * p] = 2
    _write_davis(tmp_path / "DAVIS", ["static"], size=(h, w), frames=6, static=(image, lab))
    spec = get_benchmark("davis-propagation")
    enc = load_encoder("random:vit_small_patch16_224")
    r = spec.run(enc, tmp_path, spec.default_config(short_side=128), progress=False)
    assert r.metrics["j_mean"] > 90 and r.metrics["j_and_f"] > 85, r.metrics
    assert r.metrics["j_recall"] == 100.0
    assert r.derived["feature_grids"] == {"static": [8, 12]} and r.derived["label_channels"] == {"static": 3}


@pytest.fixture(scope="module")
def synthetic_runs(synth_root, tmp_path_factory):
    cache = FeatureCache(tmp_path_factory.mktemp("davis-cache"))
    spec = get_benchmark("davis-propagation")
    out = tmp_path_factory.mktemp("davis-preds")
    enc = load_encoder("pixels")
    first = spec.run(enc, synth_root, spec.default_config(**spec.synthetic, save_predictions=str(out)), cache=cache,
                     progress=False)
    forwarded = enc.images_forwarded
    again = spec.run(enc, synth_root, spec.default_config(**spec.synthetic), cache=cache, progress=False)
    return first, again, forwarded, enc.images_forwarded - forwarded, out


def test_synthetic_davis_runs_end_to_end_and_is_cached(synth_root, synthetic_runs):
    first, again, forwarded, forwarded_again, _ = synthetic_runs
    manifest = json.loads((synth_root / "DAVIS" / "densebench_manifest.json").read_text())
    n_frames = sum(len(manifest["frames"][s]) for s in manifest["splits"]["val"])
    assert forwarded == n_frames and forwarded_again == 0          # second run: every frame from the cache
    assert first.metrics == again.metrics
    for key in ("j_and_f", "j_mean", "f_mean", "j_recall", "f_recall"):
        assert 0.0 <= first.metrics[key] <= 100.0
    assert first.main_score == first.metrics["j_and_f"]
    assert set(first.metrics["per_sequence_j_and_f"]) == set(manifest["splits"]["val"])
    objects = {f"{s}_{o['id']}" for s in manifest["splits"]["val"] for o in manifest["motion"][s]}
    assert set(first.metrics["per_object_j"]) == objects
    assert first.provenance["dataset"]["synthetic"] is True


def test_saved_predictions_are_official_palette_pngs_that_rescore_to_the_same_j(synth_root, synthetic_runs):
    first, _, _, _, out = synthetic_runs
    ds = open_dataset("davis", synth_root, "val")
    js = []
    for seq in ds.sequences:
        gt = ds.annotations(seq)
        pngs = sorted((out / seq).glob("*.png"))
        assert [p.stem for p in pngs] == ds.frames[seq]
        with Image.open(pngs[1]) as im:
            assert im.mode == "P" and im.getpalette()[:9] == voc_palette()[:9]
        pred = np.stack([np.asarray(Image.open(p)) for p in pngs])
        np.testing.assert_array_equal(pred[0], gt[0])               # the first frame is the given mask
        for k in range(1, int(gt[0].max()) + 1):                    # brute-force J per object, frames 1..T-2
            g, q = gt[1:-1] == k, pred[1:-1] == k
            js.append(np.mean([(g[i] & q[i]).sum() / max(1, (g[i] | q[i]).sum()) if (g[i] | q[i]).any() else 1.0
                               for i in range(len(g))]) * 100)
    assert first.metrics["j_mean"] == pytest.approx(np.mean(js))
    pictures = first.provenance["artifacts"]
    assert pictures and all(p.endswith(".png") for p in pictures)


def test_static_case_scores_higher_than_moving_objects(synth_root, tmp_path):
    """The same random ViT: moving objects (synthetic suite) score below an aligned static sequence."""
    spec = get_benchmark("davis-propagation")
    enc = load_encoder("random:vit_small_patch16_224")
    moving = spec.run(enc, synth_root, spec.default_config(**spec.synthetic), progress=False).metrics["j_and_f"]
    p = 16
    image = np.random.default_rng(9).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    lab = np.zeros((128, 192), np.uint8)
    lab[p:4 * p, 2 * p:6 * p] = 1
    _write_davis(tmp_path / "DAVIS", ["still"], size=(128, 192), frames=5, static=(image, lab))
    still = spec.run(enc, tmp_path, spec.default_config(short_side=128), progress=False).metrics["j_and_f"]
    assert 0 <= moving < still <= 100
