"""The result record: one JSON per (model, benchmark, config), schema-validated and tamper-evident.

A result says exactly how it was made (lm-evaluation-harness style): the full protocol config,
encoder fingerprint, dataset manifest hash, versions, device, seeds and wall time per stage.
``integrity`` is a sha256 over the canonical JSON of model, config, provenance and metrics, so a
hand-edited number is detected by ``densebench submit``. Files are written atomically and never
silently overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from . import __version__
from .errors import ResultError

SCHEMA_VERSION = 1


def load_schema(name: str = "result.schema.json") -> dict:
    return json.loads(resources.files("densebench").joinpath("schemas", name).read_text())


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def integrity_hash(result: dict) -> str:
    body = {k: result[k] for k in ("benchmark", "model", "config", "provenance", "metrics")}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples, numpy scalars -> plain JSON; NaN/inf are refused (they mean a bug)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ResultError(f"non-finite value {obj} in a result")
    return obj


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


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
    hardware = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(torch.device(device))
        hardware["cuda"] = torch.version.cuda
    return {"versions": versions, "hardware": hardware}


def make_result(*, benchmark: str, model: dict, config: Any, metrics: dict, device: str, seeds: dict,
                timings: dict, dataset: dict, cache: dict | None = None,
                artifacts: list[str] | None = None) -> dict:
    """Assemble, hash and validate a result record.

    ``artifacts``: paths of files the run wrote besides the result (pictures), kept in provenance so
    reports can show them.
    """
    env = environment(device)
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "model": _jsonable(model),
        "config": _jsonable(config),
        "provenance": _jsonable({
            "densebench_version": __version__,
            "git_hash": git_hash(),
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
        "metrics": _jsonable(metrics),
    }
    result["integrity"] = integrity_hash(result)
    validate_result(result)
    return result


def validate_result(result: dict, *, check_integrity: bool = True, source: str = "result") -> None:
    """Schema check (+ integrity check); raises ResultError naming the first problem."""
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_result(result: dict, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise ResultError(f"{path} already exists", hint="choose another --output or pass --overwrite")
    validate_result(result)
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def read_result(path: str | os.PathLike, *, check_integrity: bool = True) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"result file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ResultError(f"result file {path} is not valid JSON ({e})") from None
    validate_result(data, check_integrity=check_integrity, source=str(path))
    return data
