"""The Python API the CLI calls: ``evaluate(...)`` -> list of :class:`~densebench.results.Result`. Usable
from notebooks (``densebench.evaluate`` is this function)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any


from . import distributed
from .benchmark_table import BenchmarkSpec, benchmarks, find_benchmark, select
from .devices import resolve_device
from .errors import ConfigError, DataError, ResultError, choices_message
from .options import option_text
from .features import FeatureCache
from .paths import cache_dir as resolve_cache_dir
from .paths import data_home, slug
from .precision import check_precision
from .precision import precision as compute_precision
from .progress import job as progress_job
from .results import Result, check_writable_folder, write_result, write_result_elsewhere

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
    if optional and low in ("none", "all", "auto", "null", ""):
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


def protocol_versions(bench: BenchmarkSpec) -> tuple[str, ...]:
    """The named protocol versions ``--protocol`` accepts for ``bench`` (empty: its protocol has none)."""
    import dataclasses

    from .options import option_spec

    field = next((f for f in dataclasses.fields(bench.config_class) if f.name == "protocol"), None)
    spec = option_spec(field) if field is not None else None
    return tuple(spec.choices or ()) if spec is not None else ()


def _applies(bench: BenchmarkSpec, name: str, value: Any) -> bool:
    """Whether option ``name`` belongs to ``bench``'s protocol; ``--protocol`` names a version of one protocol
    and applies only to the benchmarks of the protocol that has it."""
    if name == "protocol":
        return value in protocol_versions(bench)
    return name in _field_types(bench.config_class)


def build_config(bench: BenchmarkSpec, options: dict[str, Any]):
    """The benchmark's published config with the options that belong to its protocol applied (validated
    when made: a bad value is refused here, before any data is read)."""
    hints = _field_types(bench.config_class)
    updates = {k: coerce_option(k, v, hints[k]) for k, v in options.items()
               if v is not None and _applies(bench, k, v)}
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
    version = options.get("protocol")
    if version is not None and not any(_applies(b, "protocol", version) for b in benches):
        versions = [v for b in benches for v in protocol_versions(b)]
        raise ConfigError(choices_message("--protocol for " + ", ".join(b.name for b in benches), version,
                                          list(dict.fromkeys(versions))),
                          hint="a version names one protocol's recipe (e.g. hbird-1.1 for the in-context benchmarks)")


def select_benchmarks(names: list[str] | str | None, data_root: Path) -> list[BenchmarkSpec]:
    from .data import available

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names:
        return select(names)
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
    folders = [p for p in paths.values() if p.is_dir()]
    if folders:
        raise ConfigError(f"--output {folders[0]} is a folder, not a result file",
                          hint="name a .json file that does not exist yet, or pass a folder for several benchmarks")
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise ResultError(f"{existing[0]} already exists", hint="choose another --output or pass --overwrite")
    for folder in dict.fromkeys(p.parent for p in paths.values()):
        check_writable_folder(folder, what="--output folder", hint="choose an --output on a writable disk")
    return paths


def save_result(result: Result, path: Path, *, overwrite: bool) -> None:
    """Write a computed result; when that fails anyway (a full disk, a concurrent run that took the name, a
    permission changed during the run) keep it in a new file elsewhere and raise one ResultError saying where."""
    try:
        write_result(result, path, overwrite=overwrite)
        return
    except ResultError as e:
        reason, fix = e.message, ("another run wrote this file while this one computed; compare the two and keep "
                                  "the one you want")
    except OSError as e:
        reason, fix = e.strerror or str(e), "free disk space or fix the folder's permissions"
    saved = write_result_elsewhere(result, path)
    if saved is None:
        scores = ", ".join(f"{k}={v:.4g}" for k, v in result.scalar_metrics().items())
        raise ResultError(f"could not write the result {path} ({reason}) nor save it anywhere else; "
                          f"its metrics: {scores}", hint=fix)
    raise ResultError(f"could not write the result {path} ({reason}); the computed result was saved as {saved}",
                      hint=f"{fix}, then move {saved} to where you want it")


@contextlib.contextmanager
def content_manifests(on: bool):
    """While active (``on``), dataset manifests hash file contents: ``$DENSEBENCH_VERIFY_DATA`` is set, the
    switch every reader's ``manifest_hash`` honours (densebench.data.base)."""
    name, old = "DENSEBENCH_VERIFY_DATA", os.environ.get("DENSEBENCH_VERIFY_DATA")
    if on:
        os.environ[name] = "1"
    try:
        yield
    finally:
        if on and old is None:
            os.environ.pop(name, None)
        elif on:
            os.environ[name] = old


def evaluate(model, *, weights: str | None = None, benchmarks: list[str] | str | None = None,
             data_root: str | Path | None = None, device: str = "cpu", cache_dir: str | Path | None = None,
             use_cache: bool = True, output: str | Path | None = None, overwrite: bool = False,
             progress: bool = True, layer: int | None = None, feature_norm: bool | None = None,
             options: dict[str, Any] | None = None, on_result=None, verify_data: bool = False,
             pos_interp: str = "auto", precision: str = "auto", **more_options: Any) -> list[Result]:
    """Evaluate one encoder on one or more benchmarks; features are extracted once and shared via the cache.

    ``model`` is a model string (see ``densebench list models``), a DenseEncoder, or any ``nn.Module`` (a timm
    ViT, or a ViT-like module with ``get_intermediate_layers`` / ``forward_features``), fingerprinted from its
    weights. A DenseEncoder's own fingerprint is checked against a hash of its weights (up to 2 GB of them): when
    they differ, the hash joins the cache key, so two sets of weights never share cached features. Protocol options
    (``input_size=``, ``memory_size=``, ...) go in ``options`` or as keyword arguments; each applies to
    the selected protocols that define it. ``output`` is a .json file (one benchmark) or a directory.
    ``verify_data``: dataset manifests (cache keys, the recorded ``manifest_hash``) hash the files' contents
    instead of their size and mtime (reads all the data once; docs/cache.md). ``pos_interp``: how a timm ViT
    resamples its position embeddings, ``timm``, ``meta-offset`` or ``auto`` (per benchmark, the mode of the
    code behind its published rows); recorded in each result's model block and checked by the leaderboard.
    ``precision``: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``tf32``, ``bf16`` or ``fp16`` for the
    forward and the k-NN search (recorded in ``derived.precision``; part of the cache key).
    ``protocol=`` names a protocol version (``hbird-2.0``, ``hbird-1.1``, ``neco-leopart``); it applies to the
    selected benchmarks of the protocol that has it.
    """
    from .encoders import POS_INTERP_CHOICES

    check_precision(precision)
    if pos_interp not in POS_INTERP_CHOICES:
        raise ConfigError(choices_message("--pos-interp", pos_interp, POS_INTERP_CHOICES),
                          hint="leave it at auto for the choice of the code behind each benchmark's published rows")

    options = {**(options or {}), **more_options}
    root = data_home(data_root)
    if root is None:
        raise DataError("no data root given", hint="pass --data-root DIR or set $DENSEBENCH_DATA; "
                        "`densebench run` with no arguments runs the built-in synthetic suite")
    if not root.exists():
        raise DataError(f"data root {root} does not exist", hint="check --data-root / $DENSEBENCH_DATA")
    with distributed.joined(resolve_device(device)) as group:
        return _evaluate(model, group, weights=weights, benchmarks=benchmarks, root=root,
                         device=distributed.rank_device(resolve_device(device), group), cache_dir=cache_dir,
                         use_cache=use_cache, output=output, overwrite=overwrite, progress=progress and group.is_main,
                         layer=layer, feature_norm=feature_norm, options=options, on_result=on_result,
                         verify_data=verify_data, pos_interp=pos_interp, precision=precision)


def _evaluate(model, group, *, weights, benchmarks, root: Path, device: str, cache_dir, use_cache: bool, output,
              overwrite: bool, progress: bool, layer, feature_norm, options: dict, on_result, verify_data: bool,
              pos_interp: str, precision: str) -> list[Result]:
    """:func:`evaluate` once its arguments are checked, on this rank of ``group`` (rank 0 writes and reports)."""
    from .encoders import load_encoder
    from .encoders.plugin import adopt_encoder

    benches = select_benchmarks(benchmarks, root)
    check_options(benches, options)
    configs = {}
    for b in benches:
        opts = dict(options)
        # --feature-norm sets the encoder's default and every protocol that has its own published choice.
        if feature_norm is not None and "feature_norm" in _field_types(b.config_class):
            opts["feature_norm"] = feature_norm
        configs[b.name] = build_config(b, opts)
    # rank 0 writes (and so checks) the result files; the other ranks only compute
    paths = output_paths(output if group.is_main else None, benches, overwrite=overwrite)
    cache_root = resolve_cache_dir(cache_dir) if use_cache else None
    if cache_root is not None:
        check_writable_folder(cache_root, what="feature cache", hint="pass --cache-dir DIR on a writable disk "
                              "(or set $DENSEBENCH_CACHE), or run with --no-cache")
    if isinstance(model, str):
        kw = {} if layer is None else {"layer": layer}
        if feature_norm is not None:
            kw["norm"] = feature_norm
        encoder = load_encoder(model, weights=weights, **kw)
    else:
        if weights is not None:
            raise ConfigError("--weights applies to a model string; load the weights into the module yourself")
        encoder = adopt_encoder(model, layer=layer, norm=feature_norm)
    cache = FeatureCache(cache_root)
    results = []
    for i, b in enumerate(benches):
        label = f"{encoder.name} · {b.name}" + (f" · job {i + 1}/{len(benches)}" if len(benches) > 1 else "")
        with progress_job(label), content_manifests(verify_data), compute_precision(precision):
            result = b.run(encoder, root, configs[b.name], device=device, cache=cache, progress=progress,
                           pos_interp=pos_interp)
        if paths[b.name] is not None:
            save_result(result, paths[b.name], overwrite=overwrite)
        results.append(result)
        if on_result is not None and group.is_main:
            on_result(b, result, paths[b.name])
    return results


def run_folder(out_root: str | Path, model: str, stamp: str) -> Path:
    """``<out>/<model>/<timestamp>/``: the one layout of every run (a fresh folder, never an old one)."""
    base = Path(out_root) / slug(model)
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    return folder


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_run_summary(folder: str | Path, results: list[Result], *, device: str, notes: list[str] = ()) -> Path:
    """``summary.json`` beside a run's result files: every headline metric, the command line, the environment."""
    from . import __version__
    from .results import RUN_SUMMARY, atomic_write_text, environment

    rows = []
    for r in results:
        spec = find_benchmark(r.benchmark)
        rows.append({"benchmark": r.benchmark, "model": r.model_name, "main_metric": spec.main_metric if spec else None,
                     "score": r.main_score, "file": f"{r.benchmark}.json",
                     "headline": {m: r.metrics.get(m) for m in (spec.headline_metrics if spec else ())},
                     "synthetic": bool(r.provenance["dataset"].get("synthetic"))})
    summary = {"densebench_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
               "command": list(sys.argv), "device": device, "environment": environment(device),
               "notes": list(notes), "results": rows}
    return atomic_write_text(Path(folder) / RUN_SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")


def embedded_default(out_dir: str | Path = "densebench-results", *, cache_dir: str | Path | None = None,
                     device: str = "cpu", progress: bool = True, models=DEFAULT_MODELS,
                     benchmark_names: list[str] | str | None = None, on_result=None) -> tuple[list[Path], list[Result]]:
    """`densebench run` with no ``--model``: the built-in offline encoders on the synthetic suite, every benchmark
    (or ``benchmark_names``), each with its reduced embedded-default settings (``BenchmarkSpec.synthetic``).

    Results go to ``<out_dir>/<model>/<timestamp>/`` (fresh folders) with a ``summary.json`` each.
    """
    from .data.synth import ensure_synthetic_suite

    cache_root = resolve_cache_dir(cache_dir)
    suite = ensure_synthetic_suite(cache_root)
    specs = select_benchmarks(benchmark_names, suite) if benchmark_names else benchmarks()
    stamp = timestamp()
    folders = {model: run_folder(out_dir, model, stamp) for model in models}
    results: list[Result] = []
    jobs = [(model, b) for model in models for b in specs]
    for i, (model, b) in enumerate(jobs):
        with progress_job(f"job {i + 1}/{len(jobs)}"):
            results += evaluate(model, benchmarks=[b.name], data_root=suite, device=device, cache_dir=cache_root,
                                output=folders[model] / f"{b.name}.json", progress=progress,
                                options=dict(b.synthetic), on_result=on_result)
    for model, folder in folders.items() if distributed.current().is_main else ():
        write_run_summary(folder, [r for r in results if r.model_name == model], device=device,
                          notes=reduced_settings_notes(specs))
    return list(folders.values()), results


def reduced_settings_notes(specs: list[BenchmarkSpec]) -> list[str]:
    """What the embedded default changes from the published protocols, one line per benchmark."""
    return [f"{s.name}: " + ", ".join(f"{k}={option_text(v)}" for k, v in s.synthetic.items())
            for s in specs if s.synthetic]
