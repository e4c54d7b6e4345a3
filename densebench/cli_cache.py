"""``densebench cache``: look after the feature cache (``ls``, ``du``, ``verify``, ``prune``, ``path``).

``register(app)`` adds the command group to the main typer app. The cache root is ``--cache-dir``, else
``$DENSEBENCH_CACHE``, else the user cache directory (:func:`densebench.paths.cache_dir`). Deleting takes
each entry's lock without waiting: an entry another process is building or resuming is skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .tables import Col, check_format, emit

from .cache import EntryInfo, FeatureCache, human_bytes
from .errors import ConfigError
from .paths import cache_dir as resolve_cache_dir

cache_app = typer.Typer(help="Inspect, check and prune the feature cache.", no_args_is_help=True)

CacheDirOption = Annotated[str | None, typer.Option("--cache-dir", help="Feature cache (default $DENSEBENCH_CACHE "
                                                    "or the user cache dir).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
FormatOption = Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="table (default), json, csv, "
                                           "markdown or plain (tab-separated).")]


def _cache(cache_dir: str | None) -> FeatureCache:
    return FeatureCache(resolve_cache_dir(cache_dir))


def _age(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0.0, now - float(t))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.1f} {unit}"
    return f"{s:.0f} s"


def _emit_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


def ls(cache_dir: CacheDirOption = None, fmt: FormatOption = "table", as_json: JsonOption = False) -> None:
    """List cache entries: key (first 12 characters), kind, model, dataset/split, view kind, rows (views), size,
    age, last use. --format json gives every field and the full keys."""
    fmt = check_format(fmt, as_json)
    cache = _cache(cache_dir)
    entries = sorted(cache.iter_entries(), key=lambda e: -(e.last_used or 0))
    if fmt == "json":
        _emit_json([e.as_dict() for e in entries])
        return
    console = Console()
    if not entries and fmt == "table":
        console.print(f"no feature cache entries under {cache.root}", highlight=False)
        return
    now = time.time()
    if fmt == "table":
        console.print(f"feature cache {cache.root}", highlight=False)
    # Keys, sizes and ages are never cut; model and data fold; the view only when there is room.
    rows = [{"key": e.key[:12], "kind": e.kind + ("*" if e.owner_alive else ""), "model": e.model,
             "data": f"{e.dataset}/{e.split}", "view": e.view, "rows": "-" if e.rows is None else e.rows,
             "size": human_bytes(e.size_bytes), "age": _age(e.created, now), "used": _age(e.last_used, now)}
            for e in entries]
    emit(console, rows, [Col("key", role="key"), Col("kind", role="key"), Col("model"), Col("data"),
                         Col("view", role="secondary"), Col("rows", role="number"), Col("size", role="number"),
                         Col("age", role="number"), Col("used", role="secondary")], fmt)
    if fmt != "table":
        return
    console.print(f"{len(entries)} item(s), {human_bytes(sum(e.size_bytes for e in entries))}"
                  + ("; partial*: its extraction is running" if any(e.owner_alive for e in entries) else ""),
                  highlight=False)


def du(cache_dir: CacheDirOption = None, fmt: FormatOption = "table", as_json: JsonOption = False) -> None:
    """Disk use of the cache, per model and kind, and the space left on its disk."""
    fmt = check_format(fmt, as_json)
    cache = _cache(cache_dir)
    entries = list(cache.iter_entries())
    by_model: dict[str, dict] = {}
    for e in entries:
        row = by_model.setdefault(e.model, {"entries": 0, "partial": 0, "legacy": 0, "bytes": 0})
        row["entries" if e.kind == "entry" else e.kind] += 1
        row["bytes"] += e.size_bytes
    total = sum(e.size_bytes for e in entries)
    probe = cache.root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if fmt == "json":
        _emit_json({"root": str(cache.root), "total_bytes": total, "free_bytes": free, "by_model": by_model})
        return
    console = Console()
    rows = [{"model": model, **{k: row[k] for k in ("entries", "partial", "legacy")},
             "size": human_bytes(row["bytes"]) if fmt == "table" else row["bytes"]}
            for model, row in sorted(by_model.items(), key=lambda kv: -kv[1]["bytes"])]
    columns = [Col("model", role="key"), *(Col(c, role="number") for c in ("entries", "partial", "legacy")),
               Col("size", role="number")]
    if fmt != "table":
        emit(console, rows, columns, fmt)
        return
    console.print(f"feature cache {cache.root}", highlight=False)
    emit(console, rows, columns, fmt)
    console.print(f"total {human_bytes(total)} in {len(entries)} item(s); {human_bytes(free)} free on its disk",
                  highlight=False)


def verify(cache_dir: CacheDirOption = None,
           delete: Annotated[bool, typer.Option("--delete", help="Delete the damaged entries (a run would "
                                                "rebuild them anyway).")] = False,
           as_json: JsonOption = False) -> None:
    """Check every entry's sizes and block checksums; exit code 1 when any entry is damaged."""
    cache = _cache(cache_dir)
    report = []
    damaged = 0
    for e in cache.iter_entries():
        if e.kind == "entry":
            e.problem = cache.verify_entry(e.key)
            status = "ok" if e.problem is None else "damaged"
        elif e.kind == "partial":
            status = "partial"
        else:
            status = "legacy"
        if status == "damaged":
            damaged += 1
            if delete:
                cache.remove(e)
        report.append((e, status))
    if as_json:
        _emit_json([{**e.as_dict(), "status": s} for e, s in report])
    else:
        console = Console()
        for e, status in report:
            if status == "ok":
                continue
            what = {"damaged": f"[bold red]damaged[/]: {e.problem}" + (" (deleted)" if delete else ""),
                    "partial": f"interrupted extraction, {e.rows} view(s) resumable",
                    "legacy": "format 1 (written by an older densebench, never read; prune it)"}[status]
            console.print(f"{e.key[:16]} {e.model} {e.dataset}/{e.split} {e.view}: {what}", highlight=False)
        ok = sum(1 for _, s in report if s == "ok")
        console.print(f"{ok} entr{'y' if ok == 1 else 'ies'} ok, {damaged} damaged", highlight=False)
    if damaged:
        raise typer.Exit(1)


def _matches_model(e: EntryInfo, model: str) -> bool:
    fingerprint = str(((e.meta.get("key_parts") or {}).get("encoder") or {}).get("fingerprint", ""))
    return any(model.lower() in n.lower() for n in (e.model, fingerprint))


def _select(entries: list[EntryInfo], older_than: float | None, model: str | None, max_size: float | None,
            all_: bool) -> list[EntryInfo]:
    """Entries matching every filter given, then (``max_size``) the least recently used others until the
    rest fits."""
    now = time.time()
    entries = sorted(entries, key=lambda e: e.last_used or 0)   # least recently used first
    chosen: list[EntryInfo] = []
    if all_ or older_than is not None or model is not None:
        chosen = [e for e in entries
                  if (older_than is None or now - (e.last_used or 0) >= older_than * 86400)
                  and (model is None or _matches_model(e, model))]
    if max_size is not None:
        keys = {id(e) for e in chosen}
        left = sum(e.size_bytes for e in entries if id(e) not in keys)
        for e in entries:
            if left <= max_size * 1e9:
                break
            if id(e) not in keys:
                chosen.append(e)
                left -= e.size_bytes
    return chosen


def prune(cache_dir: CacheDirOption = None,
          older_than: Annotated[float | None, typer.Option("--older-than", metavar="DAYS",
                                                           help="Entries not used for DAYS days.")] = None,
          model: Annotated[str | None, typer.Option("--model", metavar="SUBSTR", help="Entries whose model name or "
                                                    "fingerprint contains SUBSTR.")] = None,
          max_size: Annotated[float | None, typer.Option("--max-size", metavar="GB", help="Then remove the least "
                                                         "recently used entries until the cache holds at most GB "
                                                         "gigabytes (1e9 bytes).")] = None,
          all_: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
          as_json: JsonOption = False) -> None:
    """Remove entries by age, model or total size (interrupted extractions and old-format entries count as
    entries); always removes leftovers of killed runs. Entries in use by another process are skipped."""
    if older_than is None and model is None and max_size is None and not all_:
        raise ConfigError("say what to prune", hint="give --older-than DAYS, --model SUBSTR, --max-size GB or --all")
    if (older_than is not None and older_than < 0) or (max_size is not None and max_size < 0):
        raise ConfigError("--older-than and --max-size must be >= 0")
    cache = _cache(cache_dir)
    chosen = _select(list(cache.iter_entries()), older_than, model, max_size, all_)
    removed, skipped = [], []
    for e in chosen:
        if dry_run or cache.remove(e):
            removed.append(e)
        else:
            skipped.append(e)
    leftovers = [] if dry_run else cache.clean_orphans(force=True)
    freed = sum(e.size_bytes for e in removed)
    if as_json:
        _emit_json({"dry_run": dry_run, "removed": [e.as_dict() for e in removed],
                    "skipped_in_use": [e.as_dict() for e in skipped], "freed_bytes": freed,
                    "leftovers_removed": [str(p) for p in leftovers]})
        return
    console = Console()
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        console.print(f"{verb} {e.key[:16]} {e.kind} {e.model} {e.dataset}/{e.split} {e.view} "
                      f"({human_bytes(e.size_bytes)})", highlight=False)
    for e in skipped:
        console.print(f"skipped {e.key[:16]} (in use by another process)", highlight=False)
    console.print(f"{verb} {len(removed)} item(s), {human_bytes(freed)}"
                  + (f"; {len(leftovers)} leftover folder(s) of killed runs" if leftovers else ""), highlight=False)


def path(key: Annotated[str | None, typer.Argument(help="An entry key or its first characters.")] = None,
         cache_dir: CacheDirOption = None) -> None:
    """Print the cache root, or the folder of the entry whose key starts with KEY."""
    cache = _cache(cache_dir)
    if key is None:
        typer.echo(str(cache.root))
        return
    matches = [e for e in cache.iter_entries() if e.key.startswith(key.lower())]
    if not matches:
        raise ConfigError(f"no cache entry key starts with {key!r} under {cache.root}",
                          hint="`densebench cache ls` lists the keys")
    if len({e.key for e in matches}) > 1:
        raise ConfigError(f"{len(matches)} cache entries start with {key!r}", hint="give more characters of the key")
    for e in matches:
        typer.echo(str(Path(e.path)))


cache_app.command("ls")(ls)
cache_app.command("du")(du)
cache_app.command("verify")(verify)
cache_app.command("prune")(prune)
cache_app.command("path")(path)


def register(app: typer.Typer) -> None:
    """Add ``densebench cache ...`` to ``app``."""
    app.add_typer(cache_app, name="cache")
