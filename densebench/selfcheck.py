"""``densebench selfcheck``: one command that exercises every CUDA path and writes one JSON report.

Run it whenever a GPU is at hand (``densebench selfcheck``, or ``python bench/gpu_check.py``); on a CPU-only
machine (``--device cpu``) it is the smoke test the test suite runs with ``--quick``. Every check compares
against an independent computation and says PASS, FAIL (with the reason) or SKIP (with the reason):

- ``environment``: versions of torch / CUDA / cuDNN / faiss (and whether it has GPU support) / timm, the GPU;
- ``benchmark <name>``: every benchmark end to end on the synthetic suite with a seeded random ViT, on the
  device and on the CPU, each pass with its own fresh feature cache; the main metrics must agree within
  :data:`TOLERANCE_POINTS` (CUDA extraction runs under fp16 autocast, the CPU in fp32);
- ``retrieval <backend>``: every retrieval backend on the device against a float64 brute-force top-k;
- ``kmeans cpu`` / ``kmeans gpu vs cpu``: faiss k-means, its objective against a float64 recomputation, and
  the GPU objective against the CPU one;
- ``neco_train train`` / ``resume`` / ``compile``: a few steps of a tiny model, a checkpoint, an exact resume
  and a ``--compile`` run (CUDA only), with the images/s the training log recorded;
- ``distributed``: a 2-process ``torchrun`` of ``densebench run`` against a 1-process run (SKIP while
  densebench has no distributed support).

Tolerances and why: docs/selfcheck.md. Nothing here changes what densebench computes; a crash inside a
check is that check's FAIL (with its traceback in the report), never the end of the run.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import retrieval
from .errors import ConfigError, ResultError, choices_message

SCHEMA = "densebench-selfcheck/1"
#: The encoder of the benchmark checks: seeded, so the device and the CPU pass load the same weights.
MODEL = "random:vit_small_patch16_224"
#: What a full run on one GPU should stay under (the report records whether it did).
BUDGET_S = 480.0
GROUPS = ("environment", "benchmarks", "retrieval", "kmeans", "neco_train", "distributed")
STATUSES = ("PASS", "FAIL", "SKIP")

#: Largest accepted |device - CPU| of a benchmark's main metric, in metric points, per protocol, and per
#: benchmark where measured noise asks for more. Features rolled by one image per batch (a broken device path)
#: move the metrics by 4 to 49 points; bf16 autocast on the CPU (coarser than CUDA's fp16) by at most 0.43,
#: except the COCO linear probes (1.3 and 5.7: their synthetic-suite head training amplifies 1e-3 feature
#: noise into +-2 points). Measurements and reasons: docs/selfcheck.md.
TOLERANCE_POINTS = {"incontext": 2.0, "linear": 2.0, "overcluster": 3.0, "correspondence": 2.0, "davis": 2.0}
BENCHMARK_TOLERANCE_POINTS = {"coco-things-linear": 6.0, "coco-stuff-linear": 6.0}
DEFAULT_TOLERANCE_POINTS = 2.0
#: Retrieval against the float64 brute force: the least recall@k and the largest similarity error that still
#: admit fp16 (or TF32) rounding; emulated fp16 scores give recall 0.998 and an error of 1.5e-4.
MIN_RECALL = 0.99
MAX_SIM_ERROR = 2e-3
IVF_MAX_LISTS = 256
#: k-means: reported objective / float64 recomputation from the labels, and GPU objective / CPU objective.
KMEANS_SELF_RANGE = (0.999, 1.02)
KMEANS_GPU_TOLERANCE = 0.02
#: neco_train --compile: relative difference of the first step's loss to the eager run's (same weights, same
#: batch, no drop-path; bf16 rounding differs between the fused and the eager kernels).
COMPILE_LOSS_TOLERANCE = 0.05
#: 2-process vs 1-process ``densebench run``: identical up to float noise of other batch compositions.
DISTRIBUTED_TOLERANCE_POINTS = 0.01
DISTRIBUTED_BENCHMARK = "voc-incontext"
DISTRIBUTED_TIMEOUT_S = 300


@dataclass(frozen=True)
class Sizes:
    """How much each check does: ``full`` on a GPU in minutes, ``quick`` in seconds on two CPU cores."""

    suite_scale: str
    one_per_protocol: bool
    retrieval: tuple[int, int, int, int]      # keys, dim, queries, k
    kmeans: tuple[int, int, int, int]         # points, dim, K, iterations
    neco_steps: tuple[int, int]               # cpu, cuda
    neco_more_steps: int                      # steps the resumed run adds


FULL = Sizes("default", False, (200_000, 384, 1_000, 30), (100_000, 64, 100, 20), (3, 30), 5)
QUICK = Sizes("tiny", True, (20_000, 64, 256, 30), (4_000, 16, 20, 10), (3, 10), 2)


@dataclass
class Check:
    """One line of the report: a status, the figure that matters, the reason for a FAIL or SKIP, details."""

    name: str
    group: str
    status: str = "PASS"
    figure: str = ""
    reason: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.status = "FAIL"
        self.reason = reason if self.reason is None else f"{self.reason}; {reason}"

    def skip(self, reason: str) -> None:
        self.status, self.reason = "SKIP", reason

    def require(self, ok: bool, reason: str) -> None:
        if not ok:
            self.fail(reason)


@dataclass
class Context:
    device: str
    quick: bool
    work: Path
    sizes: Sizes
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def suite(self) -> Path:
        """The synthetic suite (generated once into the densebench cache, like the embedded default's)."""
        if "suite" not in self.shared:
            from .data.synth import ensure_synthetic_suite
            from .paths import cache_dir

            self.shared["suite"] = ensure_synthetic_suite(cache_dir(), scale=self.sizes.suite_scale)
        return self.shared["suite"]


Item = tuple[str, str, Callable[..., None], tuple]


# -- running and reporting ----------------------------------------------------------------------------------
def _guarded(ctx: Context, name: str, group: str, fn: Callable[..., None], args: tuple) -> Check:
    """Run one check; an exception is its FAIL (message, and the traceback in the details)."""
    check = Check(name, group)
    t0 = time.perf_counter()
    try:
        fn(ctx, check, *args)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a crash in one check must not hide the others
        message, hint = getattr(e, "message", str(e)), getattr(e, "hint", None)
        check.fail(f"{type(e).__name__}: {message}" + (f" (fix: {hint})" if hint else ""))
        check.details["traceback"] = traceback.format_exc()
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    check.seconds = round(time.perf_counter() - t0, 3)
    if check.status == "SKIP" and not check.reason:
        check.fail("skipped without a reason")
    return check


def default_report_path() -> Path:
    return Path(f"densebench-selfcheck-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")


def _check_paths(out: Path, keep: Path | None) -> None:
    """Refuse, before any work, a report that exists or cannot be written and a --keep folder in use."""
    from .results import check_writable_folder

    if out.exists():
        raise ResultError(f"the report {out} already exists", hint="pass another --out (reports are never replaced)")
    check_writable_folder(out.parent, what="--out folder", hint="pass an --out on a writable disk")
    if keep is not None:
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise ConfigError(f"--keep {keep} exists and is not an empty folder",
                              hint="name a new folder for the working files")
        check_writable_folder(keep, what="--keep folder", hint="name a folder on a writable disk")


def run_selfcheck(*, device: str = "auto", quick: bool = False, out: str | os.PathLike | None = None,
                  keep: str | os.PathLike | None = None, only: list[str] | None = None,
                  on_check: Callable[[Check], None] | None = None) -> dict[str, Any]:
    """Run the checks (``only``: some of :data:`GROUPS`; the environment always runs) and write the report.

    Returns the report (also written, atomically and never over an existing file, to ``out``, by default
    ``./densebench-selfcheck-<timestamp>.json``). ``keep``: a new folder that keeps the working files
    (synthetic results, feature caches, training runs); otherwise they go to a temporary folder, deleted after.
    ``on_check`` is called with each check as it finishes.
    """
    from . import __version__
    from .devices import resolve_device
    from .results import atomic_write_text

    groups = _groups(only)
    device = resolve_device(device)
    out_path = Path(out) if out is not None else default_report_path()
    keep_path = Path(keep) if keep is not None else None
    _check_paths(out_path, keep_path)
    if keep_path is not None:
        keep_path.mkdir(parents=True, exist_ok=True)
    work = keep_path or Path(tempfile.mkdtemp(prefix="densebench-selfcheck-"))
    ctx = Context(device=device, quick=quick, work=work.absolute(), sizes=QUICK if quick else FULL)
    started, t0 = _dt.datetime.now().astimezone(), time.perf_counter()
    checks: list[Check] = []
    try:
        for name, group, fn, args in _items(ctx, groups):
            check = _guarded(ctx, name, group, fn, args)
            checks.append(check)
            if on_check is not None:
                on_check(check)
    finally:
        if keep_path is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    report = {"schema": SCHEMA, "densebench_version": __version__, "started": started.isoformat(timespec="seconds"),
              "seconds": round(seconds, 1), "budget_s": BUDGET_S, "within_budget": seconds <= BUDGET_S,
              "device": device, "quick": quick, "groups": groups, "work_dir": str(keep_path) if keep_path else None,
              "ok": counts["FAIL"] == 0, "counts": counts,
              "environment": next((c.details for c in checks if c.group == "environment"), {}),
              "checks": [_jsonable(asdict(c)) for c in checks]}
    text = json.dumps(report, indent=2) + "\n"
    try:
        written = atomic_write_text(out_path, text, exclusive=True)
    except FileExistsError:  # another process took the name while the checks ran: keep both, say where
        written = atomic_write_text(out_path.with_name(f"{out_path.stem}-{os.getpid()}{out_path.suffix}"), text,
                                    exclusive=True)
    report["path"] = str(written)
    return report


def _groups(only: list[str] | None) -> list[str]:
    if not only:
        return list(GROUPS)
    for g in only:
        if g not in GROUPS:
            raise ConfigError(choices_message("check group", g, GROUPS))
    return [g for g in GROUPS if g == "environment" or g in only]


def _items(ctx: Context, groups: list[str]) -> Iterator[Item]:
    makers = {"environment": lambda: [("environment", "environment", check_environment, ())],
              "benchmarks": lambda: _benchmark_items(ctx), "retrieval": lambda: _retrieval_items(ctx),
              "kmeans": lambda: [("kmeans cpu", "kmeans", check_kmeans_cpu, ()),
                                 ("kmeans gpu vs cpu", "kmeans", check_kmeans_gpu, ())],
              "neco_train": lambda: [(f"neco_train {s}", "neco_train", fn, ()) for s, fn in
                                     (("train", check_neco_train), ("resume", check_neco_resume),
                                      ("compile", check_neco_compile))],
              "distributed": lambda: [("distributed", "distributed", check_distributed, ())]}
    for g in groups:
        yield from makers[g]()


def _jsonable(obj: Any) -> Any:
    """Plain JSON; a non-finite float (a diverged loss) is written as its string, never refused."""
    from .results import jsonable

    return jsonable(obj, nonfinite_as_text=True)


# -- 1. environment -----------------------------------------------------------------------------------------
def environment_info(device: str) -> dict[str, Any]:
    """The provenance environment of a result, plus cuDNN, GPU memory and faiss' GPU support."""
    from . import __version__
    from .results import environment, git_hash

    info = environment(device)
    info["versions"].update(densebench=__version__, git=git_hash(), cuda_runtime=torch.version.cuda,
                            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = [{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}"}
                    for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]
    info["faiss_gpu_build"] = info["faiss_gpus"] = None
    if retrieval.faiss_available():
        import faiss

        info["faiss_gpu_build"] = hasattr(faiss, "StandardGpuResources")
        info["faiss_gpus"] = faiss.get_num_gpus() if info["faiss_gpu_build"] else 0
    return info


def check_environment(ctx: Context, check: Check) -> None:
    info = environment_info(ctx.device)
    check.details.update(info)
    v = info["versions"]
    faiss = "faiss missing" if v.get("faiss") is None else \
        f"faiss {v['faiss']} ({'GPU' if info['faiss_gpus'] else 'no GPU'})"
    parts = [f"torch {v['torch']}", faiss, f"timm {v.get('timm')}"]
    if ctx.cuda:
        gpu = torch.cuda.get_device_properties(torch.device(ctx.device))
        parts[1:1] = [f"CUDA {v['cuda_runtime']}", f"cuDNN {v['cudnn']}",
                      f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB)"]
        check.require(v["cudnn"] is not None, "cuDNN is not available to torch on this CUDA device")
    else:
        parts.insert(1, "CPU only")
    check.figure = ", ".join(parts)


# -- 2. benchmarks on the device and on the CPU ------------------------------------------------------------
def _benchmark_items(ctx: Context) -> list[Item]:
    from .benchmark_table import benchmarks

    specs, seen = [], set()
    for b in benchmarks():
        if ctx.sizes.one_per_protocol and b.protocol_name in seen:
            continue
        seen.add(b.protocol_name)
        specs.append(b)
    return [(f"benchmark {b.name}", "benchmarks", check_benchmark, (b,)) for b in specs]


def _encoder(ctx: Context, device: str):
    """The seeded random ViT, one instance per device (both passes must hold the same weights)."""
    encoders = ctx.shared.setdefault("encoders", {})
    if device not in encoders:
        from .encoders import load_encoder

        encoder = load_encoder(MODEL)
        if encoders:  # compared on the CPU, wherever the first one is now
            where = same_state(next(iter(encoders.values())).state_dict(), encoder.state_dict())
            if where is not None:
                raise RuntimeError(f"{MODEL} loaded twice holds other weights at {where}: the seeded "
                                   f"initialisation is not deterministic, so the passes cannot be compared")
        encoders[device] = encoder
    return encoders[device]


def _one_pass(ctx: Context, bench, device: str) -> dict[str, Any]:
    """Run ``bench`` on ``device`` with that device's own feature cache; the figures of the run."""
    from .api import evaluate

    label = "cpu" if device == "cpu" else "device"
    t0 = time.perf_counter()
    output = ctx.work / f"results-{label}" / f"{bench.name}.json"
    result = evaluate(_encoder(ctx, device), benchmarks=[bench.name], data_root=ctx.suite(), device=device,
                      cache_dir=ctx.work / f"cache-{label}", output=output, progress=False,
                      options=dict(bench.synthetic))[0]
    value = result.metrics.get(bench.main_metric)
    prov = result.provenance
    return {"device": device, "recorded_device": prov.get("device"), "value": value,
            "seconds": round(time.perf_counter() - t0, 3),
            "images_forwarded": prov.get("cache", {}).get("images_forwarded"), "timings": prov.get("timings")}


def tolerance_points(bench) -> float:
    """The largest accepted |device - CPU| of ``bench``'s main metric, in points."""
    return BENCHMARK_TOLERANCE_POINTS.get(bench.name, TOLERANCE_POINTS.get(bench.protocol_name,
                                                                            DEFAULT_TOLERANCE_POINTS))


def check_benchmark(ctx: Context, check: Check, bench) -> None:
    metric = bench.main_metric
    tol = tolerance_points(bench)
    check.details.update(benchmark=bench.name, metric=metric, tolerance_points=tol, model=MODEL,
                         synthetic_options=dict(bench.synthetic))
    passes = {"device": _one_pass(ctx, bench, ctx.device)}
    passes["cpu"] = _one_pass(ctx, bench, "cpu") if ctx.cuda else passes["device"]
    check.details["passes"] = passes
    for where, p in passes.items():
        v = p["value"]
        check.require(str(p["recorded_device"]).split(":")[0] == p["device"].split(":")[0],
                      f"the {where} pass asked for {p['device']} but its result records {p['recorded_device']}")
        check.require(isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 100.0,
                      f"{metric} on the {where} pass is {v!r}, not a percentage")
    if check.status == "FAIL":
        return
    dev, cpu = passes["device"]["value"], passes["cpu"]["value"]
    if not ctx.cuda:
        check.details["comparison"] = {"status": "SKIP", "reason": "no CUDA device: the device pass is the CPU pass"}
        check.figure = f"{metric} {cpu:.2f} on cpu (device vs cpu: SKIP, no GPU)"
        return
    diff = dev - cpu
    ok = abs(diff) <= tol
    check.details["comparison"] = {"status": "PASS" if ok else "FAIL", "difference_points": diff}
    check.figure = f"{metric} {dev:.2f} {ctx.device} vs {cpu:.2f} cpu, diff {diff:+.2f} (tol {tol:g})"
    check.require(ok, f"{metric} differs by {diff:+.2f} points between {ctx.device} and cpu (tolerance {tol:g})")


# -- 3. retrieval backends against a float64 brute force ---------------------------------------------------
def _retrieval_items(ctx: Context) -> list[Item]:
    variants = [("torch", {}), ("faiss", {}), ("faiss-ivf", {})]
    if ctx.cuda:
        variants.insert(2, ("faiss", {"fp16": True}))
    return [(f"retrieval {b}" + (" fp16" if kw.get("fp16") else ""), "retrieval", check_retrieval, (b, kw))
            for b, kw in variants]


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def brute_force_topk(keys: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 128):
    """Exact inner-product top-k in float64 on the CPU: (sims (M, k) float64, idx (M, k) int64)."""
    k64 = keys.double()
    sims, idx = [], []
    for q0 in range(0, queries.shape[0], chunk):
        s, i = (queries[q0:q0 + chunk].double() @ k64.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _retrieval_reference(ctx: Context):
    if "retrieval" not in ctx.shared:
        n, d, m, k = ctx.sizes.retrieval
        keys, queries = _unit_rows(n, d, 0), _unit_rows(m, d, 1)
        t0 = time.perf_counter()
        sims, idx = brute_force_topk(keys, queries, k)
        ctx.shared["retrieval"] = (keys, queries, k, sims, idx, time.perf_counter() - t0)
    return ctx.shared["retrieval"]


def recall_at_k(found: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over queries of |found ∩ true| / k (both (M, k) index tensors; a repeated index counts once)."""
    return float((true[:, :, None] == found[:, None, :]).any(-1).double().mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_retrieval(ctx: Context, check: Check, backend: str, kwargs: dict) -> None:
    if backend.startswith("faiss") and not retrieval.faiss_available():
        return check.skip("faiss is not installed (pip install faiss-cpu, or faiss-gpu for CUDA)")
    if backend.startswith("faiss") and ctx.cuda and not retrieval.faiss_gpu_available():
        return check.skip("the installed faiss has no GPU support (faiss-cpu): no faiss index on the device")
    keys, queries, k, true_sims, true_idx, ref_s = _retrieval_reference(ctx)
    kw = dict(kwargs)
    if backend == "faiss-ivf":  # every list probed: exact, so the brute force is its reference too; at most
        nlist = min(IVF_MAX_LISTS, retrieval._ivf_params(keys.shape[0], None, None)[0])  # 256 lists: fast to train
        kw.update(nlist=nlist, nprobe=nlist)
    dev = torch.device(ctx.device)
    t0 = time.perf_counter()
    index = retrieval.build_index(keys, backend, ctx.device, **kw)
    _sync(dev)
    build_s = time.perf_counter() - t0
    index.search(queries[:8], k)  # warm-up (kernels, faiss GPU resources)
    _sync(dev)
    t0 = time.perf_counter()
    sims, idx = index.search(queries, k)
    _sync(dev)
    search_s = time.perf_counter() - t0
    recall = recall_at_k(idx.cpu(), true_idx)
    err = float((sims.cpu().double() - true_sims).abs().max())
    n, d, m, _ = ctx.sizes.retrieval
    check.details.update(keys=n, dim=d, queries=m, k=k, recall_at_k=recall, max_similarity_error=err,
                         build_s=build_s, search_s=search_s, queries_per_s=m / max(search_s, 1e-9),
                         brute_force_float64_s=ref_s, index=index.describe(), min_recall=MIN_RECALL,
                         max_similarity_error_allowed=MAX_SIM_ERROR)
    check.figure = (f"recall@{k} {recall:.4f}, sim err {err:.1e}, search {1e3 * search_s:.0f} ms "
                    f"({m} q x {n} keys, {index.describe().get('dtype')} on {dev})")
    check.require(recall >= MIN_RECALL, f"recall@{k} {recall:.4f} < {MIN_RECALL} against the float64 brute force")
    check.require(err <= MAX_SIM_ERROR, f"similarities off by up to {err:.2e} (> {MAX_SIM_ERROR:g})")


# -- 4. k-means ---------------------------------------------------------------------------------------------
def _kmeans_data(ctx: Context) -> np.ndarray:
    if "kmeans_data" not in ctx.shared:
        n, d, k, _ = ctx.sizes.kmeans
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(k, d)) * 2.0
        ctx.shared["kmeans_data"] = (centres[rng.integers(0, k, n)] + rng.normal(size=(n, d)) * 0.5).astype(np.float32)
    return ctx.shared["kmeans_data"]


def kmeans_objective_f64(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Sum of squared distances of every point to the float64 mean of its cluster (the labels' own optimum)."""
    x64 = x.astype(np.float64)
    centres = np.zeros((k, x.shape[1]))
    np.add.at(centres, labels, x64)
    counts = np.bincount(labels, minlength=k)
    centres[counts > 0] /= counts[counts > 0, None]
    return float(((x64 - centres[labels]) ** 2).sum())


def _kmeans(ctx: Context, gpu: bool) -> dict[str, Any]:
    from .kmeans import faiss_kmeans

    x = _kmeans_data(ctx)
    _, _, k, niter = ctx.sizes.kmeans
    run = faiss_kmeans(x, k, niter=niter, nredo=1, seed=0, gpu=gpu)
    recomputed = kmeans_objective_f64(x, run.labels, k)
    return {"objective": run.objective, "objective_f64_from_labels": recomputed,
            "self_ratio": run.objective / recomputed, "seconds": run.seconds, "empty_clusters":
            int(k - np.unique(run.labels).size), "info": run.info}


def _kmeans_self_check(check: Check, run: dict, where: str) -> None:
    low, high = KMEANS_SELF_RANGE
    check.require(low <= run["self_ratio"] <= high,
                  f"{where} objective / float64 recomputation from its labels = {run['self_ratio']:.4f}, "
                  f"outside [{low}, {high}]")


def check_kmeans_cpu(ctx: Context, check: Check) -> None:
    if not retrieval.faiss_available():
        return check.skip("faiss is not installed (densebench's k-means is faiss')")
    n, d, k, niter = ctx.sizes.kmeans
    run = ctx.shared["kmeans_cpu"] = _kmeans(ctx, gpu=False)
    check.details.update(points=n, dim=d, k=k, niter=niter, cpu=run, self_range=KMEANS_SELF_RANGE)
    check.figure = f"objective / float64 recomputation {run['self_ratio']:.5f} ({n} x {d}, K={k}, " \
                   f"{run['seconds']:.2f} s)"
    _kmeans_self_check(check, run, "CPU")


def check_kmeans_gpu(ctx: Context, check: Check) -> None:
    if not ctx.cuda:
        return check.skip("no CUDA device")
    if not retrieval.faiss_gpu_available():
        return check.skip("the installed faiss has no GPU support (faiss-cpu)")
    cpu = ctx.shared.get("kmeans_cpu") or _kmeans(ctx, gpu=False)
    gpu = _kmeans(ctx, gpu=True)
    ratio = gpu["objective"] / cpu["objective"]
    check.details.update(gpu=gpu, cpu_objective=cpu["objective"], ratio=ratio, tolerance=KMEANS_GPU_TOLERANCE,
                         speedup=cpu["seconds"] / max(gpu["seconds"], 1e-9))
    check.figure = f"objective gpu / cpu {ratio:.5f} (tol {KMEANS_GPU_TOLERANCE:g}), " \
                   f"{gpu['seconds']:.2f} s vs {cpu['seconds']:.2f} s"
    check.require(abs(ratio - 1.0) <= KMEANS_GPU_TOLERANCE, f"GPU objective / CPU objective = {ratio:.4f}")
    _kmeans_self_check(check, gpu, "GPU")


# -- 5. neco_train ------------------------------------------------------------------------------------------
def _neco_config(ctx: Context, out: Path, steps: int, **changes):
    """A tiny run on the suite's VOC images: the tests' TINY settings on the CPU, ViT-Ti at 224 px in bf16 on
    CUDA. lr 1e-3 so a resume that lost the weights would show; no drop-path so two runs draw alike."""
    from neco_train.trainer import TrainConfig

    images = ctx.suite() / "VOCSegmentation" / "images"
    n_images = sum(1 for _ in images.glob("*.jpg"))
    if ctx.cuda:
        kw = {"model": "random:vit_tiny_patch16_224", "batch_size": 8, "global_size": 224, "local_size": 96,
              "workers": min(4, os.cpu_count() or 1), "precision": "bf16"}
    else:
        kw = {"model": "random:vit_tiny_patch16_224", "model_kwargs": {"depth": 2}, "batch_size": 2,
              "global_size": 32, "local_size": 16, "head_hidden": 64, "head_out": 32, "queue_length": 64,
              "workers": 0, "precision": "fp32"}
    per_epoch = max(1, n_images // kw["batch_size"])
    epochs = math.ceil((_neco_steps(ctx) + ctx.sizes.neco_more_steps) / per_epoch)  # one schedule for all runs
    kw.update(data=str(images), output=str(out), device=ctx.device, epochs=epochs, max_steps=steps, drop_path=0.0,
              lr_backbone=1e-3, lr_head=1e-3, progress=False, **changes)
    return TrainConfig(**kw)


def _read_log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _train_figures(summary: dict, out: Path) -> dict[str, Any]:
    log = _read_log(out)
    last = log[-1] if log else {}
    return {"steps": summary["steps"], "losses": summary["losses"], "checkpoint": summary["checkpoint"],
            "log_steps": [r.get("step") for r in log], "images_per_s": last.get("images_per_s"),
            "data_wait_share": last.get("data_wait_share")}


def _check_run(check: Check, figures: dict, first: int, last: int) -> None:
    """Steps, log and losses of a run that went from step ``first`` to ``last``."""
    check.require(figures["steps"] == last, f"the run ended at step {figures['steps']}, not {last}")
    check.require(len(figures["losses"]) == last - first,
                  f"{len(figures['losses'])} losses for the {last - first} steps from {first} to {last}")
    check.require(all(math.isfinite(v) for v in figures["losses"]), f"non-finite loss: {figures['losses']}")
    steps = figures["log_steps"]
    check.require(bool(steps) and steps[-1] == last and steps == sorted(set(steps)),
                  f"log.jsonl steps {steps}: not increasing, or not ending at step {last}")
    ips = figures["images_per_s"]
    check.require(isinstance(ips, (int, float)) and ips > 0, f"log.jsonl images_per_s is {ips!r}")


def _neco_steps(ctx: Context) -> int:
    return ctx.sizes.neco_steps[1 if ctx.cuda else 0]


def check_neco_train(ctx: Context, check: Check) -> None:
    from neco_train.trainer import Trainer

    steps = _neco_steps(ctx)
    cfg = _neco_config(ctx, ctx.work / "neco-train", steps)
    trainer = Trainer(cfg)
    figures = _train_figures(trainer.fit(), trainer.out)
    ctx.shared["neco"] = {"trainer": trainer, "figures": figures, "steps": steps}
    check.details.update(config=cfg.to_json(), **figures)
    check.require((trainer.out / "train_state.pt").is_file(), "no train_state.pt to resume from")
    _check_run(check, figures, 0, steps)
    check.details["checkpoint_feature_difference"] = diff = _checkpoint_difference(trainer)
    check.require(diff <= 1e-4, f"densebench's neco: loader gives features {diff:.2e} away from the student's")
    if figures["losses"]:
        check.figure = (f"{steps} steps ({cfg.precision}), loss {figures['losses'][0]:.3f} -> "
                        f"{figures['losses'][-1]:.3f}, {figures['images_per_s'] or 0:.1f} img/s, "
                        f"data wait {100 * (figures['data_wait_share'] or 0):.0f}%")


def _checkpoint_difference(trainer) -> float:
    """Largest |difference| between the features of the saved checkpoint, loaded as densebench's ``neco:``
    encoder, and the trained student's backbone, in fp32 on the training device."""
    from .encoders import load_encoder

    meta = json.loads((trainer.out / "last.json").read_text())
    encoder = load_encoder("neco:" + str(trainer.out / "last"), pos_interp=meta["pos_interp"]).to(trainer.device)
    student = trainer.student.backbone
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)).to(trainer.device)
    student.eval()
    try:
        with torch.no_grad():
            return float((encoder(images) - student(images)).abs().max())
    finally:
        student.train()


def same_state(a: Any, b: Any, path: str = "") -> str | None:
    """None when two (nested) state dicts are equal, bit for bit; else the first key that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(set(a) ^ set(b))[:3]}"
        return next((d for k in a if (d := same_state(a[k], b[k], f"{path}.{k}")) is not None), None)
    if torch.is_tensor(a) and torch.is_tensor(b):
        return None if a.shape == b.shape and torch.equal(a.cpu(), b.cpu()) else path
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := same_state(x, y, f"{path}[{i}]")) is not None),
                    None)
    return None if a == b else path


def check_neco_resume(ctx: Context, check: Check) -> None:
    from neco_train.trainer import Trainer

    first = ctx.shared.get("neco")
    if first is None:
        return check.skip("needs the neco_train training run, which did not finish")
    done, more = first["steps"], ctx.sizes.neco_more_steps
    a = first["trainer"]
    b = Trainer(_neco_config(ctx, a.out, done + more, resume=str(a.out)), base=a.base)
    check.require(b.step == done, f"the resumed run starts at step {b.step}, not {done}")
    for what, sa, sb in (("student", a.student.state_dict(), b.student.state_dict()),
                         ("teacher", a.teacher.state_dict(), b.teacher.state_dict()),
                         ("objective (queue, generator)", a.objective.state_dict(), b.objective.state_dict())):
        where = same_state(sa, sb)
        check.require(where is None, f"the resumed {what} differs from the saved one at {where}")
    figures = _train_figures(b.fit(), b.out)
    check.details.update(resumed_from_step=done, **figures, loss_before=first["figures"]["losses"][-1])
    _check_run(check, figures, done, done + more)
    if figures["losses"]:
        check.figure = (f"step {done} -> {figures['steps']}, state restored exactly, loss "
                        f"{first['figures']['losses'][-1]:.3f} -> {figures['losses'][-1]:.3f}")


def _dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_neco_compile(ctx: Context, check: Check) -> None:
    if not ctx.cuda:
        return check.skip("torch.compile is checked on CUDA only (on the CPU it needs minutes of C++ compilation)")
    first = ctx.shared.get("neco")
    if first is None:
        return check.skip("needs the neco_train training run (the eager reference), which did not finish")
    run_compiled(ctx, check, first)


#: Steps in which ``--compile`` may still compile graphs (both crop sizes, the dynamic-shape recompile).
COMPILE_WARMUP_STEPS = 3


def run_compiled(ctx: Context, check: Check, eager: dict) -> None:
    """``--compile`` for as many steps as the eager run: the same first loss, no graph compiled after the
    warm-up steps (a recompilation every step ends in eager fallback), and the images/s it reached."""
    from neco_train.trainer import Trainer

    steps = eager["steps"]
    trainer = Trainer(_neco_config(ctx, ctx.work / "neco-compile", steps, compile=True), base=eager["trainer"].base)
    graphs = [_dynamo_graphs()]
    step = trainer.train_step

    def counted_step(batch):  # the graphs compiled so far, after every step
        loss = step(batch)
        graphs.append(_dynamo_graphs())
        return loss

    trainer.train_step = counted_step
    figures = _train_figures(trainer.fit(), trainer.out)
    per_step = [g - graphs[0] for g in graphs[1:]]
    late = per_step[-1] - per_step[COMPILE_WARMUP_STEPS - 1] if len(per_step) > COMPILE_WARMUP_STEPS else None
    l0, e0 = figures["losses"][0] if figures["losses"] else float("nan"), eager["figures"]["losses"][0]
    rel = abs(l0 - e0) / max(abs(e0), 1e-12)
    eager_ips = eager["figures"]["images_per_s"] or 0.0
    check.details.update(**figures, graphs_after_each_step=per_step, graphs_after_warmup=late,
                         warmup_steps=COMPILE_WARMUP_STEPS, first_loss_eager=e0, first_loss_relative_difference=rel,
                         eager_images_per_s=eager_ips)
    _check_run(check, figures, 0, steps)
    check.require(rel <= COMPILE_LOSS_TOLERANCE, f"first loss {l0:.4f} compiled vs {e0:.4f} eager "
                                                 f"(relative difference {rel:.3f} > {COMPILE_LOSS_TOLERANCE})")
    check.require(not late, f"{late} graph(s) compiled after the first {COMPILE_WARMUP_STEPS} steps: the student "
                            f"recompiles during training (and falls back to eager at dynamo's limit)")
    ips = figures["images_per_s"] or 0.0
    check.figure = (f"{steps} steps, {per_step[-1] if per_step else 0} graph(s) "
                    f"({'none' if late == 0 else late} after warm-up), {ips:.1f} img/s vs {eager_ips:.1f} eager, "
                    f"first loss diff {100 * rel:.2f}%")


# -- 6. torchrun, 2 processes vs 1 --------------------------------------------------------------------------
def distributed_supported() -> tuple[bool, str]:
    """Whether ``densebench run`` detects a torch.distributed launch (``densebench.distributed.is_supported()``)."""
    try:
        module = importlib.import_module(".distributed", __package__)
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.distributed":
            raise
        return False, "densebench run is single-process in this version"
    is_supported = getattr(module, "is_supported", None)
    if is_supported is None or not is_supported():
        return False, "densebench run is single-process in this version (densebench.distributed.is_supported() " \
                      "is false)"
    return True, ""


def run_command_args(bench, suite: Path, device: str, folder: Path) -> list[str]:
    """``densebench run`` arguments for ``bench`` on the synthetic suite (its synthetic options as flags)."""
    args = ["run", "--model", MODEL, "--benchmark", bench.name, "--data-root", str(suite), "--device", device,
            "--cache-dir", str(folder / "cache"), "--output", str(folder / "result.json"), "--quiet"]
    for name, value in bench.synthetic.items():
        args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def _launch(cmd: list[str], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # two ranks on one GPU: NCCL refuses a communicator with the same GPU twice, gloo takes it
    env = {**os.environ, "DENSEBENCH_DIST_BACKEND": "gloo"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DISTRIBUTED_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"command": cmd, "returncode": None, "seconds": DISTRIBUTED_TIMEOUT_S,
                "error": f"no result after {DISTRIBUTED_TIMEOUT_S} s (a hang?)"}
    run = {"command": cmd, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
           "stderr_tail": proc.stderr[-2000:]}
    if proc.returncode == 0:
        from .results import read_result

        result = read_result(folder / "result.json")
        run["value"] = result.main_score
        run["images_forwarded"] = result.provenance.get("cache", {}).get("images_forwarded")
        run["distributed"] = result.derived.get("distributed")
    return run


def check_distributed(ctx: Context, check: Check) -> None:
    ok, why = distributed_supported()
    if not ok:
        return check.skip(why)
    from .benchmark_table import get_benchmark

    bench = get_benchmark(DISTRIBUTED_BENCHMARK)
    runs = {}
    for n in (1, 2):
        folder = ctx.work / f"distributed-{n}"
        # batches of 4, so that both ranks get some of even the quick suite's views
        args = [*run_command_args(bench, ctx.suite(), ctx.device, folder), "--batch-size", "4"]
        launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        runs[n] = _launch([sys.executable, *launcher, "-m", "densebench", *args], folder)
    check.details.update(benchmark=bench.name, runs={str(n): r for n, r in runs.items()},
                         tolerance_points=DISTRIBUTED_TOLERANCE_POINTS)
    for n, r in runs.items():
        check.require(r.get("returncode") == 0, f"the {n}-process run failed: "
                      f"{r.get('error') or (r.get('stderr_tail') or '').strip().splitlines()[-1:]}")
    if check.status == "FAIL":
        return
    diff = runs[2]["value"] - runs[1]["value"]
    check.details["difference_points"] = diff
    check.figure = (f"{bench.main_metric} {runs[2]['value']:.4f} (2 processes) vs {runs[1]['value']:.4f} (1), "
                    f"{runs[2]['seconds']:.0f} s vs {runs[1]['seconds']:.0f} s")
    shares = (runs[2].get("distributed") or {}).get("images_forwarded_per_rank")
    check.details["forwards_per_rank"] = shares
    single = runs[1].get("images_forwarded")
    check.require(shares is not None and len(shares) == 2 and sum(shares) == single and min(shares) > 0,
                  f"the 2 ranks forwarded {shares} images, the single process {single}")
    check.require(abs(diff) <= DISTRIBUTED_TOLERANCE_POINTS,
                  f"2 processes differ from 1 by {diff:+.4f} points (tolerance {DISTRIBUTED_TOLERANCE_POINTS})")
