"""ADE20K SceneParsing (ADEChallengeData2016), spec §2.2.

``ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}``; L-mode masks with
values 0..150 where 0 = "other"/unlabelled is the ignore index and the class count stays 151 as in the
published protocols. A split's ids are the images present in ``images/<split>/`` (as the reference loaders
read them), each paired with ``annotations/<split>/<id>.png`` by id, never by pairing two directory listings;
they are compared with the shipped published lists (ADE_train_00000001..20210, ADE_val_00000001..2000), which
are used when the folder is absent. A ``sets/<split>.txt`` in the root takes precedence over the listing. Own
classes: ``densebench_classes.json`` or ``classes.txt`` in the root (see densebench.data.base).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import SegmentationDataset, with_own_classes
from .ids import IdList, shipped_path, split_ids

NUM_CLASSES = 151
IGNORE_INDEX = 0
SHIPPED_SPLITS = {"training": 20210, "validation": 2000}


def class_names() -> list[str]:
    """151 names: index 0 'other' (ignored) then objectInfo150.txt's names in Idx order."""
    path = shipped_path("ade20k", "class_names.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class ADE20KDataset(SegmentationDataset):
    def image_path(self, id_: str) -> Path:
        return self.root / "images" / self.split / f"{id_}.jpg"

    def mask_path(self, id_: str) -> Path:
        return self.root / "annotations" / self.split / f"{id_}.png"


def open_ade20k(root: Path, split: str, *, id_list: IdList = None) -> ADE20KDataset:
    published = shipped_path("ade20k", f"{split}.txt") if split in SHIPPED_SPLITS else None
    ids, synthetic, extra = split_ids(root, "ade20k", split, id_list, own_files=[root / "sets" / f"{split}.txt"],
                                      own_listing=(root / "images" / split, ".jpg"), published=published,
                                      hint="ADE20K splits are 'training' and 'validation'")
    return with_own_classes(ADE20KDataset, name="ade20k", root=root, split=split, ids=ids, synthetic=synthetic,
                            extra=extra, num_classes=NUM_CLASSES, class_names=class_names, ignore_index=IGNORE_INDEX)
