"""Check a dataset tree before a long run, and say how to build one.

``verify`` reads every file of every split once (images fully decoded, masks range-checked through the
reader's own label mapping) and reports *every* problem with the file and the fix, instead of failing on
the first bad image an hour into an evaluation. ``prepare_instructions`` prints the official archives
(with the checksums shipped in ``datasets/checksums.json``), the target layout and the commands to build it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import DataError
from . import FAMILIES, find_root, get_family, open_dataset
from .base import read_manifest
from .coco import SPLIT_DIR
from .ids import shipped_path

#: progress(done, total, path): called once per checked file group.
Progress = Callable[[int, int, str], None]

#: Published split sizes of the real datasets (a list shorter than this is reported).
PUBLISHED_COUNTS = {
    ("voc", "trainaug"): 10582, ("voc", "val"): 1449,
    ("ade20k", "training"): 20210, ("ade20k", "validation"): 2000,
    ("coco-things", "val"): 5000, ("coco-stuff", "val"): 5000,
    ("spair", "trn"): 53340, ("spair", "val"): 5384, ("spair", "test"): 12234,
    ("davis", "train"): 60, ("davis", "val"): 30,     # sequences
}

REQUIRED_DIRS = {
    "voc": ("images", "SegmentationClass", "SegmentationClassAug"),
    "ade20k": ("images/training", "images/validation", "annotations/training", "annotations/validation"),
    "coco-things": ("images", "annotations"),
    "coco-stuff": ("images", "annotations"),
    "spair": ("JPEGImages", "ImageAnnotation", "PairAnnotation"),
    "davis": ("JPEGImages/480p", "Annotations/480p", "ImageSets/2017"),
}

VERIFY_SPLITS = {"voc": ("trainaug", "val"), "ade20k": ("training", "validation"),
                 "coco-things": ("train", "val"), "coco-stuff": ("train", "val"), "spair": ("trn", "val", "test"),
                 "davis": ("train", "val")}

#: Official archives that ``datasets/checksums.json`` does not list yet (same fields).
EXTRA_ARCHIVES = {
    "DAVIS-2017-trainval-480p.zip": {
        "families": ["davis"],
        "url": "https://data.vision.ee.ethz.ch/csergi/share/davis/DAVIS-2017-trainval-480p.zip",
        "md5": None, "sha1": None,
        "note": "the semi-supervised TrainVal 480p release (davischallenge.org/davis2017/code.html); extracts to "
                "DAVIS/{JPEGImages,Annotations}/480p/<sequence>/ and DAVIS/ImageSets/2017/{train,val}.txt",
    },
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset tree: where, what, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}\n  fix: {self.fix}"


def _problem(path, err: DataError | str, fix: str | None = None) -> Problem:
    if isinstance(err, DataError):
        return Problem(str(path), err.message, fix or err.hint or "re-extract the file from the official archive")
    return Problem(str(path), err, fix or "re-extract the file from the official archive")


def _check_image(path: Path) -> tuple[tuple[int, int] | None, Problem | None]:
    if not path.is_file():
        return None, _problem(path, "image is missing", "re-extract it from the official archive")
    try:
        with Image.open(path) as im:
            im.load()
            return im.size, None
    except Exception as e:  # noqa: BLE001 - PIL raises many exception types for broken files
        return None, _problem(path, f"image cannot be decoded ({type(e).__name__}: {e})")


def _verify_segmentation(ds, progress: Progress | None, done: int, total: int) -> tuple[list[Problem], int]:
    from .base import open_mask

    problems: list[Problem] = []
    for id_ in ds.ids:
        ipath, mpath = ds.image_path(id_), ds.mask_path(id_)
        size, prob = _check_image(ipath)
        if prob:
            problems.append(prob)
        if not mpath.is_file():
            problems.append(_problem(mpath, "mask is missing"))
        else:
            try:
                mask = ds.map_mask(open_mask(mpath), id_)
                if size is not None and mask.shape != (size[1], size[0]):
                    problems.append(_problem(mpath, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                                    f"{ipath} is {size[0]}x{size[1]}",
                                             "image and mask of one id must have the same size; re-extract both"))
            except DataError as e:
                problems.append(_problem(mpath, e))
        done += 1
        if progress:
            progress(done, total, str(ipath))
    return problems, done


def _verify_spair(ds, progress: Progress | None, done: int, total: int) -> tuple[list[Problem], int]:
    problems: list[Problem] = []
    try:
        pairs = ds.pairs
    except DataError as e:
        return [_problem(ds.root / "PairAnnotation" / ds.split, e)], done + len(ds.ids)
    if ds.out_of_image:
        problems.append(Problem(str(ds.root / "PairAnnotation" / ds.split),
                                f"{ds.out_of_image} keypoints lie outside their image (they are treated as invisible)",
                                "nothing to do unless the count is large; then re-extract the annotations"))
    needed = sorted({p["src_id"] for p in pairs} | {p["trg_id"] for p in pairs})
    for id_ in needed:
        _, prob = _check_image(ds.image_path(id_))
        if prob:
            problems.append(prob)
        done += 1
        if progress:
            progress(done, total, str(ds.image_path(id_)))
    return problems, done


def _verify_davis(ds, progress: Progress | None, done: int, total: int) -> tuple[list[Problem], int]:
    """Every frame as a segmentation pair, then per sequence: enough frames to score, objects in the first
    annotation, one frame size."""
    problems, done = _verify_segmentation(ds, progress, done, total)
    for seq in ds.sequences:
        folder = ds.root / "JPEGImages" / "480p" / seq
        if len(ds.frames[seq]) < 3:
            problems.append(Problem(str(folder), f"sequence has {len(ds.frames[seq])} frames; the semi-supervised "
                                                 "evaluation scores all but the first and last, so it needs 3",
                                    "re-extract the sequence from the official archive"))
        first = ds.mask_path(ds.frame_ids(seq)[0])
        try:
            objects = ds.annotation(ds.frame_ids(seq)[0])
        except DataError:
            continue                                  # reported above
        if not ((objects > 0) & (objects != 255)).any():
            problems.append(Problem(str(first), "the first annotation of the sequence holds no object",
                                    "the first frame's annotation defines the objects; re-extract it"))
        sizes = set()
        for id_ in ds.frame_ids(seq):
            try:
                with Image.open(ds.image_path(id_)) as im:
                    sizes.add(im.size)
            except OSError:
                pass                                  # reported above
        if len(sizes) > 1:
            problems.append(Problem(str(folder), f"frames of one sequence have several sizes {sorted(sizes)}",
                                    "re-extract the sequence from the official archive"))
    return problems, done


def _split_size(family: str, ds) -> int:
    """What a split list counts: SPair pairs, DAVIS sequences, else images."""
    if family == "spair":
        return len(ds.pair_names)
    if family == "davis":
        return len(ds.sequences)
    return len(ds.ids)


_VERIFIERS = {"spair": _verify_spair, "davis": _verify_davis}


def verify(family: str, data_root: str | os.PathLike, *, splits: tuple[str, ...] | None = None,
           progress: Progress | None = None) -> list[Problem]:
    """Every problem of ``family`` under ``data_root``: layout, split lists and counts, and each file
    (readable image, mask present and readable, mask size = image size, label values in range, COCO thing
    masks that are 0-indexed stuffthingmaps). An empty list means the tree is ready."""
    get_family(family)
    try:
        root = find_root(family, data_root)
    except DataError as e:
        return [_problem(data_root, e)]
    problems = [_problem(root / d, "expected folder is missing",
                         f"see `densebench data prepare {family}` for the layout")
                for d in REQUIRED_DIRS[family] if not (root / d).is_dir()]
    manifest = read_manifest(root)
    splits = splits or (tuple(manifest["splits"]) if manifest and family == "spair" else VERIFY_SPLITS[family])
    datasets = []
    for split in splits:
        if manifest and split not in manifest.get("splits", {}):
            continue
        try:
            ds = open_dataset(family, root, split)
        except DataError as e:
            problems.append(_problem(root, e))
            continue
        if manifest:
            expected = manifest.get("counts", {}).get(split)
            if expected is not None and expected != _split_size(family, ds):
                problems.append(Problem(str(root), f"split {split} lists {_split_size(family, ds)} ids but the "
                                                   f"manifest says {expected}",
                                        "regenerate the suite with `densebench synth`"))
        else:
            published = PUBLISHED_COUNTS.get((family, split))
            n = _split_size(family, ds)
            if published is not None and n != published:
                problems.append(Problem(ds.extra.get("id_source", str(root)),
                                        f"split {split} has {n} ids; the published split has {published}",
                                        "use the official split list (densebench ships it for VOC and ADE20K)"))
        datasets.append(ds)
    total = sum(len(ds.ids) for ds in datasets)
    done = 0
    for ds in datasets:
        found, done = _VERIFIERS.get(family, _verify_segmentation)(ds, progress, done, total)
        problems += found
    return problems


def checksums() -> dict:
    """The shipped table of official archives (name → url, checksums, what it provides)."""
    return json.loads(shipped_path("checksums.json").read_text())


_STEPS = {
    "voc": """Target layout (open-hummingbird-eval):
  VOCSegmentation/images/<id>.jpg                 (all of VOCdevkit/VOC2012/JPEGImages)
  VOCSegmentation/SegmentationClass/<id>.png      (VOC2012 SegmentationClass, palette PNGs; val)
  VOCSegmentation/SegmentationClassAug/<id>.png   (SBD-augmented masks, values 0..20 and 255; train/trainaug)
  VOCSegmentation/sets/{{train,trainaug,val}}.txt   (optional: densebench ships trainaug and val)
Steps:
  tar xf VOCtrainval_11-May-2012.tar && tar xzf benchmark.tgz
  mkdir -p VOCSegmentation/sets
  cp -r VOCdevkit/VOC2012/JPEGImages VOCSegmentation/images
  cp -r VOCdevkit/VOC2012/SegmentationClass VOCSegmentation/SegmentationClass
  # SegmentationClassAug: convert SBD's cls/*.mat (GTcls.Segmentation) to PNG and add the VOC train masks,
  # e.g. with mmsegmentation: python tools/dataset_converters/voc_aug.py VOCdevkit benchmark_RELEASE --nproc 8
  # then move VOCdevkit/VOC2012/SegmentationClassAug to VOCSegmentation/SegmentationClassAug
  densebench data verify voc --root VOCSegmentation""",
    "ade20k": """Target layout (the official archive as extracted):
  ADEChallengeData2016/images/{{training,validation}}/ADE_*.jpg
  ADEChallengeData2016/annotations/{{training,validation}}/ADE_*.png   (L PNGs, 0 = other/ignored, 1..150)
Steps:
  unzip ADEChallengeData2016.zip
  densebench data verify ade20k --root ADEChallengeData2016""",
    "coco": """Target layout (NeCo / open-hummingbird-eval):
  coco/images/{{train2017,val2017}}/<12-digit id>.jpg
  coco/annotations/{{train2017,val2017}}/<id>.png       (COCO-Things: panoptic-derived semantic PNGs,
                                                       value = panoptic category id, 0 = void; NOT the
                                                       0-indexed stuffthingmaps of COCO-Stuff-164k)
  coco/annotations/panoptic_annotations/panoptic_val2017.json
  coco/annotations/stuff_annotations/stuff_{{train,val}}2017_pixelmaps/<id>.png   (COCO-Stuff)
  coco/annotations/stuff_annotations/stuff_val2017.json
Steps:
  mkdir -p coco/images coco/annotations/panoptic_annotations coco/annotations/stuff_annotations
  unzip train2017.zip -d coco/images && unzip val2017.zip -d coco/images
  unzip panoptic_annotations_trainval2017.zip -d coco/annotations/panoptic_annotations
  (cd coco/annotations/panoptic_annotations && unzip panoptic_train2017.zip && unzip panoptic_val2017.zip)
  mv coco/annotations/panoptic_annotations/annotations/* coco/annotations/panoptic_annotations/ 2>/dev/null
  # things masks: panopticapi (github.com/cocodataset/panopticapi), for split in train val:
  python converters/panoptic2semantic_segmentation.py \\
      --input_json_file coco/annotations/panoptic_annotations/panoptic_${{split}}2017.json \\
      --segmentations_folder coco/annotations/panoptic_annotations/panoptic_${{split}}2017 \\
      --semantic_seg_folder coco/annotations/${{split}}2017 \\
      --categories_json_file panoptic_coco_categories.json
  unzip stuff_annotations_trainval2017.zip -d coco/annotations/stuff_annotations
  (cd coco/annotations/stuff_annotations && mv annotations/* . 2>/dev/null; \\
   unzip stuff_train2017_pixelmaps.zip && unzip stuff_val2017_pixelmaps.zip)
  densebench data prepare coco-things --root coco   # writes coco/{split_dir}/{{train,val}}.txt:
                                               # val = all val2017 ids, train = seeded 10% of train2017
  densebench data verify coco-things --root coco && densebench data verify coco-stuff --root coco""",
    "spair": """Target layout (the official archive as extracted):
  SPair-71k/JPEGImages/<category>/<image>.jpg, SPair-71k/Segmentation/<category>/<image>.png
  SPair-71k/ImageAnnotation/<category>/<image>.json, SPair-71k/PairAnnotation/{{trn,val,test}}/*.json
  SPair-71k/Layout/large/{{trn,val,test}}.txt
Steps:
  tar xzf SPair-71k.tar.gz
  densebench data verify spair --root SPair-71k""",
    "davis": """Target layout (the official archive as extracted):
  DAVIS/JPEGImages/480p/<sequence>/<frame>.jpg     (00000.jpg, 00001.jpg, ...)
  DAVIS/Annotations/480p/<sequence>/<frame>.png    (palette PNGs: 0 background, 1..N objects, 255 void)
  DAVIS/ImageSets/2017/{{train,val}}.txt             (60 train and 30 val sequence names)
Steps:
  unzip DAVIS-2017-trainval-480p.zip
  densebench data verify davis --root DAVIS""",
}


def prepare_instructions(family: str) -> str:
    """The official archives (URL and checksum), the target layout and the commands that build it."""
    key = "coco" if family in ("coco", "coco-things", "coco-stuff") else get_family(family).name
    table = {**checksums()["archives"], **EXTRA_ARCHIVES}
    lines = [f"# {family}: this machine cannot download datasets; fetch these archives yourself", "Archives:"]
    for name, info in table.items():
        if key not in info["families"]:
            continue
        sums = ", ".join(f"{k} {info[k]}" for k in ("md5", "sha1", "sha256") if info.get(k)) or "checksum not published"
        lines.append(f"  {name}  {info['url']}  ({sums})")
        if info.get("note"):
            lines.append(f"      {info['note']}")
    lines.append(_STEPS[key].format(split_dir=SPLIT_DIR))
    return "\n".join(lines)


__all__ = ["FAMILIES", "Problem", "checksums", "prepare_instructions", "verify"]
