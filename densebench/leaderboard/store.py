"""The leaderboard file: its schema version, and creating, validating, reading and writing it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema

from ..errors import ResultError
from ..results import atomic_write_text, load_schema

LEADERBOARD_SCHEMA_VERSION = 1
SOURCES = ("measured", "published")
_RESTORE_HINT = "restore the file from version control; densebench did not change it"


def new_leaderboard(name: str, description: str = "") -> dict:
    """An empty leaderboard document."""
    return {"schema_version": LEADERBOARD_SCHEMA_VERSION, "name": name, "description": description,
            "entries": []}


def validate_leaderboard(doc: Any, *, source: str = "leaderboard") -> None:
    """Schema check plus the rules a schema cannot say (unique ids); raises ResultError naming the problem."""
    if not isinstance(doc, dict):
        raise ResultError(f"{source} is not a JSON object", hint=_RESTORE_HINT)
    version = doc.get("schema_version")
    if version != LEADERBOARD_SCHEMA_VERSION:
        raise ResultError(f"{source} has schema_version {version!r}; this densebench reads leaderboard "
                          f"version {LEADERBOARD_SCHEMA_VERSION}",
                          hint="use the densebench version that wrote it")
    validator = jsonschema.Draft202012Validator(load_schema("leaderboard.schema.json"))
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ResultError(f"{source} does not match the leaderboard schema at {where}: {error.message}",
                          hint=_RESTORE_HINT)
    seen: dict[str, int] = {}
    for i, entry in enumerate(doc["entries"]):
        if entry["id"] in seen:
            raise ResultError(f"{source}: entries {seen[entry['id']]} and {i} have the same id {entry['id']} "
                              "(the same model, benchmark and config twice)",
                              hint="remove one of them; `densebench submit --replace` replaces entries")
        seen[entry["id"]] = i


def load_leaderboard(path: str | os.PathLike) -> dict:
    """Read and validate a leaderboard file; a missing, unparsable or invalid file is a ResultError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultError(f"leaderboard {path} does not exist",
                          hint="give an existing file, or submit a result to create it") from None
    except IsADirectoryError:
        raise ResultError(f"leaderboard {path} is a folder, not a file",
                          hint="pass the leaderboard .json file, e.g. leaderboards/dense-ssl.json") from None
    except UnicodeDecodeError:
        raise ResultError(f"leaderboard {path} is not a text file (not UTF-8 JSON)",
                          hint="pass a leaderboard .json file, e.g. leaderboards/dense-ssl.json") from None
    except OSError as e:
        raise ResultError(f"leaderboard {path} cannot be read ({e.strerror or e})",
                          hint="check the file's permissions") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultError(f"leaderboard {path} is not valid JSON ({e})", hint=_RESTORE_HINT) from None
    validate_leaderboard(doc, source=str(path))
    return doc


def write_leaderboard(doc: dict, path: str | os.PathLike) -> None:
    """Validate, then replace the file atomically; on failure (e.g. a full disk) the old file is untouched."""
    path = Path(path)
    validate_leaderboard(doc, source=str(path))
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ResultError(f"could not write leaderboard {path} ({e.strerror or e}); the previous file was "
                          "left unchanged",
                          hint="free disk space (or fix permissions) and submit again") from None


def default_leaderboard() -> Path:
    """The leaderboard shipped with densebench (published reference numbers plus measured entries)."""
    from ..paths import shipped_leaderboard

    return shipped_leaderboard("dense-ssl.json")
