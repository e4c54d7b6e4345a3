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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import fraction_list, open_dataset
from ..data import splits as dataset_splits
from ..encoders.base import incontext_input_size
from ..errors import ConfigError, choices_message
from ..features import ExtractionStats, FeatureCache, extract
from ..metrics import ConfusionMatrix, segmentation_scores
from ..progress import progress_bar
from ..retrieval import build_index
from ..transforms import HummingbirdTrainView, ResizeView, generator_for, normalisation
from .common import check_input_size, train_val_result

#: Config fields that do not change the measured numbers (ignored when comparing to the canonical config).
NON_SEMANTIC_FIELDS = {"batch_size", "num_workers", "device", "query_chunk", "save_predictions",
                       "save_predictions_count"}


@dataclass(frozen=True)
class Config:
    dataset: str = "voc"
    input_size: int | None = None          # None: 504 for /14 models, 512 for /16 (published)
    augment_epochs: int = 2                # published: 2; 0 = memory from resized, un-augmented images
    memory_size: int | None = 10_240_000   # patches kept in the memory; None = every patch ("all")
    neighbours: int = 30
    temperature: float = 0.02
    train_list: str | None = None          # explicit id list for the memory bank
    train_fraction: int | None = None      # 128, 64 or 8: the shipped 1/N fraction list
    fraction_seed: int = 42                # which of the published fraction lists (42, 400, 783, 1293, 4019)
    memory_ignore: str = "class0"          # "class0": ignore pixels count as class 0 (published); "drop"
    normalization: str = "imagenet"        # "imagenet" or "hbird-legacy" (the reference's 0.255 std typo)
    backend: str = "auto"                  # retrieval backend: auto, torch, faiss, faiss-ivf
    seed: int = 0
    batch_size: int = 16
    num_workers: int = 0
    query_chunk: int = 0                   # val images per retrieval chunk; 0 = sized automatically
    save_predictions: str | None = None    # folder for PNGs: image | ground truth | prediction
    save_predictions_count: int = 8        # how many val images (the first ones) to draw

    def validate(self) -> None:
        if self.augment_epochs < 0:
            raise ConfigError(f"--augment-epochs must be >= 0, got {self.augment_epochs}")
        if self.memory_size is not None and self.memory_size < 1:
            raise ConfigError(f"--memory-size must be a positive integer or 'all', got {self.memory_size}")
        if self.neighbours < 1:
            raise ConfigError(f"--neighbours must be >= 1, got {self.neighbours}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.memory_ignore not in ("class0", "drop"):
            raise ConfigError(choices_message("--memory-ignore", self.memory_ignore, ["class0", "drop"]))
        if self.train_fraction is not None and self.train_fraction not in (128, 64, 8):
            raise ConfigError(choices_message("--train-fraction", self.train_fraction, [128, 64, 8]))
        if self.train_fraction is not None and self.train_list is not None:
            raise ConfigError("give either --train-list or --train-fraction, not both")
        if self.save_predictions_count < 0:
            raise ConfigError(f"--save-predictions-count must be >= 0, got {self.save_predictions_count}")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"--input-size must be positive, got {self.input_size}")


def resolve_input_size(input_size: int | None, patch_size: int) -> int:
    """The published input size when none is given: 504 for /14 models, 512 for /16 (and /8)."""
    return input_size if input_size is not None else incontext_input_size(patch_size)


def resolve_canonical(config: dict, model: dict) -> dict:
    """The canonical config as a result for ``model`` records it (for leaderboard comparisons)."""
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


def run(encoder, data_root, config: Config, *, device: str = "cpu", cache: FeatureCache | None = None,
        progress: bool = True, benchmark: str | None = None) -> dict:
    """Evaluate ``encoder`` with the in-context retrieval protocol; returns a validated result record."""
    config.validate()
    t_start = time.perf_counter()
    input_size = resolve_input_size(config.input_size, encoder.patch_size)
    p = encoder.patch_size
    check_input_size(input_size, encoder)
    mean, std = normalisation(config.normalization)
    train_split, val_split = dataset_splits(config.dataset)
    id_list = config.train_list
    if config.train_fraction is not None:
        id_list = str(fraction_list(config.dataset, config.train_fraction, config.fraction_seed, data_root=data_root))
    train = open_dataset(config.dataset, data_root, train_split, id_list=id_list)
    val = open_dataset(config.dataset, data_root, val_split)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"{config.dataset}: empty split (train {len(train)}, val {len(val)} images)")
    C, ignore = val.num_classes, val.ignore_index
    s = input_size // p
    per_image, clamped = _memory_per_image(config, len(train), s * s)

    stats = ExtractionStats()
    common = dict(cache=cache, device=device, batch_size=config.batch_size, num_workers=config.num_workers,
                  progress=progress, stats=stats)
    # Memory bank: one cached entry per augmentation epoch (0 epochs = one un-augmented pass).
    keys_parts, label_parts = [], []
    for epoch in range(max(1, config.augment_epochs)):
        if config.augment_epochs == 0:
            view = ResizeView(input_size, mean=mean, std=std)
        else:
            view = HummingbirdTrainView(input_size, seed=config.seed, epoch=epoch, mean=mean, std=std)
        reducer = MemoryReducer(p, C, ignore, config.memory_ignore, per_image, config.seed, epoch)
        mem = extract(encoder, train, view, key_parts={"view": view.describe(), "reduce": reducer.describe()},
                      reducer=reducer, desc=f"memory bank {epoch + 1}/{max(1, config.augment_epochs)}", **common)
        keys_parts.append(mem["keys"])
        label_parts.append(mem["labels"])
    val_view = ResizeView(input_size, mean=mean, std=std)
    q = extract(encoder, val, val_view, key_parts={"view": val_view.describe(), "reduce": "full-f16"},
                desc="val features", **common)
    t_extracted = time.perf_counter()

    dev = torch.device(device)
    keys = torch.from_numpy(np.concatenate([np.asarray(k) for k in keys_parts])).float()
    labels = torch.from_numpy(np.concatenate([np.asarray(lab) for lab in label_parts]))
    if keys.shape[0] == 0:
        raise ConfigError("the memory bank is empty (no labelled patches in the train split)")
    k = min(config.neighbours, keys.shape[0])
    index = build_index(keys, backend=config.backend, device=str(dev))
    labels = labels.to(dev)
    conf = ConfusionMatrix(C, ignore_index=ignore, device=str(dev))
    n_val = len(val)
    chunk = config.query_chunk or max(1, int(64e6 // (C * input_size * input_size)))
    n_draw = min(config.save_predictions_count, n_val) if config.save_predictions else 0
    drawn: list[np.ndarray] = []
    with progress_bar("retrieval", total=n_val, enabled=progress) as advance:
        for start in range(0, n_val, chunk):
            stop = min(n_val, start + chunk)
            feats = torch.from_numpy(np.array(q["features"][start:stop], dtype=np.float32)).to(dev)
            b = feats.shape[0]
            queries = F.normalize(feats.reshape(-1, feats.shape[-1]), dim=-1)
            sims, idx = index.search(queries, k)
            sims = torch.as_tensor(sims, device=dev)
            idx = torch.as_tensor(idx, device=dev)
            scores = transfer_labels(sims, idx, labels, config.temperature, p * p)
            scores = scores.view(b, s, s, C).permute(0, 3, 1, 2)
            scores = F.interpolate(scores, size=(input_size, input_size), mode="bilinear", align_corners=False)
            pred = scores.argmax(1)
            gt = torch.from_numpy(np.array(q["masks"][start:stop])).to(dev)
            conf.update(pred, gt)
            if start < n_draw:
                drawn.append(pred[: n_draw - start].to(torch.uint8).cpu().numpy())
            advance(b)
    t_done = time.perf_counter()
    artifacts = None
    if n_draw:
        from ..pictures import render_label_panels

        images = [(val.ids[i], val[i][1]) for i in range(n_draw)]
        artifacts = render_label_panels(Path(config.save_predictions), benchmark or f"{config.dataset}-incontext",
                                        images, np.asarray(q["masks"][:n_draw]),
                                        [("prediction", np.concatenate(drawn))], ignore)

    names = val.class_names
    hung = segmentation_scores(conf.matrix, matching="hungarian", class_names=names)
    ident = segmentation_scores(conf.matrix, matching="identity", class_names=names)
    metrics = {"miou": hung["miou"], "miou_identity": ident["miou"], "pixel_accuracy": ident["pixel_accuracy"],
               "per_class_iou": ident["per_class_iou"]}
    if config.dataset == "ade20k":
        metrics["miou_150"] = segmentation_scores(conf.matrix, matching="hungarian", class_names=names,
                                                  exclude=[0])["miou"]
        metrics["miou_identity_150"] = segmentation_scores(conf.matrix, matching="identity", class_names=names,
                                                           exclude=[0])["miou"]

    resolved = dataclasses.asdict(config)
    resolved.update(input_size=input_size, memory_per_image=per_image, memory_per_image_clamped=clamped,
                    memory_rows=int(keys.shape[0]), neighbours_used=k, mean=list(mean), std=list(std),
                    train_list_resolved=id_list, metric_notes={
                        "miou": "Hungarian-matched, pooled over val, mean over all classes"
                                + (" (151 incl. ignored class 0, as published)" if config.dataset == "ade20k" else ""),
                        "miou_150": "ADE20K mean over the 150 real classes" if config.dataset == "ade20k" else None})
    resolved["retrieval"] = index.describe()
    # Exact backends give the same neighbours; only an approximate index changes what is measured.
    resolved["backend"] = "exact" if resolved["retrieval"].get("exact") else config.backend
    return train_val_result(benchmark=benchmark or f"{config.dataset}-incontext", dataset_name=config.dataset,
                            encoder=encoder, config=resolved, metrics=metrics, seed=config.seed, device=device,
                            stats=stats, cache=cache, train=train, val=val, t_start=t_start,
                            t_extracted=t_extracted, t_done=t_done, artifacts=artifacts)
