"""Where things live: the feature cache, the data home, the shipped split lists and leaderboards."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import platformdirs

from .errors import DataError


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The feature cache: ``--cache-dir``, else ``$DENSEBENCH_CACHE``, else the XDG user cache dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("DENSEBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("densebench"))


def data_home(override: str | os.PathLike | None = None) -> Path | None:
    """The data root: ``--data-root``, else ``$DENSEBENCH_DATA``, else None."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("DENSEBENCH_DATA")
    return Path(env).expanduser() if env else None


def shipped(*parts: str) -> Path:
    """A file shipped in the package's ``datasets/`` folder (split lists, class names, checksums).

    Works for editable and regular installs: the folder is installed as ``densebench_datasets``.
    """
    path = Path(str(resources.files("densebench_datasets").joinpath(*parts)))
    if not path.exists():
        raise DataError(f"shipped dataset file {'/'.join(parts)} is missing from the installation ({path})",
                        hint="reinstall densebench (pip install -e .)")
    return path


def shipped_leaderboard(name: str = "dense-ssl.json") -> Path:
    """A leaderboard JSON shipped in the package's ``leaderboards/`` folder."""
    return Path(str(resources.files("densebench_leaderboards").joinpath(name)))


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Read a split/id list: one id per line, blank lines skipped, CRLF tolerated, extensions kept as written."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"id list {path} does not exist",
                        hint="give a text file with one image id per line (e.g. a dataset's sets/<split>.txt)")
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if len(set(ids)) != len(ids):
        raise DataError(f"id list {path} contains duplicate ids", hint="remove the repeated lines")
    return ids


def slug(text: str, max_len: int = 80) -> str:
    """A file-name-safe form of ``text``: runs of anything but letters, digits, ``_ . - @`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", text).strip("_")[:max_len] or "_"
