"""``--bench``: densebench on the base model and on the trained one, and the before/after table.

Both evaluations go through ``densebench.api.evaluate`` (the same code path as ``densebench run``):
the base model by the name and weights training started from, the trained one as ``neco:<checkpoint>``.
Each result JSON is written under ``<output>/base`` and ``<output>/trained``; ``before_after.json``
holds the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from densebench.errors import ConfigError, DataError

from .model import BaseModel


def check_bench(names: list[str], data_root: str | os.PathLike | None) -> None:
    """Fail fast (before training) on an unknown benchmark or a missing data root."""
    from densebench.paths import data_home
    from densebench.benchmark_table import get_benchmark

    for name in names:
        get_benchmark(name)
    root = data_home(data_root)
    if root is None:
        raise DataError("--bench needs the benchmark data", hint="pass --bench-data-root DIR or set $DENSEBENCH_DATA")
    if not root.exists():
        raise DataError(f"benchmark data root {root} does not exist", hint="check --bench-data-root")


def before_after(base: BaseModel, checkpoint: str | os.PathLike | None, names: list[str], *,
                 data_root: str | os.PathLike | None, device: str, output: str | os.PathLike,
                 options: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate base and trained model on ``names``; print and return one row per benchmark."""
    from densebench.api import evaluate
    from densebench.encoders import load_encoder
    from densebench.benchmark_table import get_benchmark

    if checkpoint is None:
        raise ConfigError("there is no trained checkpoint to benchmark")
    output = Path(output)
    stem = str(Path(checkpoint).with_suffix(""))
    # Encoders are built here rather than by name inside evaluate(): the base needs the model kwargs
    # training used, and both sides resample position embeddings the same way (the training one).
    base_encoder = load_encoder(base.name, weights=base.weights, model_kwargs=base.model_kwargs_given or None,
                                pos_interp=base.pos_interp)
    trained_encoder = load_encoder("neco:" + stem, pos_interp=base.pos_interp)
    common = {"benchmarks": names, "data_root": data_root, "device": device, "overwrite": True,
              "progress": progress, "options": dict(options or {})}
    before = evaluate(base_encoder, output=output / "base", **common)
    after = evaluate(trained_encoder, output=output / "trained", **common)
    rows = []
    for b, a in zip(before, after):
        metric = get_benchmark(b["benchmark"]).main_metric
        v0, v1 = b["metrics"].get(metric), a["metrics"].get(metric)
        delta = v1 - v0 if isinstance(v0, (int, float)) and isinstance(v1, (int, float)) else None
        rows.append({"benchmark": b["benchmark"], "metric": metric, "base": v0, "trained": v1, "delta": delta,
                     "base_result": str(output / "base" / f"{b['benchmark']}.json"),
                     "trained_result": str(output / "trained" / f"{a['benchmark']}.json")})
    (output / "before_after.json").write_text(json.dumps({"base_model": base.name, "checkpoint": stem,
                                                          "pos_interp": base.pos_interp, "rows": rows}, indent=2))
    print_table(rows, base.name, stem, base.pos_interp)
    return rows


def print_table(rows: list[dict[str, Any]], base_name: str, trained_name: str, pos_interp: str) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    table = Table(title=f"NeCo before/after: {base_name} -> neco:{trained_name}",
                  caption=f"both evaluated with {pos_interp} position-embedding resampling")
    for col in ("benchmark", "metric", "base", "trained", "delta"):
        table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for r in rows:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.2f}"
        table.add_row(r["benchmark"], r["metric"], fmt(r["base"]), fmt(r["trained"]), delta)
    Console().print(table)
