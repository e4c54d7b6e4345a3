"""From a result record to a leaderboard entry: the benchmark's metadata, the canonical-config check,
labels and stable entry ids."""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Iterable
from typing import Any

from .. import benchmark_table
from ..errors import ResultError
from ..results import canonical_json, config_hash

_VIT_SIZES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}


def benchmark_protocol(benchmark: str) -> str | None:
    """``voc-incontext`` -> ``incontext`` (None for a benchmark this densebench does not know)."""
    spec = benchmark_table.find_benchmark(benchmark)
    return spec.protocol_name if spec else None


def headline_metrics(benchmark: str) -> tuple[str, ...] | None:
    """The metrics tables show for this benchmark (None: unknown benchmark, show every scalar metric)."""
    spec = benchmark_table.find_benchmark(benchmark)
    return spec.headline_metrics if spec else None


def canonical_config(benchmark: str, model: dict | None = None) -> tuple[dict, frozenset[str]]:
    """The benchmark's canonical config as JSON (its published defaults, automatic fields resolved for
    ``model``) and the fields that do not change the numbers."""
    spec = benchmark_table.find_benchmark(benchmark)
    if spec is None:
        raise ResultError(f"benchmark {benchmark!r} is not known to this densebench, so its canonical config "
                          "cannot be checked", hint="use the densebench version that ran it")
    return spec.canonical_config(model), spec.non_semantic_fields


def semantic_config(config: dict, canonical: dict, ignored: Iterable[str]) -> dict:
    """The part of a config that identifies the measurement: the protocol's own fields minus the
    non-semantic ones."""
    ignored = set(ignored)
    return {k: config[k] for k in sorted(canonical) if k in config and k not in ignored}


def check_config(result) -> tuple[dict, dict, list[str]]:
    """``(semantic config, canonical semantic config, reasons it is non-standard)`` of a result.

    The result's config is put in the benchmark's canonical form first (e.g. any exact k-NN backend
    reads ``exact``), so like is compared with like. Synthetic data is always non-standard.
    """
    canonical, ignored = canonical_config(result["benchmark"], result["model"])
    spec = benchmark_table.get_benchmark(result["benchmark"])
    config = spec.resolve_canonical(dict(result["config"]), dict(result["model"]))
    reasons = config_differences(config, canonical, ignored)
    if result["provenance"]["dataset"].get("synthetic"):
        reasons.insert(0, "measured on synthetic data")
    return (semantic_config(config, canonical, ignored), semantic_config(canonical, canonical, ignored),
            reasons)


def config_differences(config: dict, canonical: dict, ignored: Iterable[str]) -> list[str]:
    """Human-readable differences between a result's config and the canonical one."""
    ignored = set(ignored)
    out = []
    for key in sorted(canonical):
        if key in ignored:
            continue
        if key not in config:
            out.append(f"{key} missing (canonical {canonical[key]!r})")
        elif config[key] != canonical[key]:
            out.append(f"{key}={config[key]!r} (canonical {canonical[key]!r})")
    return out


def architecture_label(model: dict) -> str:
    """``ViT-S/14`` style label: the model's own ``architecture``/``arch`` field, else from width and
    patch."""
    for key in ("architecture", "arch"):
        if isinstance(model.get(key), str) and model[key]:
            return model[key]
    dim, patch = model.get("embed_dim"), model["patch_size"]
    size = _VIT_SIZES.get(dim)
    return f"ViT-{size}/{patch}" if size else f"{dim}-d/{patch}"


def _entry_id(kind: str, *parts: Any) -> str:
    return f"{kind}-" + hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:16]


def published_entry_id(citation_short: str, model_name: str, benchmark: str, variant: str) -> str:
    """Stable id of a published entry: one source's number for one model, benchmark and variant."""
    return _entry_id("p", citation_short, model_name, benchmark, variant)


def entry_from_result(result: dict) -> dict:
    """A measured leaderboard entry from a validated result record (scalar metrics only; the per-class
    values stay in the result file, which the entry names by its integrity hash)."""
    benchmark = result["benchmark"]
    model = result["model"]
    prov = result["provenance"]
    semantic, canonical_semantic, reasons = check_config(result)
    chash = config_hash(semantic)
    metrics = {k: v for k, v in result["metrics"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        raise ResultError(f"result for {model['name']} on {benchmark} has no scalar metric to rank")
    source_url = next((model[k] for k in ("source_url", "url", "weights_url")
                       if isinstance(model.get(k), str)), None)
    n_params = model.get("n_parameters")
    return {
        "id": _entry_id("m", model["fingerprint"], benchmark, chash),
        "source": "measured",
        "model": {"name": model["name"], "architecture": architecture_label(model),
                  "patch_size": model["patch_size"],
                  "n_parameters": n_params if isinstance(n_params, int) else None,
                  "fingerprint": model["fingerprint"], "source_url": source_url},
        "benchmark": benchmark,
        "config_hash": chash,
        "canonical_config_hash": config_hash(canonical_semantic),
        "standard": not reasons,
        "nonstandard_reasons": reasons,
        "metrics": metrics,
        "densebench_version": prov["densebench_version"],
        "date": prov["date"],
        "hardware": {"device": prov["device"], **(prov.get("hardware") or {})},
        "wall_time_s": float(prov["timings"]["total_s"]),
        "config": semantic,
        "dataset": prov["dataset"],
        "result_integrity": result["integrity"],
        "submitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
