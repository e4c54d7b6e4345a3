"""SPair correspondence benchmark: a literal per-pair implementation vs densebench, same numbers?

The literal implementation follows the structure of probe3d's evaluate_spair_correspondence.py: for
every category and every viewpoint bucket (0, 1, 2, all) it builds the pair subset, then for every pair
loads and transforms both images, forwards them together (one pair per batch, no cache), normalises,
samples the source keypoints, takes the argmax over the target grid and pools the errors. It reads the
SPair JSON files itself and shares no code with densebench.protocols.correspondence beyond the encoder,
so equal PCK is also a cross-check of the protocol. The one deliberate difference to probe3d: the pair
names are sorted before the seeded shuffle (probe3d shuffles in glob order), as densebench does.

Runs on two synthetic SPair suites: the standard one (8 test pairs per category, each image in ~2 pairs)
and a denser one (more test pairs over the same 8 images per category, closer to real SPair where each
test image appears in many pairs). Prints a table and writes bench/results/spair.json. The target is
at least 5x faster on CPU with identical PCK. No timing assertions live in the tests.

It also prints the bytes of feature grids read from the cache per evaluated pair: before, by the old
formula (both grids read for every pair: 2 x grid bytes), and after, as measured by the run
(``derived.grid_read_bytes``: each image's grid read once per category), for both suites and, on paper,
for the SPair-71k test split (12,234 pairs) with a ViT-L/14 at the published 800 px (``--reads-only``
skips the slow literal run, prints only these and writes bench/results/spair_reads.json).

    python bench/spair.py [--model random:vit_small_patch16_224] [--input-size 224] [--dense-pairs 24]
                          [--reads-only]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densebench.data import synth
from densebench.encoders import load_encoder
from densebench.features import FeatureCache
from densebench.protocols.correspondence import Config, run
from densebench.results import environment
from densebench.transforms import SquarePadView

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ------------------------------------------------------------------------------ literal reference

def literal_load(root: Path, cat: str, name: str, size: int):
    """probe3d get_image + image_transform: pad bottom/right to a square with 255, bicubic resize, normalise."""
    arr = np.array(Image.open(root / "JPEGImages" / cat / f"{name}.jpg").convert("RGB"))
    h, w, _ = arr.shape
    side = max(h, w)
    arr = np.pad(arr, ((0, side - h), (0, side - w), (0, 0)), constant_values=255)
    img = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    return (t - MEAN) / STD, side


def literal_keypoints(root: Path, cat: str, name: str, n: int):
    ann = json.loads((root / "ImageAnnotation" / cat / f"{name}.json").read_text())
    xy = np.zeros((n, 2))
    vis = np.zeros(n, bool)
    for k in range(n):
        v = ann["kps"].get(str(k))
        if v is not None:
            xy[k], vis[k] = v, True
    return xy, vis


def literal_pair_errors(model, root: Path, pair: dict, size: int, patch: int):
    cat = pair["category"]
    _, src, trg = pair["filename"].split(":")[0].split("-")
    img_s, side_s = literal_load(root, cat, src, size)
    img_t, side_t = literal_load(root, cat, trg, size)
    images = torch.stack([img_s, img_t])
    pad = (-size) % patch                                   # probe3d center_padding inside the backbone
    images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    with torch.inference_mode():
        feats = model(images, norm=False).permute(0, 3, 1, 2)   # one pair per forward, no cache
    feats = F.normalize(feats, dim=1)
    n = len(json.loads((root / "ImageAnnotation" / cat / f"{src}.json").read_text())["kps"])
    kps_s, vis_s = literal_keypoints(root, cat, src, n)
    kps_t, vis_t = literal_keypoints(root, cat, trg, n)
    u_s = torch.from_numpy(kps_s / side_s).float()
    u_t = torch.from_numpy(kps_t / side_t).float()
    desc = F.grid_sample(feats[:1], (u_s * 2 - 1)[None, None], mode="bilinear", align_corners=True)[0, :, 0].t()
    heat = torch.einsum("kf,fhw->khw", desc, feats[1])
    flat = heat.flatten(1).argmax(1)
    w = heat.shape[-1]
    pred = torch.stack([flat % w, flat // w], 1).float() / w
    x1, y1, x2, y2 = pair["trg_bndbox"]
    thresh_scale = max(x2 - x1, y2 - y1) / max(pair["trg_imsize"][:2])
    err = (pred - u_t).norm(dim=1) / thresh_scale
    return err[torch.from_numpy(vis_s & vis_t)]


def literal_run(model, root: Path, size: int, per_category: int, seed: int, thresh: float = 0.10):
    files = sorted((root / "PairAnnotation" / "test").glob("*.json"))
    annots = [json.loads(f.read_text()) for f in files]
    cats = sorted({a["category"] for a in annots})
    recall = {}
    forwards = 0
    for cat in cats:
        for vp in (0, 1, 2, None):
            inst = [a for a in annots if a["category"] == cat]
            if vp is not None:
                inst = [a for a in inst if a["viewpoint_variation"] == vp]
            inst = sorted(inst, key=lambda a: a["filename"])
            random.Random(seed).shuffle(inst)
            inst = inst[:per_category]
            if not inst:
                continue
            errs = torch.cat([literal_pair_errors(model, root, a, size, model.patch_size) for a in inst])
            forwards += 2 * len(inst)
            recall[(cat, vp)] = (errs < thresh).double().mean().item() * 100
    out = {}
    for vp, key in ((None, "pck@0.10"), (0, "pck@0.10_vp0"), (1, "pck@0.10_vp1"), (2, "pck@0.10_vp2")):
        vals = [v for (c, b), v in recall.items() if b == vp]
        if vals:
            out[key] = float(np.mean(vals))
    return out, forwards


# --------------------------------------------------------------------------------------------- main

def make_suite(out: Path, dense_pairs: int | None) -> Path:
    if dense_pairs:
        scale = dict(synth.SCALES["default"])
        scale["spair_pairs"] = {"trn": 1, "val": 1, "test": dense_pairs}
        synth.SCALES["bench-dense-spair"] = scale
        synth.write_synthetic_suite(out, seed=0, scale="bench-dense-spair")
    else:
        synth.write_synthetic_suite(out, seed=0)
    return out


def cache_reads(result, embed_dim: int) -> dict:
    """Bytes of feature grids read from the cache per evaluated pair: the old formula (both grids of every
    pair) against what the run read (its derived.grid_read_bytes)."""
    d = result["derived"]
    grid_bytes = d["feature_grid"] ** 2 * embed_dim * 2            # float16 (S, S, D) as cached
    before = 2 * d["pairs"] * grid_bytes
    return {"pairs": d["pairs"], "grid_bytes": grid_bytes, "grid_reads_before": 2 * d["pairs"],
            "grid_reads_after": d["grid_reads"], "bytes_per_pair_before": before / d["pairs"],
            "bytes_per_pair_after": d["grid_read_bytes"] / d["pairs"], "reduction": before / d["grid_read_bytes"]}


def on_paper(pairs: int = 12_234, images: int = 1_800, size: int = 800, patch: int = 14, dim: int = 1024) -> dict:
    """SPair-71k test with a ViT-L/14 at the published size (800 -> 812, a 58x58 grid of 1024 fp16 values).

    Before: 2 grids per pair. After: one read per (category, image) of the test pairs, at most the 1,800
    images SPair-71k has in all (its images belong to one category each), so the figure is an upper bound.
    """
    grid = SquarePadView(size, patch=patch).padded_size // patch
    grid_bytes = grid * grid * dim * 2
    before, after = 2 * pairs * grid_bytes, images * grid_bytes
    return {"pairs": pairs, "images_at_most": images, "grid": grid, "dim": dim, "grid_bytes": grid_bytes,
            "bytes_before": before, "bytes_after_at_most": after, "bytes_per_pair_before": before / pairs,
            "bytes_per_pair_after_at_most": after / pairs, "reduction_at_least": before / after}


def print_reads(rows: list[dict], paper: dict) -> None:
    print(f"\n{'cache reads':<22}{'pairs':>7}{'grids before':>14}{'grids after':>13}{'KB/pair before':>16}"
          f"{'KB/pair after':>15}{'less':>8}")
    for r in rows:
        c = r["cache_reads"]
        print(f"{r['suite']:<22}{c['pairs']:>7}{c['grid_reads_before']:>14}{c['grid_reads_after']:>13}"
              f"{c['bytes_per_pair_before'] / 1e3:>16.1f}{c['bytes_per_pair_after'] / 1e3:>15.1f}"
              f"{c['reduction']:>7.2f}x")
    print(f"\nSPair-71k test on paper: {paper['pairs']:,} pairs, ViT-L/14 at 800 px ({paper['grid']}x{paper['grid']}"
          f"x{paper['dim']} fp16 = {paper['grid_bytes'] / 1e6:.2f} MB a grid): before {paper['bytes_before'] / 1e9:.1f}"
          f" GB ({paper['bytes_per_pair_before'] / 1e6:.2f} MB/pair), after <= {paper['bytes_after_at_most'] / 1e9:.1f}"
          f" GB (<= {paper['bytes_per_pair_after_at_most'] / 1e6:.2f} MB/pair, each of <= {paper['images_at_most']:,}"
          f" images once): >= {paper['reduction_at_least']:.1f}x less")


def measure_reads(label: str, data: Path, model: str, size: int, tmp: Path, per_category: int, seed: int) -> dict:
    """Only the cache reads (no literal run): one densebench run on a fresh cache."""
    enc = load_encoder(model)
    res = run(enc, data, Config(input_size=size, pairs_per_category=per_category, seed=seed),
              cache=FeatureCache(tmp / f"cache-{label}"), progress=False)
    return {"suite": label, "cache_reads": cache_reads(res, enc.embed_dim)}


def measure(label: str, data: Path, model: str, size: int, tmp: Path, per_category: int, seed: int) -> dict:
    enc = load_encoder(model)
    # Warm-up outside the timings: one forward, and the imports a result record makes (versions of
    # timm/faiss/scipy/sklearn), which would otherwise be charged to whichever side runs first.
    with torch.inference_mode():
        enc(torch.zeros(1, 3, size + (-size) % enc.patch_size, size + (-size) % enc.patch_size))
    environment("cpu")
    t0 = time.perf_counter()
    ref, ref_forwards = literal_run(enc, data / "SPair-71k", size, per_category, seed)
    literal_s = time.perf_counter() - t0
    cfg = Config(input_size=size, pairs_per_category=per_category, seed=seed)
    cache = FeatureCache(tmp / f"cache-{label}")
    before = enc.images_forwarded
    t0 = time.perf_counter()
    cold = run(enc, data, cfg, cache=cache, progress=False)
    cold_s = time.perf_counter() - t0
    cold_forwards = enc.images_forwarded - before
    t0 = time.perf_counter()
    warm = run(enc, data, cfg, cache=cache, progress=False)
    warm_s = time.perf_counter() - t0
    keys = sorted(ref)
    diff = max(abs(ref[k] - cold["metrics"][k]) for k in keys)
    return {"suite": label, "pairs_evaluated": cold["provenance"]["dataset"]["n_pairs_evaluated"],
            "images": cold["provenance"]["dataset"]["n_images"],
            "literal_s": literal_s, "literal_forwards": ref_forwards,
            "densebench_cold_s": cold_s, "densebench_forwards": cold_forwards,
            "densebench_warm_s": warm_s, "speedup_cold": literal_s / cold_s, "speedup_warm": literal_s / warm_s,
            "pck_literal": {k: ref[k] for k in keys}, "pck_densebench": {k: cold["metrics"][k] for k in keys},
            "max_abs_pck_difference": diff, "identical": diff < 1e-9,
            "densebench_protocol_s": cold["provenance"]["timings"]["protocol_s"],
            "warm_equals_cold": warm["metrics"] == cold["metrics"],
            "cache_reads": cache_reads(warm, enc.embed_dim)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:vit_small_patch16_224")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--dense-pairs", type=int, default=24, help="test pairs per category of the dense suite")
    ap.add_argument("--pairs-per-category", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spair.json"))
    ap.add_argument("--reads-only", action="store_true", help="only the cache reads per pair (no literal run)")
    args = ap.parse_args()

    rows = []
    paper = on_paper()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, dense in (("standard", None), (f"dense-{args.dense_pairs}", args.dense_pairs)):
            data = make_suite(tmp / label, dense)
            rows.append((measure_reads if args.reads_only else measure)(
                label, data, args.model, args.input_size, tmp, args.pairs_per_category, args.seed))
    if args.reads_only:
        print_reads(rows, paper)
        out = Path(args.out).with_name("spair_reads.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "input_size": args.input_size, "rows": rows,
                                   "on_paper": paper}, indent=2))
        print(f"wrote {out}")
        return
    head = (f"{'suite':<11}{'pairs':>6}{'images':>7}{'literal s':>10}{'fwd':>6}{'dense s':>9}{'fwd':>5}"
            f"{'warm s':>8}{'speed-up':>9}{'pck lit':>9}{'pck db':>8}{'same':>6}")
    print(head)
    for r in rows:
        print(f"{r['suite']:<11}{r['pairs_evaluated']:>6}{r['images']:>7}{r['literal_s']:>10.2f}"
              f"{r['literal_forwards']:>6}{r['densebench_cold_s']:>9.2f}{r['densebench_forwards']:>5}"
              f"{r['densebench_warm_s']:>8.2f}{r['speedup_cold']:>8.1f}x{r['pck_literal']['pck@0.10']:>9.2f}"
              f"{r['pck_densebench']['pck@0.10']:>8.2f}{'yes' if r['identical'] else 'NO':>6}")
    print("\nspeed-up = literal wall time / densebench cold-cache wall time (target >= 5x, identical PCK);"
          " 'same': pck@0.10 overall and per viewpoint bucket agree to 1e-9 (float64 on both sides).")
    print_reads(rows, paper)
    report = {"model": args.model, "input_size": args.input_size, "pairs_per_category": args.pairs_per_category,
              "seed": args.seed, "torch_threads": torch.get_num_threads(), "rows": rows, "on_paper": paper}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
