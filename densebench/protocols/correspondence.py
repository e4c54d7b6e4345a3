"""Protocol D: SPair-71k semantic keypoint correspondence (probe3d; spec protocols.md §6).

Each image of the evaluated pairs is padded to a square (bottom/right, white), resized to the input
size and pushed through the encoder once; its patch features (last block without the final norm by
default) are L2-normalised per location and cached. Every pair is then matched from the cache, a
category at a time: each image's grid is read once per category and all the category's pairs are
matched from it (``plan_reads`` bounds the memory), in batches. The source keypoints' descriptors are
sampled bilinearly (``grid_sample``, align_corners=True) from the source grid, the nearest neighbour
(argmax of the dot product) over the target grid gives the predicted cell, and a keypoint is correct
when its error is below alpha times the longest side of the target bounding box. Only keypoints
visible in both images count. PCK pools keypoints within a category, then takes the unweighted mean
over categories, for all pairs and per viewpoint bucket.

The reference forwards both images again for every pair and every bucket (about 28k forwards at 800²
for the published subset); here each image is forwarded once, whatever the number of pairs, buckets,
thresholds or matching options.

Pair subset: for each category (the headline number) and each (category, viewpoint bucket), the pair
names are sorted and shuffled with ``random.Random(seed)`` (published seed 20), and the first
``pairs_per_category`` are kept. The reference shuffles in ``glob`` order, which depends on the file
system; sorting first makes the subset reproducible everywhere (and equal to the reference's wherever
its glob happens to return sorted names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import get_family, open_dataset
from ..errors import ConfigError, DataError
from ..metrics import PCKAccumulator, threshold_label
from ..options import ProtocolConfig, option
from ..paths import slug
from ..pictures import draw_matches
from ..progress import progress_bar
from ..transforms import SquarePadView, normalisation
from .common import Outcome, RunContext, check_input_size, protocol_runner

SPAIR_SPLITS = ("trn", "val", "test")
PCK_NORMS = ("bbox", "image")
PATCH_PADDINGS = ("symmetric", "none")
#: The buckets of SPair's ``viewpoint_variation`` annotation.
VIEWPOINT_BUCKETS = (0, 1, 2)


def _parse_thresholds(value) -> tuple[float, ...]:
    """'0.05,0.10' / ('0.05', '0.1') / (0.05, 0.1) -> (0.05, 0.1); ConfigError naming the bad entry."""
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value if isinstance(value, Sequence) else [value])
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            alpha = float(text)
        except ValueError:
            raise ConfigError(f"--thresholds entry {text!r} is not a number",
                              hint="give PCK thresholds as a comma list, e.g. --thresholds 0.05,0.10,0.15"
                              ) from None
        if not 0 < alpha <= 1:
            raise ConfigError(f"--thresholds entry {alpha} is outside (0, 1]",
                              hint="PCK thresholds are fractions of the bounding box, e.g. 0.05,0.10,0.15")
        out.append(alpha)
    if not out:
        raise ConfigError("--thresholds is empty", hint="e.g. --thresholds 0.10")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("spair", "dataset family (set by the benchmark)", choices=("spair",))
    split: str = option("test", "split whose pairs are evaluated (published: the 12,234 test pairs, before "
                                "subsampling)", choices=SPAIR_SPLITS)
    input_size: int = option(800, "side of the square the padded image is resized to", min=1, max=4096)
    patch_padding: str = option("symmetric", "input not a multiple of the patch: zero-pad symmetrically "
                                             "(probe3d) or refuse", choices=PATCH_PADDINGS)
    square_fill: int = option(255, "pixel value of the bottom/right padding to a square (published: 255, "
                                   "white)", min=0, max=255)
    feature_norm: bool = option(False, "apply the encoder's final norm (published: off, raw last block)")
    pairs_per_category: int | None = option(200, "pairs kept per category and per (category, viewpoint "
                                                 "bucket)", min=1, none="all")
    pair_list: str | None = option(None, "file of pair names to evaluate exactly (no subsampling)")
    seed: int = option(20, "seed of the pair-subset shuffle (published: random.seed(20))")
    thresholds: tuple[float, ...] = option((0.10,), "PCK alphas in (0, 1], a comma list, e.g. 0.05,0.10,0.15")
    pck_norm: str = option("bbox", "PCK normaliser: alpha * longest side of the target bounding box (bbox, "
                                   "published) or of the target image", choices=PCK_NORMS)
    cell_centre: bool = option(False, "predicted location = the matched cell's centre, padding-aware "
                                      "(published: its top-left corner)")
    mutual: bool = option(False, "keep only mutual nearest neighbours (the others count as wrong)")
    upsample: int = option(1, "bilinear feature upsampling factor before matching (published: 1)",
                           min=1, max=16)
    integer_keypoints: bool = option(False, "probe3d's int-tensor truncation of keypoints at the input size")
    save_matches: str | None = option(None, "folder for match pictures", non_semantic=True)
    save_matches_count: int = option(8, "how many pairs (the first ones) to draw", min=0, non_semantic=True)
    batch_size: int = option(8, "images per backbone forward", min=1, non_semantic=True)
    num_workers: int | None = option(None, "data-loading worker processes; auto: the usable cores, at most 8",
                                     min=0, none="auto", non_semantic=True)
    pair_batch: int = option(0, "pairs matched per batch; 0 = sized automatically", min=0, non_semantic=True)
    grid_budget_mb: float = option(4096.0, "MiB of image feature grids held on the device while a category is "
                                           "matched; a larger category is matched in image blocks (at least "
                                           "two grids are held)", min=0, min_exclusive=True, non_semantic=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", _parse_thresholds(self.thresholds))
        super().__post_init__()

    def check(self) -> None:
        if self.pair_list is not None and not Path(self.pair_list).expanduser().is_file():
            raise ConfigError(f"--pair-list {self.pair_list} does not exist",
                              hint="give a text file with one SPair pair name per line")


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run records it: an explicit pair list replaces the per-category subsampling."""
    config = dict(config)
    if config.get("pair_list"):
        config["pairs_per_category"] = None
    return config


# ---------------------------------------------------------------------------------------------------
# Pair subset

def select_pairs(pairs: Sequence[Mapping], per_category: int | None, seed: int) -> dict[object, list[int]]:
    """Indices of the evaluated pairs: ``{"all": [...], 0: [...], 1: [...], 2: [...]}``.

    "all" holds up to ``per_category`` pairs of each category; bucket ``b`` up to ``per_category`` pairs
    of each category with ``viewpoint_variation == b``, drawn independently as the reference does (it
    builds one dataset per bucket). Within a group: sort by pair name, shuffle with a fresh
    ``random.Random(seed)``, keep the first ``per_category``. The result does not depend on the order of
    ``pairs``. Indices are returned sorted by pair name.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(("all", p["category"]), []).append(i)
        groups.setdefault((int(p["viewpoint_variation"]), p["category"]), []).append(i)
    out: dict[object, list[int]] = {}
    for (bucket, _cat), members in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        members = sorted(members, key=lambda i: pairs[i]["name"])
        if per_category is not None and len(members) > per_category:
            random.Random(seed).shuffle(members)
            members = members[:per_category]
        out.setdefault(bucket, []).extend(members)
    return {b: sorted(idx, key=lambda i: pairs[i]["name"]) for b, idx in out.items()}


# ---------------------------------------------------------------------------------------------------
# Geometry and matching (pure functions, unit-tested against brute force)

@dataclass(frozen=True)
class Geometry:
    """Where feature cells sit in an image, in units of the padded square's side (spec §6.3-6.4).

    ``input_size``: side of the resized square; ``padded_size``/``offset``: the encoder input after the
    symmetric patch padding; ``grid``: cells per side of the (possibly upsampled) feature map.
    """

    input_size: int
    padded_size: int
    offset: int
    grid: int

    def cell_location(self, flat_index: torch.Tensor, cell_centre: bool) -> torch.Tensor:
        """Flat cell indices (...,) -> (..., 2) (x, y) in units of the square side.

        Published (``cell_centre=False``): (col, row) / grid, the top-left corner of the cell, measured as
        if the grid covered the unpadded square. ``cell_centre=True``: the cell's centre in the image,
        accounting for the patch-multiple padding.
        """
        row = torch.div(flat_index, self.grid, rounding_mode="floor").to(torch.float64)
        col = (flat_index % self.grid).to(torch.float64)
        xy = torch.stack([col, row], dim=-1)
        if not cell_centre:
            return xy / self.grid
        step = self.padded_size / self.grid
        return ((xy + 0.5) * step - self.offset) / self.input_size

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def unit_keypoints(xy: np.ndarray, side: float, input_size: int, integer: bool = False) -> np.ndarray:
    """Pixel keypoints -> units of the padded square's side (x / max(H, W)).

    ``integer=True`` reproduces probe3d, which keeps keypoints in an int tensor: the annotation is
    truncated to whole pixels and so is its position at the input size.
    """
    xy = np.nan_to_num(np.asarray(xy, dtype=np.float64), nan=0.0)
    if not integer:
        return xy / side
    return np.trunc(np.trunc(xy) * input_size / side) / input_size


def upsample_features(feats: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, S, S, D) unit features -> (B, fS, fS, D), bilinear (align_corners=False), re-normalised."""
    if factor == 1:
        return feats
    x = F.interpolate(feats.permute(0, 3, 1, 2), scale_factor=factor, mode="bilinear", align_corners=False)
    return F.normalize(x, dim=1).permute(0, 2, 3, 1)


def match_keypoints(src: torch.Tensor, trg: torch.Tensor, src_uv: torch.Tensor, geometry: Geometry, *,
                    cell_centre: bool = False, mutual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour transfer of source keypoints into target images, a batch of pairs at once.

    src, trg: (B, S, S, D) L2-normalised feature grids; src_uv: (B, K, 2) source keypoints (x, y) in
    units of the square side. Returns the predicted target locations (B, K, 2) in the same units
    (float64) and a (B, K) bool tensor, True where the match is mutual (all True without ``mutual``).

    Source descriptors are sampled with grid_sample(bilinear, align_corners=True) at 2u - 1 (so u = 0
    and u = 1 hit the first and last cell centres, as published); the match is the argmax of the dot
    product over the target cells (first index on ties). A match is mutual when the target cell's own
    nearest source cell is one of the (up to four) cells the source descriptor was interpolated from.
    """
    b, s, _, d = src.shape
    grid = (src_uv.to(src.dtype) * 2 - 1)[:, None]                       # (B, 1, K, 2)
    desc = F.grid_sample(src.permute(0, 3, 1, 2), grid, mode="bilinear", align_corners=True)
    desc = desc[:, :, 0].transpose(1, 2)                                 # (B, K, D)
    trg_flat = trg.reshape(b, s * s, d)
    heat = torch.bmm(desc, trg_flat.transpose(1, 2))                     # (B, K, S²)
    best = heat.argmax(dim=-1)                                           # (B, K)
    pred = geometry.cell_location(best, cell_centre)
    if not mutual:
        return pred, torch.ones(best.shape, dtype=torch.bool, device=best.device)
    matched = torch.gather(trg_flat, 1, best[..., None].expand(-1, -1, d))    # (B, K, D)
    back = torch.bmm(matched, src.reshape(b, s * s, d).transpose(1, 2)).argmax(dim=-1)
    back_xy = torch.stack([back % s, torch.div(back, s, rounding_mode="floor")], dim=-1).to(torch.float64)
    g = src_uv.to(torch.float64) * (s - 1)
    ok = ((back_xy - g).abs() < 1).all(dim=-1)
    return pred, ok


# ---------------------------------------------------------------------------------------------------
# Data plumbing

class PairImages:
    """The images used by the selected pairs, as the dataset interface ``features.extract`` expects.

    Masks are never read (the protocol does not use them); ``manifest_hash`` covers the image ids and
    file sizes, so a different pair subset gets its own cache entry.
    """

    def __init__(self, spair, ids: Sequence[str]):
        self.spair = spair
        self.ids = list(ids)
        self.name = "spair"
        self.split = spair.split
        self.synthetic = bool(spair.synthetic)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        id_ = self.ids[i]
        return id_, self.spair.image(id_), np.zeros((1, 1), np.uint8)

    def manifest_hash(self) -> str:
        h = hashlib.sha256(f"spair-images|{self.split}".encode())
        for id_ in self.ids:
            h.update(id_.encode())
            try:
                h.update(str(self.spair.image_path(id_).stat().st_size).encode())
            except FileNotFoundError:
                h.update(b"missing")
        return h.hexdigest()


class UnitFeatureReducer:
    """Keep each image's patch grid L2-normalised per location, as float16."""

    def describe(self) -> dict:
        return {"reducer": "l2-unit-f16"}

    def __call__(self, feats: torch.Tensor, masks: torch.Tensor,
                 indices: torch.Tensor) -> dict[str, np.ndarray]:
        return {"features": F.normalize(feats.float(), dim=-1).to(torch.float16).cpu().numpy()}


@dataclass
class PairBatch:
    """Keypoint arrays of a batch of pairs, padded to the batch's largest keypoint count."""

    src_uv: np.ndarray       # (B, K, 2) source keypoints, units of the source square side
    trg_uv: np.ndarray       # (B, K, 2) true target keypoints, units of the target square side
    visible: np.ndarray      # (B, K) visible in both images
    scale: np.ndarray        # (B,) PCK normaliser in units of the target square side


def pair_arrays(pairs: Sequence[Mapping], input_size: int, pck_norm: str, integer: bool) -> PairBatch:
    """Stack the keypoints of ``pairs`` (reader dicts) into unit coordinates with their PCK scale."""
    k = max(len(p["src_kps"]) for p in pairs)
    n = len(pairs)
    src_uv, trg_uv = np.zeros((n, k, 2)), np.zeros((n, k, 2))
    vis = np.zeros((n, k), dtype=bool)
    scale = np.zeros(n)
    for i, p in enumerate(pairs):
        src_side, trg_side = float(max(p["src_size"])), float(max(p["trg_size"]))
        m = len(p["src_kps"])
        src_uv[i, :m] = unit_keypoints(p["src_kps"], src_side, input_size, integer)
        trg_uv[i, :m] = unit_keypoints(p["trg_kps"], trg_side, input_size, integer)
        vis[i, :m] = np.asarray(p["src_vis"], bool) & np.asarray(p["trg_vis"], bool)
        if pck_norm == "bbox":
            x1, y1, x2, y2 = p["trg_bbox"]
            scale[i] = max(x2 - x1, y2 - y1) / trg_side
        else:
            scale[i] = 1.0
        if vis[i].any() and not scale[i] > 0:
            raise DataError(f"SPair pair {p['name']}: target bounding box {p['trg_bbox']} is empty, "
                            "so PCK@bbox is undefined",
                            hint="check its PairAnnotation JSON or use --pck-norm image")
    return PairBatch(src_uv, trg_uv, vis, scale)


def _auto_pair_batch(grid: int, dim: int) -> int:
    """Pairs per matching batch so one batch's target grids hold about 32M floats."""
    return max(1, min(256, int(32e6 // (grid * grid * max(1, dim)))))


@dataclass(frozen=True)
class ReadStep:
    """One step of the matching plan: hold these image blocks' grids, match these pairs from them."""

    category: str
    blocks: tuple[tuple[int, ...], ...]   # feature rows, in blocks; a block is read (and upsampled) as one array
    pairs: tuple[int, ...]                # positions in the pair list given to plan_reads
    blocked: bool = False                 # the category is over the budget: one of several image-block steps


def plan_reads(pair_rows: Sequence[tuple[str, int, int]], max_images: int) -> list[ReadStep]:
    """Which feature grids to hold while matching which pairs: each image read once per category.

    ``pair_rows``: (category, source row, target row) of every pair to match. Per category (in sorted
    order; pairs in the given order), all the images its pairs use form one block, read once, and every
    pair of the category is matched from it. A category using more than ``max_images`` images (the device
    budget, at least 2: a pair needs two grids) is matched in image blocks of ``max_images // 2`` sorted
    rows instead: for each block a, block a stays held while each block b >= a that shares pairs with it
    is read in turn, so at most two blocks (``max_images`` grids) are held at once and block b is re-read
    once per earlier block it shares pairs with. A step's pairs keep their given order.
    """
    by_cat: dict[str, list[int]] = {}
    for pos, (cat, _src, _trg) in enumerate(pair_rows):
        by_cat.setdefault(cat, []).append(pos)
    steps = []
    for cat in sorted(by_cat):
        members = by_cat[cat]
        rows = sorted({r for pos in members for r in pair_rows[pos][1:]})
        if len(rows) <= max_images:
            steps.append(ReadStep(cat, (tuple(rows),), tuple(members)))
            continue
        h = max(1, max_images // 2)
        blocks = [tuple(rows[k:k + h]) for k in range(0, len(rows), h)]
        block_of = {r: k // h for k, r in enumerate(rows)}
        groups: dict[tuple[int, int], list[int]] = {}
        for pos in members:
            a, b = sorted((block_of[pair_rows[pos][1]], block_of[pair_rows[pos][2]]))
            groups.setdefault((a, b), []).append(pos)
        for a, b in sorted(groups):
            held = (blocks[a],) if a == b else (blocks[a], blocks[b])
            steps.append(ReadStep(cat, held, tuple(groups[(a, b)]), blocked=True))
    return steps



# ---------------------------------------------------------------------------------------------------
# The recipe

run = protocol_runner(__name__, "-correspondence",
                      "Evaluate ``encoder`` with the probe3d SPair-71k correspondence protocol")


@dataclass
class Prepared:
    spair: object                       # the SPair reader of the split (pairs, images)
    pairs: list[dict]
    subsets: dict[object, list[int]]    # select_pairs: {"all": [...], 0: [...], 1: [...], 2: [...]}
    used: list[int]                     # every evaluated pair, sorted by name
    images: PairImages                  # the images those pairs use, each forwarded once
    view: SquarePadView
    mean: tuple
    std: tuple


def prepare(ctx: RunContext) -> Prepared:
    """Open the split's pairs, draw the evaluated subset and list the images it needs."""
    config = ctx.config
    if config.pair_list:
        ctx.config = config = dataclasses.replace(config, pairs_per_category=None)
    if config.patch_padding == "none":
        check_input_size(config.input_size, ctx.encoder, " or --patch-padding symmetric")
    mean, std = normalisation("imagenet")
    spair = open_dataset(get_family(config.dataset), ctx.data_root, config.split,
                         id_list=str(Path(config.pair_list).expanduser()) if config.pair_list else None)
    pairs = spair.pairs
    if not pairs:
        raise DataError(f"SPair-71k {config.split}: no pairs to evaluate under {spair.root}",
                        hint="check the split list (Layout/large/<split>.txt) or --pair-list")
    subsets = select_pairs(pairs, config.pairs_per_category, config.seed)
    used = sorted(set().union(*subsets.values()), key=lambda i: pairs[i]["name"])
    image_ids = sorted({pairs[i][side] for i in used for side in ("src_id", "trg_id")})
    patch = ctx.encoder.patch_size if config.patch_padding == "symmetric" else 1
    view = SquarePadView(config.input_size, patch=patch, fill=config.square_fill, mean=mean, std=std)
    return Prepared(spair, pairs, subsets, used, PairImages(spair, image_ids), view, mean, std)


def extract_features(ctx: RunContext, prep: Prepared) -> np.ndarray:
    """One forward per image: (N, S, S, D) unit-norm float16 grids, rows in ``prep.images.ids`` order."""
    return ctx.extract(prep.images, prep.view, reducer=UnitFeatureReducer(), norm=ctx.config.feature_norm,
                       desc="SPair image features")["features"]


def score(ctx: RunContext, prep: Prepared, feats_np: np.ndarray) -> Outcome:
    """Match every evaluated pair from the cached grids, a category at a time; PCK per category, overall,
    per bucket."""
    config, pairs, used = ctx.config, prep.pairs, prep.used
    s, dim = int(feats_np.shape[1]) * config.upsample, int(feats_np.shape[-1])
    geometry = Geometry(config.input_size, prep.view.padded_size, prep.view.offset, s)
    chunk = config.pair_batch or _auto_pair_batch(s, dim)
    matched = _match_pairs(ctx, prep, feats_np, geometry, chunk)
    preds, mutual_ok, arrays = matched.preds, matched.mutual_ok, matched.arrays

    def accumulate(indices: Sequence[int], by: tuple[str, ...]) -> PCKAccumulator:
        acc = PCKAccumulator(config.thresholds, by=by)
        for i in indices:
            a = arrays[i]
            pred = np.where(mutual_ok[i][:, None], preds[i], np.inf)   # a rejected match is never correct
            acc.update(pred, a.trg_uv, float(a.scale[0]), a.visible, category=pairs[i]["category"],
                       bucket=int(pairs[i]["viewpoint_variation"]))
        return acc

    subsets = prep.subsets
    overall = accumulate(subsets["all"], ("category",)).compute()
    bucket_idx = [i for b in VIEWPOINT_BUCKETS for i in subsets.get(b, [])]
    by_bucket = accumulate(bucket_idx, ("category", "viewpoint")).compute() if bucket_idx else {}
    metrics: dict = {}
    for alpha in config.thresholds:
        name = f"pck@{threshold_label(alpha)}"
        metrics[name] = overall[name]
        for b in VIEWPOINT_BUCKETS:
            if f"{name}_vp{b}" in by_bucket:
                metrics[f"{name}_vp{b}"] = by_bucket[f"{name}_vp{b}"]
        metrics[f"per_category_{name}"] = overall["per_category"][name]
    if config.mutual:
        vis = np.concatenate([arrays[i].visible for i in subsets["all"]])
        ok = np.concatenate([mutual_ok[i] for i in subsets["all"]])
        metrics["mutual_match_rate"] = float(100.0 * ok[vis].mean()) if vis.any() else 0.0

    artifacts = _draw(config, prep, preds, mutual_ok, arrays) if config.save_matches else []
    counts = {str(b): len(v) for b, v in subsets.items()}
    names_hash = hashlib.sha256("\n".join(pairs[i]["name"] for i in used).encode()).hexdigest()[:16]
    derived = {
        "layer": ctx.encoder.layer, "mean": list(prep.mean), "std": list(prep.std),
        "geometry": geometry.describe(), "feature_grid": int(feats_np.shape[1]), "pair_batch": chunk,
        "pairs": len(used), "grid_reads": matched.grid_reads, "grid_read_bytes": matched.grid_read_bytes,
        "grid_blocked_categories": matched.blocked_categories,
        "pair_selection": {
            "rule": "explicit --pair-list" if config.pair_list else
                    "per category and per (category, viewpoint bucket): sort pair names, "
                    "random.Random(seed).shuffle, keep the first pairs_per_category",
            "seed": config.seed, "pairs_hash": names_hash, "counts": counts},
        "metric_notes": {
            "pck": "percentage of keypoints visible in both images with error < alpha * "
                   + ("longest side of the target bounding box" if config.pck_norm == "bbox" else
                      "longest side of the target image")
                   + "; pooled per category, unweighted mean over categories",
            "pck_vp": "same, on the pairs drawn per viewpoint-variation bucket (0 small, 1 medium, 2 large)",
            "predicted_location": "cell centre (padding-aware)" if config.cell_centre else
                                  "top-left cell corner col/grid (published)"}}
    spair = prep.spair
    dataset = {"name": "spair", "manifest_hash": prep.images.manifest_hash(),
               "synthetic": bool(spair.synthetic), "split": config.split,
               "id_source": spair.extra.get("id_source"), "n_pairs_split": len(pairs),
               "n_pairs_evaluated": len(used), "n_images": len(prep.images),
               "keypoints_outside_image": int(getattr(spair, "out_of_image", 0)),
               "visible_keypoints": overall["num_keypoints"]}
    return Outcome(metrics=metrics, derived=derived, dataset=dataset, seeds={"pair_selection": config.seed},
                   artifacts=artifacts)


@dataclass
class Matched:
    """Per evaluated pair (keyed by its index in ``Prepared.pairs``): predictions and keypoint arrays;
    and how many feature grids were read from the cache to get them."""

    preds: dict[int, np.ndarray]        # (K, 2) predicted target keypoints, units of the target square side
    mutual_ok: dict[int, np.ndarray]    # (K,) the match is mutual (all True without --mutual)
    arrays: dict[int, PairBatch]
    grid_reads: int                     # grids read from the cache (one per category and image, unblocked)
    grid_read_bytes: int                # their bytes (float16, as cached)
    blocked_categories: int             # categories over --grid-budget-mb, matched in image blocks


def _match_pairs(ctx: RunContext, prep: Prepared, feats_np: np.ndarray, geometry: Geometry,
                 chunk: int) -> Matched:
    """Match every evaluated pair, holding each category's image grids on the device (:func:`plan_reads`).

    A grid is read from the (memory-mapped) cache, moved to the device and upsampled once per category,
    not once per pair. Memory bound: the held grids (float16 as cached, float32 once upsampled) stay
    within ``--grid-budget-mb`` (or two grids, the least a pair needs); a category over the budget is
    matched in image blocks, re-reading a block once per earlier block it shares pairs with. On top of the
    held grids: one batch of ``chunk`` source and target grids in float32, and while a block is upsampled,
    ``chunk`` images' float16 -> float32 intermediates. Batches are stacked from the held grids in float32,
    exactly as the per-pair recipe forms them, so the predictions do not depend on the plan.
    """
    config, pairs, used = ctx.config, prep.pairs, prep.used
    row_of = {id_: r for r, id_ in enumerate(prep.images.ids)}
    dev = torch.device(ctx.device)
    per_image = feats_np[0].size * (2 if config.upsample == 1 else 4 * config.upsample ** 2)
    steps = plan_reads([(pairs[i]["category"], row_of[pairs[i]["src_id"]], row_of[pairs[i]["trg_id"]])
                        for i in used], max(2, int(config.grid_budget_mb * 2 ** 20 // per_image)))
    out = Matched({}, {}, {}, 0, 0, len({st.category for st in steps if st.blocked}))

    def read(rows: tuple[int, ...]) -> torch.Tensor:
        """(B, S, S, D) grids of these feature rows on the device: float16 as cached, float32 upsampled."""
        block = torch.from_numpy(np.asarray(feats_np[list(rows)])).to(dev)
        out.grid_reads += len(rows)
        out.grid_read_bytes += block.numel() * block.element_size()
        if config.upsample == 1:
            return block
        up = torch.empty((len(rows), geometry.grid, geometry.grid, block.shape[-1]), device=dev)
        for j in range(0, len(rows), chunk):
            up[j:j + chunk] = upsample_features(block[j:j + chunk].float(), config.upsample)
        return up

    def match(step: ReadStep, held: dict[tuple[int, ...], torch.Tensor], advance) -> None:
        where = {r: (grids, j) for b, grids in held.items() for j, r in enumerate(b)}

        def stack(rows: list[int]) -> torch.Tensor:
            return torch.stack([where[r][0][where[r][1]] for r in rows]).float()

        for start in range(0, len(step.pairs), chunk):
            idx = [used[pos] for pos in step.pairs[start:start + chunk]]
            batch = pair_arrays([pairs[i] for i in idx], config.input_size, config.pck_norm,
                                config.integer_keypoints)
            src = stack([row_of[pairs[i]["src_id"]] for i in idx])
            trg = stack([row_of[pairs[i]["trg_id"]] for i in idx])
            pred, ok = match_keypoints(src, trg, torch.from_numpy(batch.src_uv).to(dev), geometry,
                                       cell_centre=config.cell_centre, mutual=config.mutual)
            pred, ok = pred.cpu().numpy(), ok.cpu().numpy()
            for j, i in enumerate(idx):
                m = len(pairs[i]["src_kps"])
                out.preds[i], out.mutual_ok[i] = pred[j, :m], ok[j, :m]
                out.arrays[i] = PairBatch(batch.src_uv[j, :m], batch.trg_uv[j, :m], batch.visible[j, :m],
                                          batch.scale[j:j + 1])
            advance(len(idx))

    held: dict[tuple[int, ...], torch.Tensor] = {}
    bar = progress_bar("matching pairs", total=len(used), enabled=ctx.progress)
    with bar as advance, torch.inference_mode():
        for step in steps:
            held = {b: grids for b, grids in held.items() if b in step.blocks}   # free before reading more
            for b in step.blocks:
                if b not in held:
                    held[b] = read(b)
            match(step, held, advance)
    return out


def _draw(config: Config, prep: Prepared, preds: dict, mutual_ok: dict, arrays: dict) -> list[str]:
    """Match pictures of the first ``save_matches_count`` pairs of the "all" subset, at the headline alpha."""
    alpha0 = 0.10 if 0.10 in config.thresholds else config.thresholds[0]
    artifacts = []
    for i in prep.subsets["all"][: config.save_matches_count]:
        pr, a = prep.pairs[i], arrays[i]
        src_side, trg_side = float(max(pr["src_size"])), float(max(pr["trg_size"]))
        pred_px = np.where(mutual_ok[i][:, None], preds[i], np.inf) * trg_side
        err = np.linalg.norm(preds[i] - a.trg_uv, axis=1) / a.scale[0]
        correct = (err < alpha0) & mutual_ok[i]
        title = (f"{pr['name']}  PCK@{threshold_label(alpha0)} "
                 f"{int(correct[a.visible].sum())}/{int(a.visible.sum())}  vp{pr['viewpoint_variation']}")
        out = Path(config.save_matches).expanduser() / f"{slug(pr['name'])}.png"
        draw_matches(prep.spair.image(pr["src_id"]), prep.spair.image(pr["trg_id"]), a.src_uv * src_side,
                     a.trg_uv * trg_side, pred_px, a.visible, correct, out, title=title)
        artifacts.append(str(out))
    return artifacts
