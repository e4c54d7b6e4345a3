"""``densebench reproduce RESULT.json``: measure a recorded result again here and compare every metric.

A result's ``integrity`` hash only shows that the record was not changed by accident: whoever edits a
number can recompute the hash. This is the check that trusts nothing in the record but its recipe: it
loads the recorded model by name (the re-loaded encoder's fingerprint must equal the recorded one), rebuilds
the recorded, resolved protocol config, runs the benchmark on the data found here, and compares every
numeric metric, nested per-class / per-category values included, within a stated tolerance in metric
points (metrics are percent). A leaderboard maintainer can so verify a submitted row on their own hardware.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .benchmark_table import get_benchmark
from .errors import ConfigError, DataError, ModelError
from .results import Result, read_result

#: Largest difference, in metric points, that still counts as the same number. Re-runs on one machine agree
#: exactly (tests/test_reproduce.py); another device, BLAS or faiss build, or AMP on a GPU can move k-NN ties,
#: k-means and the linear probe's SGD, so the default leaves half a point (not measured across devices here:
#: state the tolerance you verify with).
DEFAULT_TOLERANCE = 0.5


@dataclass(frozen=True)
class MetricCheck:
    """One metric: the recorded and the re-measured value (None where a side has none)."""

    name: str
    recorded: float | None
    measured: float | None

    @property
    def delta(self) -> float | None:
        if self.recorded is None or self.measured is None:
            return None
        return self.measured - self.recorded

    def within(self, tolerance: float) -> bool:
        if self.recorded is None or self.measured is None:
            return self.recorded is None and self.measured is None
        return abs(self.measured - self.recorded) <= tolerance

    @property
    def nested(self) -> bool:
        """A per-class / per-category value rather than a headline number."""
        return "/" in self.name


@dataclass(frozen=True)
class Reproduction:
    """What ``reproduce`` found: the metric checks, config differences and notes on the data."""

    path: Path
    recorded: Result
    measured: Result
    tolerance: float
    checks: list[MetricCheck]
    config_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[MetricCheck]:
        return [c for c in self.checks if not c.within(self.tolerance)]

    @property
    def reproduced(self) -> bool:
        return not self.failed and not self.config_differences


def flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float | None]:
    """Every number of a metrics block, nested dicts and lists flattened to ``a/b/0`` names. A null stays None
    (a class the split never shows); text and booleans are not measurements and are left out."""
    out: dict[str, float | None] = {}
    items = (metrics.items() if isinstance(metrics, dict)
             else enumerate(metrics) if isinstance(metrics, list) else ())
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            out.update(flat_metrics(value, f"{name}/"))
        elif value is None:
            out[name] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def compare_metrics(recorded: dict, measured: dict) -> list[MetricCheck]:
    """A check per metric present on either side, in the recorded order, then the new ones."""
    a, b = flat_metrics(recorded), flat_metrics(measured)
    return [MetricCheck(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b])]


def _picture_fields(config_cls: type) -> dict[str, Any]:
    """Fields that only ask for pictures to be saved (``save_*``): reset, so a reproduction never writes over
    the submitter's pictures; they do not change the numbers."""
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.name.startswith("save_")}


def config_from_record(benchmark: str, config: dict):
    """The protocol Config a result recorded, validated as any config is (unknown fields refused)."""
    bench = get_benchmark(benchmark)
    cls = bench.config_class
    hints = typing.get_type_hints(cls)
    if config.get("dataset", bench.dataset.name) != bench.dataset.name:
        raise ConfigError(f"the result's config names dataset {config['dataset']!r}, but {benchmark} runs on "
                          f"{bench.dataset.name}", hint="the result file was edited or is damaged; ask for a new one")
    unknown = sorted(set(config) - set(hints))
    if unknown:
        raise ConfigError(f"the result's config has option(s) this densebench's {bench.protocol_name} protocol does "
                          f"not know: {', '.join(unknown)}",
                          hint="reproduce it with the densebench version that wrote it (its "
                               "provenance.densebench_version)")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    values.update(_picture_fields(cls))
    return cls(**values)


def _weights_for(model: dict, weights: str | os.PathLike | None) -> str | None:
    """``--weights`` if given, else the recorded weights file when it is on this machine (``neco:`` names carry
    their checkpoint themselves)."""
    if weights is not None:
        return str(weights)
    recorded = model.get("weights_path")
    if recorded and not str(model["name"]).startswith("neco:") and Path(recorded).is_file():
        return recorded
    return None


def load_recorded_encoder(model: dict, *, weights: str | os.PathLike | None = None):
    """Load the encoder a result names, with its recorded layer, norm, seed and settings; a different
    fingerprint (other weights, another timm version's init) is a ModelError."""
    from .encoders import load_encoder

    kwargs: dict[str, Any] = {"layer": model.get("layer", -1), "norm": model.get("norm", True)}
    for key in ("seed", "model_kwargs", "pos_interp"):
        if model.get(key) is not None:
            kwargs[key] = model[key]
    encoder = load_encoder(model["name"], weights=_weights_for(model, weights), **kwargs)
    if encoder.fingerprint != model["fingerprint"]:
        raise ModelError(f"{model['name']} loads here with fingerprint {encoder.fingerprint}, but the result was "
                         f"measured with {model['fingerprint']}: these are not the same weights",
                         hint="pass the weights file the result was made with: --weights PATH")
    return encoder


def _data_notes(recorded: dict, measured: dict) -> list[str]:
    """Where the data measured here differs from the recorded run's (counts, synthetic flag, file manifest)."""
    notes = []
    for key in ("n_val", "n_train", "n_pairs", "synthetic"):
        if key in recorded and recorded.get(key) != measured.get(key):
            notes.append(f"dataset {key}: recorded {recorded[key]!r}, here {measured.get(key)!r}")
    if recorded.get("manifest_hash") != measured.get("manifest_hash"):
        notes.append("the dataset's file manifest differs from the recorded run's (file sizes or modification "
                     "times; a copy of the same files differs too): compare the numbers, not the hash")
    return notes


def reproduce(path: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
              tolerance: float = DEFAULT_TOLERANCE, weights: str | os.PathLike | None = None, device: str = "cpu",
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
              progress: bool = True) -> Reproduction:
    """Re-run the model, benchmark and config recorded in ``path`` and compare every metric within
    ``tolerance`` points. Errors (unreadable result, unknown model, other weights, missing data) raise."""
    from .devices import resolve_device
    from .features import FeatureCache
    from .paths import cache_dir as resolve_cache_dir
    from .paths import data_home
    from .results import check_writable_folder

    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a number >= 0 (metric points), got {tolerance!r}",
                          hint=f"e.g. --tolerance {DEFAULT_TOLERANCE}")
    recorded = read_result(path)
    bench = get_benchmark(recorded.benchmark)
    config = config_from_record(recorded.benchmark, recorded.config)
    root = data_home(data_root)
    if root is None or not root.exists():
        raise DataError(f"data root {root} does not exist" if root else "no data root given",
                        hint=f"pass --data-root DIR holding the {bench.dataset.name} data (or set $DENSEBENCH_DATA)")
    cache_root = resolve_cache_dir(cache_dir) if use_cache else None
    if cache_root is not None:
        check_writable_folder(cache_root, what="feature cache", hint="pass --cache-dir DIR on a writable disk, "
                              "or --no-cache")
    encoder = load_recorded_encoder(recorded.model, weights=weights)
    measured = bench.run(encoder, root, config, device=resolve_device(device), cache=FeatureCache(cache_root),
                         progress=progress)
    ignored = set(_picture_fields(bench.config_class))
    differences = [f"{k}: recorded {recorded.config.get(k)!r}, run {measured.config.get(k)!r}"
                   for k in dict.fromkeys([*recorded.config, *measured.config])
                   if k not in ignored and recorded.config.get(k) != measured.config.get(k)]
    return Reproduction(path=Path(path), recorded=recorded, measured=measured, tolerance=float(tolerance),
                        checks=compare_metrics(recorded.metrics, measured.metrics), config_differences=differences,
                        notes=_data_notes(recorded.provenance.get("dataset", {}),
                                          measured.provenance.get("dataset", {})))
