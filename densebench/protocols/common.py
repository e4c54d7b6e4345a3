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

from .. import data, distributed, precision
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
    #: the ranks of a torchrun / srun launch (one process: every method a no-op); see densebench.distributed
    group: distributed.Group = field(default_factory=distributed.current)

    def extract(self, dataset, view: View, *, desc: str, reducer: Reducer | None = None,
                norm: bool | None = None) -> dict[str, np.ndarray]:
        """Features of every view of ``dataset`` (full patch grids as float16, or what ``reducer`` keeps)."""
        return extract(self.encoder, dataset, view, cache=self.cache, device=self.device,
                       batch_size=self.config.batch_size, num_workers=self.config.num_workers, reducer=reducer,
                       norm=norm, desc=desc, progress=self.progress, stats=self.stats)


    def extract_each(self, jobs: list[tuple[Any, View, dict]]) -> list[dict[str, np.ndarray]]:
        """Many small extractions (DAVIS: one entry per sequence), ``jobs`` = ``[(dataset, view, extract kwargs)]``.

        Under torchrun / srun each whole entry is computed by one rank (the longest first, each to the least
        loaded rank: a sequence shorter than a batch per rank would leave ranks idle if split), then every
        rank loads them all from the cache."""
        g = self.group
        if g.enabled:
            load = [0] * g.world
            mine = []
            for i in sorted(range(len(jobs)), key=lambda i: (-len(jobs[i][0]), i)):
                r = load.index(min(load))
                load[r] += len(jobs[i][0])
                if r == g.rank:
                    mine.append(i)
            named = len(self.stats.entries)
            with distributed.alone():
                for i in sorted(mine):
                    self.extract(jobs[i][0], jobs[i][1], **jobs[i][2])
            del self.stats.entries[named:]   # named once below, in order, as one process names them
            g.sync(f"{self.benchmark}: extraction")
        return [self.extract(ds, view, **kw) for ds, view, kw in jobs]


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
    group = ctx.group
    group.stage = f"{benchmark}: preparing"
    with data.limited(config.limit):   # --limit N: every split opened in prepare is cut to its first N items
        prepared = protocol.prepare(ctx)
    group.stage = f"{benchmark}: extracting features"
    features = protocol.extract_features(ctx, prepared)
    t_extracted = time.perf_counter()
    group.stage = f"{benchmark}: scoring"
    outcome, scoring = _score(protocol, ctx, prepared, features)
    t_done = time.perf_counter()
    timings = {"extraction_s": ctx.stats.extraction_s, "forward_s": ctx.stats.forward_s,
               "protocol_s": t_done - t_extracted, **outcome.timings,
               "total_s": time.perf_counter() - ctx.t_start}
    derived = {**outcome.derived, "precision": precision.record(torch.device(ctx.device).type)}
    cache_stats = {**ctx.stats.as_dict(), "enabled": bool(cache is not None and cache.enabled)}
    if group.enabled:   # every rank's share of the work; the record is rank 0's, with the totals
        ranks = group.gather({"images_forwarded": ctx.stats.images_forwarded, "forward_s": ctx.stats.forward_s,
                              "extraction_s": ctx.stats.extraction_s}, f"{benchmark}: collecting statistics")
        cache_stats["images_forwarded"] = sum(r["images_forwarded"] for r in ranks)
        derived["distributed"] = {**group.describe(), "scoring": scoring,
                                  "images_forwarded_per_rank": [r["images_forwarded"] for r in ranks],
                                  "extraction_s_per_rank": [round(r["extraction_s"], 3) for r in ranks]}
    return make_result(benchmark=benchmark, model=encoder.describe(), config=dataclasses.asdict(ctx.config),
                       derived=derived, metrics=outcome.metrics, device=str(device), seeds=outcome.seeds,
                       timings=timings, dataset=outcome.dataset, cache=cache_stats,
                       artifacts=outcome.artifacts or None)


def _score(protocol: ModuleType, ctx: RunContext, prepared, features) -> tuple[Outcome, str]:
    """The protocol's ``score`` and how it ran: on every rank when the module shards its own scoring
    (``SHARDED_SCORE``, reading ``ctx.group``), else on rank 0 while the others wait for its Outcome."""
    group = ctx.group
    if not group.enabled:
        return protocol.score(ctx, prepared, features), "single process"
    if getattr(protocol, "SHARDED_SCORE", False):
        outcome = protocol.score(ctx, prepared, features)
        return outcome, outcome.derived.get("sharding", "sharded")
    outcome = protocol.score(ctx, prepared, features) if group.is_main else None
    return group.share(outcome, f"{ctx.benchmark}: scoring on rank 0"), "rank 0"


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
