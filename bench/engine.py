"""The feature engine at VOC size: data path cost, worker scaling, main-thread overhead, resume, disk bytes.

On a VOC-sized synthetic set (800 trainaug + 100 val images of about 500x375 in the official VOC layout,
``densebench.data.synth.write_voc_sized``, generated once under the cache directory) with a near-zero-cost
encoder passed through the API (per-patch mean colour tiled to D channels), ``voc-incontext`` at input 512
with 2 augmentation epochs. Prints, from this one run:

  1. CPU cost of one memory-bank view (read + decode image and mask, augment, both parts of the view), one
     thread, as a ratio to decoding that JPEG once (target <= 5x); the full-image float recipe the data
     path replaced, for comparison (it is bitwise what the new path computes: tests/test_data_path.py);
  2. memory-bank extraction throughput with 1 worker and with as many workers as cores (target: >= 0.8 x
     cores x the 1-worker rate);
  3. main-thread CPU time per image outside the encoder call, with workers (target <= 0.3 ms);
  4. a run killed with SIGKILL at ~50 % of its views, then resumed: forwards of the resumed run as a share
     of a full run (target <= 55 %) and its metrics (must equal an uninterrupted run's);
  5. bytes on disk of that run's entries against the formula of docs/cache.md (must be equal);
  6. COCO-Things then COCO-Stuff linear probe (synthetic suite): forwards of the second run (must be 0).

Writes bench/results/engine.json. Not part of the test suite (no timing assertions anywhere).

    python bench/engine.py [--train 800] [--val 100] [--views 120] [--dim 64] [--memory-size 102400]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from densebench import evaluate, get_benchmark  # noqa: E402
from densebench.cache import FeatureCache  # noqa: E402
from densebench.data import open_dataset  # noqa: E402
from densebench.data.base import open_image  # noqa: E402
from densebench.encoders.base import DenseEncoder  # noqa: E402
from densebench.features import ExtractionStats, default_workers, extract  # noqa: E402
from densebench.paths import cache_dir  # noqa: E402
from densebench.protocols.incontext import MemoryReducer  # noqa: E402
from densebench.transforms import HummingbirdTrainView, generator_for, normalise  # noqa: E402
from densebench.transforms import random_resized_crop_params, resize_image, resize_mask, to_tensor  # noqa: E402

INPUT = 512
PATCH = 16


class NullEncoder(DenseEncoder):
    """Near-zero-cost stand-in for a ViT: per-patch mean colour tiled to ``dim`` channels (deterministic).

    Records the CPU time its calls take on the calling thread (``thread_s``), so the bench can subtract it.
    """

    def __init__(self, dim: int = 64, **kw):
        super().__init__(**kw)
        self.patch_size, self.embed_dim = PATCH, dim
        self.name, self.fingerprint = f"null-{dim}", f"null-encoder-{dim}-v1"
        self.thread_s = 0.0

    def _features(self, images, layer, norm):
        t0 = time.thread_time()
        pooled = F.avg_pool2d(images, self.patch_size).permute(0, 2, 3, 1)      # (B, h, w, 3)
        out = pooled.repeat(1, 1, 1, -(-self.embed_dim // 3))[..., : self.embed_dim].contiguous()
        self.thread_s += time.thread_time() - t0
        return out


# ---------------------------------------------------------------------------------------------------
# data

def voc_sized_root(n_train: int, n_val: int, seed: int = 0) -> Path:
    """The VOC-sized set under the cache directory, generated once (atomically)."""
    from densebench.data.synth import SYNTH_VERSION, write_voc_sized

    root = cache_dir(None) / f"bench-voc-sized-v{SYNTH_VERSION}-{n_train}x{n_val}-seed{seed}"
    if (root / "VOCSegmentation" / "densebench_manifest.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    t0 = time.perf_counter()
    print(f"generating the VOC-sized set ({n_train} + {n_val} images) in {root} ...", flush=True)
    write_voc_sized(tmp, n_train=n_train, n_val=n_val, seed=seed)
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


# ---------------------------------------------------------------------------------------------------
# 1. per-view CPU cost

def full_image_recipe(view: HummingbirdTrainView, index: int, image, mask):
    """The memory-bank view as computed before the data path work: float ops on the whole image (reference)."""
    import torchvision.transforms.functional as TF

    from densebench.transforms import _uniform

    g = generator_for(view.seed, view.epoch, index)
    img = to_tensor(image)
    j = view.jitter
    h = j if view.hue is None else view.hue
    for fn, lo, hi in ((TF.adjust_brightness, 1 - j, 1 + j), (TF.adjust_contrast, 1 - j, 1 + j),
                       (TF.adjust_saturation, 1 - j, 1 + j), (TF.adjust_hue, -h, h)):
        if float(torch.rand((), generator=g)) < 0.5:
            img = fn(img, _uniform(g, lo, hi))
    img = normalise(img, view.mean, view.std)
    m = torch.from_numpy(np.asarray(mask))
    top, left, h, w = random_resized_crop_params(g, img.shape[1], img.shape[2], view.scale, view.ratio)
    return (resize_image(img[:, top:top + h, left:left + w], (view.size, view.size)),
            resize_mask(m[top:top + h, left:left + w], (view.size, view.size)))


def view_cost(train, n: int) -> dict:
    """Thread CPU seconds per image: JPEG decode alone; one memory-bank view as the worker computes it
    (dataset item read + view image + view mask); the same with the full-image recipe."""
    torch.set_num_threads(1)
    ids = range(min(n, len(train)))
    views = [HummingbirdTrainView(INPUT, seed=0, epoch=e) for e in (0, 1)]

    def clock(fn) -> float:
        fn(0)
        t0 = time.thread_time()
        for i in ids:
            fn(i)
        return (time.thread_time() - t0) / len(ids)

    decode = clock(lambda i: open_image(train.image_path(train.ids[i])))
    new = clock(lambda i: [(v.image(i, it[1]), v.mask(i, it[2])) for it in [train[i]] for v in views]) / 2
    old = clock(lambda i: [full_image_recipe(v, i, it[1], it[2]) for it in [train[i]] for v in views]) / 2
    torch.set_num_threads(os.cpu_count() or 1)
    return {"images": len(ids), "decode_ms": 1e3 * decode, "view_ms": 1e3 * new, "full_image_recipe_ms": 1e3 * old,
            "view_over_decode": new / decode, "full_image_recipe_over_decode": old / decode}


# ---------------------------------------------------------------------------------------------------
# 2-3. throughput and the main thread

def memory_pass(train, dim: int, workers: int, per_image: int) -> dict:
    """One memory-bank epoch (the in-context protocol's view and reducer) without a cache; wall time, and the
    main thread's CPU time outside the encoder."""
    enc = NullEncoder(dim)
    view = HummingbirdTrainView(INPUT, seed=0, epoch=0)
    red = MemoryReducer(PATCH, 21, 255, "class0", per_image, seed=0, epoch=0)
    stats = ExtractionStats()
    t0, c0 = time.perf_counter(), time.thread_time()
    extract(enc, train, view, reducer=red, cache=FeatureCache(None), batch_size=16, num_workers=workers,
            progress=False, stats=stats)
    wall, main_cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {"workers": workers, "views": len(train), "wall_s": wall, "views_per_s": len(train) / wall,
            "main_thread_ms_per_view_outside_encoder": 1e3 * (main_cpu - enc.thread_s) / len(train)}


def _decode_many(paths) -> int:
    for path in paths:
        open_image(path)
    return len(paths)


def parallel_capacity(train, cores: int, n: int = 300) -> float:
    """How much faster ``cores`` processes decode JPEGs than one, right now: the parallelism this machine
    actually offers (below ``cores`` when other work shares it), the ceiling of any worker scaling."""
    import multiprocessing as mp

    paths = [train.image_path(train.ids[i % len(train)]) for i in range(n)]
    rates = {}
    for k in sorted({1, cores}):
        with mp.get_context("fork").Pool(k) as pool:
            t0 = time.perf_counter()
            done = sum(pool.map(_decode_many, [paths] * k))
            rates[k] = done / (time.perf_counter() - t0)
    return rates[cores] / rates[1]


def loader_rate(train, workers: int) -> float:
    """Views per second the data path alone delivers (workers reading and augmenting; batches dropped)."""
    from torch.utils.data import DataLoader

    from densebench.features import _Items, _WholeItem

    items = _Items(len(train), _WholeItem(train, HummingbirdTrainView(INPUT, seed=0, epoch=0), finish_here=True))
    t0 = time.perf_counter()
    for _ in DataLoader(items, batch_size=16, num_workers=workers):
        pass
    return len(train) / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# 4-5. kill -9 at ~50 %, resume, bytes on disk

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {bench!r})
    from engine import NullEncoder, incontext_run
    from densebench.cache import FeatureCache
    incontext_run(NullEncoder({dim}), {root!r}, FeatureCache({cache!r}, shard_images={shard}), {opts!r})
""")


def incontext_run(encoder, root, cache, opts: dict):
    bench = get_benchmark("voc-incontext")
    return bench.run(encoder, root, bench.default_config(**opts), cache=cache, progress=False)


def done_views(cache_root: Path) -> int:
    """Views complete on disk: committed entries plus complete shards of extractions in progress."""
    done = 0
    for p in (cache_root / "features").glob("*/*"):
        try:
            partial = p.name.endswith(".partial")
            meta = json.loads((p / ("progress.json" if partial else "meta.json")).read_text())
            if (meta.get("info") or {}).get("model") == "(masks)":
                continue
            if partial:
                shards = meta.get("shards") or []
                done += shards[-1]["images"][1] if shards else 0
            else:
                done += int(meta["info"]["n_images"])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return done


def kill_and_resume(root: Path, tmp: Path, dim: int, opts: dict, total_views: int, shard: int) -> dict:
    full_cache = tmp / "full"
    enc = NullEncoder(dim)
    t0 = time.perf_counter()
    full = incontext_run(enc, root, FeatureCache(full_cache, shard_images=shard), opts)
    full_s = time.perf_counter() - t0
    cache = tmp / "killed"
    child = CHILD.format(bench=str(BENCH), dim=dim, root=str(root), cache=str(cache), shard=shard, opts=opts)
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)
    killed_at = 0
    while proc.poll() is None:
        killed_at = done_views(cache)
        if killed_at >= total_views // 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read().decode()[-2000:])
    enc2 = NullEncoder(dim)
    resumed = incontext_run(enc2, root, FeatureCache(cache, shard_images=shard), opts)
    leftovers = [str(p) for p in (cache / "features").rglob("*") if p.name.endswith(".partial") or ".tmp-" in p.name]
    return {"full": full, "full_forwards": enc.images_forwarded, "full_s": full_s, "killed_at_views": killed_at,
            "resumed": resumed, "resumed_forwards": enc2.images_forwarded,
            "resumed_views_reused": resumed["provenance"]["cache"]["views_reused"], "leftovers": leftovers,
            "cache": full_cache}


def disk_bytes(cache_root: Path) -> dict:
    out = {}
    for meta_path in (cache_root / "features").glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for name in meta["arrays"]:
            f = meta_path.parent / f"{name}.bin"
            out[f"{meta['info']['desc']}:{name}"] = f.stat().st_size if f.exists() else 0
    return out


def formula_bytes(n_train: int, n_val: int, dim: int, per_image: int, epochs: int) -> dict:
    """docs/cache.md: memory bank = views x rows x (2 D + C b) (b = 2 bytes per count: patch^2 > 255);
    val = N x s^2 x 2 D features + N x H x W masks."""
    s2, c, b = (INPUT // PATCH) ** 2, 21, 1 if PATCH * PATCH <= 255 else 2
    out = {}
    for e in range(epochs):
        out[f"memory bank {e + 1}/{epochs}:keys"] = n_train * per_image * 2 * dim
        out[f"memory bank {e + 1}/{epochs}:labels"] = n_train * per_image * c * b
    out["val features:features"] = n_val * s2 * 2 * dim
    out["val features:masks"] = n_val * INPUT * INPUT
    return out


# ---------------------------------------------------------------------------------------------------
# 6. COCO-Things + COCO-Stuff

def coco_sharing(tmp: Path, dim: int) -> dict:
    from densebench.data.synth import write_synthetic_suite

    write_synthetic_suite(tmp / "suite", seed=0)
    enc = NullEncoder(dim)
    opts = dict(input_size=224, train_mask_size=56, epochs=2, train_views=2)
    rows = {}
    for name in ("coco-things-linear", "coco-stuff-linear"):
        before = enc.images_forwarded
        res = evaluate(enc, benchmarks=[name], data_root=tmp / "suite", cache_dir=tmp / "coco-cache",
                       progress=False, **opts)[0]
        plain = evaluate(NullEncoder(dim), benchmarks=[name], data_root=tmp / "suite", use_cache=False,
                         progress=False, **opts)[0]
        rows[name] = {"forwards": enc.images_forwarded - before, "masks_read": res["provenance"]["cache"]["masks_read"],
                      "miou": res["metrics"]["miou"], "equals_no_cache": res["metrics"] == plain["metrics"]}
    return rows


# ---------------------------------------------------------------------------------------------------

def summary(r: dict) -> list[tuple[str, str, str, bool]]:
    """The table: (measure, measured, target, met)."""
    vc, sc, rs, cores = r["view_cost"], r["scaling"], r["resume"], r["scaling"]["cores"]
    coco = r["coco"]["coco-stuff-linear"]
    main_ms = r["throughput"]["memory_pass"][-1]["main_thread_ms_per_view_outside_encoder"]
    return [
        ("CPU per memory-bank view / JPEG decode (0 workers)", f"{vc['view_over_decode']:.1f}x "
         f"(was {vc['full_image_recipe_over_decode']:.1f}x)", "<= 5x", vc["view_over_decode"] <= 5),
        (f"data path throughput, {cores} workers / 1 worker", f"{sc['loader_alone']:.2f}x", f">= {0.8 * cores:.1f}x",
         sc["loader_alone"] >= 0.8 * cores),
        (f"memory-bank epoch (CPU reducer too), {cores} workers / 1", f"{sc['memory_pass']:.2f}x",
         f">= {0.8 * cores:.1f}x", sc["memory_pass"] >= 0.8 * cores),
        ("main thread outside the encoder, per view", f"{main_ms:.3f} ms", "<= 0.3 ms", main_ms <= 0.3),
        ("forwards after kill -9 at ~50 %, share of a full run", f"{100 * rs['forward_share']:.1f} %", "<= 55 %",
         rs["forward_share"] <= 0.55),
        ("resumed metrics == uninterrupted, no leftovers", str(rs["identical_metrics"] and not rs["leftovers"]),
         "True", rs["identical_metrics"] and not rs["leftovers"]),
        ("bytes on disk == docs/cache.md formula", str(r["disk"]["equal"]), "True", r["disk"]["equal"]),
        ("coco-stuff-linear forwards after coco-things-linear", f"{coco['forwards']} (= no-cache: "
         f"{coco['equals_no_cache']})", "0", coco["forwards"] == 0 and coco["equals_no_cache"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--views", type=int, default=120, help="images timed for the per-view CPU cost")
    ap.add_argument("--dim", type=int, default=64, help="feature width of the null encoder")
    ap.add_argument("--memory-size", type=int, default=102_400, help="memory bank patches (exact k-NN on CPU)")
    ap.add_argument("--shard-images", type=int, default=50)
    ap.add_argument("--out", default=str(BENCH / "results" / "engine.json"))
    args = ap.parse_args()
    epochs, cores = 2, default_workers()
    root = voc_sized_root(args.train, args.val)
    train = open_dataset("voc", root, "trainaug")
    per_image = min(args.memory_size // (len(train) * epochs), (INPUT // PATCH) ** 2)
    report: dict = {"machine": {"usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__},
                    "data": {"train": len(train), "val": args.val, "size": "about 500x375", "input": INPUT,
                             "augment_epochs": epochs, "dim": args.dim, "memory_size": args.memory_size,
                             "per_image": per_image}}

    report["view_cost"] = vc = view_cost(train, args.views)
    print(f"1. memory-bank view (one thread): decode {vc['decode_ms']:.2f} ms, view {vc['view_ms']:.2f} ms = "
          f"{vc['view_over_decode']:.1f}x decode (target <= 5x); full-image recipe {vc['full_image_recipe_ms']:.2f} ms "
          f"= {vc['full_image_recipe_over_decode']:.1f}x", flush=True)

    passes = [memory_pass(train, args.dim, w, per_image) for w in sorted({1, cores})]
    one, many = passes[0], passes[-1]
    scaling = many["views_per_s"] / one["views_per_s"]
    loader = {w: loader_rate(train, w) for w in sorted({1, cores})}
    loader_scaling = loader[cores] / loader[1]
    report["throughput"] = {"memory_pass": passes, "loader_views_per_s": loader}
    capacity = parallel_capacity(train, cores)
    report["scaling"] = {"cores": cores, "memory_pass": scaling, "loader_alone": loader_scaling, "target": 0.8 * cores,
                         "machine_parallel_capacity": capacity}
    print(f"2. memory-bank epoch: 1 worker {one['views_per_s']:.1f} views/s, {cores} workers "
          f"{many['views_per_s']:.1f} views/s = {scaling:.2f}x (target >= {0.8 * cores:.1f}x); the loader alone "
          f"{loader[1]:.1f} -> {loader[cores]:.1f} views/s = {loader_scaling:.2f}x; {cores} processes decoding "
          f"JPEGs get {capacity:.2f}x of one on this machine now", flush=True)
    print(f"3. main thread outside the encoder, {cores} workers: "
          f"{many['main_thread_ms_per_view_outside_encoder']:.3f} ms per view (target <= 0.3 ms)", flush=True)

    opts = {"input_size": INPUT, "augment_epochs": epochs, "memory_size": args.memory_size,
            "num_workers": cores, "backend": "torch"}
    total_views = len(train) * epochs + args.val
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kr = kill_and_resume(root, tmp, args.dim, opts, total_views, args.shard_images)
        same = kr["resumed"]["metrics"] == kr["full"]["metrics"]
        share = kr["resumed_forwards"] / kr["full_forwards"]
        report["resume"] = {"total_views": total_views, "full_forwards": kr["full_forwards"], "full_s": kr["full_s"],
                            "killed_at_views": kr["killed_at_views"], "resumed_forwards": kr["resumed_forwards"],
                            "resumed_views_reused": kr["resumed_views_reused"], "forward_share": share,
                            "identical_metrics": same, "miou": kr["full"]["metrics"]["miou"],
                            "leftovers": kr["leftovers"]}
        print(f"4. kill -9 at {kr['killed_at_views']}/{total_views} views, resumed: {kr['resumed_forwards']} forwards "
              f"= {100 * share:.1f} % of a full run (target <= 55 %), metrics identical: {same}, "
              f"leftovers: {len(kr['leftovers'])}", flush=True)
        measured, expected = disk_bytes(kr["cache"]), formula_bytes(len(train), args.val, args.dim, per_image, epochs)
        report["disk"] = {"measured": measured, "formula": expected, "equal": measured == expected}
        print(f"5. bytes on disk {sum(measured.values()):,} vs formula {sum(expected.values()):,}: "
              f"equal per array: {measured == expected}", flush=True)
        report["coco"] = coco = coco_sharing(tmp, args.dim)
        print(f"6. coco-things-linear {coco['coco-things-linear']['forwards']} forwards, then coco-stuff-linear "
              f"{coco['coco-stuff-linear']['forwards']} forwards ({coco['coco-stuff-linear']['masks_read']} mask "
              f"views read), metrics equal to --no-cache: {coco['coco-stuff-linear']['equals_no_cache']}", flush=True)

    report["table"] = rows = summary(report)
    print(f"\n{'measure':<58}{'measured':>22}{'target':>14}  met")
    for name, value, target, met in rows:
        print(f"{name:<58}{value:>22}{target:>14}  {'yes' if met else 'NO'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
