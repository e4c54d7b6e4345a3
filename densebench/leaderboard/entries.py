"""From a result record to a leaderboard entry: the benchmark's metadata, the protocol version, the
canonical-config check (against the canonical config of the result's own protocol version, the encoder's
position-embedding resampling and where the data came from included), labels and stable entry ids."""

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


def canonical_config(benchmark: str, model: dict | None = None,
                     version: str | None = None) -> tuple[dict, frozenset[str]]:
    """The benchmark's canonical config as JSON (the published defaults of protocol ``version``, by default the
    default version, automatic fields resolved for ``model``) and the fields that do not change the numbers."""
    spec = benchmark_table.find_benchmark(benchmark)
    if spec is None:
        raise ResultError(f"benchmark {benchmark!r} is not known to this densebench, so its canonical config "
                          "cannot be checked", hint="use the densebench version that ran it")
    return spec.canonical_config(model, version), spec.non_semantic_fields


def entry_version(entry: dict) -> str | None:
    """The protocol version of a leaderboard entry (its ``protocol`` field; an older measured entry without one
    has its benchmark's default version)."""
    if entry.get("protocol"):
        return entry["protocol"]
    spec = benchmark_table.find_benchmark(entry["benchmark"])
    return spec.version_of(entry.get("config")) if spec else None


def dataset_reasons(dataset: dict) -> list[str]:
    """Why the data a result measured is not the published data (the result's dataset provenance)."""
    reasons = []
    if dataset.get("published_ids") is False:
        parts = [f"{split}: {ids.get('missing', 0)} of {ids.get('count', '?')} published ids missing, "
                 f"{ids.get('extra', 0)} extra"
                 for split, ids in (dataset.get("ids") or {}).items() if ids.get("published") is False]
        reasons.append("the dataset's own split differs from the published ids"
                       + (f" ({'; '.join(parts)})" if parts else ""))
    classes = dataset.get("classes")
    if isinstance(classes, dict):
        reasons.append(f"the dataset's own classes ({classes.get('num_classes')}, from {classes.get('source')})")
    return reasons


def semantic_config(config: dict, canonical: dict, ignored: Iterable[str]) -> dict:
    """The part of a config that identifies the measurement: the protocol's own fields minus the
    non-semantic ones."""
    ignored = set(ignored)
    return {k: config[k] for k in sorted(canonical) if k in config and k not in ignored}


def check_config(result) -> tuple[dict, dict, list[str]]:
    """``(semantic config, canonical semantic config, reasons it is non-standard)`` of a result.

    The canonical config is that of the result's own protocol version (a ``hbird-1.1`` result is standard when
    it is the published ``hbird-1.1`` recipe), plus the encoder settings that change the numbers (a timm ViT's
    ``pos_interp``, canonically the one the code behind the published rows used). The result's config is put in
    the benchmark's canonical form first (e.g. any exact k-NN backend reads ``exact``), so like is compared with
    like. Synthetic data, a split that differs from the published ids and a dataset's own classes are always
    non-standard.
    """
    version = entry_version({"benchmark": result["benchmark"], "config": result["config"]})
    canonical, ignored = canonical_config(result["benchmark"], result["model"], version)
    spec = benchmark_table.get_benchmark(result["benchmark"])
    config = spec.resolve_canonical(dict(result["config"]), dict(result["model"]))
    recorded, expected = spec.encoder_choices(result["model"])
    config.update(recorded)
    canonical.update(expected)
    reasons = config_differences(config, canonical, ignored)
    reasons += precision_reasons(result.get("derived") or {})
    dataset = result["provenance"]["dataset"]
    reasons += dataset_reasons(dataset)
    if dataset.get("synthetic"):
        reasons.insert(0, "measured on synthetic data")
    return (semantic_config(config, canonical, ignored), semantic_config(canonical, canonical, ignored),
            reasons)


#: Precisions a standard entry may have used: the references' fp32 and densebench's default (fp16 autocast on
#: CUDA), whose effect is measured per benchmark (docs/precision.md); an explicit tf32/bf16/fp16 is marked.
STANDARD_PRECISIONS = ("auto", "fp32")


def precision_reasons(derived: dict) -> list[str]:
    requested = (derived.get("precision") or {}).get("requested")
    if requested is None or requested in STANDARD_PRECISIONS:
        return []
    return [f"precision={requested!r} (standard: {' or '.join(STANDARD_PRECISIONS)})"]


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
    version = entry_version({"benchmark": benchmark, "config": result["config"]})
    return {
        "id": _entry_id("m", model["fingerprint"], benchmark, chash),
        "source": "measured",
        "model": {"name": model["name"], "architecture": architecture_label(model),
                  "patch_size": model["patch_size"],
                  "n_parameters": n_params if isinstance(n_params, int) else None,
                  "fingerprint": model["fingerprint"], "source_url": source_url},
        "benchmark": benchmark,
        **({"protocol": version} if version else {}),
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
