"""ADE20K SceneParsing (ADEChallengeData2016), spec §2.2.

``ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}``; L-mode masks with
values 0..150 where 0 = "other"/unlabelled is the ignore index and the class count stays 151 as in the
published protocols. Ids come from the shipped lists (ADE_train_00000001..20210, ADE_val_00000001..2000),
never from pairing two directory listings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import SegmentationDataset
from .ids import IdList, resolve_ids, shipped_path

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
    candidates = []
    if split in SHIPPED_SPLITS:
        candidates.append(shipped_path("ade20k", f"{split}.txt"))
    candidates.append(root / "sets" / f"{split}.txt")
    ids, source, synthetic = resolve_ids(root, "ade20k", split, id_list, candidates,
                                         hint="ADE20K splits are 'training' and 'validation'")
    return ADE20KDataset(name="ade20k", split=split, root=root, ids=ids, num_classes=NUM_CLASSES,
                         ignore_index=IGNORE_INDEX, class_names=class_names(), synthetic=synthetic,
                         extra={"id_source": source})
