"""Protocol E: DAVIS-2017 semi-supervised video object segmentation by label propagation (docs/davis.md).

DINO's ``eval_video_segmentation.py``, step by step, with the official ``davis2017-evaluation`` metric:

* Frames: decoded RGB, resized with OpenCV's bilinear ``cv2.resize`` (reproduced bit-exactly here, no
  antialiasing) so that the shorter side is 480 and the other side is scaled and rounded *down* to a
  multiple of 64 (854x480 -> 832x480), divided by 255 and normalised with mean (0.485, 0.456, 0.406) and
  std (0.228, 0.224, 0.225) (the reference's constants: 0.228, not ImageNet's 0.229). A patch size that does
  not divide the result drops the last rows and columns, as a strided patch embedding does.
* Features: last block, with the final norm (DINO's ``get_intermediate_layers``), CLS dropped, L2-normalised
  per patch; one forward per frame, cached.
* First frame: the annotation resized to the patch grid with PIL nearest, one channel per id 0..max.
* Propagation to frame t: context = the first frame (its one-hot labels) + the last ``n_last_frames``
  frames (their *soft* propagated labels). Affinities exp(cos / 0.1) to every context patch, zeroed outside a
  (2·12+1)² neighbourhood of the query; the top-5 over all context patches kept (every value >= the 5th
  largest), normalised to sum 1; the labels are their weighted sum.
* Prediction: soft labels upsampled bilinearly by the patch size, each channel min-max normalised, argmax,
  nearest-resized to the original frame.
* Metric: J and boundary F per object over all frames but the first and last, mean / recall / decay per
  object, means over all objects (:mod:`densebench.davis_metrics`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import get_family, open_dataset
from ..data.base import open_image
from ..data.davis import SPLITS, VOID, DavisDataset
from ..davis_metrics import BOUND_TH, DavisAccumulator
from ..errors import ConfigError, DataError
from ..options import ProtocolConfig, option
from ..pictures import render_label_panels
from ..progress import progress_bar
from .common import Outcome, RunContext, protocol_runner
from .correspondence import UnitFeatureReducer

#: The normalisation of DINO's video script (``color_normalize``): ImageNet's mean, std (0.228, 0.224, 0.225).
DINO_VIDEO_MEAN = (0.485, 0.456, 0.406)
DINO_VIDEO_STD = (0.228, 0.224, 0.225)
NORMALIZATIONS = {"dino-video": (DINO_VIDEO_MEAN, DINO_VIDEO_STD),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("davis", "dataset family (set by the benchmark)", choices=("davis",))
    split: str = option("val", "split whose sequences are evaluated (published: the 30 val sequences)",
                        choices=SPLITS)
    sequence_list: str | None = option(None, "file of sequence names to evaluate (instead of the whole split)")
    short_side: int = option(480, "frames are resized so their shorter side has this many pixels", min=1)
    side_multiple: int = option(64, "the longer side is scaled and rounded down to a multiple of this", min=1)
    normalization: str = option("dino-video", "input normalisation: dino-video = the reference's std "
                                              "(0.228, 0.224, 0.225), imagenet = (0.229, 0.224, 0.225)",
                                choices=tuple(NORMALIZATIONS))
    feature_norm: bool = option(True, "apply the encoder's final norm, as DINO's get_intermediate_layers does")
    n_last_frames: int = option(7, "previous frames (with their soft propagated labels) used besides the first",
                                min=0)
    neighbourhood: int = option(12, "context patches farther than this many rows or columns from the query are "
                                    "ignored; 0 = no restriction", min=0)
    topk: int = option(5, "affinities kept per query patch over all context patches", min=1)
    temperature: float = option(0.1, "affinity = exp(cosine / temperature)", min=0, min_exclusive=True)
    bound_th: float = option(BOUND_TH, "boundary F tolerance: fraction of the image diagonal (< 1) or pixels",
                             min=0, min_exclusive=True)
    batch_size: int = option(16, "frames per backbone forward", min=1, non_semantic=True)
    num_workers: int = option(0, "data-loading worker processes", min=0, non_semantic=True)
    query_chunk: int = option(0, "query patches per affinity block; 0 = sized automatically", min=0,
                              non_semantic=True)
    save_predictions: str | None = option(None, "folder for the predicted palette PNGs (<sequence>/<frame>.png, "
                                                "the layout davis2017-evaluation reads) and pictures",
                                          non_semantic=True)
    save_predictions_count: int = option(4, "how many sequences (the first ones) get a picture of three frames",
                                         min=0, non_semantic=True)


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run of ``model`` records it: nothing here is automatic, so the config itself."""
    return dict(config)


# ---------------------------------------------------------------------------------------------------
# Frames as the reference reads them

def reference_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """(height, width) of the resized frame: the shorter side becomes ``short_side`` (landscape or square:
    the height), the other side is scaled and rounded down to a multiple of ``multiple``."""
    if height > width:
        return int((short_side * height / width) // multiple * multiple), short_side
    return short_side, int((short_side * width / height) // multiple * multiple)


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and 11-bit fixed-point weights of OpenCV's INTER_LINEAR along one axis."""
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    if clamp:   # horizontally OpenCV clamps the tap and zeroes the weight at the borders
        edge = (i0 < 0) | (i0 >= src - 1)
        frac[edge] = 0
        i0 = np.clip(i0, 0, src - 1)
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def cv2_linear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (INTER_LINEAR) for uint8 (H, W, C) images, bit for bit.

    OpenCV's 8-bit path: 11-bit weights per axis, a horizontal pass into ints, then a vertical pass that
    shifts each row by 4 bits before a 16-bit product and rounds the sum by 2 bits (``VResizeLinear``).
    """
    x0, x1, a0, a1 = _linear_taps(image.shape[1], width, clamp=True)
    y0, y1, b0, b1 = _linear_taps(image.shape[0], height, clamp=False)
    src = np.asarray(image, dtype=np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]
    out = (((b0[:, None, None] * (rows[y0] >> 4)) >> 16) + ((b1[:, None, None] * (rows[y1] >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DavisFrameView:
    """DINO's ``read_frame``: reference size, OpenCV bilinear, /255, normalisation, then the frame cropped to
    whole patches (what a strided patch embedding sees). The mask is not used (a 1x1 placeholder)."""

    short_side: int
    side_multiple: int
    patch: int
    mean: tuple
    std: tuple

    def size(self, height: int, width: int) -> tuple[int, int]:
        return reference_size(height, width, self.short_side, self.side_multiple)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        th, tw = self.size(height, width)
        return th // self.patch, tw // self.patch

    def __call__(self, index: int, image: Image.Image, mask=None):
        arr = np.asarray(image.convert("RGB"))
        th, tw = self.size(arr.shape[0], arr.shape[1])
        x = cv2_linear_resize(arr, th, tw).astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        gh, gw = th // self.patch, tw // self.patch
        x = torch.from_numpy(np.ascontiguousarray(x[: gh * self.patch, : gw * self.patch].transpose(2, 0, 1)))
        return x, torch.zeros((1, 1), dtype=torch.uint8)

    def describe(self) -> dict:
        return {"view": "davis-dino-frame", "resize": "cv2-inter-linear", **dataclasses.asdict(self)}


# ---------------------------------------------------------------------------------------------------
# Label propagation (pure functions, unit-tested against a literal loop)

def first_frame_labels(annotation: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(C, gh, gw) one-hot labels of the first annotation on the patch grid (PIL nearest, as ``read_seg``);
    C = 1 + the largest id left on the grid. Void (255) counts as background, as in the metric."""
    gh, gw = grid
    ann = np.where(annotation == 255, 0, annotation).astype(np.uint8)
    small = np.asarray(Image.fromarray(ann).resize((gw, gh), Image.Resampling.NEAREST)).astype(np.int64)
    labels = torch.zeros(int(small.max()) + 1, gh, gw)
    labels.scatter_(0, torch.from_numpy(small)[None], 1.0)
    return labels


def neighbourhood_mask(height: int, width: int, size: int) -> torch.Tensor:
    """(hw, hw) bool: key cell within ``size`` rows and ``size`` columns of the query cell."""
    r = torch.arange(height).repeat_interleave(width)
    c = torch.arange(width).repeat(height)
    return ((r[:, None] - r[None]).abs() <= size) & ((c[:, None] - c[None]).abs() <= size)


def propagate_step(target: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                   topk: int, mask: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
    """Soft labels (C, Q) of ``target`` (Q, D) from ``keys`` (N, K, D) carrying ``labels`` (N, C, K).

    Features are unit vectors. Per query: a = exp(cos / temperature) for each of the N·K context patches,
    0 where ``mask`` (Q, K) is False; every a below the ``topk``-th largest is zeroed (ties all kept); the
    rest are normalised to sum 1 and weight the context labels. ``chunk`` queries at a time (0 = all).
    Queries are rows here (the reference holds them as columns), so the top-k runs along contiguous memory.
    """
    n, k, _ = keys.shape
    flat_keys = keys.reshape(n * k, -1)
    flat_labels = labels.permute(0, 2, 1).reshape(n * k, labels.shape[1])        # (N·K, C)
    keep = min(topk, n * k)
    weights = mask.to(target.dtype) if mask is not None else None
    step = chunk or target.shape[0]
    out = []
    for s in range(0, target.shape[0], step):
        aff = torch.exp(target[s:s + step] @ flat_keys.T / temperature)          # (q, N·K)
        if weights is not None:
            aff = (aff.view(-1, n, k) * weights[s:s + step, None, :]).view(-1, n * k)
        kth = torch.topk(aff, keep, dim=1).values[:, -1:]
        aff.masked_fill_(aff < kth, 0.0)
        aff /= aff.sum(dim=1, keepdim=True)
        out.append(aff @ flat_labels)
    return torch.cat(out).T


def channel_minmax(x: torch.Tensor) -> torch.Tensor:
    """The reference's ``norm_mask``: each channel with a positive maximum rescaled to [0, 1] by its min and max.

    A positive channel that is constant becomes 0 (the reference divides 0 by 0 there, and the NaN then wins
    every argmax); an all-zero channel stays 0.
    """
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                         torch.zeros_like(x))
    return torch.where(hi > 0, scaled, x)


def labels_to_prediction(soft: torch.Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """(C, gh, gw) soft labels -> (H, W) uint8 ids: bilinear x patch, channel min-max, argmax, PIL nearest."""
    c, gh, gw = soft.shape
    up = F.interpolate(soft[None].float(), scale_factor=patch, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    ids = channel_minmax(up).cpu().numpy().argmax(axis=0).astype(np.uint8)   # first maximum on ties, as torch
    return np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.Resampling.NEAREST))


def propagate_sequence(feats: torch.Tensor, first: torch.Tensor, *, n_last: int, neighbourhood: int, topk: int,
                       temperature: float, chunk: int = 0):
    """Yield the soft labels (C, gh, gw) of frames 1..T-1 of a sequence with unit features (T, gh, gw, D)."""
    t_len, gh, gw, d = feats.shape
    flat = feats.reshape(t_len, gh * gw, d)
    c = first.shape[0]
    mask = neighbourhood_mask(gh, gw, neighbourhood).to(feats.device) if neighbourhood > 0 else None
    first_labels = first.reshape(c, gh * gw).to(feats.device)
    queue: deque[tuple[int, torch.Tensor]] = deque(maxlen=n_last)
    for t in range(1, t_len):
        idx = [0] + [i for i, _ in queue]
        labels = torch.stack([first_labels] + [soft for _, soft in queue])
        soft = propagate_step(flat[t], flat[idx], labels, temperature=temperature, topk=topk, mask=mask,
                              chunk=chunk)
        queue.append((t, soft))
        yield soft.reshape(c, gh, gw)


# ---------------------------------------------------------------------------------------------------
# The recipe

run = protocol_runner(__name__, "-propagation",
                      "Evaluate ``encoder`` with DINO's DAVIS-2017 label-propagation protocol")


@dataclass
class Prepared:
    davis: DavisDataset
    sequences: list[str]
    sizes: dict[str, tuple[int, int]]     # original (H, W) of each sequence's frames
    view: DavisFrameView
    mean: tuple
    std: tuple


def _frame_sizes(davis: DavisDataset, seq: str) -> tuple[int, int]:
    sizes = set()
    for id_ in davis.frame_ids(seq):
        try:
            with Image.open(davis.image_path(id_)) as im:
                sizes.add((im.height, im.width))
        except (OSError, ValueError) as e:
            raise DataError(f"DAVIS frame {davis.image_path(id_)} cannot be read ({e})",
                            hint="re-extract it from DAVIS-2017-trainval-480p.zip") from e
    if len(sizes) != 1:
        raise DataError(f"DAVIS sequence {seq} has frames of several sizes {sorted(sizes)}",
                        hint="re-extract it from DAVIS-2017-trainval-480p.zip")
    return sizes.pop()


def prepare(ctx: RunContext) -> Prepared:
    """Open the split's sequences and check, before any forward, that each can be propagated and scored."""
    config = ctx.config
    id_list = str(Path(config.sequence_list).expanduser()) if config.sequence_list else None
    davis = open_dataset(get_family(config.dataset), ctx.data_root, config.split, id_list=id_list)
    if not davis.sequences:
        raise DataError(f"DAVIS {config.split}: no sequence to evaluate under {davis.root}",
                        hint="check ImageSets/2017/<split>.txt or --sequence-list")
    short = [s for s in davis.sequences if len(davis.frames[s]) < 3]
    if short:
        raise DataError(f"DAVIS sequence {short[0]} has {len(davis.frames[short[0]])} frames; the evaluation "
                        "scores all frames but the first and last, so a sequence needs at least 3")
    missing = davis.missing_annotations()
    if missing:
        raise DataError(f"{len(missing)} DAVIS frames have no annotation (first: {missing[0]})",
                        hint="every train/val frame has one in DAVIS-2017-trainval-480p.zip; re-extract it")
    mean, std = NORMALIZATIONS[config.normalization]
    p = ctx.encoder.patch_size
    view = DavisFrameView(config.short_side, config.side_multiple, p, mean, std)
    sizes = {s: _frame_sizes(davis, s) for s in davis.sequences}
    for seq, (h, w) in sizes.items():
        gh, gw = view.grid(h, w)
        if gh < 1 or gw < 1:
            th, tw = view.size(h, w)
            raise ConfigError(f"DAVIS {seq}: frames of {w}x{h} become {tw}x{th}, smaller than one {p}-pixel patch",
                              hint="raise --short-side or lower --side-multiple")
    return Prepared(davis, davis.sequences, sizes, view, mean, std)


def extract_features(ctx: RunContext, prep: Prepared) -> dict[str, np.ndarray]:
    """One forward per frame, one cache entry per sequence: {sequence: (T, gh, gw, D) unit float16}."""
    jobs = [(prep.davis.sequence(seq), prep.view, {"reducer": UnitFeatureReducer(), "norm": ctx.config.feature_norm,
                                                    "desc": f"DAVIS {seq}"}) for seq in prep.sequences]
    return {seq: arrays["features"] for seq, arrays in zip(prep.sequences, ctx.extract_each(jobs))}


def _query_chunk(config: Config, n_context: int, cells: int) -> int:
    return config.query_chunk or max(1, int(2 ** 24 // max(1, (n_context + 1) * cells)))


def _save_sequence(out: Path, seq: str, frames: list[str], first: np.ndarray, preds: list[np.ndarray]) -> None:
    from ..data.voc import voc_palette

    folder = out / seq
    folder.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for name, ids in zip(frames, [first, *preds], strict=True):
        im = Image.fromarray(np.asarray(ids, np.uint8), "P")
        im.putpalette(palette)
        im.save(folder / f"{name}.png")


def _picture(config: Config, prep: Prepared, benchmark: str, seq: str, gt: np.ndarray,
             preds: list[np.ndarray]) -> list[str]:
    t_len = len(gt)
    frames = sorted({1, t_len // 2, t_len - 2})
    ids = prep.davis.frame_ids(seq)
    images = [(ids[t], open_image(prep.davis.image_path(ids[t]))) for t in frames]
    pred = np.stack([preds[t - 1] for t in frames])
    return render_label_panels(Path(config.save_predictions).expanduser() / "pictures", f"{benchmark}_{seq}",
                               images, gt[frames], [("prediction", pred)], None,
                               class_names=["background", *(f"object {i}" for i in range(1, VOID)), "void"])


def score(ctx: RunContext, prep: Prepared, feats: dict[str, np.ndarray]) -> Outcome:
    """Propagate the first annotation through every sequence and score J and F per object."""
    config, p = ctx.config, ctx.encoder.patch_size
    dev = torch.device(ctx.device)
    acc = DavisAccumulator(bound_th=config.bound_th)
    grids, channels, artifacts = {}, {}, []
    with progress_bar("propagating", total=len(prep.sequences), enabled=ctx.progress) as advance:
        for i, seq in enumerate(prep.sequences):
            f = F.normalize(torch.from_numpy(np.asarray(feats[seq], dtype=np.float32)).to(dev), dim=-1)
            gt = prep.davis.annotations(seq)
            first = first_frame_labels(gt[0], tuple(f.shape[1:3]))
            grids[seq], channels[seq] = list(f.shape[1:3]), int(first.shape[0])
            chunk = _query_chunk(config, config.n_last_frames + 1, f.shape[1] * f.shape[2])
            with torch.inference_mode():
                preds = [labels_to_prediction(soft, p, prep.sizes[seq])
                         for soft in propagate_sequence(f, first, n_last=config.n_last_frames,
                                                        neighbourhood=config.neighbourhood, topk=config.topk,
                                                        temperature=config.temperature, chunk=chunk)]
            acc.update(seq, gt, np.stack([gt[0], *preds]))
            if config.save_predictions:
                _save_sequence(Path(config.save_predictions).expanduser(), seq, prep.davis.frames[seq], gt[0],
                               preds)
                if i < config.save_predictions_count:
                    artifacts += _picture(config, prep, ctx.benchmark, seq, gt, preds)
            advance(1)
    metrics = acc.compute()
    n_frames = sum(len(prep.davis.frames[s]) for s in prep.sequences)
    derived = {
        "mean": list(prep.mean), "std": list(prep.std), "patch_size": p,
        "input_sizes": {s: list(prep.view.size(*prep.sizes[s])) for s in prep.sequences},
        "feature_grids": grids, "label_channels": channels,
        "objects": {s: len(acc.sequences[s]) for s in prep.sequences},
        "frames_scored": n_frames - 2 * len(prep.sequences),
        "metric_notes": {
            "j_and_f": "(J-Mean + F-Mean) / 2; each the mean over all objects of the per-object mean over all "
                       "frames but the first and last (davis2017-evaluation, semi-supervised)",
            "f": f"boundary F-measure, tolerance {config.bound_th} of the image diagonal (official 0.008)",
            "recall_decay": "fraction of frames above 0.5; first-quarter minus last-quarter mean (official bins)",
            "per_object": "keys <sequence>_<object id>, as the official per-sequence table"}}
    manifest = hashlib.sha256("\n".join(f"{s}:{prep.davis.sequence(s).manifest_hash()}"
                                        for s in prep.sequences).encode()).hexdigest()
    dataset = {"name": "davis", "manifest_hash": manifest, "synthetic": bool(prep.davis.synthetic),
               "split": config.split, "id_source": prep.davis.extra.get("id_source"),
               "n_sequences": len(prep.sequences), "n_frames": n_frames}
    return Outcome(metrics=metrics, derived=derived, dataset=dataset, artifacts=artifacts)
