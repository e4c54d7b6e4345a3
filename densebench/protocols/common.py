"""Pieces every protocol shares when it turns its measurements into a result record."""

from __future__ import annotations

import time
from typing import Any

from ..errors import ConfigError
from ..features import ExtractionStats
from ..results import make_result


def check_input_size(input_size: int, encoder, extra_hint: str = "") -> None:
    """Refuse an input side that is not a whole number of patches, before any work starts."""
    p = encoder.patch_size
    if input_size % p:
        raise ConfigError(f"--input-size {input_size} is not a multiple of the patch size {p} of {encoder.name}",
                          hint=f"use e.g. --input-size {max(p, input_size // p * p)}{extra_hint}")


def train_val_result(*, benchmark: str, dataset_name: str, encoder, config: dict, metrics: dict, seed: int, device: str,
                     stats: ExtractionStats, cache, train, val, t_start: float, t_extracted: float, t_done: float,
                     dataset_extra: dict[str, Any] | None = None, artifacts: list[str] | None = None) -> dict:
    """The result of a protocol that extracts a train and a val split, then computes on the features.

    Timings: extraction (data + forwards), forward alone, protocol (everything after extraction), total.
    """
    timings = {"extraction_s": stats.extraction_s, "forward_s": stats.forward_s,
               "protocol_s": t_done - t_extracted, "total_s": time.perf_counter() - t_start}
    dataset = {"name": dataset_name, "manifest_hash": val.manifest_hash(), "train_manifest_hash": train.manifest_hash(),
               "synthetic": bool(val.synthetic), "n_train": len(train), "n_val": len(val),
               "train_split": train.split, "val_split": val.split, **(dataset_extra or {})}
    return make_result(benchmark=benchmark, model=encoder.describe(), config=config, metrics=metrics,
                       device=str(device), seeds={"protocol": seed}, timings=timings, dataset=dataset,
                       cache={**stats.as_dict(), "enabled": bool(cache is not None and cache.enabled)},
                       artifacts=artifacts)
