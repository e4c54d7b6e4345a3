"""Dataset readers for the four benchmark families and the helpers that locate them.

A data root is either a dataset's official top folder itself (``VOCSegmentation/``,
``ADEChallengeData2016/``, the COCO root holding ``images/`` and ``annotations/``, ``SPair-71k/``) or a data
home holding several of them side by side (``<home>/VOCSegmentation``, ``<home>/ADEChallengeData2016``,
``<home>/coco``, ``<home>/SPair-71k``). Both forms work everywhere a root is accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError, choices_message
from .ade20k import open_ade20k
from .base import SegmentationDataset, read_manifest
from .coco import open_coco
from .ids import IdList, shipped_path
from .spair import open_spair
from .voc import open_voc

FAMILIES: tuple[str, ...] = ("voc", "ade20k", "coco-things", "coco-stuff", "spair")

#: Folder names a data home may hold each family under (first = the official name).
ROOT_NAMES: dict[str, tuple[str, ...]] = {
    "voc": ("VOCSegmentation",),
    "ade20k": ("ADEChallengeData2016",),
    "coco-things": ("coco", "COCO"),
    "coco-stuff": ("coco", "COCO"),
    "spair": ("SPair-71k",),
}

_SPLITS: dict[str, tuple[str, str]] = {
    "voc": ("trainaug", "val"),
    "ade20k": ("training", "validation"),
    "coco-things": ("train", "val"),
    "coco-stuff": ("train", "val"),
    "spair": ("trn", "test"),
}

#: Shipped Hummingbird fraction lists: family → (list prefix, {fraction: number of ids}).
FRACTIONS: dict[str, tuple[str, dict[int, int]]] = {
    "voc": ("trainaug", {128: 80, 64: 160, 8: 1320}),
    "ade20k": ("training", {128: 150, 64: 300, 8: 2550}),
}
FRACTION_SEEDS: tuple[int, ...] = (42, 400, 783, 1293, 4019)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise DataError(choices_message("dataset family", family, FAMILIES))
    return family


def _looks_like(family: str, path: Path) -> bool:
    """Whether ``path`` is the top folder of ``family`` (by its characteristic sub-folders)."""
    if not path.is_dir():
        return False
    if family == "voc":
        return (path / "images").is_dir() and ((path / "SegmentationClass").is_dir()
                                                 or (path / "SegmentationClassAug").is_dir())
    if family == "ade20k":
        return (path / "images").is_dir() and (path / "annotations").is_dir() and (
            (path / "images" / "training").is_dir() or (path / "images" / "validation").is_dir())
    if family in ("coco-things", "coco-stuff"):
        has_images = any((path / "images" / f"{s}2017").is_dir() or (path / f"{s}2017").is_dir()
                         for s in ("train", "val"))
        return has_images and (path / "annotations").is_dir()
    return (path / "PairAnnotation").is_dir() and (path / "JPEGImages").is_dir()


def find_root(family: str, data_root: str | os.PathLike | None) -> Path:
    """The top folder of ``family`` given a data root that is that folder or a data home containing it."""
    check_family(family)
    if data_root is None:
        raise DataError(f"no data root given for {family}",
                        hint="pass --data-root DIR or set $DENSEBENCH_DATA")
    base = Path(data_root).expanduser()
    if not base.exists():
        raise DataError(f"data root {base} does not exist", hint="pass an existing folder as --data-root")
    tried = [base] + [base / n for n in ROOT_NAMES[family]]
    for cand in tried:
        if _looks_like(family, cand):
            return cand
    names = " or ".join(f"{base}/{n}" for n in ROOT_NAMES[family])
    raise DataError(
        f"no {family} dataset under {base}: it is not the {ROOT_NAMES[family][0]} folder itself and {names} "
        "does not exist or lacks the expected sub-folders",
        hint=f"point --data-root at the {ROOT_NAMES[family][0]} folder or a folder containing it; "
             f"`densebench data prepare {family}` prints how to build it")


def available(data_root: str | os.PathLike | None) -> list[str]:
    """The families present under ``data_root`` (in FAMILIES order); empty when the root is missing."""
    if data_root is None or not Path(data_root).expanduser().exists():
        return []
    found = []
    for fam in FAMILIES:
        try:
            find_root(fam, data_root)
        except DataError:
            continue
        found.append(fam)
    return found


def splits(family: str) -> tuple[str, str]:
    """``(train_split, val_split)`` names of ``family`` (SPair: training pairs 'trn', evaluation pairs 'test')."""
    return _SPLITS[check_family(family)]


def fraction_list(family: str, fraction: int, seed: int, *, data_root: str | os.PathLike | None = None) -> Path:
    """The Hummingbird 1/``fraction`` training list for ``seed`` (VOC and ADE20K; 128, 64 or 8).

    Real datasets use the lists shipped verbatim from open-hummingbird-eval. When ``data_root`` holds a
    synthetic suite (its root has a synthetic manifest), the suite's own seeded, nested miniature lists are
    returned instead, since the published ids do not exist there.
    """
    if family not in FRACTIONS:
        raise DataError(f"no shipped fraction lists for {family!r}; they exist for: {', '.join(FRACTIONS)}")
    prefix, counts = FRACTIONS[family]
    if fraction not in counts:
        raise DataError(choices_message("training fraction 1/N for " + family, fraction, counts))
    if seed not in FRACTION_SEEDS:
        raise DataError(choices_message("fraction-list seed", seed, FRACTION_SEEDS))
    if data_root is not None:
        root = find_root(family, data_root)
        manifest = read_manifest(root)
        if manifest and manifest.get("synthetic"):
            rel = manifest.get("fractions", {}).get(str(fraction), {}).get(str(seed))
            path = root / rel if rel else root
            if not rel or not path.is_file():
                raise DataError(f"the synthetic suite at {root} has no 1/{fraction} list for seed {seed}",
                                hint="regenerate it with `densebench synth`")
            return path
    path = shipped_path(family, f"1_div_{fraction}", f"{prefix}_{fraction}_{seed}.txt")
    if not path.is_file():
        raise DataError(f"shipped fraction list {path} is missing from the installation",
                        hint="reinstall densebench")
    return path


def open_dataset(family: str, data_root: str | os.PathLike | None, split: str, *,
                 id_list: IdList = None) -> SegmentationDataset:
    """Open ``split`` of ``family`` under ``data_root``; ``id_list`` (ids or a list file) restricts the ids."""
    root = find_root(family, data_root)
    if family == "voc":
        return open_voc(root, split, id_list=id_list)
    if family == "ade20k":
        return open_ade20k(root, split, id_list=id_list)
    if family in ("coco-things", "coco-stuff"):
        return open_coco(family, root, split, id_list=id_list)
    return open_spair(root, split, id_list=id_list)


__all__ = ["FAMILIES", "FRACTIONS", "FRACTION_SEEDS", "ROOT_NAMES", "SegmentationDataset", "available",
           "check_family", "find_root", "fraction_list", "open_dataset", "shipped_path", "splits"]
