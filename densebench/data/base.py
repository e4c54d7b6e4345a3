"""What every dataset reader provides.

Readers pair images and masks *by id from a split list*, never by listing two directories. The id
list comes from (in order): an explicit list the user passes, the ``densebench_manifest.json`` a
synthetic suite writes into its root, or the list shipped in ``datasets/`` for the real dataset.
Masks are returned as uint8 class-id maps already in the benchmark's label space (e.g. COCO
supercategory ids), with ``ignore_index`` marking pixels that are never scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ..errors import DataError

#: File a synthetic suite writes into each dataset root: {"synthetic": true, "splits": {split: [ids]}, ...}
MANIFEST_NAME = "densebench_manifest.json"


_MANIFEST_FIX = ("regenerate the suite with `densebench synth`, or delete the file if this is a real dataset "
                 "folder (the official split lists are used then)")


def read_manifest(root: Path) -> dict | None:
    """The synthetic suite's manifest of ``root`` (None when there is none), its structure checked: a JSON object
    whose ``splits`` maps each split to a list of ids and whose ``fractions`` maps N to {seed: list path}."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})", hint=_MANIFEST_FIX) from e
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})", hint="check its permissions") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is not a densebench manifest: {problem}", hint=_MANIFEST_FIX)
    return manifest


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return f"it holds {_json_kind(manifest)}, not a JSON object"
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict):
        return f"'splits' is {_json_kind(splits)}, not an object of id lists"
    for name, ids in splits.items():
        if not isinstance(ids, list):
            return f"splits.{name} is {_json_kind(ids)}, not a list of ids"
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))]
        if bad:
            return f"splits.{name} holds {_json_kind(bad[0])} where an id belongs"
    fractions = manifest.get("fractions", {})
    lists = list(fractions.values()) if isinstance(fractions, dict) else [None]
    if not all(isinstance(f, dict) and all(isinstance(p, str) for p in f.values()) for f in lists):
        return "'fractions' is not an object of {seed: list file} objects"
    if not isinstance(manifest.get("counts", {}), dict):
        return "'counts' is not an object"
    return None


#: A dataset root's own classes (a user's dataset in an official layout): a JSON object
#: ``{"class_names": [...], "ignore_index": 255}`` (``num_classes`` optional, equal to the number of names),
#: or ``classes.txt`` with one class name per line (ignore label: the family's). The JSON file wins.
CLASSES_JSON = "densebench_classes.json"
CLASSES_TXT = "classes.txt"
_CLASSES_FIX = (f"write {CLASSES_JSON} as {{\"class_names\": [\"background\", ...], \"ignore_index\": 255}} or "
                f"{CLASSES_TXT} with one class name per line (docs/datasets.md)")


@dataclass(frozen=True)
class ClassInfo:
    """The label space a dataset root declares; ``source`` is the metadata file (None: the family's own)."""

    num_classes: int
    class_names: list[str]
    ignore_index: int
    source: str | None = None


def _classes_from_json(path: Path, ignore_index: int) -> ClassInfo:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as JSON ({e})", hint=_CLASSES_FIX) from e
    names = meta.get("class_names") if isinstance(meta, dict) else None
    count = meta.get("num_classes") if isinstance(meta, dict) else None
    if names is None and isinstance(count, int) and not isinstance(count, bool):
        names = [f"class_{i}" for i in range(count)]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"{path} needs 'class_names', a non-empty list of names (or 'num_classes')", hint=_CLASSES_FIX)
    if count is not None and count != len(names):
        raise DataError(f"{path} gives num_classes {count!r} but {len(names)} class names", hint=_CLASSES_FIX)
    ignore = meta.get("ignore_index", ignore_index)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise DataError(f"{path}: ignore_index must be an integer in 0..255, got {ignore!r}", hint=_CLASSES_FIX)
    return ClassInfo(len(names), [n.strip() for n in names], ignore, str(path))


def dataset_classes(root: Path, num_classes: int, class_names, ignore_index: int) -> ClassInfo:
    """The classes of the dataset at ``root``: its own metadata file when it has one (:data:`CLASSES_JSON`,
    :data:`CLASSES_TXT`), else the family's (``class_names`` is called only then)."""
    root = Path(root)
    if (root / CLASSES_JSON).is_file():
        info = _classes_from_json(root / CLASSES_JSON, ignore_index)
    elif (root / CLASSES_TXT).is_file():
        names = [line.strip() for line in (root / CLASSES_TXT).read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n]
        if not names:
            raise DataError(f"{root / CLASSES_TXT} lists no class names", hint=_CLASSES_FIX)
        info = ClassInfo(len(names), names, ignore_index, str(root / CLASSES_TXT))
    else:
        return ClassInfo(num_classes, list(class_names()), ignore_index)
    if info.num_classes > 255 or (info.num_classes > info.ignore_index and info.ignore_index != ignore_index):
        raise DataError(f"{info.source}: {info.num_classes} classes with ignore label {info.ignore_index} do not fit "
                        "uint8 label maps (class ids 0..C-1, the ignore label outside them)", hint=_CLASSES_FIX)
    if len(set(info.class_names)) != len(info.class_names):
        raise DataError(f"{info.source} repeats a class name", hint="give every class a distinct name")
    return info


def with_own_classes(cls: type, *, name: str, root: Path, split: str, ids: list[str], synthetic: bool, extra: dict,
                     num_classes: int, class_names, ignore_index: int) -> SegmentationDataset:
    """A split of ``cls`` with the classes :func:`dataset_classes` finds at ``root`` (recorded in ``extra``)."""
    classes = dataset_classes(root, num_classes, class_names, ignore_index)
    if classes.source:
        extra["classes_source"] = classes.source
    return cls(name=name, split=split, root=root, ids=ids, num_classes=classes.num_classes,
               ignore_index=classes.ignore_index, class_names=classes.class_names, synthetic=synthetic, extra=extra)


_REEXTRACT = "re-extract it from the official archive (the file is damaged or was cut short)"


def missing_file_hint(id_: str | None = None, listed_in: str | None = None) -> str:
    """The fix for a file whose id the split list names but which is not there (ids come from split lists, never
    from listing folders, so a missing file is a listed id without its files)."""
    which = f"id {id_}" if id_ else "its id"
    where = f" ({listed_in})" if listed_in else ""
    return (f"{which} is in the split list{where} but the file is missing: restore it from the official archive, "
            "or check that --data-root is the complete dataset")


def open_image(path: Path, *, missing_hint: str | None = None) -> Image.Image:
    """Open an RGB image, turning PIL's many failure modes into one clear DataError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"image {path} does not exist", hint=missing_hint or missing_file_hint()) from e
    except Exception as e:  # PIL raises a zoo of exception types for corrupt files
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e})", hint=_REEXTRACT) from e


def open_mask(path: Path, *, missing_hint: str | None = None) -> np.ndarray:
    """Open a label PNG as the raw uint8 values stored in it (palette indices for 'P' images)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"mask {path} has mode {im.mode}; expected a single-channel label PNG (L or P)",
                                hint="use the official label PNGs (class ids as pixel values), not colour renderings")
            arr = np.array(im)
    except FileNotFoundError as e:
        raise DataError(f"mask {path} does not exist", hint=missing_hint or missing_file_hint()) from e
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"mask {path} cannot be read ({type(e).__name__}: {e})", hint=_REEXTRACT) from e
    if arr.dtype != np.uint8:
        if arr.max() > 255:
            raise DataError(f"mask {path} has values above 255",
                            hint="class ids are 0..255; use the official label PNGs")
        arr = arr.astype(np.uint8)
    return arr


def _verify_data_default(obj, verify_data: bool | None) -> bool:
    if verify_data is not None:
        return bool(verify_data)
    if getattr(obj, "verify_data", False):
        return True
    return os.environ.get("DENSEBENCH_VERIFY_DATA", "").strip().lower() in ("1", "true", "yes", "on")


def _content_digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def file_signature(path: str | os.PathLike, verify_data: bool = False) -> bytes:
    """What one data file contributes to a manifest hash.

    ``b"size:mtime_ns"`` (one stat), or with ``verify_data`` ``b"size:"`` + the BLAKE2b-128 digest of its
    bytes; ``b"missing"`` when the file does not exist (readers report missing files when they read them).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return b"missing"
    if not verify_data:
        return f"{st.st_size}:{st.st_mtime_ns}".encode()
    try:
        return f"{st.st_size}:".encode() + _content_digest(path)
    except FileNotFoundError:
        return b"missing"


def files_manifest(head: str, items, verify_data: bool = False, workers: int = 8) -> str:
    """sha256 over ``head`` and, per ``(id, paths)`` item in order, the id and each path's :func:`file_signature`.

    Content hashing (``verify_data``) reads files on ``workers`` threads (hashlib releases the GIL).
    """
    items = [(str(id_), [Path(p) for p in paths]) for id_, paths in items]
    flat = [p for _, paths in items for p in paths]
    if verify_data and len(flat) > 1 and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            sigs = list(pool.map(lambda p: file_signature(p, True), flat))
    else:
        sigs = [file_signature(p, verify_data) for p in flat]
    h = hashlib.sha256(head.encode())
    k = 0
    for id_, paths in items:
        h.update(b"\0id\0" + id_.encode())
        for _ in paths:
            h.update(b"\0f\0" + sigs[k])
            k += 1
    return h.hexdigest()


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
    #: hash file contents (not size + mtime) in :meth:`manifest_hash`; set per object, e.g. by ``--verify-data``
    verify_data: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.ids)

    def limited(self, n: int) -> SegmentationDataset:
        """The first ``n`` items of this split (``--limit``, a smoke test; a new object with its own manifest)."""
        return dataclasses.replace(self, ids=list(self.ids[:n]))

    # Subclasses implement these two; the base class checks and maps.
    def image_path(self, id_: str) -> Path:  # pragma: no cover - overridden
        raise DataError(f"{type(self).__name__} does not define image_path", hint="implement image_path(id_)")

    def mask_path(self, id_: str) -> Path:  # pragma: no cover - overridden
        raise DataError(f"{type(self).__name__} does not define mask_path", hint="implement mask_path(id_)")

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
        missing = missing_file_hint(id_, self.extra.get("id_source"))
        image = open_image(self.image_path(id_), missing_hint=missing)
        mask = self.map_mask(open_mask(self.mask_path(id_), missing_hint=missing), id_)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"mask {self.mask_path(id_)} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{self.image_path(id_)} is {image.width}x{image.height}",
                hint="image and mask of one id must have the same size",
            )
        return id_, image, mask

    def manifest_hash(self, verify_data: bool | None = None, *, refresh: bool = False) -> str:
        """Identity of this split for cache keys and results: family, split, ids and every image and mask file.

        By default each file enters as its size and ``st_mtime_ns`` (one ``stat`` per file): rewriting a
        mask, even with the same size, gives a new hash and so new cache entries. With ``verify_data``
        (argument, else the ``verify_data`` attribute, else ``$DENSEBENCH_VERIFY_DATA``) each file
        enters as its size and a BLAKE2b digest of its bytes instead: content-addressed, so it catches
        a change that kept size and mtime (``touch -r``, ``rsync -t``, a restored backup), ignores a
        mere ``touch``, and costs one full read of the data. The two modes give different hashes.

        Memoised per dataset object (and mode): a run stats the files once however many protocols
        ask. ``subset`` copies start with an empty memo; ``refresh=True`` re-reads the files.
        """
        mode = "content" if _verify_data_default(self, verify_data) else "stat"
        head = f"{self.name}|{self.split}|{self.num_classes}|{self.ignore_index}|files-{mode}-v2"
        # what the file paths depend on too: a copy.copy() with another split or root must not reuse the memo
        ident = (head, type(self).__qualname__, str(self.root), tuple(self.ids))
        memo = self.__dict__.setdefault("_manifest_memo", {})
        hit = memo.get(mode)
        if hit is not None and not refresh and hit[0] == ident:
            return hit[1]
        digest = files_manifest(head, [(id_, (self.image_path(id_), self.mask_path(id_))) for id_ in self.ids],
                                verify_data=mode == "content")
        memo[mode] = (ident, digest)
        return digest

    def subset(self, ids: list[str]) -> SegmentationDataset:
        """The same dataset restricted to ``ids`` (e.g. a fraction list); unknown ids are an error."""
        known = set(self.ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise DataError(f"{len(missing)} ids of the list are not in {self.name}/{self.split} "
                            f"(first: {missing[:3]})", hint="check that the list belongs to this dataset and split")
        import copy
        out = copy.copy(self)
        out.ids = list(ids)
        out.__dict__.pop("_manifest_memo", None)  # the parent's memo describes the parent's ids
        return out
