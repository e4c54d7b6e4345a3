"""The result record: one JSON per (model, benchmark, config), schema-validated and tamper-evident.

A result says exactly how it was made (lm-evaluation-harness style): the full protocol config,
encoder fingerprint, dataset manifest hash, versions, device, seeds and wall time per stage.
``integrity`` is a sha256 over the canonical JSON of model, config, provenance and metrics, so an
accidentally edited number is detected by ``densebench submit``; it is no signature (whoever edits a value
can recompute it), and ``densebench reproduce`` is the check that re-measures. Files are written atomically
with the umask's permissions (or an existing file's), and created exclusively unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import platform
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from . import __version__
from .errors import ResultError

SCHEMA_VERSION = 2
#: The parts of a record its integrity hash covers (everything but the hash and the schema version).
HASHED_PARTS = ("benchmark", "model", "config", "derived", "provenance", "metrics")


def load_schema(name: str = "result.schema.json") -> dict:
    return json.loads(resources.files("densebench").joinpath("schemas", name).read_text())


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def integrity_hash(result: dict) -> str:
    body = {k: result[k] for k in HASHED_PARTS}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


#: the file ``densebench run`` writes beside a run's results (every headline metric, the command, the environment)
RUN_SUMMARY = "summary.json"


def jsonable(obj: Any, *, nonfinite_as_text: bool = False) -> Any:
    """Dataclasses, paths, tuples, numpy scalars -> plain JSON. NaN/inf are refused (in a result they mean a
    bug), or with ``nonfinite_as_text`` written as their string (a report of a diverged loss)."""
    def again(v):
        return jsonable(v, nonfinite_as_text=nonfinite_as_text)

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return again(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): again(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [again(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite_as_text:
            return str(obj)
        raise ResultError(f"non-finite value {obj} in a result")
    return obj


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> bool | None:
    """Whether the densebench checkout has uncommitted changes (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware recorded in provenance."""
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("timm", "faiss", "scipy", "sklearn"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    hardware = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(torch.device(device))
        hardware["cuda"] = torch.version.cuda
    return {"versions": versions, "hardware": hardware}


@dataclass(frozen=True)
class Result(Mapping):
    """One evaluation of one encoder on one benchmark: what ``run`` and ``densebench.evaluate`` return.

    ``config`` is the resolved protocol Config (automatic fields filled, e.g. ``input_size`` by patch
    size); ``derived`` holds what the run computed on the way (memory-bank rows, k-means objectives,
    metric notes); ``metrics`` are in percent. The record reads like its JSON file too
    (``result["metrics"]["miou"]``), so code written against the files works on the object and back.
    The JSON Schema is checked whenever a Result is made or read.
    """

    benchmark: str
    model: dict
    config: dict
    derived: dict
    provenance: dict
    metrics: dict
    integrity: str
    schema_version: int = SCHEMA_VERSION

    # -- the JSON view -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "benchmark": self.benchmark, "model": self.model,
                "config": self.config, "derived": self.derived, "provenance": self.provenance,
                "metrics": self.metrics, "integrity": self.integrity}

    def __getitem__(self, key: str) -> Any:
        if key not in _RESULT_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_RESULT_KEYS)

    def __len__(self) -> int:
        return len(_RESULT_KEYS)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, check_integrity: bool = True, source: str = "result") -> Result:
        """Validate a JSON record (schema, then integrity) and wrap it."""
        validate_result(data, check_integrity=check_integrity, source=source)
        return cls(**{k: data[k] for k in _RESULT_KEYS})

    # -- conveniences --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def main_score(self) -> float | None:
        """The benchmark's main metric (None when the benchmark is unknown to this densebench)."""
        from .benchmark_table import find_benchmark

        spec = find_benchmark(self.benchmark)
        value = self.metrics.get(spec.main_metric) if spec else None
        return float(value) if isinstance(value, (int, float)) else None

    def scalar_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_row(self) -> dict[str, Any]:
        """One flat row: model, benchmark, main metric and score, every scalar metric, data, time, date."""
        from .benchmark_table import find_benchmark

        spec = find_benchmark(self.benchmark)
        prov = self.provenance
        return {"model": self.model_name, "fingerprint": self.model["fingerprint"], "benchmark": self.benchmark,
                "main_metric": spec.main_metric if spec else None, "score": self.main_score,
                **self.scalar_metrics(), "synthetic": bool(prov["dataset"].get("synthetic")),
                "device": prov["device"], "total_s": prov["timings"]["total_s"], "date": prov["date"]}


def to_pandas(results: Iterable[Result | Mapping]):
    """A pandas DataFrame with one row per result (see :meth:`Result.to_row`), e.g. to pivot models x
    benchmarks: ``to_pandas(rs).pivot_table(index="model", columns="benchmark", values="score")``."""
    import pandas as pd

    rows = [(r if isinstance(r, Result) else Result.from_dict(r)).to_row() for r in results]
    return pd.DataFrame(rows)


_RESULT_KEYS = ("schema_version", "benchmark", "model", "config", "derived", "provenance", "metrics", "integrity")


def make_result(*, benchmark: str, model: dict, config: Any, metrics: dict, device: str, seeds: dict,
                timings: dict, dataset: dict, derived: dict | None = None, cache: dict | None = None,
                artifacts: list[str] | None = None) -> Result:
    """Assemble, hash and validate a result record.

    ``artifacts``: paths of files the run wrote besides the result (pictures), kept in provenance so
    reports can show them.
    """
    env = environment(device)
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "model": jsonable(model),
        "config": jsonable(config),
        "derived": jsonable(derived or {}),
        "provenance": jsonable({
            "densebench_version": __version__,
            "git_hash": git_hash(),
            "git_dirty": git_dirty(),
            "command": list(sys.argv),
            "versions": env["versions"],
            "device": device,
            "hardware": env["hardware"],
            "seeds": seeds,
            "timings": {k: round(float(v), 4) for k, v in timings.items()},
            "dataset": dataset,
            "encoder_fingerprint": model["fingerprint"],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cache": cache or {},
            **({"artifacts": [str(a) for a in artifacts]} if artifacts else {}),
        }),
        "metrics": jsonable(metrics),
    }
    result["integrity"] = integrity_hash(result)
    return Result.from_dict(result)


def validate_result(result: Any, *, check_integrity: bool = True, source: str = "result") -> None:
    """Schema check (+ integrity check); raises ResultError naming the first problem."""
    if isinstance(result, Result):
        result = result.to_dict()
    if not isinstance(result, dict):
        raise ResultError(f"{source} is not a JSON object")
    version = result.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultError(f"{source} has schema_version {version!r}; this densebench reads version {SCHEMA_VERSION}",
                          hint="re-run the evaluation with this densebench version")
    try:
        jsonschema.validate(result, load_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ResultError(f"{source} does not match the result schema at {where}: {e.message}") from None
    if check_integrity and result["integrity"] != integrity_hash(result):
        raise ResultError(f"{source} failed its integrity check: its model, config, provenance or metrics were "
                          "edited after `densebench run` wrote it", hint="re-run the evaluation instead of editing")


def _umask() -> int:
    """The process umask, read without changing it where Linux's /proc allows (``os.umask`` must set it to read
    it, which is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode_for(path: str | os.PathLike) -> int:
    """The permission bits a (re)written ``path`` gets: the existing file's (a lab's 0664 leaderboard stays
    0664), else what ``open()`` would give a new file, 0666 minus the umask (``mkstemp`` alone gives 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return 0o666 & ~_umask()


def real_path(path: str | os.PathLike) -> Path:
    """Where a write to ``path`` must land: a symlink's target (the link stays a link and the shared file is
    updated), with every symlinked folder on the way resolved."""
    return Path(os.path.realpath(os.fspath(path)))


def _link_new(tmp: str, path: Path, mode: int) -> None:
    """Give the finished ``tmp`` the name ``path`` only if no file has it: of two concurrent writers exactly one
    wins, and the file never appears half-written. ``FileExistsError`` for the loser."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:  # no hard links on this filesystem: reserve the name exclusively, then rename over it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Binary counterpart of :func:`atomic_write_text`: ``write(tmp)`` fills a temporary file in the same folder
    (a PNG, a safetensors checkpoint), then fsync and rename. The file gets an existing file's permission bits,
    else the umask's (0644 under umask 022: a lab's web server can read it), never ``mkstemp``'s 0600; a
    symlink is written through to its target. Returns the path written."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = file_mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename: readers see old or new, never half.

    The file keeps an existing file's permission bits, else gets the umask's (:func:`file_mode_for`); a
    symlink is written through to its target (:func:`real_path`). ``exclusive``: create the file, never
    replace one: ``FileExistsError`` when it exists, also when another process created it a moment ago.
    Returns the path written (the symlink's target for a link).
    """
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = file_mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.chmod(tmp, mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_new(tmp, path, mode)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def check_writable_folder(folder: str | os.PathLike, *, what: str, hint: str) -> None:
    """Refuse, before any work starts, a folder that cannot take a new file: a path through a regular file,
    or a folder that refuses one (permissions, a read-only mount). A folder still to be made is judged by
    its nearest existing parent. Creates nothing: the probe file is removed at once.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ResultError(f"{what} {folder} cannot be created: {existing} is a file, not a folder",
                          hint=f"{hint} (a path that does not go through the file {existing})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".densebench-write-check.", dir=existing)
    except OSError as e:
        raise ResultError(f"{what} {folder} is not writable: {existing} refuses new files "
                          f"({e.strerror or e})", hint=hint) from None
    os.close(fd)
    os.unlink(probe)


def write_result(result: Result | dict, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a validated result. Without ``overwrite`` the file is created exclusively: an existing file,
    even one another run wrote while this one computed, is a ResultError and stays untouched."""
    path = Path(path)
    record = result if isinstance(result, Result) else Result.from_dict(result)
    try:
        atomic_write_text(path, record.to_json(), exclusive=not overwrite)
    except FileExistsError as e:
        if e.filename is None or Path(e.filename) != real_path(path):
            raise  # a folder on the way is a file: not this result's name
        raise ResultError(f"{path} already exists", hint="choose another --output or pass --overwrite") from None
    return path


def write_result_elsewhere(result: Result, path: str | os.PathLike) -> Path | None:
    """Keep a result that could not be written to ``path``: a new file beside it, else in the current folder,
    else in the temporary folder. Returns where it went, None when nowhere would take it."""
    path = Path(path)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{path.stem}.unsaved-{stamp}-{os.getpid()}.json"
    for folder in (path.parent, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            return atomic_write_text(folder / name, result.to_json(), exclusive=True)
        except OSError:
            continue
    return None


def read_result(path: str | os.PathLike, *, check_integrity: bool = True) -> Result:
    path = Path(path)
    fix = "pass a result .json file written by `densebench run`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"result file {path} does not exist", hint=fix) from None
    except IsADirectoryError:
        raise ResultError(f"result file {path} is a folder, not a file",
                          hint=f"pass the result files inside it, e.g. {path / '*.json'}") from None
    except UnicodeDecodeError:
        raise ResultError(f"result file {path} is not a text file (not UTF-8 JSON)", hint=fix) from None
    except OSError as e:
        raise ResultError(f"result file {path} cannot be read ({e.strerror or e})",
                          hint="check the file's permissions") from None
    except json.JSONDecodeError as e:
        raise ResultError(f"result file {path} is not valid JSON ({e})", hint=fix) from None
    return Result.from_dict(data, check_integrity=check_integrity, source=str(path))
