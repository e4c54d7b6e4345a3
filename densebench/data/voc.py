"""Pascal VOC 2012 with the SBD "trainaug" split, in the open-hummingbird-eval layout (spec §2.1).

``VOCSegmentation/{images/<id>.jpg, SegmentationClass/<id>.png (val), SegmentationClassAug/<id>.png
(train, trainaug), sets/<split>.txt}``. Palette PNGs are read as their indices (the VOC colour map encodes
class ids), 21 classes, 255 = object boundary (ignored).

The split is the dataset's own ``sets/<split>.txt``, as the reference loaders read it (the shipped published
list when the dataset has none), compared with the published ids (:func:`densebench.data.ids.split_ids`). A
folder in this layout with its own classes declares them in ``densebench_classes.json`` or ``classes.txt``
(:func:`densebench.data.base.dataset_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..paths import read_id_list
from .base import SegmentationDataset, with_own_classes
from .ids import IdList, shipped_path, split_ids

NUM_CLASSES = 21
IGNORE_INDEX = 255
#: Splits whose masks live in SegmentationClassAug (SBD-augmented); every other split uses SegmentationClass.
AUG_SPLITS = ("train", "trainaug")
#: Splits densebench ships the official id list for (the published counts).
SHIPPED_SPLITS = {"trainaug": 10582, "val": 1449}


def class_names() -> list[str]:
    return read_id_list(shipped_path("voc", "class_names.txt"))


def voc_palette() -> list[int]:
    """The official VOC colour map (bit-interleaved), 256 entries flattened to 768 ints, for writing P PNGs."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


@dataclass
class VOCDataset(SegmentationDataset):
    def image_path(self, id_: str) -> Path:
        return self.root / "images" / f"{id_}.jpg"

    def mask_path(self, id_: str) -> Path:
        folder = "SegmentationClassAug" if self.split in AUG_SPLITS else "SegmentationClass"
        return self.root / folder / f"{id_}.png"


def open_voc(root: Path, split: str, *, id_list: IdList = None) -> VOCDataset:
    published = shipped_path("voc", f"{split}.txt") if split in SHIPPED_SPLITS else None
    ids, synthetic, extra = split_ids(root, "voc", split, id_list, own_files=[root / "sets" / f"{split}.txt"],
                                      published=published)
    return with_own_classes(VOCDataset, name="voc", root=root, split=split, ids=ids, synthetic=synthetic,
                            extra=extra, num_classes=NUM_CLASSES, class_names=class_names, ignore_index=IGNORE_INDEX)
