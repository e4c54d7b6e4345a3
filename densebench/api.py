"""The Python API the CLI calls: ``evaluate(...)`` -> list of :class:`~densebench.results.Result`. Usable
from notebooks (``densebench.evaluate`` is this function)."""

from __future__ import annotations

import datetime as _dt
import types
import typing
from pathlib import Path
from typing import Any


from .benchmark_table import BenchmarkSpec, benchmarks, get_benchmark
from .devices import resolve_device
from .errors import ConfigError, DataError, ResultError, choices_message
from .features import FeatureCache
from .paths import cache_dir as resolve_cache_dir
from .paths import data_home, slug
from .progress import job as progress_job
from .results import Result, write_result

#: Built-in offline encoders used by the embedded default run.
DEFAULT_MODELS = ("pixels", "random:vit_small_patch16_224")


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def coerce_option(name: str, value: Any, annotation: Any) -> Any:
    """Turn a CLI string into the type a Config field declares (int | None accepts 'all'/'none')."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    optional = (origin in (typing.Union, types.UnionType)) and type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    low = value.strip().lower()
    if optional and low in ("none", "all", "null", ""):
        return None
    try:
        if base is bool:
            if low in ("1", "true", "on", "yes"):
                return True
            if low in ("0", "false", "off", "no"):
                return False
            raise ValueError(value)
        if base is int:
            return int(value.replace("_", ""))
        if base is float:
            return float(value)
        if typing.get_origin(base) is tuple or base is tuple:
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} expects {getattr(base, '__name__', base)}"
                          f"{' or all' if optional else ''}; got {value!r}") from None
    return value


def build_config(bench: BenchmarkSpec, options: dict[str, Any]):
    """The benchmark's published config with the options that belong to its protocol applied (validated
    when made: a bad value is refused here, before any data is read)."""
    hints = _field_types(bench.config_class)
    updates = {k: coerce_option(k, v, hints[k]) for k, v in options.items() if k in hints and v is not None}
    try:
        return bench.default_config(**updates)
    except TypeError as e:
        raise ConfigError(f"{bench.name}: {e}") from None


def check_options(benches: list[BenchmarkSpec], options: dict[str, Any]) -> None:
    """Every option must belong to at least one selected protocol; name the accepted ones otherwise."""
    accepted: set[str] = set()
    for b in benches:
        accepted |= set(_field_types(b.config_class))
    accepted.discard("dataset")
    unknown = [k for k, v in options.items() if v is not None and k not in accepted]
    if unknown:
        raise ConfigError(choices_message("option for " + ", ".join(b.name for b in benches),
                                          "--" + unknown[0].replace("_", "-"),
                                          ["--" + a.replace("_", "-") for a in accepted]))


def select_benchmarks(names: list[str] | str | None, data_root: Path) -> list[BenchmarkSpec]:
    from .data import available

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names:
        return [get_benchmark(n) for n in names]
    present = set(available(data_root))
    chosen = [b for b in benchmarks() if b.dataset.name in present]
    if not chosen:
        raise DataError(f"no benchmark data found under {data_root}",
                        hint="point --data-root at a dataset's official folder or a folder holding several; "
                             "see `densebench data prepare NAME`")
    return chosen


def output_paths(output: str | Path | None, benches: list[BenchmarkSpec], *,
                 overwrite: bool) -> dict[str, Path | None]:
    """Map each benchmark to its result path; refuse existing files before any work starts."""
    if output is None:
        return {b.name: None for b in benches}
    output = Path(output)
    if len(benches) == 1 and output.suffix == ".json":
        paths = {benches[0].name: output}
    else:
        if output.suffix == ".json":
            raise ConfigError(f"--output {output} is a file but {len(benches)} benchmarks run",
                              hint="pass a directory; one <benchmark>.json is written per benchmark")
        paths = {b.name: output / f"{b.name}.json" for b in benches}
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise ResultError(f"{existing[0]} already exists", hint="choose another --output or pass --overwrite")
    return paths


def evaluate(model, *, weights: str | None = None, benchmarks: list[str] | str | None = None,
             data_root: str | Path | None = None, device: str = "cpu", cache_dir: str | Path | None = None,
             use_cache: bool = True, output: str | Path | None = None, overwrite: bool = False,
             progress: bool = True, layer: int | None = None, feature_norm: bool | None = None,
             options: dict[str, Any] | None = None, on_result=None, **more_options: Any) -> list[Result]:
    """Evaluate one encoder on one or more benchmarks; features are extracted once and shared via the cache.

    ``model`` is a model string (see ``densebench list models``) or a DenseEncoder. Protocol options
    (``input_size=``, ``memory_size=``, ...) go in ``options`` or as keyword arguments; each applies to
    the selected protocols that define it. ``output`` is a .json file (one benchmark) or a directory.
    """
    from .encoders import load_encoder
    from .encoders.base import DenseEncoder

    options = {**(options or {}), **more_options}
    root = data_home(data_root)
    if root is None:
        raise DataError("no data root given", hint="pass --data-root DIR or set $DENSEBENCH_DATA; "
                        "`densebench run` with no arguments runs the built-in synthetic suite")
    if not root.exists():
        raise DataError(f"data root {root} does not exist", hint="check --data-root / $DENSEBENCH_DATA")
    device = resolve_device(device)
    benches = select_benchmarks(benchmarks, root)
    check_options(benches, options)
    configs = {}
    for b in benches:
        opts = dict(options)
        # --feature-norm sets the encoder's default and every protocol that has its own published choice.
        if feature_norm is not None and "feature_norm" in _field_types(b.config_class):
            opts["feature_norm"] = feature_norm
        configs[b.name] = build_config(b, opts)
    if isinstance(model, DenseEncoder):
        encoder = model
    else:
        kw = {} if layer is None else {"layer": layer}
        if feature_norm is not None:
            kw["norm"] = feature_norm
        encoder = load_encoder(model, weights=weights, **kw)
    paths = output_paths(output, benches, overwrite=overwrite)
    cache = FeatureCache(resolve_cache_dir(cache_dir) if use_cache else None)
    results = []
    for i, b in enumerate(benches):
        label = f"{encoder.name} · {b.name}" + (f" · job {i + 1}/{len(benches)}" if len(benches) > 1 else "")
        with progress_job(label):
            result = b.run(encoder, root, configs[b.name], device=device, cache=cache, progress=progress)
        if paths[b.name] is not None:
            write_result(result, paths[b.name], overwrite=overwrite)
        results.append(result)
        if on_result is not None:
            on_result(b, result, paths[b.name])
    return results


def embedded_default(out_dir: str | Path = "densebench-results", *, cache_dir: str | Path | None = None,
                     device: str = "cpu", progress: bool = True, models=DEFAULT_MODELS,
                     on_result=None) -> tuple[Path, list[Result]]:
    """`densebench run` with no arguments: every benchmark on the synthetic suite with the offline encoders.

    Results go to a fresh timestamped folder under ``out_dir`` so repeated runs never overwrite anything.
    """
    from .data.synth import ensure_synthetic_suite

    cache_root = resolve_cache_dir(cache_dir)
    suite = ensure_synthetic_suite(cache_root)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_dir) / stamp
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = Path(out_dir) / f"{stamp}-{n}"
    results = []
    jobs = [(model, b) for model in models for b in benchmarks()]
    for i, (model, b) in enumerate(jobs):
        with progress_job(f"job {i + 1}/{len(jobs)}"):
            results += evaluate(model, benchmarks=[b.name], data_root=suite, device=device, cache_dir=cache_root,
                                output=run_dir / slug(model) / f"{b.name}.json", progress=progress,
                                options=dict(b.synthetic), on_result=on_result)
    return run_dir, results
