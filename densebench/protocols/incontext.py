"""Protocol A: Hummingbird-style in-context retrieval segmentation (spec protocols.md §3).

Memory bank: every train image (or a fraction list) is viewed ``augment_epochs`` times with the
published augmentation; each view's patch features are L2-normalised and stored with the patch's
class histogram (pixel counts, uint8/uint16), subsampled per image by the published rarity rule to
fit ``memory_size``. Queries: val images resized to the input size; exact inner-product k-NN over the
memory; softmax(sim / temperature) label transfer using the similarities the search returned;
bilinear upsampling of the class scores to the input size; argmax; one streaming confusion matrix.
Scores: Hungarian-matched mIoU (as published), identity mIoU, per-class IoU; ADE20K also reports
the 150-class mean next to the published 151-class mean.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DatasetFamily, SegmentationDataset, fraction_list, get_family, open_dataset
from ..encoders.base import incontext_input_size
from ..errors import ConfigError
from ..metrics import ConfusionMatrix, segmentation_scores
from ..options import ProtocolConfig, option
from ..pictures import render_label_panels
from ..progress import progress_bar
from ..retrieval import build_index
from ..transforms import HummingbirdTrainView, ResizeView, generator_for, normalisation
from .common import Outcome, RunContext, check_input_size, check_splits, protocol_runner, split_record

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf")
FRACTIONS = (128, 64, 8)


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("voc", "dataset family (set by the benchmark)")
    input_size: int | None = option(None, "image side fed to the encoder; auto: 504 for /14 models, 512 for /16",
                                    min=1, none="auto")
    augment_epochs: int = option(2, "augmented passes over the train split for the memory bank; 0 = resized, "
                                    "un-augmented images", min=0)
    memory_size: int | None = option(10_240_000, "patches kept in the memory bank", min=1, none="all")
    neighbours: int = option(30, "nearest neighbours per query patch", min=1)
    temperature: float = option(0.02, "softmax temperature of the label transfer", min=0, min_exclusive=True)
    train_list: str | None = option(None, "file of ids for the memory bank (instead of the whole train split)")
    train_fraction: int | None = option(None, "use the shipped Hummingbird 1/N list of the train split",
                                        choices=FRACTIONS)
    fraction_seed: int = option(42, "which published fraction list", choices=(42, 400, 783, 1293, 4019))
    memory_ignore: str = option("class0", "ignore pixels in the memory bank: counted as class 0 (published) or "
                                          "dropped", choices=("class0", "drop"))
    normalization: str = option("imagenet", "input normalisation; hbird-legacy = the reference's 0.255 std typo",
                                choices=("imagenet", "hbird-legacy"))
    backend: str = option("auto", "k-NN backend: auto (faiss on GPU, else torch), torch, faiss (exact), "
                                  "faiss-ivf (approximate)", choices=BACKENDS)
    seed: int = option(0, "seed of the augmentations and the memory-bank sampling", min=0)
    batch_size: int = option(16, "images per backbone forward", min=1, non_semantic=True)
    num_workers: int = option(0, "data-loading worker processes", min=0, non_semantic=True)
    query_chunk: int = option(0, "val images per retrieval chunk; 0 = sized automatically", min=0,
                              non_semantic=True)
    save_predictions: str | None = option(None, "folder for image | ground truth | prediction PNGs",
                                          non_semantic=True)
    save_predictions_count: int = option(8, "how many val images (the first ones) to draw", min=0,
                                         non_semantic=True)

    def check(self) -> None:
        if self.train_fraction is not None and self.train_list is not None:
            raise ConfigError("give either --train-list or --train-fraction, not both")


def resolve_input_size(input_size: int | None, patch_size: int) -> int:
    """The published input size when none is given: 504 for /14 models, 512 for /16 (and /8)."""
    return input_size if input_size is not None else incontext_input_size(patch_size)


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run of ``model`` records it, in the form leaderboards compare: the input size by patch
    size, and every exact backend as ``exact`` (they return the same neighbours)."""
    config = dict(config)
    config["input_size"] = resolve_input_size(config.get("input_size"), int(model["patch_size"]))
    if config.get("backend") in ("auto", "torch", "faiss"):
        config["backend"] = "exact"
    return config


# ---------------------------------------------------------------------------------------------------
# Memory bank pieces (pure functions, unit-tested against brute force)

def patch_label_counts(masks: torch.Tensor, patch: int, num_classes: int, ignore_index: int,
                       memory_ignore: str = "class0") -> torch.Tensor:
    """(B, H, W) label maps -> (B, H/p, W/p, C) pixel counts per patch and class.

    ``class0``: ignore pixels are counted as class 0 (the reference's 255→0 merge);
    ``drop``: they are left out, so a patch's counts may sum to less than p².
    """
    b, h, w = masks.shape
    s_h, s_w = h // patch, w // patch
    m = masks.long()
    ignore = m == ignore_index
    if memory_ignore == "class0":
        m = torch.where(ignore, torch.zeros_like(m), m)
    else:
        m = torch.where(ignore, torch.full_like(m, num_classes), m)
    m = m.view(b, s_h, patch, s_w, patch).permute(0, 1, 3, 2, 4).reshape(b * s_h * s_w, patch * patch)
    counts = torch.zeros(m.shape[0], num_classes + 1, dtype=torch.int32, device=m.device)
    counts.scatter_add_(1, m, torch.ones_like(m, dtype=torch.int32))
    return counts[:, :num_classes].view(b, s_h, s_w, num_classes)


def rarity_sample(counts: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``k`` patches to keep, by the published rule (spec §3.3 step 5).

    presence[p, c] = class c occurs in patch p; freq[c] = number of patches of this image containing c;
    score[p] = Σ_c presence·freq times U(0, 1) noise; keep the k smallest scores (classes rare within
    the image win). Patches with no labelled pixel (only possible with memory_ignore=drop) are never kept.
    """
    presence = (counts > 0).to(torch.float64)
    freq = presence.sum(0)
    score = (presence * freq).sum(1) * torch.rand(counts.shape[0], generator=generator, dtype=torch.float64)
    empty = presence.sum(1) == 0
    score[empty] = math.inf
    k = min(k, int((~empty).sum()))
    return torch.topk(score, k, largest=False).indices


class MemoryReducer:
    """Per train view: normalise patch features, sample patches, keep (features f16, label counts)."""

    def __init__(self, patch: int, num_classes: int, ignore_index: int, memory_ignore: str,
                 per_image: int | None, seed: int, epoch: int):
        self.patch, self.num_classes, self.ignore_index = patch, num_classes, ignore_index
        self.memory_ignore, self.per_image, self.seed, self.epoch = memory_ignore, per_image, seed, epoch
        self.count_dtype = np.uint8 if patch * patch <= 255 else np.uint16

    def describe(self) -> dict:
        return {"reducer": "hbird-memory", "per_image": self.per_image, "memory_ignore": self.memory_ignore,
                "seed": self.seed, "epoch": self.epoch, "count_dtype": np.dtype(self.count_dtype).str}

    def __call__(self, feats: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor) -> dict[str, np.ndarray]:
        b, s_h, s_w, d = feats.shape
        counts = patch_label_counts(masks, self.patch, self.num_classes, self.ignore_index, self.memory_ignore)
        keys = F.normalize(feats.reshape(b, s_h * s_w, d), dim=-1)
        counts = counts.reshape(b, s_h * s_w, self.num_classes)
        out_f, out_c = [], []
        for i in range(b):
            c = counts[i].cpu()
            if self.per_image is None and self.memory_ignore == "class0":
                sel = torch.arange(c.shape[0])
            else:
                g = generator_for(self.seed, 10_000 + self.epoch, int(indices[i]))
                sel = rarity_sample(c, self.per_image if self.per_image is not None else c.shape[0], g)
                sel = torch.sort(sel).values
            out_f.append(keys[i, sel.to(keys.device)].to(torch.float16).cpu().numpy())
            out_c.append(c[sel].numpy().astype(self.count_dtype))
        return {"keys": np.concatenate(out_f), "labels": np.concatenate(out_c)}


def transfer_labels(sims: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, temperature: float,
                    patch_area: int) -> torch.Tensor:
    """Cross-attention label transfer: softmax_k(sim / T) · soft labels of the k neighbours -> (Q, C).

    ``sims`` are the inner products the search returned (queries and keys already unit-norm, so they
    are the cosines the reference recomputes from gathered features); only labels are gathered.
    """
    w = torch.softmax(sims.float() / temperature, dim=1)
    soft = labels[idx].float() / patch_area              # (Q, k, C)
    return torch.einsum("qk,qkc->qc", w, soft)


# ---------------------------------------------------------------------------------------------------

def _memory_per_image(config: Config, n_images: int, tokens_per_image: int) -> tuple[int | None, bool]:
    if config.memory_size is None:
        return None, False
    views = n_images * max(1, config.augment_epochs)
    k = max(1, config.memory_size // max(1, views))
    return min(k, tokens_per_image), k > tokens_per_image


# ---------------------------------------------------------------------------------------------------
# The recipe

run = protocol_runner(__name__, "-incontext", "Evaluate ``encoder`` with the in-context retrieval protocol")


@dataclass
class Prepared:
    family: DatasetFamily
    train: SegmentationDataset
    val: SegmentationDataset
    train_list: str | None
    mean: tuple
    std: tuple
    per_image: int | None
    clamped: bool


def prepare(ctx: RunContext) -> Prepared:
    """Open the memory (train or a fraction list) and query (val) splits; size the memory per image."""
    config = ctx.config
    ctx.config = config = dataclasses.replace(
        config, input_size=resolve_input_size(config.input_size, ctx.encoder.patch_size))
    check_input_size(config.input_size, ctx.encoder)
    family = get_family(config.dataset)
    id_list = config.train_list
    if config.train_fraction is not None:
        id_list = str(fraction_list(family, config.train_fraction, config.fraction_seed, data_root=ctx.data_root))
    train = open_dataset(family, ctx.data_root, family.train_split, id_list=id_list)
    val = open_dataset(family, ctx.data_root, family.val_split)
    check_splits(family.name, train=train, val=val)
    s = config.input_size // ctx.encoder.patch_size
    per_image, clamped = _memory_per_image(config, len(train), s * s)
    mean, std = normalisation(config.normalization)
    return Prepared(family, train, val, id_list, mean, std, per_image, clamped)


def extract_features(ctx: RunContext, prep: Prepared) -> dict:
    """Memory bank: one cached entry per augmentation epoch (0 epochs = one un-augmented pass); val grids."""
    config, p = ctx.config, ctx.encoder.patch_size
    epochs = max(1, config.augment_epochs)
    keys, labels = [], []
    for epoch in range(epochs):
        if config.augment_epochs == 0:
            view = ResizeView(config.input_size, mean=prep.mean, std=prep.std)
        else:
            view = HummingbirdTrainView(config.input_size, seed=config.seed, epoch=epoch, mean=prep.mean,
                                        std=prep.std)
        reducer = MemoryReducer(p, prep.val.num_classes, prep.val.ignore_index, config.memory_ignore,
                                prep.per_image, config.seed, epoch)
        mem = ctx.extract(prep.train, view, reducer=reducer, desc=f"memory bank {epoch + 1}/{epochs}")
        keys.append(mem["keys"])
        labels.append(mem["labels"])
    val = ctx.extract(prep.val, ResizeView(config.input_size, mean=prep.mean, std=prep.std), desc="val features")
    return {"keys": keys, "labels": labels, "val": val}


def score(ctx: RunContext, prep: Prepared, feats: dict) -> Outcome:
    """Exact k-NN of every val patch in the memory bank, label transfer, one streaming confusion matrix."""
    config, p = ctx.config, ctx.encoder.patch_size
    input_size, s = config.input_size, config.input_size // p
    C, ignore = prep.val.num_classes, prep.val.ignore_index
    dev = torch.device(ctx.device)
    keys = torch.from_numpy(np.concatenate([np.asarray(k) for k in feats["keys"]])).float()
    labels = torch.from_numpy(np.concatenate([np.asarray(lab) for lab in feats["labels"]])).to(dev)
    if keys.shape[0] == 0:
        raise ConfigError("the memory bank is empty (no labelled patches in the train split)")
    k = min(config.neighbours, keys.shape[0])
    index = build_index(keys, backend=config.backend, device=str(dev))
    q = feats["val"]
    conf = ConfusionMatrix(C, ignore_index=ignore, device=str(dev))
    n_val = len(prep.val)
    chunk = config.query_chunk or max(1, int(64e6 // (C * input_size * input_size)))
    n_draw = min(config.save_predictions_count, n_val) if config.save_predictions else 0
    drawn: list[np.ndarray] = []
    with progress_bar("retrieval", total=n_val, enabled=ctx.progress) as advance:
        for start in range(0, n_val, chunk):
            stop = min(n_val, start + chunk)
            val_feats = torch.from_numpy(np.array(q["features"][start:stop], dtype=np.float32)).to(dev)
            b = val_feats.shape[0]
            queries = F.normalize(val_feats.reshape(-1, val_feats.shape[-1]), dim=-1)
            sims, idx = index.search(queries, k)
            scores = transfer_labels(torch.as_tensor(sims, device=dev), torch.as_tensor(idx, device=dev), labels,
                                     config.temperature, p * p)
            scores = scores.view(b, s, s, C).permute(0, 3, 1, 2)
            scores = F.interpolate(scores, size=(input_size, input_size), mode="bilinear", align_corners=False)
            pred = scores.argmax(1)
            conf.update(pred, torch.from_numpy(np.array(q["masks"][start:stop])).to(dev))
            if start < n_draw:
                drawn.append(pred[: n_draw - start].to(torch.uint8).cpu().numpy())
            advance(b)
    artifacts = []
    if n_draw:
        images = [(prep.val.ids[i], prep.val[i][1]) for i in range(n_draw)]
        artifacts = render_label_panels(Path(config.save_predictions), ctx.benchmark, images,
                                        np.asarray(q["masks"][:n_draw]), [("prediction", np.concatenate(drawn))],
                                        ignore)

    names = prep.val.class_names
    hung = segmentation_scores(conf.matrix, matching="hungarian", class_names=names)
    ident = segmentation_scores(conf.matrix, matching="identity", class_names=names)
    metrics = {"miou": hung["miou"], "miou_identity": ident["miou"], "pixel_accuracy": ident["pixel_accuracy"],
               "per_class_iou": ident["per_class_iou"],
               **prep.family.class_means(conf.matrix, "hungarian"),
               **prep.family.class_means(conf.matrix, "identity", prefix="miou_identity")}
    retrieval = index.describe()
    derived = {"memory_per_image": prep.per_image, "memory_per_image_clamped": prep.clamped,
               "memory_rows": int(keys.shape[0]), "neighbours_used": k, "mean": list(prep.mean),
               "std": list(prep.std), "train_list_resolved": prep.train_list, "retrieval": retrieval,
               "metric_notes": {"miou": f"Hungarian-matched, pooled over val, {prep.family.mean_note()}",
                                **prep.family.class_mean_notes()}}
    return Outcome(metrics=metrics, derived=derived, dataset=split_record(prep.family.name, prep.val, prep.train),
                   seeds={"protocol": config.seed}, artifacts=artifacts)
