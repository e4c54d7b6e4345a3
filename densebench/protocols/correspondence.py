"""Protocol D: SPair-71k semantic keypoint correspondence (probe3d; spec protocols.md §6).

Each image of the evaluated pairs is padded to a square (bottom/right, white), resized to the input
size and pushed through the encoder once; its patch features (last block without the final norm by
default) are L2-normalised per location and cached. Every pair is then matched from the cache, in
batches: the source keypoints' descriptors are sampled bilinearly (``grid_sample``, align_corners=True)
from the source grid, the nearest neighbour (argmax of the dot product) over the target grid gives the
predicted cell, and a keypoint is correct when its error is below alpha times the longest side of the
target bounding box. Only keypoints visible in both images count. PCK pools keypoints within a
category, then takes the unweighted mean over categories, for all pairs and per viewpoint bucket.

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError, choices_message
from ..features import ExtractionStats, FeatureCache, extract
from ..metrics import PCKAccumulator
from ..metrics import _threshold_label as _alpha_label
from ..progress import progress_bar
from ..results import make_result
from ..transforms import SquarePadView, normalisation
from . import Benchmark, register
from .common import check_input_size

#: Config fields that do not change the measured numbers.
NON_SEMANTIC_FIELDS = {"batch_size", "num_workers", "pair_batch", "save_matches", "save_matches_count"}

SPAIR_SPLITS = ("trn", "val", "test")
PCK_NORMS = ("bbox", "image")
PATCH_PADDINGS = ("symmetric", "none")
#: The buckets of SPair's ``viewpoint_variation`` annotation.
VIEWPOINT_BUCKETS = (0, 1, 2)


def _parse_thresholds(value) -> tuple[float, ...]:
    """'0.05,0.10' / ('0.05', '0.1') / (0.05, 0.1) -> (0.05, 0.1); ConfigError naming the bad entry."""
    items = value.split(",") if isinstance(value, str) else list(value if isinstance(value, Sequence) else [value])
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            alpha = float(text)
        except ValueError:
            raise ConfigError(f"--thresholds entry {text!r} is not a number",
                              hint="give PCK thresholds as a comma list, e.g. --thresholds 0.05,0.10,0.15") from None
        if not 0 < alpha <= 1:
            raise ConfigError(f"--thresholds entry {alpha} is outside (0, 1]",
                              hint="PCK thresholds are fractions of the bounding box, e.g. 0.05,0.10,0.15")
        out.append(alpha)
    if not out:
        raise ConfigError("--thresholds is empty", hint="e.g. --thresholds 0.10")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Config:
    dataset: str = "spair"
    split: str = "test"                      # published: the 12,234 test pairs (before subsampling)
    input_size: int = 800                    # side of the square the padded image is resized to
    patch_padding: str = "symmetric"         # input not a multiple of the patch: "symmetric" zero pad (probe3d) | "none" (error)
    square_fill: int = 255                   # value of the bottom/right padding to a square (published: 255, white)
    feature_norm: bool = False               # apply the encoder's final norm (published: no, raw last block)
    pairs_per_category: int | None = 200     # pairs kept per category and per (category, bucket); None = "all"
    pair_list: str | None = None             # file of pair names to evaluate exactly (no subsampling)
    seed: int = 20                           # pair-subset shuffle seed (published: random.seed(20))
    thresholds: tuple = (0.10,)              # PCK alphas, e.g. 0.05,0.10,0.15
    pck_norm: str = "bbox"                   # "bbox": alpha * longest target-bbox side (published) | "image"
    cell_centre: bool = False                # predicted location = matched cell's centre (published: its corner)
    mutual: bool = False                     # keep only mutual nearest neighbours (others count as wrong)
    upsample: int = 1                        # bilinear feature upsampling factor before matching (published: 1)
    integer_keypoints: bool = False          # probe3d's int-tensor truncation of keypoints at the input size
    save_matches: str | None = None          # folder for match pictures
    save_matches_count: int = 8
    batch_size: int = 8
    num_workers: int = 0
    pair_batch: int = 0                      # pairs matched per batch; 0 = sized automatically

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", _parse_thresholds(self.thresholds))

    def validate(self) -> None:
        if self.dataset != "spair":
            raise ConfigError(choices_message("dataset for the correspondence protocol", self.dataset, ["spair"]))
        if self.split not in SPAIR_SPLITS:
            raise ConfigError(choices_message("--split", self.split, SPAIR_SPLITS))
        if self.input_size < 1:
            raise ConfigError(f"--input-size must be positive, got {self.input_size}")
        if self.patch_padding not in PATCH_PADDINGS:
            raise ConfigError(choices_message("--patch-padding", self.patch_padding, PATCH_PADDINGS))
        if not 0 <= self.square_fill <= 255:
            raise ConfigError(f"--square-fill must be a pixel value in 0..255, got {self.square_fill}")
        if self.pairs_per_category is not None and self.pairs_per_category < 1:
            raise ConfigError(f"--pairs-per-category must be a positive integer or 'all', got {self.pairs_per_category}")
        if self.pck_norm not in PCK_NORMS:
            raise ConfigError(choices_message("--pck-norm", self.pck_norm, PCK_NORMS))
        if not 1 <= self.upsample <= 16:
            raise ConfigError(f"--upsample must be an integer factor in 1..16, got {self.upsample}")
        if self.save_matches_count < 0:
            raise ConfigError(f"--save-matches-count must be >= 0, got {self.save_matches_count}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.pair_batch < 0:
            raise ConfigError(f"--pair-batch must be >= 0 (0 = automatic), got {self.pair_batch}")
        if self.pair_list is not None and not Path(self.pair_list).expanduser().is_file():
            raise ConfigError(f"--pair-list {self.pair_list} does not exist",
                              hint="give a text file with one SPair pair name per line")


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

    def __call__(self, feats: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor) -> dict[str, np.ndarray]:
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
                            "so PCK@bbox is undefined", hint="check its PairAnnotation JSON or use --pck-norm image")
    return PairBatch(src_uv, trg_uv, vis, scale)


def _auto_pair_batch(grid: int, dim: int) -> int:
    """Pairs per matching batch so one batch's target grids hold about 32M floats."""
    return max(1, min(256, int(32e6 // (grid * grid * max(1, dim)))))


# ---------------------------------------------------------------------------------------------------
# Pictures

_SLOT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
                 (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
                 (0, 0, 128), (128, 128, 128)]


def draw_matches(src_image, trg_image, src_xy: np.ndarray, trg_xy: np.ndarray, pred_xy: np.ndarray,
                 visible: np.ndarray, correct: np.ndarray, path: Path, title: str = "", height: int = 256) -> Path:
    """Source | target side by side: source keypoints (dots, one colour per slot), true target keypoints
    (rings) and predictions (dots), each prediction joined to its truth by a green (correct) or red line."""
    from PIL import Image, ImageDraw

    def fit(im):
        f = height / im.height
        return im.convert("RGB").resize((max(1, round(im.width * f)), height), Image.Resampling.BILINEAR), f

    left, fs = fit(src_image)
    right, ft = fit(trg_image)
    gap, top = 8, 18
    canvas = Image.new("RGB", (left.width + gap + right.width, height + top), (255, 255, 255))
    canvas.paste(left, (0, top))
    canvas.paste(right, (left.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    ox = left.width + gap
    r = 3
    for k in np.nonzero(visible)[0]:
        colour = _SLOT_COLOURS[k % len(_SLOT_COLOURS)]
        sx, sy = src_xy[k] * fs
        draw.ellipse([sx - r, sy + top - r, sx + r, sy + top + r], fill=colour, outline=(0, 0, 0))
        tx, ty = trg_xy[k] * ft
        px, py = np.clip(pred_xy[k] * ft, [0, 0], [right.width - 1, height - 1]) if np.all(
            np.isfinite(pred_xy[k])) else (tx, ty)
        draw.line([ox + px, py + top, ox + tx, ty + top], fill=(0, 170, 0) if correct[k] else (220, 0, 0), width=2)
        draw.ellipse([ox + tx - r - 1, ty + top - r - 1, ox + tx + r + 1, ty + top + r + 1], outline=colour, width=2)
        draw.ellipse([ox + px - r, py + top - r, ox + px + r, py + top + r], fill=colour, outline=(0, 0, 0))
    draw.text((2, 2), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------------

def run(encoder, data_root, config: Config, *, device: str = "cpu", cache: FeatureCache | None = None,
        progress: bool = True, benchmark: str | None = None) -> dict:
    """Evaluate ``encoder`` with the probe3d SPair-71k correspondence protocol; returns a result record."""
    from ..data import open_dataset

    config.validate()
    t_start = time.perf_counter()
    p = encoder.patch_size
    if config.patch_padding == "none":
        check_input_size(config.input_size, encoder, " or --patch-padding symmetric")
    mean, std = normalisation("imagenet")
    spair = open_dataset("spair", data_root, config.split,
                         id_list=str(Path(config.pair_list).expanduser()) if config.pair_list else None)
    pairs = spair.pairs
    if not pairs:
        raise DataError(f"SPair-71k {config.split}: no pairs to evaluate under {spair.root}",
                        hint="check the split list (Layout/large/<split>.txt) or --pair-list")
    per_category = None if config.pair_list else config.pairs_per_category
    subsets = select_pairs(pairs, per_category, config.seed)
    used = sorted(set().union(*subsets.values()), key=lambda i: pairs[i]["name"])
    image_ids = sorted({pairs[i][side] for i in used for side in ("src_id", "trg_id")})
    row_of = {id_: r for r, id_ in enumerate(image_ids)}

    view = SquarePadView(config.input_size, patch=p if config.patch_padding == "symmetric" else 1,
                         fill=config.square_fill, mean=mean, std=std)
    reducer = UnitFeatureReducer()
    stats = ExtractionStats()
    images = PairImages(spair, image_ids)
    feats_np = extract(encoder, images, view, key_parts={"view": view.describe(), "reduce": reducer.describe()},
                       cache=cache, device=device, batch_size=config.batch_size, num_workers=config.num_workers,
                       reducer=reducer, norm=config.feature_norm, desc="SPair image features", progress=progress,
                       stats=stats)["features"]
    t_extracted = time.perf_counter()

    dev = torch.device(device)
    s, dim = int(feats_np.shape[1]) * config.upsample, int(feats_np.shape[-1])
    geometry = Geometry(config.input_size, view.padded_size, view.offset, s)
    chunk = config.pair_batch or _auto_pair_batch(s, dim)
    preds: dict[int, np.ndarray] = {}
    mutual_ok: dict[int, np.ndarray] = {}
    arrays: dict[int, PairBatch] = {}
    with progress_bar("matching pairs", total=len(used), enabled=progress) as advance, torch.inference_mode():
        for start in range(0, len(used), chunk):
            idx = used[start:start + chunk]
            batch = pair_arrays([pairs[i] for i in idx], config.input_size, config.pck_norm, config.integer_keypoints)
            src_rows = [row_of[pairs[i]["src_id"]] for i in idx]
            trg_rows = [row_of[pairs[i]["trg_id"]] for i in idx]
            src = upsample_features(torch.from_numpy(np.asarray(feats_np[src_rows])).to(dev).float(), config.upsample)
            trg = upsample_features(torch.from_numpy(np.asarray(feats_np[trg_rows])).to(dev).float(), config.upsample)
            pred, ok = match_keypoints(src, trg, torch.from_numpy(batch.src_uv).to(dev), geometry,
                                       cell_centre=config.cell_centre, mutual=config.mutual)
            pred, ok = pred.cpu().numpy(), ok.cpu().numpy()
            for j, i in enumerate(idx):
                m = len(pairs[i]["src_kps"])
                preds[i], mutual_ok[i] = pred[j, :m], ok[j, :m]
                arrays[i] = PairBatch(batch.src_uv[j, :m], batch.trg_uv[j, :m], batch.visible[j, :m],
                                      batch.scale[j:j + 1])
            advance(len(idx))

    def accumulate(indices: Sequence[int], by: tuple[str, ...]) -> PCKAccumulator:
        acc = PCKAccumulator(config.thresholds, by=by)
        for i in indices:
            a = arrays[i]
            pred = np.where(mutual_ok[i][:, None], preds[i], np.inf)   # a rejected match is never correct
            acc.update(pred, a.trg_uv, float(a.scale[0]), a.visible, category=pairs[i]["category"],
                       bucket=int(pairs[i]["viewpoint_variation"]))
        return acc

    overall = accumulate(subsets["all"], ("category",)).compute()
    bucket_idx = [i for b in VIEWPOINT_BUCKETS for i in subsets.get(b, [])]
    by_bucket = accumulate(bucket_idx, ("category", "viewpoint")).compute() if bucket_idx else {}
    metrics: dict = {}
    for alpha in config.thresholds:
        name = f"pck@{_alpha_label(alpha)}"
        metrics[name] = overall[name]
        for b in VIEWPOINT_BUCKETS:
            if f"{name}_vp{b}" in by_bucket:
                metrics[f"{name}_vp{b}"] = by_bucket[f"{name}_vp{b}"]
        metrics[f"per_category_{name}"] = overall["per_category"][name]
    if config.mutual:
        vis = np.concatenate([arrays[i].visible for i in subsets["all"]])
        ok = np.concatenate([mutual_ok[i] for i in subsets["all"]])
        metrics["mutual_match_rate"] = float(100.0 * ok[vis].mean()) if vis.any() else 0.0
    t_done = time.perf_counter()

    artifacts = []
    if config.save_matches and config.save_matches_count:
        alpha0 = 0.10 if 0.10 in config.thresholds else config.thresholds[0]   # the headline threshold
        for i in subsets["all"][: config.save_matches_count]:
            pr, a = pairs[i], arrays[i]
            src_side, trg_side = float(max(pr["src_size"])), float(max(pr["trg_size"]))
            pred_px = np.where(mutual_ok[i][:, None], preds[i], np.inf) * trg_side
            err = np.linalg.norm(preds[i] - a.trg_uv, axis=1) / a.scale[0]
            correct = (err < alpha0) & mutual_ok[i]
            title = (f"{pr['name']}  PCK@{_alpha_label(alpha0)} {int(correct[a.visible].sum())}/{int(a.visible.sum())}"
                     f"  vp{pr['viewpoint_variation']}")
            out = Path(config.save_matches).expanduser() / f"{_safe_name(pr['name'])}.png"
            draw_matches(spair.image(pr["src_id"]), spair.image(pr["trg_id"]), a.src_uv * src_side,
                         a.trg_uv * trg_side, pred_px, a.visible, correct, out, title=title)
            artifacts.append(str(out))

    counts = {str(b): len(v) for b, v in subsets.items()}
    names_hash = hashlib.sha256("\n".join(pairs[i]["name"] for i in used).encode()).hexdigest()[:16]
    resolved = dataclasses.asdict(config)
    resolved.update(
        thresholds=list(config.thresholds), pairs_per_category=per_category,
        layer=encoder.layer, mean=list(mean), std=list(std), geometry=geometry.describe(),
        feature_grid=int(feats_np.shape[1]), pair_batch=chunk,
        pair_selection={
            "rule": "explicit --pair-list" if config.pair_list else
                    "per category and per (category, viewpoint bucket): sort pair names, random.Random(seed).shuffle, "
                    "keep the first pairs_per_category",
            "seed": config.seed, "pairs_hash": names_hash, "counts": counts},
        metric_notes={
            "pck": "percentage of keypoints visible in both images with error < alpha * "
                   + ("longest side of the target bounding box" if config.pck_norm == "bbox" else
                      "longest side of the target image")
                   + "; pooled per category, unweighted mean over categories",
            "pck_vp": "same, on the pairs drawn per viewpoint-variation bucket (0 small, 1 medium, 2 large)",
            "predicted_location": "cell centre (padding-aware)" if config.cell_centre else
                                  "top-left cell corner col/grid (published)"})
    timings = {"extraction_s": stats.extraction_s, "forward_s": stats.forward_s,
               "protocol_s": t_done - t_extracted, "total_s": time.perf_counter() - t_start}
    return make_result(
        benchmark=benchmark or "spair-correspondence", model=encoder.describe(), config=resolved,
        metrics=metrics, device=str(device), seeds={"pair_selection": config.seed},
        timings=timings,
        dataset={"name": "spair", "manifest_hash": images.manifest_hash(), "synthetic": bool(spair.synthetic),
                 "split": config.split, "id_source": spair.extra.get("id_source"), "n_pairs_split": len(pairs),
                 "n_pairs_evaluated": len(used), "n_images": len(image_ids),
                 "keypoints_outside_image": int(getattr(spair, "out_of_image", 0)),
                 "visible_keypoints": overall["num_keypoints"]},
        cache={**stats.as_dict(), "enabled": bool(cache and cache.enabled)},
        artifacts=artifacts,
    )


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


register(Benchmark("spair-correspondence", "correspondence", "spair",
                   "SPair-71k keypoint correspondence (probe3d): PCK@0.1 of the target bbox, nearest neighbour on "
                   "raw last-block features, mean over categories",
                   synthetic={"input_size": 224}, main_metric="pck@0.10"))
