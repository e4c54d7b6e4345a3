"""The protocol skeleton: prepare -> extract -> score -> Outcome -> Result, shared by every protocol.

A protocol module supplies the three steps; :func:`run_protocol` times them, feeds the encoder through
the feature cache with the config's batch size and workers, and turns the :class:`Outcome` into the
result record (timings, provenance, cache statistics) in this one place.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .. import precision
from ..errors import ConfigError
from ..features import ExtractionStats, FeatureCache, Reducer, View, default_workers, extract
from ..results import Result, make_result


@dataclass
class RunContext:
    """One protocol run: what it evaluates, where, and what it has measured so far.

    ``config`` starts as the user's Config; ``prepare`` replaces it with the resolved one (automatic
    fields filled), which is what the result records.
    """

    encoder: Any
    data_root: Path
    config: Any
    device: str
    cache: FeatureCache | None
    progress: bool
    benchmark: str
    stats: ExtractionStats = field(default_factory=ExtractionStats)
    t_start: float = field(default_factory=time.perf_counter)

    def extract(self, dataset, view: View, *, desc: str, reducer: Reducer | None = None,
                norm: bool | None = None) -> dict[str, np.ndarray]:
        """Features of every view of ``dataset`` (full patch grids as float16, or what ``reducer`` keeps)."""
        return extract(self.encoder, dataset, view, cache=self.cache, device=self.device,
                       batch_size=self.config.batch_size, num_workers=self.config.num_workers, reducer=reducer,
                       norm=norm, desc=desc, progress=self.progress, stats=self.stats)


@dataclass
class Outcome:
    """What ``score`` measured: metrics (percent), derived facts, and where the numbers came from."""

    metrics: dict
    derived: dict = field(default_factory=dict)   # facts computed on the way (rows, k-means runs, notes)
    dataset: dict = field(default_factory=dict)   # provenance of the data measured
    seeds: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)   # protocol-specific stages, seconds
    artifacts: list[str] = field(default_factory=list)


def run_protocol(protocol: ModuleType, encoder, data_root, config, *, device: str = "cpu",
                 cache: FeatureCache | None = None, progress: bool = True, benchmark: str) -> Result:
    """Run ``protocol``'s steps on ``encoder`` and return the validated result record."""
    config.validate()
    config = resolve_workers(config)
    ctx = RunContext(encoder=encoder, data_root=Path(data_root), config=config, device=str(device), cache=cache,
                     progress=progress, benchmark=benchmark)
    prepared = protocol.prepare(ctx)
    features = protocol.extract_features(ctx, prepared)
    t_extracted = time.perf_counter()
    outcome = protocol.score(ctx, prepared, features)
    t_done = time.perf_counter()
    timings = {"extraction_s": ctx.stats.extraction_s, "forward_s": ctx.stats.forward_s,
               "protocol_s": t_done - t_extracted, **outcome.timings,
               "total_s": time.perf_counter() - ctx.t_start}
    derived = {**outcome.derived, "precision": precision.record(torch.device(ctx.device).type)}
    return make_result(benchmark=benchmark, model=encoder.describe(), config=dataclasses.asdict(ctx.config),
                       derived=derived, metrics=outcome.metrics, device=str(device), seeds=outcome.seeds,
                       timings=timings, dataset=outcome.dataset,
                       cache={**ctx.stats.as_dict(), "enabled": bool(cache is not None and cache.enabled)},
                       artifacts=outcome.artifacts or None)


def resolve_workers(config):
    """``num_workers`` None ("auto") -> the usable cores, at most 8 (:func:`densebench.features.default_workers`),
    so that the result records the number used. Workers never change the features (views are deterministic)."""
    if getattr(config, "num_workers", 0) is None:
        return dataclasses.replace(config, num_workers=default_workers())
    return config


def protocol_runner(module_name: str, suffix: str, summary: str):
    """The ``run`` function of a protocol module: :func:`run_protocol` over the module's three steps.

    ``suffix`` names the default benchmark (``<dataset><suffix>``) when none is given.
    """
    def run(encoder, data_root, config, *, device: str = "cpu", cache: FeatureCache | None = None,
            progress: bool = True, benchmark: str | None = None) -> Result:
        return run_protocol(sys.modules[module_name], encoder, data_root, config, device=device, cache=cache,
                            progress=progress, benchmark=benchmark or f"{config.dataset}{suffix}")

    run.__module__ = module_name
    run.__doc__ = f"{summary}; returns the validated Result."
    return run


def check_input_size(input_size: int, encoder, extra_hint: str = "") -> None:
    """Refuse an input side that is not a whole number of patches, before any work starts."""
    p = encoder.patch_size
    if input_size % p:
        raise ConfigError(f"--input-size {input_size} is not a multiple of the patch size {p} of {encoder.name}",
                          hint=f"use e.g. --input-size {max(p, input_size // p * p)}{extra_hint}")


def check_splits(family: str, **splits) -> None:
    """Refuse empty splits before any forward: ``check_splits("voc", train=train, val=val)``."""
    if any(len(ds) == 0 for ds in splits.values()):
        sizes = ", ".join(f"{name} {len(ds)}" for name, ds in splits.items())
        raise ConfigError(f"{family}: empty split ({sizes} images)")


def split_record(family: str, val, train=None, **extra) -> dict:
    """Provenance of the data a train/val protocol measured (manifest hashes, sizes, split names)."""
    record = {"name": family, "manifest_hash": val.manifest_hash(), "synthetic": bool(val.synthetic),
              "n_val": len(val), "val_split": val.split}
    if train is not None:
        record.update(train_manifest_hash=train.manifest_hash(), n_train=len(train), train_split=train.split)
    return {**record, **extra}
