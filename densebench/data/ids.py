"""Where a split's id list comes from, and whether it is the published one.

A reader never pairs two directory listings: the ids come, in this order, from an explicit list the
caller passes (``--train-list`` / ``--val-list``, a fraction list), the ``densebench_manifest.json`` of a
synthetic suite, then the split the dataset itself provides, as the reference loaders read it (VOC
``sets/<split>.txt``; ADE20K the images present in ``images/<split>/``, each paired with its mask by id),
and only when the dataset provides none, the shipped published list. The ids the dataset provides are
compared with the published list: when they differ, one warning line says how many published ids are
missing and how many are extra, and the result's dataset provenance records it (``published_ids: false``,
which the leaderboard treats as non-standard). A missing list is a DataError naming every place looked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..paths import read_id_list
from .base import MANIFEST_NAME, read_manifest

IdList = Sequence[str] | str | os.PathLike | None


def shipped_path(*parts: str) -> Path:
    """A shipped dataset file's location, whether or not it exists (``paths.shipped`` raises when missing)."""
    from importlib import resources

    return Path(str(resources.files("densebench_datasets").joinpath(*parts)))


log = logging.getLogger("densebench.data")


def _given_ids(root: Path, family: str, split: str, id_list: IdList) -> tuple[list[str], str, bool] | None:
    """``(ids, source, synthetic)`` from an explicit list or a synthetic suite's manifest, else None."""
    manifest = read_manifest(root)
    synthetic = bool(manifest and manifest.get("synthetic"))
    if id_list is not None:
        if isinstance(id_list, (str, os.PathLike)):
            return read_id_list(id_list), str(id_list), synthetic
        ids = [str(i) for i in id_list]
        if len(set(ids)) != len(ids):
            raise DataError(f"the id list given for {family}/{split} contains duplicate ids",
                            hint="list each id once")
        return ids, "explicit list", synthetic
    if manifest is not None:
        splits = manifest.get("splits", {})
        if split not in splits:
            raise DataError(
                f"split {split!r} is not in {root / MANIFEST_NAME} (it has: {', '.join(sorted(splits)) or 'none'})",
                hint="pick one of the listed splits or regenerate the suite with `densebench synth`",
            )
        return [str(i) for i in splits[split]], str(root / MANIFEST_NAME), synthetic
    return None


def resolve_ids(root: Path, family: str, split: str, id_list: IdList,
                candidates: Sequence[Path], *, hint: str | None = None) -> tuple[list[str], str, bool]:
    """Return ``(ids, source, synthetic)`` for one split.

    ``candidates`` are the split files to try in order when neither an explicit list nor a manifest
    gives the ids. ``source`` names where the ids came from (recorded in results via ``extra``).
    """
    given = _given_ids(root, family, split, id_list)
    if given is not None:
        return given
    for path in candidates:
        if path.is_file():
            return read_id_list(path), str(path), False
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(f"no split list for {family}/{split}: looked for {looked}",
                    hint=hint or f"put the official {split} id list at {candidates[0]}")


def listed_ids(folder: Path, suffix: str) -> list[str] | None:
    """The ids (file stems) of the ``suffix`` files in ``folder``, sorted; None when the folder does not exist.
    One folder is listed and its files name the ids; the other files of an id are found by id, never by
    pairing a second listing by position."""
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() == suffix and not p.name.startswith("."))


def split_ids(root: Path, family: str, split: str, id_list: IdList, *, own_files: Sequence[Path] = (),
              own_listing: tuple[Path, str] | None = None, published: Path | None = None,
              hint: str | None = None) -> tuple[list[str], bool, dict]:
    """``(ids, synthetic, extra)`` for one split of a dataset that has a published id list.

    Order: an explicit list, a synthetic manifest, the dataset's own split file (``own_files``, the first that
    exists), the dataset's own image folder (``own_listing`` = (folder, suffix)), the shipped ``published`` list.
    ``extra`` (kept in ``SegmentationDataset.extra``) holds ``id_source`` and, when the dataset's own split was
    compared with the published list, ``published_ids`` (same set of ids) and the ``published_missing`` /
    ``published_extra`` counts. The same set in another order is read in the published order, so caches and
    seeded draws (which follow the order) are those of the published split.
    """
    given = _given_ids(root, family, split, id_list)
    if given is not None:
        ids, source, synthetic = given
        return ids, synthetic, {"id_source": source}
    own, source = None, None
    for path in own_files:
        if path.is_file():
            own, source = read_id_list(path), str(path)
            break
    if own is None and own_listing is not None:
        own = listed_ids(*own_listing)
        source = f"{own_listing[0]} (the {own_listing[1]} files present)" if own is not None else None
    has_published = published is not None and published.is_file()
    if own is None:
        if has_published:
            return read_id_list(published), False, {"id_source": str(published), "published_ids": True}
        looked = [*own_files, *([own_listing[0]] if own_listing else []), *([published] if published else [])]
        raise DataError(f"no split list for {family}/{split}: looked for {', '.join(str(p) for p in looked)}",
                        hint=hint or f"put the {split} id list at {looked[0]}")
    if not has_published:
        return own, False, {"id_source": source}
    return compare_with_published(own, read_id_list(published), f"{family}/{split}", source)


def compare_with_published(own: list[str], published: list[str], what: str, source: str
                           ) -> tuple[list[str], bool, dict]:
    """The dataset's own ids against the published ones: the published order when the sets are equal, else
    the dataset's ids, with one warning line and the counts recorded."""
    own_set, pub_set = set(own), set(published)
    if own_set == pub_set:
        return list(published), False, {"id_source": source, "published_ids": True}
    missing, extra = len(pub_set - own_set), len(own_set - pub_set)
    log.warning("%s: %s gives %d ids, not the %d published ones (%d missing, %d extra); results are marked "
                "non-standard", what, source, len(own), len(published), missing, extra)
    return own, False, {"id_source": source, "published_ids": False, "published_missing": missing,
                        "published_extra": extra, "published_count": len(published)}


def id_provenance(**splits) -> dict:
    """What a result's dataset provenance records about the ids of the splits it read (``train=ds, val=ds``):
    ``ids`` per split (source, count, comparison with the published list) and ``published_ids`` = False when
    any split differs from the published one, True when every compared split matches (absent when none was
    compared: explicit lists, synthetic suites), plus the dataset's own class metadata when it has some."""
    record: dict = {"ids": {}}
    flags = []
    for name, ds in splits.items():
        if ds is None:
            continue
        extra = ds.extra
        entry = {"source": extra.get("id_source"), "n": len(ds)}
        if "published_ids" in extra:
            flags.append(bool(extra["published_ids"]))
            entry["published"] = bool(extra["published_ids"])
            for key in ("published_missing", "published_extra", "published_count"):
                if key in extra:
                    entry[key.removeprefix("published_")] = int(extra[key])
        record["ids"][name] = entry
        if extra.get("classes_source") and "classes" not in record:
            record["classes"] = {"source": extra["classes_source"], "num_classes": ds.num_classes,
                                 "ignore_index": ds.ignore_index}
    if flags:
        record["published_ids"] = all(flags)
    return record
