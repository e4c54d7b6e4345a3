"""A deterministic miniature of every benchmark dataset, in the official on-disk layouts.

The suite is the test data and the embedded default run: it must exercise the real readers (same folders,
file formats, id lists, label encodings, category JSONs) and it must be *learnable*, so that a reasonable
encoder scores well above chance and a useless one does not. A class is therefore a texture + shape family:
a base hue, a pattern (stripes, checks, dots, waves, rings, plaid) with a class-specific period and
orientation, and a class-specific silhouette; instances jitter colour, size, pose and pattern phase, several
objects share an image, and backgrounds are smooth, mottled gradients. Each root gets a
``densebench_manifest.json`` with its splits (readers use it instead of the shipped real lists), the counts
and the label histograms the generator wrote (the tests compare what the readers read back against them).
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from .base import MANIFEST_NAME
from .coco import STUFF_OTHER_ID, read_categories, stuff_lut, things_lut
from .spair import VOC_CLASS_ID
from .spair import categories as spair_categories
from .voc import voc_palette

#: Bump when the generated content changes: ensure_synthetic_suite keys its cache folder on it.
SYNTH_VERSION = 3

SCALES: dict[str, dict] = {
    "default": {"voc": {"trainaug": 48, "val": 24}, "ade20k": {"training": 48, "validation": 24},
                "coco": {"train": 48, "val": 24}, "spair_categories": 5, "spair_images": 8,
                "spair_pairs": {"trn": 8, "val": 4, "test": 8}, "size": (160, 128),
                "davis": {"train": 2, "val": 3}, "davis_frames": 8, "davis_size": (192, 128)},
    "tiny": {"voc": {"trainaug": 6, "val": 4}, "ade20k": {"training": 6, "validation": 4},
             "coco": {"train": 6, "val": 4}, "spair_categories": 2, "spair_images": 4,
             "spair_pairs": {"trn": 2, "val": 1, "test": 3}, "size": (96, 80),
             "davis": {"train": 1, "val": 2}, "davis_frames": 4, "davis_size": (96, 64)},
}

PATTERNS = ("stripes", "checks", "dots", "waves", "rings", "plaid")
SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "cross", "ring", "blob")

#: ADE20K classes used by the suite (a handful of the 150): stuff as bands, objects on top.
ADE_STUFF = {"top": (3, 6), "middle": (1, 2), "bottom": (4, 10, 7)}   # sky/ceiling, wall/building, floor/grass/road
ADE_OBJECTS = (5, 13, 21, 20, 16, 18, 23, 37)   # tree, person, car, chair, table, plant, painting, lamp

#: COCO thing categories used (two real category ids per thing supercategory).
COCO_THINGS = (1, 2, 3, 13, 15, 18, 24, 28, 33, 37, 38, 44, 47, 53, 59, 62, 67, 72, 73, 78, 82, 84, 85)
#: COCO-Stuff categories used (covering all 15 stuff supercategories) → the panoptic id their pixels get in
#: the panoptic-derived thing masks (the panoptic release merges some stuff classes).
COCO_STUFF_TO_PANOPTIC = {128: 128, 151: 151, 102: 186, 118: 118, 122: 122, 107: 107, 149: 149, 154: 154,
                          119: 119, 124: 193, 100: 100, 157: 187, 106: 187, 150: 198, 138: 138, 109: 109,
                          171: 171, 177: 177, 155: 155, 180: 180}
COCO_STUFF_BANDS = {"top": (157, 106, 102, 180, 171, 177, 128, 151),
                    "bottom": (118, 149, 154, 124, 155, 119, 122, 107, 150, 138, 109, 100)}


# --------------------------------------------------------------------------------------- appearance
@dataclass(frozen=True)
class Style:
    """How one class looks: the features an encoder must pick up to separate it from the others."""

    hue: float
    sat: float
    val: float
    pattern: str
    period: float
    angle: float
    shape: str


def class_style(k: int) -> Style:
    """The style of class number ``k`` (0-based within a dataset), spread so that neighbours differ."""
    return Style(hue=(0.07 + k * 0.618034) % 1.0, sat=0.55 + 0.35 * ((k * 7) % 5) / 4,
                 val=0.6 + 0.35 * ((k * 11) % 4) / 3, pattern=PATTERNS[k % len(PATTERNS)],
                 period=5.0 + (k * 3) % 8, angle=float((k * 47) % 180), shape=SHAPES[(k * 3) % len(SHAPES)])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def _hsv_array(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB for (N,) hue and value arrays and a scalar saturation."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((len(h), 3), np.float32)
    for k, chans in enumerate(table):
        sel = i == k
        for c in range(3):
            rgb[sel, c] = chans[c][sel]
    return rgb


def _pattern(style: Style, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float,
             rng: np.random.Generator) -> np.ndarray:
    a = np.deg2rad(style.angle + rng.uniform(-10, 10))
    period = style.period * rng.uniform(0.9, 1.1)
    f = 1.0 / period
    xr = xx * np.cos(a) + yy * np.sin(a)
    yr = -xx * np.sin(a) + yy * np.cos(a)
    ph = rng.uniform(0, 2 * np.pi)
    if style.pattern == "stripes":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * f * xr + ph)
    elif style.pattern == "checks":
        p = ((np.floor(f * xr + ph) + np.floor(f * yr)) % 2).astype(np.float32)
    elif style.pattern == "dots":
        gx = (f * xr + ph) % 1.0 - 0.5
        gy = (f * yr) % 1.0 - 0.5
        p = (gx * gx + gy * gy < 0.09).astype(np.float32)
    elif style.pattern == "waves":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xr + 0.3 * period * np.sin(2 * np.pi * yr / (2.5 * period))) + ph)
    elif style.pattern == "rings":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy) + ph)
    else:  # plaid
        p = 0.5 + 0.25 * np.sin(2 * np.pi * f * xr + ph) + 0.25 * np.sin(2 * np.pi * 1.7 * f * yr)
    return p.astype(np.float32)


def _texture(style: Style, xx, yy, cx, cy, rng) -> np.ndarray:
    """An (H, W, 3) texture of ``style`` with instance jitter (colour, phase, orientation)."""
    c1 = _hsv(style.hue + rng.uniform(-0.03, 0.03), style.sat * rng.uniform(0.85, 1.1),
              style.val * rng.uniform(0.85, 1.1))
    c2 = _hsv(style.hue + 0.08, style.sat * 0.6, style.val * 0.4)
    p = _pattern(style, xx, yy, cx, cy, rng)[..., None]
    return c2 + (c1 - c2) * p


def _shape_mask(shape: str, xx, yy, cx, cy, rx, ry, angle, phase=0.0) -> np.ndarray:
    a = np.deg2rad(angle)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(a) + dy * np.sin(a)) / rx
    v = (-dx * np.sin(a) + dy * np.cos(a)) / ry
    r = np.hypot(u, v)
    if shape == "ellipse":
        return r <= 1
    if shape == "rectangle":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return (v <= 0.8) & (v >= 1.9 * np.abs(u) - 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    theta = np.arctan2(v, u)
    if shape == "star":
        return r <= 0.6 + 0.4 * np.cos(5 * theta + phase)
    if shape == "cross":
        return ((np.abs(u) <= 0.35) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.35) & (np.abs(u) <= 1))
    if shape == "ring":
        return (r <= 1) & (r >= 0.5)
    return r <= 0.85 + 0.2 * np.sin(3 * theta + phase)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted, mottled gradient: realistic-ish clutter that carries no class information."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ca = _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8))
    cb = _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.8))
    a = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(a) + yy * np.sin(a)) / max(h, w) + 1) / 2
    for _ in range(3):
        per = rng.uniform(30, 80)
        b = rng.uniform(0, 2 * np.pi)
        t = t + 0.12 * np.sin(2 * np.pi * (xx * np.cos(b) + yy * np.sin(b)) / per + rng.uniform(0, 6.3))
    t = np.clip(t, 0, 1)[..., None]
    return ca + (cb - ca) * t


def _finish(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def _size(rng: np.random.Generator, scale: dict) -> tuple[int, int]:
    w0, h0 = scale["size"]
    return int(w0 + 8 * rng.integers(-3, 4)), int(h0 + 8 * rng.integers(-2, 3))


def _boundary_band(label: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` of a label change: VOC's 255 object-boundary band."""
    edge = np.zeros(label.shape, bool)
    diff_x = label[:, 1:] != label[:, :-1]
    diff_y = label[1:, :] != label[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    for _ in range(width):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def _place_objects(img, label, classes, styles, rng, value_of=lambda c: c):
    """Paint one object per entry of ``classes`` (later ones occlude earlier ones) into img and label."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in classes:
        st = styles[c]
        rx = rng.uniform(0.16, 0.3) * min(h, w)
        ry = rx * rng.uniform(0.7, 1.3)
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        m = _shape_mask(st.shape, xx, yy, cx, cy, rx, ry, rng.uniform(0, 360), rng.uniform(0, 6.3))
        if m.sum() < 30:
            continue
        img[m] = _texture(st, xx, yy, cx, cy, rng)[m]
        label[m] = value_of(c)


def _bands(img, label, classes, styles, rng, value_of=lambda c: c):
    """Fill the image with horizontal stuff bands (one per entry of ``classes``, top first), wavy borders."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cuts = sorted(rng.uniform(0.25, 0.75, size=len(classes) - 1) * h)
    top = np.zeros((h, w), bool)
    for i, c in enumerate(classes):
        if i < len(cuts):
            border = cuts[i] + rng.uniform(3, 9) * np.sin(2 * np.pi * xx / rng.uniform(40, 90) + rng.uniform(0, 6.3))
            m = (yy < border) & ~top
        else:
            m = ~top
        img[m] = _texture(styles[c], xx, yy, w / 2, h / 2, rng)[m]
        label[m] = value_of(c)
        top |= m


def _blob(label, rng, frac=(0.08, 0.16)) -> np.ndarray:
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = rng.uniform(*frac) * min(h, w)
    return _shape_mask("blob", xx, yy, rng.uniform(0, w), rng.uniform(0, h), r, r * rng.uniform(0.6, 1.4),
                       rng.uniform(0, 360), rng.uniform(0, 6.3))


def _clutter(img, m, rng):
    """Grey, unstructured texture for unlabelled regions (no class can be learnt from it)."""
    g = rng.uniform(0.3, 0.7)
    img[m] = np.clip(g + rng.normal(0, 0.12, (int(m.sum()), 3)), 0, 1).astype(np.float32)


def _hist(mask: np.ndarray, into: dict) -> None:
    v, n = np.unique(mask, return_counts=True)
    for a, b in zip(v.tolist(), n.tolist()):
        into[str(a)] = into.get(str(a), 0) + int(b)


def _cycle(split_seed: np.random.Generator, n_classes: int, n: int) -> list[int]:
    """``n`` class draws that visit every class before repeating (so each split holds all classes)."""
    out: list[int] = []
    while len(out) < n:
        out += list(split_seed.permutation(n_classes))
    return out[:n]


#: Folder (under a synthetic root) holding the miniature analogues of the Hummingbird fraction lists.
FRACTION_DIR = "densebench_fractions"


def _write_fractions(root: Path, prefix: str, train_ids: list[str]) -> dict:
    """Seeded 1/8, 1/64, 1/128 lists of the training split, nested like the published ones (at least one id).

    Returns {fraction: {seed: path relative to root}} for the manifest.
    """
    from . import FRACTION_SEEDS
    from .families import VOC

    out: dict = {}
    for seed in FRACTION_SEEDS:
        order = [train_ids[i] for i in np.random.default_rng(seed).permutation(len(train_ids))]
        for frac in VOC.fractions[1]:
            rel = Path(FRACTION_DIR) / f"1_div_{frac}" / f"{prefix}_{frac}_{seed}.txt"
            _ids_file(root / rel, order[: max(1, round(len(train_ids) / frac))])
            out.setdefault(str(frac), {})[str(seed)] = str(rel)
    return out


def _write_manifest(root: Path, splits: dict, hists: dict, extra: dict | None = None) -> None:
    data = {"synthetic": True, "generator": "densebench.data.synth", "version": SYNTH_VERSION,
            "splits": splits, "counts": {s: len(ids) for s, ids in splits.items()}, "label_histograms": hists}
    data.update(extra or {})
    (root / MANIFEST_NAME).write_text(json.dumps(data, indent=1))


def _ids_file(path: Path, ids: list[str], crlf: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{i}\r\n" if crlf else f"{i}\n" for i in ids).encode())


# --------------------------------------------------------------------------------------- the four layouts
def _write_voc(out: Path, scale: dict, rng: np.random.Generator) -> dict:
    root = out / "VOCSegmentation"
    for d in ("images", "SegmentationClass", "SegmentationClassAug", "sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    styles = {c: class_style(c - 1) for c in range(1, 21)}
    palette = voc_palette()
    splits: dict[str, list[str]] = {}
    hists: dict[str, dict] = {}
    counter = 0
    for split, n in scale["voc"].items():
        ids = []
        hist: dict = {}
        n_obj = [int(rng.integers(2, 5)) for _ in range(n)]
        draws = _cycle(rng, 20, sum(n_obj))
        for i in range(n):
            counter += 1
            id_ = f"{2007 + counter % 5}_{counter:06d}"
            w, h = _size(rng, scale)
            img = _background(rng, h, w)
            label = np.zeros((h, w), np.uint8)
            start = sum(n_obj[:i])
            _place_objects(img, label, [d + 1 for d in draws[start:start + n_obj[i]]], styles, rng)
            label[_boundary_band(label)] = 255
            _finish(img, rng).save(root / "images" / f"{id_}.jpg", quality=90)
            if split == "val":
                pim = Image.fromarray(label, "P")
                pim.putpalette(palette)
                pim.save(root / "SegmentationClass" / f"{id_}.png")
            else:
                Image.fromarray(label, "L").save(root / "SegmentationClassAug" / f"{id_}.png")
            _hist(label, hist)
            ids.append(id_)
        splits[split] = ids
        hists[split] = hist
    # The official layout also has a 'train' list (VOC train ⊂ trainaug); masks come from SegmentationClassAug.
    half = len(splits["trainaug"]) // 2
    splits["train"] = splits["trainaug"][:half]
    train_hist: dict = {}
    for id_ in splits["train"]:
        _hist(np.array(Image.open(root / "SegmentationClassAug" / f"{id_}.png")), train_hist)
    hists["train"] = train_hist
    for split, ids in splits.items():
        _ids_file(root / "sets" / f"{split}.txt", ids)
    fractions = _write_fractions(root, "trainaug", splits["trainaug"])
    _write_manifest(root, splits, {"voc": hists}, {"fractions": fractions})
    return {s: len(v) for s, v in splits.items()}


def _write_ade20k(out: Path, scale: dict, rng: np.random.Generator) -> dict:
    root = out / "ADEChallengeData2016"
    used = sorted({c for v in ADE_STUFF.values() for c in v} | set(ADE_OBJECTS))
    styles = {c: class_style(i) for i, c in enumerate(used)}
    splits, hists = {}, {}
    for split, n in scale["ade20k"].items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        prefix = "ADE_train_" if split == "training" else "ADE_val_"
        ids, hist = [], {}
        n_obj = [int(rng.integers(1, 4)) for _ in range(n)]
        draws = _cycle(rng, len(ADE_OBJECTS), sum(n_obj))
        band_draws = {k: _cycle(rng, len(v), n) for k, v in ADE_STUFF.items()}
        for i in range(n):
            id_ = f"{prefix}{i + 1:08d}"
            w, h = _size(rng, scale)
            img = np.zeros((h, w, 3), np.float32)
            label = np.zeros((h, w), np.uint8)
            _bands(img, label, [ADE_STUFF[k][band_draws[k][i]] for k in ("top", "middle", "bottom")], styles, rng)
            start = sum(n_obj[:i])
            _place_objects(img, label, [ADE_OBJECTS[d] for d in draws[start:start + n_obj[i]]], styles, rng)
            if rng.uniform() < 0.7:   # an unlabelled ("other", 0) region
                m = _blob(label, rng)
                _clutter(img, m, rng)
                label[m] = 0
            _finish(img, rng).save(root / "images" / split / f"{id_}.jpg", quality=90)
            Image.fromarray(label, "L").save(root / "annotations" / split / f"{id_}.png")
            _hist(label, hist)
            ids.append(id_)
        splits[split], hists[split] = ids, hist
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(
        f"{c}\t0\t0\t0\tsynthetic class {c}\n" for c in used))
    fractions = _write_fractions(root, "training", splits["training"])
    _write_manifest(root, splits, {"ade20k": hists}, {"classes_used": used, "fractions": fractions})
    return {s: len(v) for s, v in splits.items()}


def _write_coco(out: Path, scale: dict, rng: np.random.Generator) -> dict:
    root = out / "coco"
    pan_cats, _ = read_categories("panoptic")
    stuff_cats, _ = read_categories("stuff")
    thing_super = {c["id"]: c["supercategory"] for c in pan_cats if c.get("isthing") == 1}
    stuff_super = {c["id"]: c["supercategory"] for c in stuff_cats}
    t_supers = sorted(set(thing_super.values()))
    s_supers = sorted(set(stuff_super.values()) - {"other"})
    # Appearance follows the benchmark label (the supercategory), so categories of one supercategory look alike.
    styles = {("t", s): class_style(i) for i, s in enumerate(t_supers)}
    styles.update({("s", s): class_style(len(t_supers) + i) for i, s in enumerate(s_supers)})
    tstyles = {cid: styles[("t", thing_super[cid])] for cid in COCO_THINGS}
    sstyles = {cid: styles[("s", stuff_super[cid])] for cid in COCO_STUFF_TO_PANOPTIC}
    t_lut, s_lut = things_lut(pan_cats), stuff_lut(stuff_cats)
    to_panoptic = np.zeros(256, np.uint8)
    for k, v in COCO_STUFF_TO_PANOPTIC.items():
        to_panoptic[k] = v
    ann = root / "annotations"
    splits, hist_t, hist_s = {}, {}, {}
    serial = 0
    for split, n in scale["coco"].items():
        for d in (root / "images" / f"{split}2017", ann / f"{split}2017",
                  ann / "stuff_annotations" / f"stuff_{split}2017_pixelmaps"):
            d.mkdir(parents=True, exist_ok=True)
        ids, ht, hs = [], {}, {}
        n_obj = [int(rng.integers(2, 5)) for _ in range(n)]
        draws = _cycle(rng, len(COCO_THINGS), sum(n_obj))
        band_draws = {k: _cycle(rng, len(v), n) for k, v in COCO_STUFF_BANDS.items()}
        for i in range(n):
            serial += 1
            id_ = f"{serial * 7919 % 581000 + 100:012d}"
            w, h = _size(rng, scale)
            img = np.zeros((h, w, 3), np.float32)
            stuff = np.zeros((h, w), np.uint8)       # COCO-Stuff pixelmap values
            _bands(img, stuff, [COCO_STUFF_BANDS[k][band_draws[k][i]] for k in ("top", "bottom")], sstyles, rng)
            things = np.zeros((h, w), np.uint8)      # panoptic thing category ids
            start = sum(n_obj[:i])
            _place_objects(img, things, [COCO_THINGS[d] for d in draws[start:start + n_obj[i]]], tstyles, rng)
            is_thing = things > 0
            pan = to_panoptic[stuff]
            pan[is_thing] = things[is_thing]
            stuff[is_thing] = STUFF_OTHER_ID          # thing pixels are 'other' in the stuff pixelmaps
            if rng.uniform() < 0.5:                    # void: unlabelled in both annotations
                m = _blob(stuff, rng, (0.06, 0.1))
                _clutter(img, m, rng)
                pan[m] = 0
                stuff[m] = 0
            _finish(img, rng).save(root / "images" / f"{split}2017" / f"{id_}.jpg", quality=90)
            Image.fromarray(pan, "L").save(ann / f"{split}2017" / f"{id_}.png")
            Image.fromarray(stuff, "L").save(ann / "stuff_annotations" / f"stuff_{split}2017_pixelmaps" / f"{id_}.png")
            _hist(t_lut[pan], ht)
            _hist(s_lut[stuff], hs)
            ids.append(id_)
        splits[split], hist_t[split], hist_s[split] = ids, ht, hs
    (ann / "panoptic_annotations").mkdir(parents=True, exist_ok=True)
    (ann / "panoptic_annotations" / "panoptic_val2017.json").write_text(json.dumps(
        {"info": {"description": "densebench synthetic"}, "categories": pan_cats,
         "images": [{"id": int(i), "file_name": f"{i}.jpg"} for i in splits["val"]], "annotations": []}))
    (ann / "stuff_annotations" / "stuff_val2017.json").write_text(json.dumps(
        {"info": {"description": "densebench synthetic"}, "categories": stuff_cats,
         "images": [{"id": int(i), "file_name": f"{i}.jpg"} for i in splits["val"]], "annotations": []}))
    _write_manifest(root, splits, {"coco-things": hist_t, "coco-stuff": hist_s})
    return {s: len(v) for s, v in splits.items()}


def _affine(cx, cy, s, theta_deg, flip) -> np.ndarray:
    """2x3 matrix mapping template coordinates ([-1, 1]²) to image pixels."""
    t = np.deg2rad(theta_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * s
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    return np.hstack([rot, [[cx], [cy]]])


def _apply(a: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ a[:, :2].T + a[:, 2]


def _compose(a_trg: np.ndarray, a_src: np.ndarray) -> np.ndarray:
    """The affine mapping source-image pixels to target-image pixels for images rendered with a_src, a_trg."""
    m_s = np.vstack([a_src, [0, 0, 1]])
    m_t = np.vstack([a_trg, [0, 0, 1]])
    return (m_t @ np.linalg.inv(m_s))[:2]


def _spair_template(ci: int) -> tuple[np.ndarray, float]:
    """Keypoint slots (template coordinates) and aspect ratio of synthetic SPair category ``ci``."""
    k = 8 + ci % 4
    ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + 0.3 * ci
    rad = np.where(np.arange(k) % 2 == 0, 0.75, 0.4)
    aspect = 0.65 + 0.08 * ci
    return np.stack([rad * np.cos(ang), rad * aspect * np.sin(ang)], 1), aspect


def _render_spair(ci: int, a: np.ndarray, h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Render category ``ci`` posed by affine ``a``: its painting is fixed in template coordinates, so the
    same template point looks the same in every image and keypoints map exactly through the affines."""
    img = _background(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
    u = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    v = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    kps, aspect = _spair_template(ci)
    m = (u / 1.0) ** 2 + (v / aspect) ** 2 <= 1.0
    st = class_style(ci)
    hue = (st.hue + 0.18 * u + 0.1 * v) % 1.0
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * (u * np.cos(ci) + v * np.sin(ci)))
    img[m] = _hsv_array(hue[m], 0.7, 0.45 + 0.45 * stripes[m])
    for j, (ku, kv) in enumerate(kps):   # a small mark of slot-specific colour at every keypoint
        mk = m & ((u - ku) ** 2 + (v - kv) ** 2 <= 0.06 ** 2)
        img[mk] = _hsv(j / len(kps), 0.9, 0.95)
    return img, m


def _write_spair(out: Path, scale: dict, rng: np.random.Generator) -> dict:
    root = out / "SPair-71k"
    cats = spair_categories()[:: max(1, 18 // scale["spair_categories"])][: scale["spair_categories"]]
    palette = voc_palette()
    pair_id = 0
    splits: dict[str, list[str]] = {s: [] for s in scale["spair_pairs"]}
    warps, n_kps = {}, {}
    for ci, cat in enumerate(cats):
        for d in ("JPEGImages", "Segmentation", "ImageAnnotation"):
            (root / d / cat).mkdir(parents=True, exist_ok=True)
        kps_t, _ = _spair_template(ci)
        n_kps[cat] = len(kps_t)
        images = []
        for i in range(scale["spair_images"]):
            name = f"{2008 + ci % 4}_{ci:02d}{i:04d}"
            w, h = _size(rng, scale)
            s = rng.uniform(0.3, 0.42) * min(h, w)
            a = _affine(rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h), s,
                        rng.uniform(-50, 50), bool(rng.uniform() < 0.3))
            img, m = _render_spair(ci, a, h, w, rng)
            _finish(img, rng).save(root / "JPEGImages" / cat / f"{name}.jpg", quality=90)
            seg = Image.fromarray(np.where(m, VOC_CLASS_ID[cat], 0).astype(np.uint8), "P")
            seg.putpalette(palette)
            seg.save(root / "Segmentation" / cat / f"{name}.png")
            pts = _apply(a, kps_t)
            inside = (pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1)
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
            theta = float(np.degrees(np.arctan2(a[1, 0], a[0, 0])))
            (root / "ImageAnnotation" / cat / f"{name}.json").write_text(json.dumps({
                "filename": f"{name}.jpg", "src_database": "densebench-synthetic", "src_annotation": "",
                "src_image": "", "image_width": w, "image_height": h, "image_depth": 3, "category": cat,
                "pose": "Unspecified", "truncated": int(not inside.all()), "occluded": 0, "difficult": 0,
                "bndbox": bbox, "azimuth_id": 0,
                "kps": {str(j): ([round(float(p[0]), 4), round(float(p[1]), 4)] if ok else None)
                        for j, (p, ok) in enumerate(zip(pts, inside))}}))
            images.append({"name": name, "a": a, "w": w, "h": h, "pts": pts, "vis": inside, "bbox": bbox,
                           "theta": theta, "flip": bool(np.linalg.det(a[:, :2]) < 0)})
        combos = [(i, j) for i in range(len(images)) for j in range(len(images)) if i != j]
        order = rng.permutation(len(combos))
        k = 0
        for split, n in scale["spair_pairs"].items():
            (root / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                si, ti = combos[order[k % len(combos)]]
                k += 1
                src, trg = images[si], images[ti]
                pair_id += 1
                pname = f"{pair_id:06d}-{src['name']}-{trg['name']}:{cat}"
                both = np.nonzero(src["vis"] & trg["vis"])[0]
                dtheta = abs((trg["theta"] - src["theta"] + 180) % 360 - 180)
                vv = 2 if (src["flip"] != trg["flip"] or dtheta > 40) else (1 if dtheta > 15 else 0)
                (root / "PairAnnotation" / split / f"{pname}.json").write_text(json.dumps({
                    "pair_id": pair_id, "filename": pname, "src_imname": f"{src['name']}.jpg",
                    "trg_imname": f"{trg['name']}.jpg", "category": cat,
                    "src_imsize": [src["w"], src["h"], 3], "trg_imsize": [trg["w"], trg["h"], 3],
                    "src_bndbox": src["bbox"], "trg_bndbox": trg["bbox"],
                    "src_pose": "Unspecified", "trg_pose": "Unspecified",
                    "src_kps": [[round(float(x), 4), round(float(y), 4)] for x, y in src["pts"][both]],
                    "trg_kps": [[round(float(x), 4), round(float(y), 4)] for x, y in trg["pts"][both]],
                    "kps_ids": [str(int(j)) for j in both], "mirror": int(src["flip"] != trg["flip"]),
                    "viewpoint_variation": vv, "scale_variation": 0, "truncation": 0, "occlusion": 0}))
                splits[split].append(pname)
                warps[pname] = np.round(_compose(trg["a"], src["a"]), 8).tolist()
    for split, names in splits.items():
        _ids_file(root / "Layout" / "large" / f"{split}.txt", names, crlf=True)
    _write_manifest(root, splits, {}, {"categories": cats, "keypoints_per_category": n_kps,
                                       "pair_warps_src_to_trg": warps})
    return {s: len(v) for s, v in splits.items()}


def _davis_objects(rng: np.random.Generator, w: int, h: int, n_frames: int, first_class: int) -> list[dict]:
    """2-3 objects with a style, a shape and a constant velocity that keeps them inside the frame."""
    objects = []
    for k in range(int(rng.integers(2, 4))):
        rx = rng.uniform(0.13, 0.2) * min(h, w)
        ry = rx * rng.uniform(0.75, 1.25)
        span = max(1, n_frames - 1)
        vx, vy = rng.uniform(-0.35, 0.35) * w / span, rng.uniform(-0.3, 0.3) * h / span
        cx = rng.uniform(0.25 * w, 0.75 * w) - vx * span / 2
        cy = rng.uniform(0.3 * h, 0.7 * h) - vy * span / 2
        objects.append({"id": k + 1, "class": first_class + k, "shape": SHAPES[(first_class + 3 * k) % len(SHAPES)],
                        "start": [round(cx, 3), round(cy, 3)], "velocity": [round(vx, 3), round(vy, 3)],
                        "radius": [round(rx, 3), round(ry, 3)], "angle": round(float(rng.uniform(0, 360)), 3),
                        "texture_seed": int(rng.integers(2 ** 31))})
    return objects


def _write_davis(out: Path, scale: dict, rng: np.random.Generator) -> dict:
    """DAVIS-2017 in the official layout: short sequences of textured objects translating at constant
    velocities (recorded in the manifest) over a textured, static background; palette PNG annotations with
    object ids 1..N (later objects occlude earlier ones)."""
    root = out / "DAVIS"
    palette = voc_palette()
    w, h = scale["davis_size"]
    n_frames = scale["davis_frames"]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    splits, hists, motion, frames = {}, {}, {}, {}
    for split, n in scale["davis"].items():
        hist: dict = {}
        splits[split] = [f"{split}-seq{i:02d}" for i in range(n)]
        for i, seq in enumerate(splits[split]):
            for d in ("JPEGImages", "Annotations"):
                (root / d / "480p" / seq).mkdir(parents=True, exist_ok=True)
            backdrop = 0.55 * _background(rng, h, w) + 0.45 * _texture(class_style(15 + i % 5), xx, yy, w / 2, h / 2,
                                                                        rng)
            objects = _davis_objects(rng, w, h, n_frames, first_class=3 * i)
            motion[seq] = objects
            frames[seq] = [f"{t:05d}" for t in range(n_frames)]
            for t, name in enumerate(frames[seq]):
                img, label = backdrop.copy(), np.zeros((h, w), np.uint8)
                for o in objects:
                    cx, cy = (o["start"][0] + o["velocity"][0] * t, o["start"][1] + o["velocity"][1] * t)
                    m = _shape_mask(o["shape"], xx, yy, cx, cy, *o["radius"], o["angle"])
                    dx, dy = cx - o["start"][0], cy - o["start"][1]     # the texture moves with the object
                    tex = _texture(class_style(o["class"]), xx - dx, yy - dy, o["start"][0], o["start"][1],
                                   np.random.default_rng(o["texture_seed"]))
                    img[m], label[m] = tex[m], o["id"]
                _finish(img, rng).save(root / "JPEGImages" / "480p" / seq / f"{name}.jpg", quality=90)
                pim = Image.fromarray(label, "P")
                pim.putpalette(palette)
                pim.save(root / "Annotations" / "480p" / seq / f"{name}.png")
                _hist(label, hist)
        hists[split] = hist
        _ids_file(root / "ImageSets" / "2017" / f"{split}.txt", splits[split])
    _write_manifest(root, splits, {"davis": hists}, {"frames": frames, "motion": motion})
    return {s: len(v) for s, v in splits.items()}


def write_synthetic_suite(out: Path, *, seed: int = 0, scale: str = "default") -> dict:
    """Write the five miniature datasets into ``out`` (a data home) and return their split counts.

    Deterministic for a given (seed, scale, SYNTH_VERSION). ``scale`` is 'default' (the embedded run) or
    'tiny' (unit tests).
    """
    if scale not in SCALES:
        from ..errors import ConfigError, choices_message

        raise ConfigError(choices_message("synthetic scale", scale, SCALES))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sc = SCALES[scale]
    counts = {}
    for i, (name, fn) in enumerate((("voc", _write_voc), ("ade20k", _write_ade20k), ("coco", _write_coco),
                                    ("spair", _write_spair), ("davis", _write_davis))):
        counts[name] = fn(out, sc, np.random.default_rng([seed, i]))
    return {"root": str(out), "seed": seed, "scale": scale, "version": SYNTH_VERSION, "counts": counts}


def ensure_synthetic_suite(cache_root: Path, *, seed: int = 0, scale: str = "default") -> Path:
    """The data home of the synthetic suite under ``cache_root``, generated once (atomically) and reused.

    Generation goes to a temporary folder next to the target and is renamed into place, under a file
    lock, so concurrent callers never see a half-written suite.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / f"synthetic-v{SYNTH_VERSION}-seed{seed}-{scale}"
    if (target / "SPair-71k" / MANIFEST_NAME).is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / "SPair-71k" / MANIFEST_NAME).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=cache_root))
        try:
            write_synthetic_suite(tmp, seed=seed, scale=scale)
            if target.exists():   # a stale, incomplete folder from an interrupted older run
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_voc_sized(out: Path, *, n_train: int = 800, n_val: int = 100, seed: int = 0) -> dict:
    """A VOC tree (official layout) with VOC-sized images (about 500x375) for measuring the feature engine.

    ``n_train`` trainaug + ``n_val`` val images drawn like the suite's VOC (same classes, styles, boundary
    band), only larger: the data path costs (decoding, views, masks) scale with the pixels, so
    ``bench/engine.py`` measures them here rather than on the 160x128 suite. Deterministic per ``seed``.
    """
    scale = {"voc": {"trainaug": int(n_train), "val": int(n_val)}, "size": (500, 375)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = _write_voc(out, scale, np.random.default_rng([seed, 0]))
    return {"root": str(out), "seed": seed, "size": scale["size"], "version": SYNTH_VERSION, "counts": counts}
