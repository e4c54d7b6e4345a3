"""The synthetic suite: official layouts, exact read-back through the readers, learnable classes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from densebench.data import FAMILIES, available, open_dataset
from densebench.data.coco import read_categories
from densebench.data.synth import ensure_synthetic_suite, write_synthetic_suite
from densebench.data.voc import voc_palette


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    info = write_synthetic_suite(root, seed=3, scale="tiny")
    return root, info


def _manifest(path):
    return json.loads((path / "densebench_manifest.json").read_text())


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path, tiny):
    root, _ = tiny
    write_synthetic_suite(tmp_path / "again", seed=3, scale="tiny")
    assert _tree_digest(tmp_path / "again") == _tree_digest(root)
    write_synthetic_suite(tmp_path / "other", seed=4, scale="tiny")
    assert _tree_digest(tmp_path / "other") != _tree_digest(root)


def test_every_layout_is_found(tiny):
    root, info = tiny
    assert available(root) == list(FAMILIES)
    assert info["counts"]["voc"] == {"trainaug": 6, "val": 4, "train": 3}
    assert (root / "VOCSegmentation" / "sets" / "trainaug.txt").read_text().split() == \
        _manifest(root / "VOCSegmentation")["splits"]["trainaug"]
    assert (root / "coco" / "annotations" / "panoptic_annotations" / "panoptic_val2017.json").is_file()
    assert (root / "coco" / "annotations" / "stuff_annotations" / "stuff_val2017.json").is_file()
    # SPair layout lists use CRLF like the release
    assert b"\r\n" in (root / "SPair-71k" / "Layout" / "large" / "test.txt").read_bytes()


def _read_hist(ds):
    hist: dict[str, int] = {}
    for i in range(len(ds)):
        _, image, mask = ds[i]
        assert mask.shape == (image.height, image.width)
        v, n = np.unique(mask, return_counts=True)
        for a, b in zip(v.tolist(), n.tolist()):
            hist[str(a)] = hist.get(str(a), 0) + b
    return hist


@pytest.mark.parametrize("family,folder,splits", [
    ("voc", "VOCSegmentation", ("trainaug", "val", "train")),
    ("ade20k", "ADEChallengeData2016", ("training", "validation")),
    ("coco-things", "coco", ("train", "val")),
    ("coco-stuff", "coco", ("train", "val")),
])
def test_readers_read_back_what_synth_wrote(synth_root, family, folder, splits):
    manifest = _manifest(synth_root / folder)
    for split in splits:
        ds = open_dataset(family, synth_root, split)
        assert ds.synthetic
        assert ds.ids == manifest["splits"][split]
        assert len(ds) == manifest["counts"][split]
        assert _read_hist(ds) == manifest["label_histograms"][family][split]


def test_label_encodings_match_the_official_formats(synth_root):
    voc = open_dataset("voc", synth_root, "val")
    with Image.open(voc.mask_path(voc.ids[0])) as im:
        assert im.mode == "P"
        assert im.getpalette()[:63] == voc_palette()[:63]
    hist = _manifest(synth_root / "VOCSegmentation")["label_histograms"]["voc"]["val"]
    assert "255" in hist and hist["255"] > 0                       # boundary band
    assert set(hist) - {"255"} == {str(c) for c in range(21)}     # every VOC class appears in val
    ade = _manifest(synth_root / "ADEChallengeData2016")["label_histograms"]["ade20k"]["training"]
    assert "0" in ade and all(0 <= int(k) <= 150 for k in ade)
    # COCO: thing masks hold real panoptic category ids, stuff pixelmaps real COCO-Stuff ids
    pan_ids = {c["id"] for c in read_categories("panoptic")[0]}
    coco = synth_root / "coco" / "annotations"
    things = set(np.unique(np.stack([np.array(Image.open(p)).ravel()[:4000]
                                     for p in sorted((coco / "val2017").glob("*.png"))[:6]])).tolist())
    assert things <= pan_ids | {0} and any(1 <= v <= 90 for v in things) and any(v >= 92 for v in things)
    stuff_dir = coco / "stuff_annotations" / "stuff_val2017_pixelmaps"
    stuff = set(np.unique(np.concatenate([np.array(Image.open(p)).ravel() for p in stuff_dir.glob("*.png")])).tolist())
    assert stuff <= set(range(92, 184)) | {0} and 183 in stuff
    # all 12 thing and 15 stuff classes are present in the val split
    hm = _manifest(synth_root / "coco")["label_histograms"]
    assert {int(k) for k in hm["coco-things"]["val"]} - {255} == set(range(12))
    assert {int(k) for k in hm["coco-stuff"]["val"]} - {255} == set(range(15))


def test_spair_keypoints_follow_the_recorded_warps(synth_root):
    manifest = _manifest(synth_root / "SPair-71k")
    ds = open_dataset("spair", synth_root, "test")
    assert len(ds.pairs) == manifest["counts"]["test"] == 40
    assert ds.out_of_image == 0
    assert {p["viewpoint_variation"] for p in ds.pairs} <= {0, 1, 2}
    checked = 0
    for p in ds.pairs:
        a = np.array(manifest["pair_warps_src_to_trg"][p["name"]])
        both = p["src_vis"] & p["trg_vis"]
        mapped = p["src_kps"][both] @ a[:, :2].T + a[:, 2]
        np.testing.assert_allclose(mapped, p["trg_kps"][both], atol=2e-3)
        # independent check: every visible keypoint lies on the object in the Segmentation mask
        for side in ("src", "trg"):
            mask = np.array(Image.open(ds.mask_path(p[f"{side}_id"])))
            pts = np.round(p[f"{side}_kps"][p[f"{side}_vis"]]).astype(int)
            assert (mask[pts[:, 1], pts[:, 0]] > 0).all()
            x1, y1, x2, y2 = p[f"{side}_bbox"]
            assert (pts[:, 0] >= x1 - 1).all() and (pts[:, 0] <= x2 + 1).all()
            assert (pts[:, 1] >= y1 - 1).all() and (pts[:, 1] <= y2 + 1).all()
        checked += int(both.sum())
    assert checked > 100


def _patch_features(image: Image.Image, mask: np.ndarray, p: int = 8):
    """Hand-made patch descriptor (mean colour + gradient energy by orientation), an independent 'encoder'."""
    x = np.asarray(image, np.float32) / 255
    gx = np.abs(np.diff(x.mean(2), axis=1, append=0))
    gy = np.abs(np.diff(x.mean(2), axis=0, append=0))
    feats, labels = [], []
    for r in range(0, x.shape[0] - p + 1, p):
        for c in range(0, x.shape[1] - p + 1, p):
            lab = mask[r:r + p, c:c + p]
            vals, counts = np.unique(lab, return_counts=True)
            if counts.max() < p * p * 0.9 or vals[counts.argmax()] == 255:
                continue
            sl = (slice(r, r + p), slice(c, c + p))
            feats.append(np.concatenate([x[sl].mean((0, 1)), x[sl].std((0, 1)), [gx[sl].mean(), gy[sl].mean()]]))
            labels.append(int(vals[counts.argmax()]))
    return feats, labels


def test_classes_are_learnable_and_a_useless_feature_is_not(synth_root):
    """A nearest-centroid classifier on a crude patch descriptor beats chance by far; random features do not."""
    def collect(split):
        ds = open_dataset("voc", synth_root, split)
        f, y = [], []
        for i in range(len(ds)):
            _, im, m = ds[i]
            a, b = _patch_features(im, m)
            f += a
            y += b
        return np.array(f), np.array(y)

    xtr, ytr = collect("trainaug")
    xva, yva = collect("val")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    classes = np.unique(ytr)
    cent = np.stack([xtr[ytr == c].mean(0) for c in classes])
    pred = classes[np.argmin(((xva[:, None] - cent[None]) ** 2).sum(-1), 1)]
    fg = yva > 0
    acc_fg = (pred[fg] == yva[fg]).mean()
    assert acc_fg > 0.35, acc_fg                      # 20 foreground classes: chance = 0.05
    rng = np.random.default_rng(0)
    rtr, rva = rng.normal(size=xtr.shape), rng.normal(size=xva.shape)
    rcent = np.stack([rtr[ytr == c].mean(0) for c in classes])
    rpred = classes[np.argmin(((rva[:, None] - rcent[None]) ** 2).sum(-1), 1)]
    assert (rpred[fg] == yva[fg]).mean() < 0.15


def test_ensure_synthetic_suite_generates_once(tmp_path):
    home = ensure_synthetic_suite(tmp_path, scale="tiny")
    assert available(home) == list(FAMILIES)
    stamp = (home / "SPair-71k" / "densebench_manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_suite(tmp_path, scale="tiny") == home
    assert (home / "SPair-71k" / "densebench_manifest.json").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
