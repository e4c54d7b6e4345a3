"""Dataset readers for the four benchmark families and the helpers that locate them.

A data root is either a dataset's official top folder itself (``VOCSegmentation/``,
``ADEChallengeData2016/``, the COCO root holding ``images/`` and ``annotations/``, ``SPair-71k/``) or a data
home holding several of them side by side (``<home>/VOCSegmentation``, ``<home>/ADEChallengeData2016``,
``<home>/coco``, ``<home>/SPair-71k``). Both forms work everywhere a root is accepted.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path

from ..errors import DataError, choices_message
from .base import SegmentationDataset, read_manifest
from .families import FAMILIES, DatasetFamily
from .ids import IdList, shipped_path

FRACTION_SEEDS: tuple[int, ...] = (42, 400, 783, 1293, 4019)


def get_family(family: str | DatasetFamily) -> DatasetFamily:
    """The family object for a name (a family object is returned as it is)."""
    if isinstance(family, DatasetFamily):
        return family
    if family not in FAMILIES:
        raise DataError(choices_message("dataset family", family, FAMILIES), hint="use one of the accepted names")
    return FAMILIES[family]


def find_root(family: str | DatasetFamily, data_root: str | os.PathLike | None) -> Path:
    """The top folder of ``family`` given a data root that is that folder or a data home containing it."""
    fam = get_family(family)
    if data_root is None:
        raise DataError(f"no data root given for {fam.name}",
                        hint="pass --data-root DIR or set $DENSEBENCH_DATA")
    base = Path(data_root).expanduser()
    if not base.exists():
        raise DataError(f"data root {base} does not exist", hint="pass an existing folder as --data-root")
    for cand in [base] + [base / n for n in fam.root_names]:
        if cand.is_dir() and fam.looks_like(cand):
            return cand
    official = fam.root_names[0]
    names = " or ".join(f"{base}/{n}" for n in fam.root_names)
    raise DataError(
        f"no {fam.name} dataset under {base}: it is not the {official} folder itself and {names} "
        "does not exist or lacks the expected sub-folders",
        hint=f"point --data-root at the {official} folder or a folder containing it; "
             f"`densebench data prepare {fam.name}` prints how to build it")


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


def splits(family: str | DatasetFamily) -> tuple[str, str]:
    """``(train_split, val_split)`` names of ``family`` (SPair: training pairs 'trn', evaluation pairs 'test')."""
    return get_family(family).splits


def fraction_list(family: str, fraction: int, seed: int, *, data_root: str | os.PathLike | None = None) -> Path:
    """The Hummingbird 1/``fraction`` training list for ``seed`` (VOC and ADE20K; 128, 64 or 8).

    Real datasets use the lists shipped verbatim from open-hummingbird-eval. When ``data_root`` holds a
    synthetic suite (its root has a synthetic manifest), the suite's own seeded, nested miniature lists are
    returned instead, since the published ids do not exist there.
    """
    fam = get_family(family)
    if fam.fractions is None:
        with_lists = [f.name for f in FAMILIES.values() if f.fractions]
        raise DataError(f"no shipped fraction lists for {fam.name!r}; they exist for: {', '.join(with_lists)}",
                        hint="leave --train-fraction unset for this dataset, or pass your own --train-list FILE")
    prefix, counts = fam.fractions
    if fraction not in counts:
        raise DataError(choices_message("training fraction 1/N for " + fam.name, fraction, counts),
                        hint="pass one of the accepted N as --train-fraction")
    if seed not in FRACTION_SEEDS:
        raise DataError(choices_message("fraction-list seed", seed, FRACTION_SEEDS),
                        hint="pass one of the accepted seeds as --fraction-seed")
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
    path = shipped_path(fam.name, f"1_div_{fraction}", f"{prefix}_{fraction}_{seed}.txt")
    if not path.is_file():
        raise DataError(f"shipped fraction list {path} is missing from the installation",
                        hint="reinstall densebench")
    return path


def open_dataset(family: str | DatasetFamily, data_root: str | os.PathLike | None, split: str, *,
                 id_list: IdList = None) -> SegmentationDataset:
    """Open ``split`` of ``family`` under ``data_root``; ``id_list`` (ids or a list file) restricts the ids."""
    fam = get_family(family)
    ds = fam.open(find_root(fam, data_root), split, id_list=id_list)
    n = _LIMIT.get()
    return ds if n is None else ds.limited(n)


_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("densebench_limit", default=None)


@contextlib.contextmanager
def limited(n: int | None):
    """While active, :func:`open_dataset` opens only the first ``n`` items of every split (``--limit``; None: all)."""
    token = _LIMIT.set(n)
    try:
        yield
    finally:
        _LIMIT.reset(token)


__all__ = ["FAMILIES", "FRACTION_SEEDS", "DatasetFamily", "SegmentationDataset", "available", "find_root",
           "fraction_list", "get_family", "limited", "open_dataset", "shipped_path", "splits"]
