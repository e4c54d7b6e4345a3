"""Protocol C: frozen K-means clustering / overclustering of val tokens with matching (spec protocols.md §5).

Published recipe (Leopart → NeCo ``eval_overcluster.py``): val split only, images resized to 448, normed
last-layer patch tokens; all val tokens standardised (per-dimension z-score) and PCA'd to 50 dims; faiss
k-means (100 iterations, 5 restarts) for seeds 0..4; each token's cluster nearest-upsampled to the
100x100 mask grid, ignore pixels removed; Hungarian one-to-one matching when K equals the number of
classes, many-to-one (majority class per cluster) otherwise; mIoU pooled over the dataset, mean over seeds.

What is done differently, and why it does not change the numbers:

* Features are extracted once (and cached); every K and seed reuses one standardisation and one PCA.
* The reference matches by scanning all pixels once per (cluster, class) pair (10,500 scans at K=500 on
  VOC). Here the pixel grid is reduced once to (token, class, pixel count) triples — which pixels a
  token's cluster covers is fixed index arithmetic — and each clustering's (class x cluster) confusion
  matrix is one scatter-add over those triples; matching and IoU then come from
  :mod:`densebench.metrics` on that matrix, which yields exactly the reference's pixel counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DatasetFamily, SegmentationDataset, get_family, open_dataset
from ..data.ids import id_provenance
from ..errors import ConfigError, DataError, choices_message
from ..kmeans import StandardPCA, faiss_gpu_available, faiss_kmeans, fit_standard_pca
from ..metrics import segmentation_scores
from ..options import ProtocolConfig, option
from ..pictures import render_label_panels
from ..progress import progress_bar
from ..transforms import ResizeView, normalisation
from .common import Outcome, RunContext, check_input_size, protocol_runner, split_record

MATCHING_CHOICES = ("auto", "hungarian", "many-to-one")
#: The reference VOC loader's batch size; with drop_last=True it clusters 1,440 of the 1,449 val images.
REFERENCE_VAL_BATCH = 32


def parse_clusters(value) -> tuple[str, ...]:
    """``"gt,300,500"`` or ``("gt", 300, 500)`` -> ``("gt", "300", "500")`` (the CLI passes one string)."""
    if isinstance(value, str):
        value = value.split(",")
    elif isinstance(value, (int, np.integer)):
        value = [value]
    return tuple(str(v).strip().lower() for v in value if str(v).strip())


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("voc", "dataset family (set by the benchmark)")
    input_size: int = option(448, "square resize of the images (published: 448); a multiple of the patch size",
                             min=1, max=4096)
    mask_size: int = option(100, "masks and cluster maps are scored at mask_size x mask_size", min=1)
    clusters: tuple[str, ...] = option(("gt", "300", "500"), "comma list of K; gt = the number of classes")
    seeds: int = option(5, "k-means seeds 0..seeds-1; the score is the mean (and std) over seeds", min=1)
    pca_dim: int | None = option(50, "PCA width of the standardised tokens; none = cluster them directly",
                                 min=1, none="none")
    standardise: bool = option(True, "per-dimension z-score over all val tokens before the PCA")
    kmeans_iters: int = option(100, "faiss k-means iterations (niter)", min=1)
    kmeans_restarts: int = option(5, "faiss nredo: best of this many k-means runs per seed", min=1)
    kmeans_max_points_per_centroid: int | None = option(
        256, "faiss' silent subsampling: train on at most K x this many tokens; all = train on every token",
        min=1, none="all")
    matching: str = option("auto", "cluster -> class matching; auto: Hungarian when K == #classes, else "
                                   "many-to-one (the reference code)", choices=MATCHING_CHOICES)
    val_drop_last: bool = option(False, "drop the val images past the last full batch of 32, as the reference "
                                         "VOC loader (1,449 -> 1,440)")
    val_list: str | None = option(None, "file of val ids to cluster (instead of the dataset's val split)")
    normalization: str = option("imagenet", "input normalisation: imagenet (published) or the encoder's own",
                                choices=("imagenet", "encoder"))
    save_maps: str | None = option(None, "folder for image | ground truth | matched cluster map PNGs",
                                   non_semantic=True)
    save_maps_count: int = option(8, "how many val images (the first ones) to draw", min=0, non_semantic=True)
    batch_size: int = option(16, "images per backbone forward", min=1, non_semantic=True)
    num_workers: int | None = option(None, "data-loading worker processes; auto: the usable cores, at most 8",
                                     min=0, none="auto", non_semantic=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clusters", parse_clusters(self.clusters))
        super().__post_init__()

    def check(self) -> None:
        if not self.clusters:
            raise ConfigError("--clusters is empty", hint="e.g. --clusters gt,300,500")
        for c in self.clusters:
            if c != "gt" and not (c.isdigit() and int(c) >= 1):
                raise ConfigError(f"--clusters entry {c!r} is neither 'gt' nor a positive integer",
                                  hint="e.g. --clusters gt,300,500 ('gt' = the number of classes)")


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run of ``model`` records it: nothing here is automatic, so the config itself."""
    return dict(config)


# ---------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested against brute force / the literal reference computation)

def resolve_clusters(clusters: tuple[str, ...], num_classes: int) -> list[tuple[str, int]]:
    """[(label, K)] in the given order, "gt" -> num_classes, duplicates of one K kept once (first label)."""
    out: dict[int, str] = {}
    for c in clusters:
        k = num_classes if c == "gt" else int(c)
        out.setdefault(k, c)
    return [(label, k) for k, label in out.items()]


def matching_for(mode: str, k: int, num_classes: int) -> str:
    """The matching a clustering with ``k`` clusters gets: ``auto`` follows the reference code (Hungarian
    iff K == #classes, many-to-one otherwise, including K < #classes)."""
    if mode not in MATCHING_CHOICES:
        raise ConfigError(choices_message("--matching", mode, MATCHING_CHOICES))
    if mode == "auto":
        return "hungarian" if k == num_classes else "many-to-one"
    return mode


def nearest_source_index(in_size: int, out_size: int) -> torch.Tensor:
    """For each of ``out_size`` output positions, the input position ``F.interpolate(mode='nearest')``
    copies (the reference upsamples cluster maps that way, float scale and all); computed once by
    interpolating the index ramp itself, so it is torch's own rule by construction."""
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)   # float32, as the reference
    return F.interpolate(ramp, size=out_size, mode="nearest").view(out_size).round().long()


def upsample_nearest(maps: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, S, S) integer maps -> (B, out, out) by index gathers (no float round trip, no per-pixel loop)."""
    idx = nearest_source_index(maps.shape[-1], out_size).to(maps.device)
    idy = nearest_source_index(maps.shape[-2], out_size).to(maps.device)
    return maps.index_select(-2, idy).index_select(-1, idx)


@dataclass
class TokenPixelCounts:
    """The scored pixels of every val image, reduced to (token, class, count) triples.

    Pixel (y, x) of image i takes the cluster of token i·S² + iy[y]·S + ix[x] (nearest upsampling), so
    the confusion matrix of any token clustering is a scatter-add of these counts: exact pixel counts
    at the cost of ~one triple per token instead of one scan of all pixels per (cluster, class) pair.
    """

    token: torch.Tensor      # (T,) int64 global token index
    cls: torch.Tensor        # (T,) int64 ground-truth class
    count: torch.Tensor      # (T,) int64 pixels
    num_tokens: int
    num_classes: int

    @classmethod
    def from_masks(cls_, masks, grid: int, num_classes: int, ignore_index: int | None,
                   device: str | torch.device = "cpu", max_elements: int = 1 << 23) -> TokenPixelCounts:
        """``masks``: (N, M, M) uint8 label maps (array-like, e.g. the cache's memmap); ``grid`` = S."""
        dev = torch.device(device)
        n, mh, mw = masks.shape
        iy = nearest_source_index(grid, mh).to(dev)
        ix = nearest_source_index(grid, mw).to(dev)
        local = (iy[:, None] * grid + ix[None, :]).reshape(-1)          # (M*M,) token within the image
        per_image = grid * grid * num_classes
        step = max(1, max_elements // per_image)
        tokens, classes, counts = [], [], []
        for start in range(0, n, step):
            stop = min(n, start + step)
            m = torch.from_numpy(np.array(masks[start:stop])).to(dev).long().reshape(stop - start, -1)
            img = torch.arange(stop - start, device=dev)[:, None]
            keep = m != ignore_index if ignore_index is not None else torch.ones_like(m, dtype=torch.bool)
            labels = m[keep]
            if labels.numel() and int(labels.max()) >= num_classes:
                raise DataError(f"mask label {int(labels.max())} is outside [0, {num_classes}) and is not the "
                                f"ignore index {ignore_index}", hint="check the dataset's masks")
            key = ((img * (grid * grid) + local[None, :]).expand_as(m)[keep] * num_classes + labels)
            hist = torch.bincount(key, minlength=(stop - start) * per_image)
            nz = hist.nonzero().squeeze(1)
            tokens.append(nz // num_classes + start * grid * grid)
            classes.append(nz % num_classes)
            counts.append(hist[nz])
        return cls_(torch.cat(tokens), torch.cat(classes), torch.cat(counts), n * grid * grid, num_classes)

    @property
    def num_pixels(self) -> int:
        return int(self.count.sum())

    def confusion(self, labels, k: int) -> np.ndarray:
        """(num_classes, k) int64 pixel counts of class c in cluster k for per-token cluster ``labels``."""
        lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        lab = lab.to(self.token.device).long()
        if lab.shape != (self.num_tokens,):
            raise ValueError(f"expected {self.num_tokens} token labels, got shape {tuple(lab.shape)}")
        flat = torch.zeros(self.num_classes * k, dtype=torch.int64, device=self.token.device)
        flat.index_add_(0, self.cls * k + lab[self.token], self.count)
        return flat.view(self.num_classes, k).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Clustering and scoring (everything after the forward pass)

def downsample_masks(masks: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """(N, H, W) uint8 label maps -> (N, size, size) by nearest neighbour, chunked over a memory map."""
    if masks.shape[1:] == (size, size):
        return np.asarray(masks)
    out = np.empty((masks.shape[0], size, size), dtype=np.uint8)
    for start in range(0, masks.shape[0], chunk):
        block = torch.from_numpy(np.array(masks[start:start + chunk]))
        out[start:start + chunk] = F.interpolate(block[:, None].float(), size=(size, size),
                                                 mode="nearest")[:, 0].to(torch.uint8).numpy()
    return out


def check_cluster_counts(ks: list[tuple[str, int]], n_tokens: int, where: str) -> None:
    """Every K must be at most the number of tokens clustered (k-means needs a point per centroid)."""
    too_many = [k for _, k in ks if k > n_tokens]
    if too_many:
        raise ConfigError(f"--clusters {too_many[0]} exceeds the {n_tokens} val tokens to cluster ({where})",
                          hint=f"use K <= {n_tokens}, a larger --input-size, or more val images")


@dataclass
class ClusteringOutcome:
    """What :func:`cluster_and_score` measured: metrics plus everything the result records about how."""

    metrics: dict
    ks: list[tuple[str, int]]
    modes: dict[int, str]
    pca: StandardPCA
    kmeans: dict
    num_scored_pixels: int
    timings: dict[str, float]
    #: K -> (first images' token cluster ids (n, S, S), seed-0 cluster -> class mapping), when asked for.
    maps: dict[int, tuple[np.ndarray, np.ndarray]]


def cluster_and_score(features, masks, *, num_classes: int, ignore_index: int | None, class_names: list[str] | None,
                      config: Config, ignored_class: int | None = None, device: str | torch.device = "cpu",
                      progress: bool = False, keep_maps: int = 0) -> ClusteringOutcome:
    """Everything after the forward pass: one z-score + PCA, then per K and seed a faiss k-means, one
    confusion matrix and its matching. ``features`` (N, S, S, D) and ``masks`` (N, M, M) may be memmaps.

    ``ignored_class``: the family's class that is also the ignore label yet kept in the published mean
    (ADE20K's 0, IoU 0); its family also gets ``miou@<K>_<C-1>``, the mean over the other classes.
    """
    n, s = features.shape[0], features.shape[1]
    ks = resolve_clusters(config.clusters, num_classes)
    check_cluster_counts(ks, n * s * s, f"{n} images x {s}x{s} tokens")
    modes = {k: matching_for(config.matching, k, num_classes) for _, k in ks}

    t0 = time.perf_counter()
    tokens = features.reshape(-1, features.shape[-1])
    pca = fit_standard_pca(tokens, config.pca_dim, standardise=config.standardise, device=device)
    x = pca.transform(tokens, device=device)
    t_pca = time.perf_counter()
    pixels = TokenPixelCounts.from_masks(masks, s, num_classes, ignore_index, device=device)
    gpu = str(device).startswith("cuda") and faiss_gpu_available()

    per_k: dict[int, list[dict]] = {k: [] for _, k in ks}
    runs: list[dict] = []
    info: dict = {}
    maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    kmeans_s = matching_s = 0.0
    with progress_bar("k-means", total=len(ks) * config.seeds, enabled=progress) as advance:
        for _, k in ks:
            for seed in range(config.seeds):
                km = faiss_kmeans(x, k, niter=config.kmeans_iters, nredo=config.kmeans_restarts, seed=seed,
                                  max_points_per_centroid=config.kmeans_max_points_per_centroid, gpu=gpu)
                kmeans_s += km.seconds
                tm = time.perf_counter()
                conf = pixels.confusion(km.labels, k)
                scores = segmentation_scores(conf, matching=modes[k], class_names=class_names,
                                             ignore_class=ignored_class)
                matching_s += time.perf_counter() - tm
                per_k[k].append(scores)
                info = info or km.info
                runs.append({"k": k, "seed": seed, "objective": km.objective, "seconds": round(km.seconds, 4),
                             "training_points": km.info["training_points"], "miou": scores["miou"]})
                if seed == 0 and keep_maps:
                    m = min(keep_maps, n)
                    maps[k] = (km.labels[: m * s * s].reshape(m, s, s), np.asarray(scores["mapping"]))
                advance(1)
    kmeans = {key: v for key, v in info.items()
              if key not in ("k", "training_points", "subsampled", "below_min_points_per_centroid")}
    kmeans["parameters"] = {key: v for key, v in kmeans["parameters"].items() if key != "seed"}
    kmeans["seeds"] = list(range(config.seeds))
    kmeans["training_points"] = {str(r["k"]): r["training_points"] for r in runs}
    kmeans["runs"] = runs
    return ClusteringOutcome(
        metrics=_metrics(ks, per_k, num_classes, ignored_class), ks=ks, modes=modes, pca=pca, kmeans=kmeans,
        num_scored_pixels=pixels.num_pixels, maps=maps,
        timings={"standardise_pca_s": t_pca - t0, "kmeans_s": kmeans_s, "matching_s": matching_s,
                 "clustering_total_s": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------------
# The recipe

run = protocol_runner(__name__, "-overcluster", "Cluster the val tokens of ``encoder`` for every K and seed")


@dataclass
class Prepared:
    family: DatasetFamily
    val: SegmentationDataset          # the images clustered (after --val-drop-last)
    n_available: int                  # val images before --val-drop-last
    mean: tuple
    std: tuple
    ids: dict = field(default_factory=dict)   # where the val ids came from (id_provenance)


def prepare(ctx: RunContext) -> Prepared:
    """Open the val split (minus the reference's dropped last batch if asked); refuse an impossible K."""
    config = ctx.config
    check_input_size(config.input_size, ctx.encoder)
    mean, std = normalisation(config.normalization, ctx.encoder)
    family = get_family(config.dataset)
    val = open_dataset(family, ctx.data_root, family.val_split, id_list=config.val_list)
    family = family.for_classes(val.num_classes, val.ignore_index)
    ids = id_provenance(val=val)
    n_available = len(val)
    if config.val_drop_last:
        val = val.subset(val.ids[: n_available // REFERENCE_VAL_BATCH * REFERENCE_VAL_BATCH])
    if len(val) == 0:
        raise ConfigError(f"{family.name}/{family.val_split}: no val images to cluster ({n_available} available"
                          f"{', all dropped by --val-drop-last' if config.val_drop_last else ''})")
    s = config.input_size // ctx.encoder.patch_size
    # Refuse an impossible K before paying for the forward pass.
    check_cluster_counts(resolve_clusters(config.clusters, val.num_classes), len(val) * s * s,
                         f"{len(val)} images x {s}x{s} tokens at --input-size {config.input_size}")
    return Prepared(family, val, n_available, mean, std, ids)


def extract_features(ctx: RunContext, prep: Prepared) -> dict:
    """Val patch grids. Masks are stored at the input size (448 -> mask_size in a second nearest step, as
    the reference does), so this entry is the one the linear probe's val set uses: one val pass serves both."""
    view = ResizeView(ctx.config.input_size, mean=prep.mean, std=prep.std)
    out = ctx.extract(prep.val, view, desc="val features")
    return {"features": out["features"], "masks": downsample_masks(out["masks"], ctx.config.mask_size)}


def score(ctx: RunContext, prep: Prepared, feats: dict) -> Outcome:
    """One z-score + PCA, a faiss k-means per K and seed, matching; then the cluster-map pictures."""
    config, val, family = ctx.config, prep.val, prep.family
    C, ignore, ignored_class = val.num_classes, val.ignore_index, family.ignored_class
    s = config.input_size // ctx.encoder.patch_size
    n_maps = min(config.save_maps_count, len(val)) if config.save_maps else 0
    oc = cluster_and_score(feats["features"], feats["masks"], num_classes=C, ignore_index=ignore,
                           class_names=val.class_names, config=config, ignored_class=ignored_class,
                           device=ctx.device, progress=ctx.progress, keep_maps=n_maps)

    t_maps = time.perf_counter()
    artifacts: list[str] = []
    if n_maps:
        panels = []
        for label, k in oc.ks:
            lab, mapping = oc.maps[k]
            up = upsample_nearest(torch.from_numpy(mapping[lab]), config.mask_size).numpy()
            panels.append((f"K={'gt (' + str(k) + ')' if label == 'gt' else k} {oc.modes[k]}", up))
        images = [val[i][:2] for i in range(n_maps)]
        artifacts = render_label_panels(Path(config.save_maps), ctx.benchmark, images,
                                        np.asarray(feats["masks"][:n_maps]), panels, ignore,
                                        class_names=val.class_names)
    save_maps_s = time.perf_counter() - t_maps

    notes = {
        "miou@<K>": "mean over seeds of the mIoU (pooled over val at the mask size, "
                    f"{family.mean_note()}) after matching_used[K]; _std = population std over seeds (ddof=0)",
        "miou@gt": f"the K = #classes ({C}) clustering, Hungarian-matched under auto matching",
        "per_class_iou": f"K = #classes ({C}), mean over seeds"}
    if ignored_class is not None:
        notes[f"miou@<K>_{C - 1}"] = f"mean over the {C - 1} classes other than the ignored class {ignored_class}"
    derived = {
        "clusters_resolved": {label: k for label, k in oc.ks},
        "matching_used": {str(k): oc.modes[k] for _, k in oc.ks},
        "tokens_per_image": s * s, "num_tokens": len(val) * s * s, "num_scored_pixels": oc.num_scored_pixels,
        "mean": list(prep.mean), "std": list(prep.std), "features": oc.pca.describe(), "kmeans": oc.kmeans,
        "cluster_upsampling": f"nearest {s}x{s} -> {config.mask_size}x{config.mask_size} "
                              "(torch F.interpolate rule)",
        "mask_resize": f"nearest, original -> {config.input_size}x{config.input_size} -> "
                       f"{config.mask_size}x{config.mask_size} (two steps, as the reference)",
        "metric_notes": notes}
    timings = {key: oc.timings[key] for key in ("standardise_pca_s", "kmeans_s", "matching_s")}
    return Outcome(metrics=oc.metrics, derived=derived,
                   dataset=split_record(family.name, val, n_val=prep.n_available, n_val_clustered=len(val),
                                        **prep.ids),
                   seeds={"kmeans": list(range(config.seeds))}, timings={**timings, "save_maps_s": save_maps_s},
                   artifacts=artifacts)


def _metrics(ks: list[tuple[str, int]], per_k: dict[int, list[dict]], num_classes: int,
             ignored_class: int | None) -> dict:
    metrics: dict = {}
    for _label, k in ks:
        runs = per_k[k]
        miou = np.array([r["miou"] for r in runs])
        names = [f"miou@{k}"] + (["miou@gt"] if k == num_classes else [])
        for name in names:
            metrics[name] = float(miou.mean())
            metrics[f"{name}_std"] = float(miou.std())
        metrics[f"miou@{k}_seeds"] = [float(v) for v in miou]
        metrics[f"pixel_accuracy@{k}"] = float(np.mean([r["pixel_accuracy"] for r in runs]))
        if ignored_class is not None:
            key = f"miou_{num_classes - 1}"
            metrics[f"miou@{k}_{num_classes - 1}"] = float(np.mean([r[key] for r in runs]))
        if k == num_classes:
            classes = list(runs[0]["per_class_iou"])
            metrics["per_class_iou"] = {c: float(np.mean([r["per_class_iou"][c] for r in runs])) for c in classes}
    return metrics
