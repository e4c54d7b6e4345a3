"""SPair-71k (spec §2.4, ecosystem §5.5): image pairs with semantic keypoints for correspondence.

Layout: ``SPair-71k/{JPEGImages,Segmentation,ImageAnnotation}/<cat>/<img>.{jpg,png,json}``,
``PairAnnotation/{trn,val,test}/<pairid>-<src>-<trg>:<cat>.json`` and ``Layout/large/<split>.txt``
(pair names, CRLF line endings in the release). Keypoints follow probe3d: every keypoint slot of the
category from ``ImageAnnotation`` (``kps``: "0".."N-1" → [x, y] or null); when an image annotation is
missing, the pair JSON's ``src_kps``/``trg_kps``/``kps_ids`` are used. Keypoints outside the image are
marked invisible and counted (``out_of_image``) instead of crashing or silently scoring.
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..paths import read_id_list
from .base import SegmentationDataset, missing_file_hint, open_image
from .ids import IdList, resolve_ids, shipped_path
from .voc import NUM_CLASSES as VOC_NUM_CLASSES
from .voc import class_names as voc_class_names

SPLITS = ("trn", "val", "test")
#: VOC class id of each SPair category (the Segmentation PNGs are VOC class-id masks).
VOC_CLASS_ID = {"aeroplane": 1, "bicycle": 2, "bird": 3, "boat": 4, "bottle": 5, "bus": 6, "car": 7, "cat": 8,
                "chair": 9, "cow": 10, "dog": 12, "horse": 13, "motorbike": 14, "person": 15, "pottedplant": 16,
                "sheep": 17, "train": 19, "tvmonitor": 20}
REQUIRED_PAIR_FIELDS = ("category", "trg_bndbox", "viewpoint_variation")


def categories() -> list[str]:
    """The 18 SPair-71k categories in the dataset's order."""
    return read_id_list(shipped_path("spair", "categories.txt"))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{what} {path} does not exist", hint="re-extract SPair-71k.tar.gz") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{what} {path} is not valid JSON ({e})", hint="re-extract SPair-71k.tar.gz") from e
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} is not a JSON object", hint="re-extract SPair-71k.tar.gz")
    return data


def parse_pair_name(name: str) -> tuple[str, str, str, str]:
    """``'000001-2008_000585-2008_002221:aeroplane'`` → (pair_id, src, trg, category)."""
    stem = name.removesuffix(".json")
    try:
        ids, cat = stem.rsplit(":", 1)
        pair_id, rest = ids.split("-", 1)
        src, trg = rest.split("-", 1)
    except ValueError as e:
        raise DataError(f"SPair pair name {name!r} is not '<pairid>-<src>-<trg>:<category>'",
                        hint="list pairs by their official names (Layout/large/<split>.txt)") from e
    return pair_id, src, trg, cat


def _kps_from_image_annotation(ann: dict, path: Path) -> np.ndarray:
    kps = ann.get("kps")
    if not isinstance(kps, dict):
        raise DataError(f"image annotation {path} has no 'kps' dict", hint="re-extract SPair-71k.tar.gz")
    n = len(kps)
    out = np.full((n, 2), np.nan, dtype=np.float64)
    for k, v in kps.items():
        i = int(k)
        if not 0 <= i < n:
            raise DataError(f"image annotation {path} has keypoint slot {k!r} outside 0..{n - 1}",
                            hint="re-extract SPair-71k.tar.gz")
        if v is not None:
            out[i] = (float(v[0]), float(v[1]))
    return out


def _kps_from_pair(pair: dict, side: str, path: Path) -> np.ndarray:
    for key in (f"{side}_kps", "kps_ids"):
        if key not in pair:
            raise DataError(f"pair annotation {path} lacks '{key}' and there is no image annotation to fall back on",
                            hint="re-extract SPair-71k.tar.gz")
    slots = [int(i) for i in pair["kps_ids"]]
    pts = pair[f"{side}_kps"]
    if len(pts) != len(slots):
        raise DataError(f"pair annotation {path}: {side}_kps has {len(pts)} points but kps_ids has {len(slots)}",
                        hint="re-extract SPair-71k.tar.gz")
    out = np.full((max(slots, default=-1) + 1, 2), np.nan, dtype=np.float64)
    for s, p in zip(slots, pts):
        out[s] = (float(p[0]), float(p[1]))
    return out


@dataclass
class SPairDataset(SegmentationDataset):
    """A split of SPair-71k: ``pairs`` (list of dicts) plus the images they use, indexed by ``'<cat>/<img>'``.

    As a SegmentationDataset it yields each used image with its VOC class-id mask. Each pair dict has:
    pair_id, name, category, src_id/trg_id ('<cat>/<img>'), src_path/trg_path, src_kps/trg_kps (float (N, 2)
    pixel coordinates over the category's N keypoint slots, NaN where absent), src_vis/trg_vis (bool (N,)),
    src_bbox/trg_bbox ([x1, y1, x2, y2]), src_size/trg_size ((W, H)), viewpoint_variation.
    """

    pair_names: list[str] = field(default_factory=list)
    out_of_image: int = 0
    _pairs: list[dict] | None = None

    def limited(self, n: int) -> SPairDataset:
        """The first ``n`` pairs and the images they use (``--limit``)."""
        names = list(self.pair_names[:n])
        return dataclasses.replace(self, pair_names=names, ids=_pair_images(names), _pairs=None)

    def image_path(self, id_: str) -> Path:
        return self.root / "JPEGImages" / f"{id_}.jpg"

    def mask_path(self, id_: str) -> Path:
        return self.root / "Segmentation" / f"{id_}.png"

    def annotation_path(self, id_: str) -> Path:
        return self.root / "ImageAnnotation" / f"{id_}.json"

    def pair_path(self, name: str) -> Path:
        return self.root / "PairAnnotation" / self.split / f"{name}.json"

    def image(self, id_: str) -> Image.Image:
        return open_image(self.image_path(id_), missing_hint=missing_file_hint(id_, self.extra.get("id_source")))

    @property
    def pairs(self) -> list[dict]:
        if self._pairs is None:
            self._pairs = self._load_pairs()
        return self._pairs

    def _keypoints(self, id_: str, pair: dict, side: str, pair_path: Path, size: tuple[int, int]):
        ann_path = self.annotation_path(id_)
        kps = (_kps_from_image_annotation(_read_json(ann_path, "image annotation"), ann_path)
               if ann_path.is_file() else _kps_from_pair(pair, side, pair_path))
        vis = ~np.isnan(kps).any(axis=1)
        w, h = size
        inside = (kps[:, 0] >= 0) & (kps[:, 0] <= w - 1) & (kps[:, 1] >= 0) & (kps[:, 1] <= h - 1)
        outside = vis & ~inside
        self.out_of_image += int(outside.sum())
        return kps, vis & inside

    def _size(self, id_: str, pair: dict, side: str) -> tuple[int, int]:
        imsize = pair.get(f"{side}_imsize")
        if imsize is not None and len(imsize) >= 2:
            return int(imsize[0]), int(imsize[1])
        try:
            with Image.open(self.image_path(id_)) as im:
                return im.size
        except (OSError, ValueError) as e:
            raise DataError(f"image {self.image_path(id_)} cannot be read ({e})",
                            hint="re-extract SPair-71k.tar.gz") from e

    def _load_pairs(self) -> list[dict]:
        self.out_of_image = 0
        out = []
        for name in self.pair_names:
            path = self.pair_path(name)
            pair = _read_json(path, "pair annotation")
            missing = [k for k in REQUIRED_PAIR_FIELDS if k not in pair]
            if missing:
                raise DataError(f"pair annotation {path} lacks the field(s) {', '.join(missing)}",
                                hint="re-extract SPair-71k.tar.gz; every pair JSON has them")
            pair_id, src, trg, cat = parse_pair_name(pair.get("filename", name))
            src, trg = pair.get("src_imname", src), pair.get("trg_imname", trg)
            src, trg = (s.removesuffix(".jpg") for s in (src, trg))
            cat = pair["category"]
            src_id, trg_id = f"{cat}/{src}", f"{cat}/{trg}"
            src_size, trg_size = self._size(src_id, pair, "src"), self._size(trg_id, pair, "trg")
            src_kps, src_vis = self._keypoints(src_id, pair, "src", path, src_size)
            trg_kps, trg_vis = self._keypoints(trg_id, pair, "trg", path, trg_size)
            n = max(len(src_kps), len(trg_kps))
            src_kps, trg_kps = (np.vstack([k, np.full((n - len(k), 2), np.nan)]) for k in (src_kps, trg_kps))
            src_vis, trg_vis = (np.concatenate([v, np.zeros(n - len(v), bool)]) for v in (src_vis, trg_vis))
            bbox = [float(v) for v in pair["trg_bndbox"]]
            if len(bbox) != 4:
                raise DataError(f"pair annotation {path}: trg_bndbox must be [x1, y1, x2, y2], got {bbox}",
                                hint="re-extract SPair-71k.tar.gz")
            out.append({
                "pair_id": str(pair.get("pair_id", pair_id)), "name": name, "category": cat,
                "src_id": src_id, "trg_id": trg_id,
                "src_path": self.image_path(src_id), "trg_path": self.image_path(trg_id),
                "src_kps": src_kps, "trg_kps": trg_kps, "src_vis": src_vis, "trg_vis": trg_vis,
                "src_bbox": [float(v) for v in pair["src_bndbox"]] if "src_bndbox" in pair else None,
                "trg_bbox": bbox, "src_size": src_size, "trg_size": trg_size,
                "viewpoint_variation": int(pair["viewpoint_variation"]),
            })
        return out


def _pair_images(names: list[str]) -> list[str]:
    """The images (``'<cat>/<img>'``, sorted) that the pairs ``names`` use."""
    return sorted({f"{c}/{i}" for n in names for (_, s, t, c) in [parse_pair_name(n)] for i in (s, t)})


def open_spair(root: Path, split: str, *, id_list: IdList = None) -> SPairDataset:
    """Open a SPair-71k split ('trn', 'val', 'test'); ``id_list`` may restrict it to given pair names."""
    if split not in SPLITS:
        raise DataError(f"unknown SPair-71k split {split!r}; accepted: {', '.join(SPLITS)}",
                        hint="use one of the accepted splits")
    names, source, synthetic = resolve_ids(root, "spair", split, id_list,
                                           [root / "Layout" / "large" / f"{split}.txt"],
                                           hint="re-extract SPair-71k.tar.gz (it ships Layout/large/*.txt)")
    return SPairDataset(name="spair", split=split, root=root, ids=_pair_images(names), num_classes=VOC_NUM_CLASSES,
                        ignore_index=255, class_names=voc_class_names(), synthetic=synthetic,
                        extra={"id_source": source, "categories": categories()}, pair_names=names)
