"""COCO-Things (12 classes) and COCO-Stuff (15 classes) in the Leopart definition (spec §2.3).

Layout (NeCo / open-hummingbird-eval; the Leopart variants are accepted too):

- images: ``<root>/images/{split}2017/<id>.jpg``
- things: ``<root>/annotations/{split}2017/<id>.png``: panoptic-derived semantic PNGs holding COCO panoptic
  ``category_id``s (1..90 things, 92..200 merged stuff, 0 = void); Leopart's
  ``annotations/panoptic_annotations/semantic_segmentation_{split}2017/`` is accepted as well;
- stuff: ``<root>/annotations/stuff_annotations/stuff_{split}2017_pixelmaps/<id>.png`` (0 = things/unlabelled,
  92..182 stuff, 183 other);
- categories: ``annotations/panoptic_annotations/panoptic_val2017.json`` and
  ``annotations/stuff_annotations/stuff_val2017.json``.

The label spaces are the sorted supercategories: things → 12 ids, stuff pixels and void → 255; stuff → 15
ids ("other" dropped), things and unlabelled → 255. The thing-mask folder is also where COCO-Stuff-164k's
0-indexed ``stuffthingmaps`` unpack; fed to this mapping they silently shift every class by one, so the
reader inspects a sample of masks and refuses such a folder with an explanation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SegmentationDataset, open_mask
from .ids import IdList, resolve_ids, shipped_path

IGNORE_INDEX = 255
#: Folder (under the COCO root) where `densebench data prepare coco-things --root DIR` writes the split lists.
SPLIT_DIR = "densebench_splits"
#: The Leopart/NeCo COCO train split is a 10% subset of train2017; ours is drawn with this seed (see
#: write_coco_split_lists) instead of depending on directory order.
TRAIN_FRACTION = 0.1
TRAIN_SEED = 400
STUFF_OTHER_ID = 183


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def image_dir_candidates(root: Path, split: str) -> list[Path]:
    return [root / "images" / f"{split}2017", root / f"{split}2017"]


def thing_mask_dir_candidates(root: Path, split: str) -> list[Path]:
    return [root / "annotations" / f"{split}2017",
            root / "annotations" / "panoptic_annotations" / f"semantic_segmentation_{split}2017"]


def stuff_mask_dir_candidates(root: Path, split: str) -> list[Path]:
    name = f"stuff_{split}2017_pixelmaps"
    return [root / "annotations" / "stuff_annotations" / name,
            root / "annotations" / "annotations" / "stuff_annotations" / name,
            root / "annotations" / name]


def panoptic_json_candidates(root: Path) -> list[Path]:
    return [root / "annotations" / "panoptic_annotations" / "panoptic_val2017.json",
            root / "annotations" / "panoptic_val2017.json"]


def stuff_json_candidates(root: Path) -> list[Path]:
    return [root / "annotations" / "stuff_annotations" / "stuff_val2017.json",
            root / "annotations" / "annotations" / "stuff_annotations" / "stuff_val2017.json",
            root / "annotations" / "stuff_val2017.json"]


@lru_cache(maxsize=8)
def _load_categories(path: str, mtime: float) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"category file {path} cannot be read ({e})",
                        hint="re-extract it from the official COCO annotation archive") from e
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise DataError(f"category file {path} has no 'categories' list",
                        hint="re-extract it from the official COCO annotation archive")
    for c in cats:
        if not {"id", "supercategory"} <= set(c):
            raise DataError(f"category file {path} has a category without 'id'/'supercategory': {c}",
                            hint="re-extract it from the official COCO annotation archive")
    return cats


def read_categories(kind: str, root: Path | None = None) -> tuple[list[dict], str]:
    """The COCO categories (``kind`` = 'panoptic' or 'stuff') from the root's JSON, else the shipped copy.

    Returns ``(categories, source path)``. The shipped copies hold exactly the official categories.
    """
    cands = (panoptic_json_candidates if kind == "panoptic" else stuff_json_candidates)(root) if root else []
    path = _first_existing(cands) or shipped_path("coco", f"{kind}_categories.json")
    return _load_categories(str(path), path.stat().st_mtime), str(path)


def thing_supercategories(panoptic_categories: list[dict]) -> list[str]:
    """The 12 COCO-Things classes: sorted supercategories of the isthing==1 categories."""
    return sorted({c["supercategory"] for c in panoptic_categories if c.get("isthing") == 1})


def stuff_supercategories(stuff_categories: list[dict]) -> list[str]:
    """The 15 COCO-Stuff classes: sorted supercategories of stuff_val2017.json without 'other'."""
    return sorted({c["supercategory"] for c in stuff_categories} - {"other"})


def things_lut(panoptic_categories: list[dict]) -> np.ndarray:
    """256-entry map raw panoptic id → thing supercategory index; void, stuff and unknown ids → 255."""
    supers = thing_supercategories(panoptic_categories)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in panoptic_categories:
        if c.get("isthing") == 1 and 0 < c["id"] < 256:
            lut[c["id"]] = supers.index(c["supercategory"])
    return lut


def stuff_lut(stuff_categories: list[dict]) -> np.ndarray:
    """256-entry map raw stuff pixelmap id → stuff supercategory index; 0 (things) and 183 (other) → 255."""
    supers = stuff_supercategories(stuff_categories)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in stuff_categories:
        if c["supercategory"] != "other" and 0 < c["id"] < 256:
            lut[c["id"]] = supers.index(c["supercategory"])
    return lut


def diagnose_thing_values(counts: dict[int, int], panoptic_categories: list[dict]) -> str | None:
    """Explain why raw thing-mask values are not panoptic category ids, or None when they are.

    A panoptic-derived PNG holds only 0 (void) and panoptic category ids. COCO-Stuff-164k's stuffthingmaps
    hold ``id - 1`` (person = 0) and 255 for unlabelled; they are recognised when shifting every value by one
    explains more labelled pixels than reading them as they are.
    """
    valid = {int(c["id"]) for c in panoptic_categories} | {0}
    invalid = {v: n for v, n in counts.items() if v not in valid and v != IGNORE_INDEX}
    if not invalid:
        return None
    # COCO-Stuff ids of the 0-indexed maps: the 80 thing ids plus stuff 92..182.
    stuffthing_ids = {int(c["id"]) for c in panoptic_categories if c.get("isthing") == 1} | set(range(92, 183))
    as_is = sum(n for v, n in counts.items() if v in valid and v != 0)
    shifted = sum(n for v, n in counts.items() if v != IGNORE_INDEX and v + 1 in stuffthing_ids)
    shown = sorted(invalid)[:10]
    if shifted > as_is or (IGNORE_INDEX in counts and shifted >= as_is):
        return (f"the thing masks look like COCO-Stuff-164k 0-indexed stuffthingmaps (value = category id - 1, "
                f"255 = unlabelled; values {shown} are not panoptic ids but are once shifted by one). Read as "
                "panoptic ids every class would move by one and person pixels would become void")
    return f"values {shown} are not COCO panoptic category ids (0 = void, 1..90 things, 92..200 stuff)"


@dataclass
class COCODataset(SegmentationDataset):
    def image_path(self, id_: str) -> Path:
        return self.extra["image_dir"] / f"{id_}.jpg"

    def mask_path(self, id_: str) -> Path:
        return self.extra["mask_dir"] / f"{id_}.png"

    def map_mask(self, raw: np.ndarray, id_: str) -> np.ndarray:
        valid = self.extra["valid_raw"]
        bad = ~valid[raw]
        if bad.any():
            values = np.unique(raw[bad])
            if self.name == "coco-things":
                all_v, all_n = np.unique(raw, return_counts=True)
                why = diagnose_thing_values(dict(zip(all_v.tolist(), all_n.tolist())), self.extra["categories"])
            else:
                why = (f"values {values[:10].tolist()} are not COCO-Stuff pixelmap ids "
                       "(0 = things/unlabelled, 92..182 stuff, 183 other)")
            raise DataError(f"mask {self.mask_path(id_)}: {why}",
                            hint=self.extra["fix"])
        return self.extra["lut"][raw]


def _diagnose_sample(ds: COCODataset, sample: int = 8) -> None:
    """Look at up to ``sample`` existing thing masks spread over the split; refuse 0-indexed folders early."""
    if not ds.ids:
        return
    picks = sorted({int(i) for i in np.linspace(0, len(ds.ids) - 1, num=min(sample, len(ds.ids)))})
    total: dict[int, int] = {}
    for i in picks:
        path = ds.mask_path(ds.ids[i])
        if not path.is_file():
            continue
        v, n = np.unique(open_mask(path), return_counts=True)
        for a, b in zip(v.tolist(), n.tolist()):
            total[a] = total.get(a, 0) + b
    why = diagnose_thing_values(total, ds.extra["categories"])
    if why:
        raise DataError(f"thing masks in {ds.extra['mask_dir']}: {why}", hint=ds.extra["fix"])


THINGS_FIX = ("build 1-indexed semantic PNGs from the COCO panoptic annotations with panopticapi's "
              "converters/panoptic2semantic_segmentation.py (things keep their category id, void = 0) and "
              "put them in annotations/{split}2017/ (see `densebench data prepare coco-things`)")
STUFF_FIX = ("use the official stuff_{split}2017_pixelmaps from stuff_annotations_trainval2017.zip "
             "(see `densebench data prepare coco-stuff`)")


def open_coco(family: str, root: Path, split: str, *, id_list: IdList = None) -> COCODataset:
    """Open COCO-Things or COCO-Stuff for ``split`` ('train' = the 10% subset list, 'val' = val2017)."""
    candidates = [root / SPLIT_DIR / f"{split}.txt", shipped_path("coco", f"{split}.txt")]
    ids, source, synthetic = resolve_ids(
        root, family, split, id_list, candidates,
        hint=f"run `densebench data prepare coco-things --root {root}` to write the COCO split lists "
             f"(train = seeded {TRAIN_FRACTION:.0%} subset of train2017, val = all of val2017)")
    image_dir = _first_existing(image_dir_candidates(root, split)) or image_dir_candidates(root, split)[0]
    things = family == "coco-things"
    mask_cands = (thing_mask_dir_candidates if things else stuff_mask_dir_candidates)(root, split)
    mask_dir = _first_existing(mask_cands)
    if mask_dir is None:
        raise DataError(f"no {family} mask folder for split {split}: looked for "
                        + ", ".join(str(p) for p in mask_cands),
                        hint=(THINGS_FIX if things else STUFF_FIX).format(split=split))
    cats, cat_source = read_categories("panoptic" if things else "stuff", root)
    lut = things_lut(cats) if things else stuff_lut(cats)
    valid_raw = np.zeros(256, dtype=bool)
    if things:
        valid_raw[[c["id"] for c in cats if 0 <= c["id"] < 256]] = True
        valid_raw[0] = True
    else:
        valid_raw[[c["id"] for c in cats if 0 <= c["id"] < 256]] = True
        valid_raw[[0, STUFF_OTHER_ID]] = True
    valid_raw[IGNORE_INDEX] = True
    names = thing_supercategories(cats) if things else stuff_supercategories(cats)
    ds = COCODataset(name=family, split=split, root=root, ids=ids, num_classes=len(names),
                     ignore_index=IGNORE_INDEX, class_names=names, synthetic=synthetic,
                     extra={"id_source": source, "image_dir": image_dir, "mask_dir": mask_dir, "lut": lut,
                            "valid_raw": valid_raw, "categories": cats, "categories_source": cat_source,
                            "fix": (THINGS_FIX if things else STUFF_FIX).format(split=split)})
    if things:
        _diagnose_sample(ds)
    return ds


def write_coco_split_lists(root: Path, *, seed: int = TRAIN_SEED, fraction: float = TRAIN_FRACTION) -> dict[str, Path]:
    """Write ``<root>/densebench_splits/{train,val}.txt`` from the user's image folders.

    val = every val2017 image id, sorted. train = a seeded choice of ``round(fraction * n)`` ids from the
    sorted train2017 ids (numpy ``default_rng(seed).choice`` without replacement, written sorted), so the
    subset depends only on the set of files, never on directory order. This is the one place that lists a
    directory; readers use the written lists afterwards.
    """
    out = {}
    (root / SPLIT_DIR).mkdir(parents=True, exist_ok=True)
    for split in ("val", "train"):
        folder = _first_existing(image_dir_candidates(root, split))
        if folder is None:
            raise DataError(f"no COCO {split}2017 image folder under {root}: looked for "
                            + ", ".join(str(p) for p in image_dir_candidates(root, split)),
                            hint=f"extract {split}2017.zip into {root / 'images'}")
        ids = sorted(p.stem for p in folder.glob("*.jpg"))
        if not ids:
            raise DataError(f"{folder} holds no .jpg images", hint=f"extract {split}2017.zip there")
        if split == "train":
            k = max(1, round(fraction * len(ids)))
            pick = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
            ids = sorted(ids[i] for i in pick)
        path = root / SPLIT_DIR / f"{split}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{i}\n" for i in ids))
        tmp.replace(path)
        out[split] = path
    return out
