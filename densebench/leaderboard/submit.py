"""Adding result files to a leaderboard: all or none, under a file lock, through an atomic write."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock

from ..errors import ResultError
from ..results import check_writable_folder, read_result, real_path
from .entries import entry_from_result
from .store import load_leaderboard, new_leaderboard, write_leaderboard


@dataclass(frozen=True)
class Submission:
    """What happened to one result file."""
    result_path: Path
    entry: dict
    action: str          # "added" or "replaced"


def _describe(entry: dict) -> str:
    return f"{entry['model']['name']} on {entry['benchmark']}"


def _prepare(results: Sequence[str | os.PathLike], allow_nonstandard: bool) -> list[tuple[Path, dict]]:
    """An entry per result file, refusing non-standard ones (unless allowed) and repeated measurements."""
    prepared: list[tuple[Path, dict]] = []
    for p in map(Path, results):
        entry = entry_from_result(read_result(p))
        if not entry["standard"] and not allow_nonstandard:
            raise ResultError(f"{p} ({_describe(entry)}) was not measured with the canonical config: "
                              + "; ".join(entry["nonstandard_reasons"]),
                              hint="re-run with the benchmark's defaults on the real dataset, or pass "
                                   "--allow-nonstandard to add it marked as non-standard")
        for q, other in prepared:
            if other["id"] == entry["id"]:
                raise ResultError(f"{q} and {p} are the same measurement ({_describe(entry)}, config "
                                  f"{entry['config_hash']})", hint="submit only one of them")
        prepared.append((p, entry))
    return prepared


def submit(results: Sequence[str | os.PathLike], leaderboard: str | os.PathLike, *,
           allow_nonstandard: bool = False, replace: bool = False,
           lock_timeout: float = 60.0) -> list[Submission]:
    """Add result files to a leaderboard: all of them or none.

    Each result must pass its schema and integrity check; a config other than the benchmark's canonical
    one (or synthetic data) needs ``allow_nonstandard``; a result already on the board (same weights
    fingerprint, benchmark and semantic config) needs ``replace``. The read-modify-write runs under
    ``<leaderboard>.lock``; a missing leaderboard file is created. A symlinked leaderboard is written (and
    locked) at its target. The ``.lock`` file stays after the submit, empty: deleting it while another
    submit waits on it would let two writers in, so it is left for good (docs/results.md).
    """
    if not results:
        raise ResultError("no result files given", hint="densebench submit RESULT.json... --leaderboard FILE")
    prepared = _prepare(results, allow_nonstandard)

    path = Path(leaderboard)
    target = real_path(path)  # a symlinked board: the shared file is rewritten and locked, the link stays
    if target.is_dir():
        raise ResultError(f"leaderboard {path} is a folder, not a file",
                          hint="pass the leaderboard .json file to add to (it is created if missing)")
    check_writable_folder(target.parent, what="leaderboard folder",
                          hint="submit to a leaderboard in a folder you can write (the submit rewrites the file "
                               "and keeps a <leaderboard>.lock file beside it)")
    lock = filelock.FileLock(str(target) + ".lock", timeout=lock_timeout)
    try:
        with lock:
            doc = load_leaderboard(target) if target.exists() else new_leaderboard(path.stem)
            entries = doc["entries"]
            where = {e["id"]: i for i, e in enumerate(entries)}
            done = []
            for p, entry in prepared:
                if entry["id"] in where:
                    old = entries[where[entry["id"]]]
                    if not replace:
                        raise ResultError(
                            f"{path} already has {_describe(entry)} with the same weights and config "
                            f"(entry {entry['id']}, submitted {old.get('submitted', 'earlier')}); "
                            f"{p} was not added", hint="pass --replace to overwrite that entry")
                    entries[where[entry["id"]]] = entry
                    done.append(Submission(p, entry, "replaced"))
                else:
                    where[entry["id"]] = len(entries)
                    entries.append(entry)
                    done.append(Submission(p, entry, "added"))
            write_leaderboard(doc, target)
    except filelock.Timeout:
        raise ResultError(f"could not lock {target}.lock within {lock_timeout:.0f} s",
                          hint="another submit holds the lock; retry (delete the .lock file only if no "
                               "densebench process is running)") from None
    return done
