"""Where a split's id list comes from.

A reader never lists directories to decide which images exist: the ids come, in this order, from an
explicit list the caller passes (e.g. a fraction list), the ``densebench_manifest.json`` of a synthetic
suite, then the candidate split files of the family (shipped lists first for the real datasets, so that
every user evaluates on the published ids). A missing list is a DataError naming every file looked for.
"""

from __future__ import annotations

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


def resolve_ids(root: Path, family: str, split: str, id_list: IdList,
                candidates: Sequence[Path], *, hint: str | None = None) -> tuple[list[str], str, bool]:
    """Return ``(ids, source, synthetic)`` for one split.

    ``candidates`` are the split files to try in order when neither an explicit list nor a manifest
    gives the ids. ``source`` names where the ids came from (recorded in results via ``extra``).
    """
    manifest = read_manifest(root)
    synthetic = bool(manifest and manifest.get("synthetic"))
    if id_list is not None:
        if isinstance(id_list, (str, os.PathLike)):
            return read_id_list(id_list), str(id_list), synthetic
        ids = [str(i) for i in id_list]
        if len(set(ids)) != len(ids):
            raise DataError(f"the id list given for {family}/{split} contains duplicate ids")
        return ids, "explicit list", synthetic
    if manifest is not None:
        splits = manifest.get("splits", {})
        if split not in splits:
            raise DataError(
                f"split {split!r} is not in {root / MANIFEST_NAME} (it has: {', '.join(sorted(splits)) or 'none'})",
                hint="pick one of the listed splits or regenerate the suite with `densebench synth`",
            )
        return [str(i) for i in splits[split]], str(root / MANIFEST_NAME), synthetic
    for path in candidates:
        if path.is_file():
            return read_id_list(path), str(path), False
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(f"no split list for {family}/{split}: looked for {looked}",
                    hint=hint or f"put the official {split} id list at {candidates[0]}")
