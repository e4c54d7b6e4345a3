"""Overclustering: a literal implementation of the published pipeline vs densebench, same features, same run.

The published pipeline (Leopart/NeCo ``eval_overcluster.py`` + ``experiments/utils.py``, spec protocols.md §5)
is reimplemented literally from its described behaviour: sklearn ``StandardScaler.partial_fit`` in 100k-row
chunks, ``faiss.PCAMatrix(D, 50)`` trained on every token, CPU ``faiss.Kmeans(niter=100, nredo=5, seed=i)``,
cluster maps upsampled with ``F.interpolate(mode='nearest')``, ignore pixels removed, then ``PredsmIoU``: one
pixel scan per (cluster, class) pair for the score matrix, greedy precision matching (K != #classes) or
``linear_sum_assignment`` on 1-IoU (K == #classes), relabelling by a mask per cluster, and per-class pixel scans
for TP/FP/FN. densebench runs :func:`densebench.protocols.overcluster.cluster_and_score` on the same tokens.

Tokens: the synthetic VOC val images seen through ``--views`` different random crops (``LinearTrainView``, each a
distinct image and 100x100 mask) at 448 px, extracted once with ``--model`` through the feature cache.

Reported: time per stage and the reference/densebench ratio (k-means is the same faiss call in both, so the
ratio grows with the pixel count: the reference's matching scans every pixel K x C times), equality of the
matched mIoU when densebench's matching is fed the reference's own cluster assignments, and the mIoU each
pipeline gets from its own clustering. A side table measures the one deliberate difference in the masks
(one nearest resize to 100 instead of the reference's PIL-nearest 448 then torch-nearest 100).

    OMP_NUM_THREADS=1 python bench/overcluster.py [--views 8] [--k 500] [--seeds 5] [--model M]
                                                  [--json bench/results/overcluster.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.preprocessing import StandardScaler

from densebench.data import open_dataset
from densebench.data.synth import ensure_synthetic_suite
from densebench.encoders import load_encoder
from densebench.features import FeatureCache, extract
from densebench.metrics import segmentation_scores
from densebench.protocols.overcluster import Config, TokenPixelCounts, cluster_and_score, matching_for
from densebench.transforms import LinearTrainView, ResizeView

INPUT, MASK, PCA_DIM = 448, 100, 50


# ------------------------------------------------------------------------------ the published pipeline

def reference_normalize_and_pca(feats: np.ndarray, pca_dim: int) -> np.ndarray:
    """StandardScaler fitted by partial_fit on 100k-row chunks, chunks transformed in place, faiss PCA on all."""
    feats = feats.copy()
    bs = 100_000
    its = feats.shape[0] // bs + 1
    scaler = StandardScaler()
    for i in range(its):
        if len(feats[i * bs:(i + 1) * bs]):
            scaler.partial_fit(feats[i * bs:(i + 1) * bs])
    for i in range(its):
        if len(feats[i * bs:(i + 1) * bs]):
            feats[i * bs:(i + 1) * bs] = scaler.transform(feats[i * bs:(i + 1) * bs])
    pca = faiss.PCAMatrix(feats.shape[-1], pca_dim)
    pca.train(feats)
    return pca.apply_py(feats)


def reference_cluster(x: np.ndarray, k: int, seed: int, s: int) -> torch.Tensor:
    km = faiss.Kmeans(x.shape[1], k, niter=100, nredo=5, verbose=False, gpu=False, spherical=False, seed=seed)
    km.train(x)
    _, pred = km.index.search(x, 1)
    return torch.from_numpy(pred.squeeze().reshape(-1, 1, s, s))


def _score(pred: np.ndarray, gt: np.ndarray, c_gt: int, c_pred: int, precision: bool) -> float:
    in_gt = gt == c_gt
    in_pred = pred == c_pred
    tp = np.sum(in_gt & in_pred)
    fp = np.sum(~in_gt & in_pred)
    if precision:
        return float(tp) / max(float(tp + fp), 1e-8)
    fn = np.sum(in_gt & ~in_pred)
    return float(tp) / max(float(tp + fp + fn), 1e-8)


def reference_miou(gt: np.ndarray, pred: np.ndarray, num_pred: int, num_gt: int) -> float:
    """PredsmIoU.compute: per-pair pixel scans, matching, relabel by masks, per-class scans (mIoU as a fraction)."""
    many_to_one = num_pred != num_gt
    scores = np.array([_score(pred, gt, c1, c2, many_to_one) for c2 in range(num_pred) for c1 in range(num_gt)])
    scores = scores.reshape(num_pred, num_gt).T
    relabelled = np.zeros(len(pred))
    if many_to_one:
        best: dict[int, int] = {}
        best_score: dict[int, float] = {}
        for c_pred in range(num_pred):
            for c_gt in range(num_gt):
                if c_pred not in best or scores[c_gt, c_pred] > best_score[c_pred]:
                    best[c_pred], best_score[c_pred] = c_gt, scores[c_gt, c_pred]
        matches = defaultdict(list)
        for c_pred, c_gt in best.items():
            matches[c_gt].append(c_pred)
        for c_gt, preds in matches.items():
            for c_pred in preds:
                relabelled[pred == c_pred] = c_gt
    else:
        rows, cols = linear_sum_assignment(1 - scores)
        for c_gt, c_pred in zip(rows, cols):
            relabelled[pred == c_pred] = c_gt
        for c_pred in np.delete(np.arange(num_pred), cols):
            relabelled[pred == c_pred] = 0
    ious = []
    for c in range(num_gt):
        in_gt, in_pred = gt == c, relabelled == c
        tp, fp, fn = np.sum(in_gt & in_pred), np.sum(~in_gt & in_pred), np.sum(in_gt & ~in_pred)
        ious.append(float(tp) / max(float(tp + fp + fn), 1e-8))
    return float(np.mean(ious))


def reference_pipeline(tokens: np.ndarray, masks: torch.Tensor, s: int, k: int, num_classes: int, ignore: int,
                       seeds: int) -> dict:
    t0 = time.perf_counter()
    x = reference_normalize_and_pca(tokens, PCA_DIM)
    t_pca = time.perf_counter()
    labels, mious, t_km, t_match = [], [], 0.0, 0.0
    valid = masks != ignore
    gt = masks[valid].numpy().astype(int)
    for seed in range(seeds):
        ta = time.perf_counter()
        clustering = reference_cluster(x, k, seed, s)
        tb = time.perf_counter()
        up = F.interpolate(clustering.float(), size=(MASK, MASK), mode="nearest")
        pred = up[valid].numpy().astype(int)
        mious.append(reference_miou(gt, pred, k, num_classes) * 100)
        t_km += tb - ta
        t_match += time.perf_counter() - tb
        labels.append(clustering.reshape(-1).numpy().astype(np.int64))
    return {"standardise_pca_s": t_pca - t0, "kmeans_s": t_km, "matching_s": t_match,
            "total_s": time.perf_counter() - t0, "miou_seeds": mious, "labels": labels}


# ----------------------------------------------------------------------------------------- helpers

def reference_masks(val, n: int) -> np.ndarray:
    """The reference's masks: PIL nearest Resize((448, 448)), then torch nearest to 100x100."""
    out = []
    for i in range(n):
        _, _, mask = val[i]
        m448 = np.asarray(Image.fromarray(mask).resize((INPUT, INPUT), Image.NEAREST))
        t = torch.from_numpy(m448.astype(np.float32))[None, None]
        out.append(F.interpolate(t, size=(MASK, MASK), mode="nearest")[0, 0].numpy().astype(np.uint8))
    return np.stack(out)


def densebench_miou_of(labels: np.ndarray, masks: np.ndarray, s: int, k: int, num_classes: int, ignore: int) -> float:
    conf = TokenPixelCounts.from_masks(masks, s, num_classes, ignore).confusion(labels, k)
    return segmentation_scores(conf, matching=matching_for("auto", k, num_classes))["miou"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", default="8", help="comma list: random crops per synthetic VOC val image (24 images); "
                    "60 gives VOC's 1,440 clustered images")
    ap.add_argument("--k", default="500", help="comma list of K (gt = 21)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--model", default="random:vit_tiny_patch16_224")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (both pipelines)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "densebench-bench-cache")
    ap.add_argument("--skip-reference", action="store_true", help="time densebench only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    root = ensure_synthetic_suite(args.cache_dir)
    val = open_dataset("voc", root, "val")
    C, ignore = val.num_classes, val.ignore_index
    enc = load_encoder(args.model)
    s = INPUT // enc.patch_size
    cache = FeatureCache(args.cache_dir)
    rows = []
    for n_views in (int(v) for v in args.views.split(",")):
        t0 = time.perf_counter()
        feats, masks = [], []
        for v in range(n_views):
            view = LinearTrainView(INPUT, MASK, seed=0, view=v, flip=True)
            out = extract(enc, val, view, key_parts={"view": view.describe(), "reduce": "full-f16"}, cache=cache,
                          progress=False)
            feats.append(np.asarray(out["features"]))
            masks.append(np.asarray(out["masks"]))
        features, masks_np = np.concatenate(feats), np.concatenate(masks)
        t_extract = time.perf_counter() - t0
        n_img, dim = features.shape[0], features.shape[-1]
        tokens32 = features.reshape(-1, dim).astype(np.float32)          # what the reference holds in memory
        n_pixels = int((masks_np != ignore).sum())
        print(f"{args.model}: {n_img} images ({n_views} views x {len(val)}), {tokens32.shape[0]} tokens x D={dim}, "
              f"{n_pixels} scored pixels at {MASK}x{MASK}; extraction {t_extract:.1f}s (cached after the first run); "
              f"{args.threads} thread(s)", flush=True)
        for k_label in args.k.split(","):
            k = C if k_label == "gt" else int(k_label)
            cfg = Config(clusters=(str(k),), seeds=args.seeds, pca_dim=PCA_DIM)
            db = cluster_and_score(features, masks_np, num_classes=C, ignore_index=ignore, class_names=None,
                                   config=cfg)
            row = {"images": n_img, "tokens": int(tokens32.shape[0]), "dim": dim, "scored_pixels": n_pixels,
                   "k": k, "seeds": args.seeds,
                   "densebench": {**{key: round(v, 3) for key, v in db.timings.items()},
                                  "miou_seeds": db.metrics[f"miou@{k}_seeds"]}}
            if not args.skip_reference:
                ref = reference_pipeline(tokens32, torch.from_numpy(masks_np)[:, None], s, k, C, ignore, args.seeds)
                same = [densebench_miou_of(lab, masks_np, s, k, C, ignore) for lab in ref.pop("labels")]
                row["reference"] = {key: (round(v, 3) if isinstance(v, float) else v) for key, v in ref.items()}
                row["densebench_matching_on_reference_labels"] = same
                row["max_abs_miou_diff_same_labels"] = max(abs(a - b) for a, b in zip(same, ref["miou_seeds"]))
                row["ratio_total"] = ref["total_s"] / db.timings["clustering_total_s"]
                row["ratio_matching"] = ref["matching_s"] / max(db.timings["matching_s"], 1e-9)
                row["ratio_standardise_pca"] = ref["standardise_pca_s"] / db.timings["standardise_pca_s"]
            rows.append(row)
            _print_row(row)
        del features, masks_np, tokens32, feats, masks

    # The one deliberate difference: masks resized to 100 in one nearest step (shared cached view) vs the
    # reference's two steps; same clustering (seed 0 on the plain val view), both mask sets scored.
    view = ResizeView(INPUT, mask_size=MASK)
    plain = extract(enc, val, view, key_parts={"view": view.describe(), "reduce": "full-f16"}, cache=cache,
                    progress=False)
    ref_masks = reference_masks(val, len(val))
    ours = np.asarray(plain["masks"])
    mask_rows = []
    for k in sorted({C, min(500, len(val) * s * s // 4)}):
        cfg = Config(clusters=(str(k),), seeds=1, pca_dim=PCA_DIM)
        km_labels = _labels_seed0(np.asarray(plain["features"]), cfg, k)
        mask_rows.append({"k": k, "miou_one_step": densebench_miou_of(km_labels, ours, s, k, C, ignore),
                          "miou_reference_two_step": densebench_miou_of(km_labels, ref_masks, s, k, C, ignore)})
    mask_diff = float((ours != ref_masks).mean())

    print(f"\nmask resize (one nearest step vs PIL 448 + torch 100): {mask_diff * 100:.2f}% of mask pixels differ")
    for m in mask_rows:
        print(f"  K={m['k']:>4}: mIoU one step {m['miou_one_step']:.3f}, reference two steps "
              f"{m['miou_reference_two_step']:.3f} (same clustering)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "views": args.views, "input_size": INPUT, "mask_size": MASK, "pca_dim": PCA_DIM,
                "threads": args.threads, "faiss": faiss.__version__, "torch": torch.__version__,
                "machine": platform.machine(), "processor": platform.processor()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "mask_resize": {
            "pixels_differing": mask_diff, "rows": mask_rows}}, indent=2))
        print(f"wrote {args.json}")


def _print_row(r: dict) -> None:
    d, ref = r["densebench"], r.get("reference")
    print(f"{'images':>6} {'K':>5} {'seeds':>5} | {'ref std+PCA':>11} {'ref k-means':>11} {'ref match':>10} "
          f"{'ref total':>10} | {'db std+PCA':>10} {'db k-means':>10} {'db match':>9} {'db total':>9} | "
          f"{'total x':>8} {'match x':>9} {'|dmIoU| same labels':>19}")
    left = (f"{ref['standardise_pca_s']:>11.2f} {ref['kmeans_s']:>11.2f} {ref['matching_s']:>10.2f} "
            f"{ref['total_s']:>10.2f}") if ref else f"{'-':>11} {'-':>11} {'-':>10} {'-':>10}"
    ratios = (f"{r['ratio_total']:>8.2f} {r['ratio_matching']:>9.0f} {r['max_abs_miou_diff_same_labels']:>19.2e}"
              if ref else f"{'-':>8} {'-':>9} {'-':>19}")
    print(f"{r['images']:>6} {r['k']:>5} {r['seeds']:>5} | {left} | {d['standardise_pca_s']:>10.2f} "
          f"{d['kmeans_s']:>10.2f} {d['matching_s']:>9.3f} {d['clustering_total_s']:>9.2f} | {ratios}")
    if ref:
        print(f"       mIoU per seed, reference pipeline:  {np.round(ref['miou_seeds'], 3).tolist()}")
        print(f"       mIoU per seed, densebench pipeline: {np.round(d['miou_seeds'], 3).tolist()}", flush=True)


def _labels_seed0(features: np.ndarray, cfg: Config, k: int) -> np.ndarray:
    from densebench.kmeans import faiss_kmeans, fit_standard_pca

    tokens = features.reshape(-1, features.shape[-1])
    x = fit_standard_pca(tokens, cfg.pca_dim).transform(tokens)
    return faiss_kmeans(x, k, niter=cfg.kmeans_iters, nredo=cfg.kmeans_restarts, seed=0).labels


if __name__ == "__main__":
    main()
