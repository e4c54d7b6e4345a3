"""densebench: how good are this encoder's patch features?

Four published dense-feature protocols (in-context retrieval segmentation, linear probes,
overclustering, SPair-71k correspondence) on any encoder, with results users can trust.

From a notebook::

    import densebench
    results = densebench.evaluate("dinov2_vits14", benchmarks="voc-incontext", data_root="~/data")
    results[0].main_score, results[0]["metrics"]["miou"]
    densebench.to_pandas(results)          # one row per result
    [b.name for b in densebench.benchmarks()]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Result", "__version__", "benchmarks", "evaluate", "get_benchmark", "to_pandas"]

if TYPE_CHECKING:
    from .benchmark_table import BenchmarkSpec
    from .results import Result


def benchmarks() -> list[BenchmarkSpec]:
    """Every benchmark specification, in table order."""
    from .benchmark_table import benchmarks as _benchmarks

    return _benchmarks()


def get_benchmark(name: str) -> BenchmarkSpec:
    """One benchmark specification by name (ConfigError names the accepted ones)."""
    from .benchmark_table import get_benchmark as _get

    return _get(name)


def evaluate(model: Any, **kwargs: Any) -> list[Result]:
    """Evaluate an encoder on benchmarks; see :func:`densebench.api.evaluate` for the arguments."""
    from .api import evaluate as _evaluate

    return _evaluate(model, **kwargs)


def to_pandas(results) -> Any:
    """One row per result (model, benchmark, main score, every scalar metric): a pandas DataFrame."""
    from .results import to_pandas as _to_pandas

    return _to_pandas(results)


def __getattr__(name: str) -> Any:
    # Result is imported lazily so that `import densebench` stays cheap (no torch import).
    if name == "Result":
        from .results import Result

        return Result
    raise AttributeError(f"module 'densebench' has no attribute {name!r}")
