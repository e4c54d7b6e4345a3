"""What every dataset reader provides.

Readers pair images and masks *by id from a split list*, never by listing two directories. The id
list comes from (in order): an explicit list the user passes, the ``densebench_manifest.json`` a
synthetic suite writes into its root, or the list shipped in ``datasets/`` for the real dataset.
Masks are returned as uint8 class-id maps already in the benchmark's label space (e.g. COCO
supercategory ids), with ``ignore_index`` marking pixels that are never scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

#: File a synthetic suite writes into each dataset root: {"synthetic": true, "splits": {split: [ids]}, ...}
MANIFEST_NAME = "densebench_manifest.json"


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})", hint="regenerate it with `densebench synth`") from e


def open_image(path: Path) -> Image.Image:
    """Open an RGB image, turning PIL's many failure modes into one clear DataError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image {path} does not exist") from e
    except Exception as e:  # PIL raises a zoo of exception types for corrupt files
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e})",
                        hint="re-extract it from the official archive") from e


def open_mask(path: Path) -> np.ndarray:
    """Open a label PNG as the raw uint8 values stored in it (palette indices for 'P' images)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"mask {path} has mode {im.mode}; expected a single-channel label PNG (L or P)")
            arr = np.array(im)
    except FileNotFoundError as e:
        raise DataError(f"mask {path} does not exist") from e
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"mask {path} cannot be read ({type(e).__name__}: {e})") from e
    if arr.dtype != np.uint8:
        if arr.max() > 255:
            raise DataError(f"mask {path} has values above 255")
        arr = arr.astype(np.uint8)
    return arr


@dataclass
class SegmentationDataset:
    """A split of a semantic segmentation dataset, indexed by id.

    ``__getitem__(i)`` returns ``(id, image: PIL RGB, mask: uint8 (H, W))``; the mask has the image's
    size (a mismatch raises DataError naming both files) and values in ``[0, num_classes) ∪ {ignore_index}``.
    """

    name: str                      # dataset family: voc, ade20k, coco-things, coco-stuff
    split: str
    root: Path
    ids: list[str]
    num_classes: int
    ignore_index: int
    class_names: list[str]
    synthetic: bool = False
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    # Subclasses implement these two; the base class checks and maps.
    def image_path(self, id_: str) -> Path:  # pragma: no cover - overridden
        raise DataError(f"{type(self).__name__} does not define image_path")

    def mask_path(self, id_: str) -> Path:  # pragma: no cover - overridden
        raise DataError(f"{type(self).__name__} does not define mask_path")

    def map_mask(self, raw: np.ndarray, id_: str) -> np.ndarray:
        """Raw stored values -> benchmark label space. Default: identity with a range check."""
        return self.check_labels(raw, id_)

    def check_labels(self, mask: np.ndarray, id_: str) -> np.ndarray:
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            values = sorted(set(np.unique(mask[bad]).tolist()))[:10]
            raise DataError(
                f"mask {self.mask_path(id_)} has label values {values} outside 0..{self.num_classes - 1} "
                f"(ignore = {self.ignore_index}) for {self.name}",
                hint="check that the masks are the official ones for this dataset",
            )
        return mask

    def __getitem__(self, i: int):
        id_ = self.ids[i]
        image = open_image(self.image_path(id_))
        mask = self.map_mask(open_mask(self.mask_path(id_)), id_)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"mask {self.mask_path(id_)} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{self.image_path(id_)} is {image.width}x{image.height}",
                hint="image and mask of one id must have the same size",
            )
        return id_, image, mask

    def manifest_hash(self) -> str:
        """Identity of this split for cache keys and results: family, split, ids and file sizes."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.split}|{self.num_classes}|{self.ignore_index}".encode())
        for id_ in self.ids:
            h.update(id_.encode())
            for p in (self.image_path(id_), self.mask_path(id_)):
                try:
                    h.update(str(p.stat().st_size).encode())
                except FileNotFoundError:
                    h.update(b"missing")
        return h.hexdigest()

    def subset(self, ids: list[str]) -> "SegmentationDataset":
        """The same dataset restricted to ``ids`` (e.g. a fraction list); unknown ids are an error."""
        known = set(self.ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise DataError(f"{len(missing)} ids of the list are not in {self.name}/{self.split} (first: {missing[:3]})",
                            hint="check that the list belongs to this dataset and split")
        import copy
        out = copy.copy(self)
        out.ids = list(ids)
        return out
