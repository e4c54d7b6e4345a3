"""Shared by the leaderboard, report and browser tests: a toy protocol registered as two benchmarks,
and result records made without running a model (so these tests need no torch work and no data)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from densebench import benchmark_table
from densebench.benchmark_table import BenchmarkSpec, BenchmarkTable
from densebench.data.families import VOC
from densebench.results import SCHEMA_VERSION, integrity_hash, validate_result

TOY_MODULE = "densebench.protocols.toyproto"


@dataclass(frozen=True)
class ToyConfig:
    dataset: str = "voc"
    input_size: int | None = None          # None: by patch size, like the in-context protocol
    memory_size: int = 1000
    train_fraction: int | None = None
    fraction_seed: int = 42
    batch_size: int = 8
    num_workers: int = 0


def _resolve_canonical(config: dict, model: dict) -> dict:
    if config["input_size"] is None:
        config["input_size"] = {14: 504, 16: 512}.get(model["patch_size"], 32 * model["patch_size"])
    return config


def install_toy_benchmarks(monkeypatch) -> None:
    """Register toy-linear and toy-incontext, backed by a protocol module that exists only in memory."""
    module = types.ModuleType(TOY_MODULE)
    module.Config = ToyConfig
    module.resolve_canonical = _resolve_canonical
    monkeypatch.setitem(sys.modules, TOY_MODULE, module)
    toys = [BenchmarkSpec(name=name, protocol=module, dataset=VOC, description="toy benchmark for tests",
                          main_metric="miou", headline_metrics=("miou",), citations=(),
                          non_semantic_fields=frozenset({"batch_size", "num_workers"}),
                          resolve_canonical=_resolve_canonical)
            for name in ("toy-linear", "toy-incontext")]
    monkeypatch.setattr(benchmark_table, "BENCHMARKS", BenchmarkTable([*benchmark_table.benchmarks(), *toys]))


def canonical_toy_config(patch_size: int = 16, **changes) -> dict:
    config = dataclasses.asdict(ToyConfig())
    config = _resolve_canonical(config, {"patch_size": patch_size})
    config.update(changes)
    return config


def fingerprint(tag: str) -> str:
    return "sha256:" + (tag.encode().hex() * 64)[:64]


def make_result(*, model: str = "enc-a", fp: str | None = None, benchmark: str = "toy-linear",
                config: dict | None = None, metrics: dict | None = None, synthetic: bool = False,
                patch_size: int = 16, artifacts=None, date: str = "2026-01-02T03:04:05+00:00") -> dict:
    """A valid, integrity-hashed result record."""
    provenance = {
        "densebench_version": "0.1.0", "git_hash": None, "versions": {"python": "3.11"}, "device": "cpu",
        "hardware": {"cpu": "x86_64", "cpu_count": 2}, "seeds": {"protocol": 0},
        "timings": {"extraction_s": 1.5, "protocol_s": 0.5, "total_s": 2.25},
        "dataset": {"name": "voc", "manifest_hash": "abc123", "synthetic": synthetic},
        "encoder_fingerprint": fp or fingerprint(model), "date": date,
    }
    if artifacts is not None:
        provenance["artifacts"] = artifacts
    result = {
        "schema_version": SCHEMA_VERSION, "benchmark": benchmark,
        "model": {"name": model, "fingerprint": fp or fingerprint(model), "patch_size": patch_size,
                  "embed_dim": 384, "n_parameters": 21_665_664},
        "config": config if config is not None else canonical_toy_config(patch_size),
        "derived": {"memory_rows": 123},
        "provenance": provenance,
        "metrics": metrics if metrics is not None else {"miou": 50.0, "miou_identity": 49.0,
                                                         "per_class_iou": {"background": 80.0, "cat": 20.0}},
    }
    result["integrity"] = integrity_hash(result)
    validate_result(result)
    return result


def write(result: dict, path: Path) -> Path:
    path.write_text(json.dumps(result, indent=2))
    return path
