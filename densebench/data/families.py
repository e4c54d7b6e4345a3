"""The dataset families densebench evaluates on, one object each: splits, classes, ignore label, the
folder names a data home may hold it under, how its characteristic folders look, how its mean is
taken, and the reader that opens a split. Benchmarks (densebench.benchmarks) point at these objects;
nothing else in the package branches on a family's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..metrics import segmentation_scores
from .ade20k import class_names as ade20k_class_names
from .ade20k import open_ade20k
from .base import SegmentationDataset
from .coco import open_coco, read_categories, stuff_supercategories, thing_supercategories
from .davis import RESOLUTION as DAVIS_RESOLUTION
from .davis import open_davis
from .ids import IdList
from .spair import categories as spair_categories
from .spair import open_spair
from .voc import class_names as voc_class_names
from .voc import open_voc


def _is_dir(path: Path, *parts: str) -> bool:
    return path.joinpath(*parts).is_dir()


def _voc_layout(p: Path) -> bool:
    return _is_dir(p, "images") and (_is_dir(p, "SegmentationClass") or _is_dir(p, "SegmentationClassAug"))


def _ade20k_layout(p: Path) -> bool:
    return (_is_dir(p, "images") and _is_dir(p, "annotations")
            and (_is_dir(p, "images", "training") or _is_dir(p, "images", "validation")))


def _coco_layout(p: Path) -> bool:
    has_images = any(_is_dir(p, "images", f"{s}2017") or _is_dir(p, f"{s}2017") for s in ("train", "val"))
    return has_images and _is_dir(p, "annotations")


def _spair_layout(p: Path) -> bool:
    return _is_dir(p, "PairAnnotation") and _is_dir(p, "JPEGImages")


def _davis_layout(p: Path) -> bool:
    return _is_dir(p, "JPEGImages", DAVIS_RESOLUTION) and _is_dir(p, "Annotations", DAVIS_RESOLUTION)


@dataclass(frozen=True)
class DatasetFamily:
    """One dataset family. ``ignored_class``: a class id that is also the ignore label yet counted in the
    published mean (ADE20K's 0 "other": the published mean is over 151 classes); such a family also
    reports the mean over the real classes (``miou_<C-1>``)."""

    name: str
    title: str
    train_split: str
    val_split: str
    root_names: tuple[str, ...]          # folder names under a data home; the first is the official one
    num_classes: int | None              # None where the family has no segmentation label space (SPair)
    ignore_index: int | None
    class_names: Callable[[], list[str]] = field(repr=False, compare=False)
    looks_like: Callable[[Path], bool] = field(repr=False, compare=False)
    opener: Callable[..., SegmentationDataset] = field(repr=False, compare=False)
    ignored_class: int | None = None
    #: Shipped Hummingbird fraction lists: (list prefix, {fraction: number of ids}).
    fractions: tuple[str, dict[int, int]] | None = None

    @property
    def splits(self) -> tuple[str, str]:
        return self.train_split, self.val_split

    def open(self, root: Path, split: str, *, id_list: IdList = None) -> SegmentationDataset:
        return self.opener(root, split, id_list=id_list)

    def for_classes(self, num_classes: int, ignore_index: int) -> DatasetFamily:
        """This family with the label space an opened dataset declares (a user's dataset in this family's layout
        with its own ``densebench_classes.json``), so means and notes count its classes; itself when unchanged.
        The ignored class is kept only where it is still both a class and the ignore label."""
        if (num_classes, ignore_index) == (self.num_classes, self.ignore_index):
            return self
        ignored = self.ignored_class if self.ignored_class == ignore_index and ignore_index < num_classes else None
        return dataclasses.replace(self, num_classes=num_classes, ignore_index=ignore_index, ignored_class=ignored)

    def mean_note(self) -> str:
        """How the headline mean over classes is taken, for result metric notes."""
        if self.ignored_class is None:
            return f"mean over the {self.num_classes} classes"
        return (f"mean over all {self.num_classes} classes including the ignored class {self.ignored_class}, "
                "as published")

    def class_mean_notes(self) -> dict[str, str]:
        """Result notes for the extra mean :meth:`class_means` reports (none without an ``ignored_class``)."""
        if self.ignored_class is None:
            return {}
        return {f"miou_{self.num_classes - 1}": f"mean over the {self.num_classes - 1} classes other than the "
                                                f"ignored class {self.ignored_class}"}

    def class_means(self, conf: np.ndarray, matching: str, *, prefix: str = "miou") -> dict[str, float]:
        """The extra mean a family with an ``ignored_class`` reports (ADE20K: ``miou_150``); else nothing."""
        if self.ignored_class is None:
            return {}
        scores = segmentation_scores(conf, matching=matching, exclude=[self.ignored_class])
        return {f"{prefix}_{self.num_classes - 1}": scores["miou"]}


def _coco_opener(family: str) -> Callable[..., SegmentationDataset]:
    def opener(root: Path, split: str, *, id_list: IdList = None) -> SegmentationDataset:
        return open_coco(family, root, split, id_list=id_list)
    return opener


def _coco_things_names() -> list[str]:
    return thing_supercategories(read_categories("panoptic")[0])


def _coco_stuff_names() -> list[str]:
    return stuff_supercategories(read_categories("stuff")[0])


VOC = DatasetFamily(
    name="voc", title="Pascal VOC 2012 (SBD trainaug)", train_split="trainaug", val_split="val",
    root_names=("VOCSegmentation",), num_classes=21, ignore_index=255, class_names=voc_class_names,
    looks_like=_voc_layout, opener=open_voc, fractions=("trainaug", {128: 80, 64: 160, 8: 1320}))
ADE20K = DatasetFamily(
    name="ade20k", title="ADE20K SceneParsing", train_split="training", val_split="validation",
    root_names=("ADEChallengeData2016",), num_classes=151, ignore_index=0, class_names=ade20k_class_names,
    looks_like=_ade20k_layout, opener=open_ade20k, ignored_class=0,
    fractions=("training", {128: 150, 64: 300, 8: 2550}))
COCO_THINGS = DatasetFamily(
    name="coco-things", title="COCO-Things (12 supercategories)", train_split="train", val_split="val",
    root_names=("coco", "COCO"), num_classes=12, ignore_index=255, class_names=_coco_things_names,
    looks_like=_coco_layout, opener=_coco_opener("coco-things"))
COCO_STUFF = DatasetFamily(
    name="coco-stuff", title="COCO-Stuff (15 supercategories)", train_split="train", val_split="val",
    root_names=("coco", "COCO"), num_classes=15, ignore_index=255, class_names=_coco_stuff_names,
    looks_like=_coco_layout, opener=_coco_opener("coco-stuff"))
SPAIR = DatasetFamily(
    name="spair", title="SPair-71k", train_split="trn", val_split="test", root_names=("SPair-71k",),
    num_classes=None, ignore_index=None, class_names=spair_categories, looks_like=_spair_layout,
    opener=open_spair)
#: Video object segmentation: no class label space (object ids are per sequence), no ignore label in the metric.
DAVIS = DatasetFamily(
    name="davis", title="DAVIS-2017 (semi-supervised, 480p)", train_split="train", val_split="val",
    root_names=("DAVIS",), num_classes=None, ignore_index=None, class_names=list, looks_like=_davis_layout,
    opener=open_davis)

#: Every family, in the order listings and leaderboards show them.
FAMILIES: dict[str, DatasetFamily] = {f.name: f for f in (VOC, ADE20K, COCO_THINGS, COCO_STUFF, SPAIR, DAVIS)}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


__all__ = ["ADE20K", "COCO_STUFF", "COCO_THINGS", "DAVIS", "FAMILIES", "SPAIR", "VOC", "DatasetFamily",
           "family_names"]
