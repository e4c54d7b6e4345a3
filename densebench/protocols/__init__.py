"""The benchmark registry: a benchmark = a protocol module + a dataset + published defaults.

Each protocol module defines a frozen ``Config`` dataclass whose defaults are the published protocol
and ``run(encoder, data_root, config, *, device, cache, progress=True) -> dict`` returning a result
record (see densebench.results.make_result).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from ..errors import ConfigError, choices_message


@dataclass(frozen=True)
class Benchmark:
    name: str
    protocol: str               # module name under densebench.protocols
    dataset: str                # dataset family understood by densebench.data.open_dataset
    description: str
    overrides: dict = field(default_factory=dict)   # Config fields that differ from the protocol defaults
    #: Options the embedded default (`densebench run` with no arguments) uses on the synthetic suite so that
    #: every benchmark finishes in seconds on a CPU (smaller inputs, fewer epochs); never used otherwise.
    synthetic: dict = field(default_factory=dict)
    #: The headline metric shown in tables and leaderboards (a key of the result's metrics).
    main_metric: str = "miou"

    def module(self) -> ModuleType:
        return importlib.import_module(f"densebench.protocols.{self.protocol}")

    def default_config(self):
        mod = self.module()
        return mod.Config(dataset=self.dataset, **self.overrides)


BENCHMARKS: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    BENCHMARKS[b.name] = b
    return b


register(Benchmark("voc-incontext", "incontext", "voc",
                   "Hummingbird in-context retrieval segmentation, Pascal VOC 2012 (trainaug memory, val queries)",
                   synthetic={"input_size": 224}))
register(Benchmark("ade20k-incontext", "incontext", "ade20k",
                   "Hummingbird in-context retrieval segmentation, ADE20K (151-class mean as published)",
                   synthetic={"input_size": 224}))


def get_benchmark(name: str) -> Benchmark:
    _load_optional_protocols()
    if name not in BENCHMARKS:
        raise ConfigError(choices_message("benchmark", name, BENCHMARKS))
    return BENCHMARKS[name]


def all_benchmarks() -> dict[str, Benchmark]:
    _load_optional_protocols()
    return dict(BENCHMARKS)


def _load_optional_protocols() -> None:
    """Protocol modules register their benchmarks on import (linear, overcluster, correspondence)."""
    for mod in ("linear", "overcluster", "correspondence"):
        try:
            importlib.import_module(f"densebench.protocols.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"densebench.protocols.{mod}":
                raise
