"""DAVIS-2017 semi-supervised video object segmentation, trainval 480p, in the official layout.

``DAVIS/JPEGImages/480p/<sequence>/<frame>.jpg``, ``DAVIS/Annotations/480p/<sequence>/<frame>.png``
(palette PNGs whose indices are object ids: 0 background, 1..N the objects of the sequence, 255 void) and
``DAVIS/ImageSets/2017/{train,val}.txt`` (sequence names; 60 train and 30 val sequences). This is what
``DAVIS-2017-trainval-480p.zip`` extracts to.

The split list names the sequences; a sequence's frames are its JPEGs in sorted order, each paired with the
annotation of the same name, which is how both DINO's ``eval_video_segmentation.py`` and the official
``davis2017-evaluation`` enumerate them. As a :class:`SegmentationDataset` the dataset yields every frame of
its sequences (ids ``<sequence>/<frame>``) with its raw annotation; :meth:`DavisDataset.sequence` narrows it
to one sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SegmentationDataset, open_mask
from .ids import IdList, resolve_ids

SPLITS = ("train", "val")
RESOLUTION = "480p"
#: The void label of the annotations; the official evaluation counts it as background.
VOID = 255


@dataclass
class DavisDataset(SegmentationDataset):
    """Frames of a DAVIS split. ``frames`` maps each sequence to its frame names in order."""

    frames: dict[str, list[str]] = field(default_factory=dict)

    @property
    def sequences(self) -> list[str]:
        return list(self.frames)

    def image_path(self, id_: str) -> Path:
        return self.root / "JPEGImages" / RESOLUTION / f"{id_}.jpg"

    def mask_path(self, id_: str) -> Path:
        return self.root / "Annotations" / RESOLUTION / f"{id_}.png"

    def map_mask(self, raw: np.ndarray, id_: str) -> np.ndarray:
        """Object ids as stored (palette indices); any value is valid."""
        return raw

    def limited(self, n: int) -> DavisDataset:
        """The first ``n`` sequences, every frame of each (``--limit``: a sequence cut short is no sequence)."""
        frames = dict(list(self.frames.items())[:n])
        return dataclasses.replace(self, ids=[i for seq in frames for i in self.frame_ids(seq)], frames=frames)

    def frame_ids(self, sequence: str) -> list[str]:
        return [f"{sequence}/{f}" for f in self.frames[sequence]]

    def sequence(self, sequence: str) -> DavisDataset:
        """The frames of one sequence (a new dataset object, with its own manifest)."""
        if sequence not in self.frames:
            raise DataError(f"DAVIS {self.split} has no sequence {sequence!r}")
        return dataclasses.replace(self, ids=self.frame_ids(sequence), frames={sequence: self.frames[sequence]})

    def annotation(self, id_: str) -> np.ndarray:
        """The raw annotation of one frame (object ids, 255 void)."""
        return open_mask(self.mask_path(id_))

    def annotations(self, sequence: str) -> np.ndarray:
        """(T, H, W) uint8 annotations of every frame of ``sequence``; a DataError names a missing or odd one."""
        masks = [self.annotation(i) for i in self.frame_ids(sequence)]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1:
            raise DataError(f"DAVIS sequence {sequence} has annotations of several sizes {sorted(shapes)}",
                            hint="re-extract it from DAVIS-2017-trainval-480p.zip")
        return np.stack(masks)

    def missing_annotations(self) -> list[Path]:
        """Frames of the split without an annotation PNG (every train/val frame has one in the release)."""
        return [self.mask_path(i) for s in self.frames for i in self.frame_ids(s) if not self.mask_path(i).is_file()]


def sequence_frames(root: Path, sequence: str) -> list[str]:
    """The frame names of a sequence: its JPEGs in sorted order (names without the extension)."""
    folder = root / "JPEGImages" / RESOLUTION / sequence
    if not folder.is_dir():
        raise DataError(f"DAVIS sequence folder {folder} does not exist",
                        hint="check that the split list matches the extracted JPEGImages/480p folders")
    frames = sorted(p.stem for p in folder.glob("*.jpg"))
    if not frames:
        raise DataError(f"DAVIS sequence folder {folder} holds no .jpg frames",
                        hint="re-extract it from DAVIS-2017-trainval-480p.zip")
    return frames


def open_davis(root: Path, split: str, *, id_list: IdList = None) -> DavisDataset:
    """Open a DAVIS-2017 split ('train' or 'val'); ``id_list`` (names or a file) restricts the sequences."""
    if split not in SPLITS:
        raise DataError(f"unknown DAVIS-2017 split {split!r}; accepted: {', '.join(SPLITS)}")
    sequences, source, synthetic = resolve_ids(
        root, "davis", split, id_list, [root / "ImageSets" / "2017" / f"{split}.txt"],
        hint="re-extract DAVIS-2017-trainval-480p.zip (it ships ImageSets/2017/train.txt and val.txt)")
    frames = {s: sequence_frames(root, s) for s in sequences}
    ids = [f"{s}/{f}" for s in sequences for f in frames[s]]
    return DavisDataset(name="davis", split=split, root=root, ids=ids, num_classes=VOID, ignore_index=VOID,
                        class_names=[], synthetic=synthetic, extra={"id_source": source}, frames=frames)
