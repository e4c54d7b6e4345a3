"""Protocol B: linear segmentation probe on frozen patch features (Leopart → NeCo, spec protocols.md §4).

Published recipe: normed last-layer patch tokens at input 448, bilinearly upsampled to 100x100, a 1x1
conv head with bias (no BatchNorm), cross-entropy with the dataset's ignore index against
nearest-downsampled 100x100 masks, SGD (lr 0.01, momentum 0.9, weight decay 1e-4), 25 epochs, lr x0.1
at epoch 20, batch 128, seed 400; evaluation with features upsampled to 448 and identity-mapped mIoU
pooled over the whole val set.

What densebench does differently, and why:

- **Cached views (the one deliberate difference).** The reference runs the backbone on a fresh
  RandomResizedCrop(0.8-1.0)+flip view of every training image every epoch (25 forwards per image).
  Here each training image is viewed ``train_views`` times with fixed, seeded augmentations; those
  features are extracted once into the feature cache and epoch ``e`` trains on view ``e mod
  train_views``. With ``train_views == epochs`` this is exactly the reference's data stream; the
  default and its measured effect on mIoU are in docs/linear.md (bench/linear.py).
- **Head applied before upsampling.** A 1x1 conv is a per-pixel affine map and bilinear interpolation
  is a per-pixel convex combination (weights sum to 1), so ``head(up(f)) == up(head(f))`` exactly in
  real arithmetic, for the logits and therefore for the loss and its gradient. Applying the head at the
  patch grid and upsampling C logit channels instead of D feature channels gives the same numbers
  (up to float rounding, checked in tests) at a fraction of the cost; ``upsample="features"`` runs the
  literal order.
- **No model selection on val.** The last epoch is reported; the reference kept the best validation
  epoch, available as the labelled legacy option ``select_on_val``.
- **Explicit COCO train list.** The reference's 10% COCO subset depended on directory order; the
  COCO reader uses a fixed list (see densebench.data.coco).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import open_dataset
from ..data import splits as dataset_splits
from ..errors import ConfigError, DataError, choices_message
from ..features import ExtractionStats, FeatureCache, extract
from ..metrics import ConfusionMatrix, iou_per_class, mean_iou, segmentation_scores
from ..progress import progress_bar
from ..transforms import LinearTrainView, ResizeView, normalisation
from . import Benchmark, register
from .common import check_input_size, train_val_result

#: Config fields that do not change the measured numbers (beyond float rounding for ``upsample``).
NON_SEMANTIC_FIELDS = {"batch_size", "num_workers", "upsample", "eval_chunk"}

UPSAMPLE_MODES = ("logits", "features")
NORMALISATIONS = ("imagenet", "hbird-legacy", "encoder")

#: Default number of cached augmented views per training image. Chosen from the bench/linear.py
#: measurement on the synthetic suite (docs/linear.md): mIoU with 1, 2, 4 views vs fresh views every epoch.
DEFAULT_TRAIN_VIEWS = 2


@dataclass(frozen=True)
class Config:
    dataset: str = "voc"
    input_size: int = 448                  # image side fed to the encoder (published 448)
    train_views: int = DEFAULT_TRAIN_VIEWS  # cached augmented views per training image; epoch e uses view e mod N
    crop_min_scale: float = 0.8            # RandomResizedCrop scale range (crop_min_scale, 1.0)
    flip: bool = True                      # random horizontal flip (p=0.5) in the training views
    train_mask_size: int = 100             # features/logits and masks are brought to this size for the loss
    eval_size: int | None = None           # evaluation resolution; None = input_size (published: 448)
    epochs: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_drop_epoch: int = 20                # StepLR step size (epochs)
    lr_gamma: float = 0.1
    head_batch_size: int = 128             # images per SGD step of the head (published 128)
    drop_last: bool = False                # drop the last incomplete head batch (the published VOC loader does)
    select_on_val: bool = False            # LEGACY: report the epoch with the best val mIoU (at train_mask_size)
    train_list: str | None = None          # explicit id list for the training split
    normalization: str = "imagenet"        # imagenet (published), hbird-legacy, or encoder
    upsample: str = "logits"               # logits: head at the patch grid, then upsample (exact); features: literal
    seed: int = 400                        # head init, batch order and the augmentation draws
    batch_size: int = 16                   # images per backbone forward during extraction
    num_workers: int = 0
    eval_chunk: int = 0                    # val images per evaluation chunk; 0 = sized automatically

    def validate(self) -> None:
        positive = {"input_size": self.input_size, "train_views": self.train_views, "epochs": self.epochs,
                    "train_mask_size": self.train_mask_size, "lr_drop_epoch": self.lr_drop_epoch,
                    "head_batch_size": self.head_batch_size, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ConfigError(f"--eval-size must be >= 1 or none, got {self.eval_size}")
        if self.train_views > self.epochs:
            raise ConfigError(f"--train-views {self.train_views} exceeds --epochs {self.epochs}: epoch e trains on "
                              "view e mod train-views, so views beyond the number of epochs would never be used",
                              hint=f"use --train-views <= {self.epochs}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(choices_message("--upsample", self.upsample, UPSAMPLE_MODES))
        if self.normalization not in NORMALISATIONS:
            raise ConfigError(choices_message("--normalization", self.normalization, NORMALISATIONS))
        if self.num_workers < 0 or self.eval_chunk < 0:
            raise ConfigError(f"--num-workers and --eval-chunk must be >= 0, got {self.num_workers}, "
                              f"{self.eval_chunk}")


# ---------------------------------------------------------------------------------------------------
# Head, logits, training and evaluation on cached features (pure functions, unit-tested)

def make_head(embed_dim: int, num_classes: int, seed: int) -> nn.Conv2d:
    """The published head: ``Conv2d(D, C, 1)`` with bias, PyTorch's default init drawn from ``seed``.

    The global RNG is forked so that building a head never disturbs (or depends on) other random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=True)


def head_logits(head: nn.Conv2d, features: torch.Tensor, size: int, upsample: str = "logits") -> torch.Tensor:
    """(B, h, w, D) patch features -> (B, C, size, size) logits of the head on bilinearly upsampled features.

    ``features``: upsample the D feature channels, then apply the head (the published order).
    ``logits``: apply the head at the patch grid, then upsample the C logit channels: the same function,
    because a 1x1 conv commutes with bilinear interpolation (convex weights), and much cheaper when C < D.
    """
    x = features.permute(0, 3, 1, 2)
    if upsample == "features":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return head(x)
    if upsample != "logits":
        raise ConfigError(choices_message("--upsample", upsample, UPSAMPLE_MODES))
    return F.interpolate(head(x), size=(size, size), mode="bilinear", align_corners=False)


def epoch_batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's shuffled batches of image indices (each batch sorted, for memory-map locality).

    The order inside a batch does not change a mean loss, so sorting only makes reads sequential.
    """
    perm = torch.randperm(n, generator=generator).numpy()
    stop = (n // batch_size) * batch_size if drop_last else n
    return [np.sort(perm[i:i + batch_size]) for i in range(0, stop, batch_size)]


@dataclass
class TrainedHead:
    """A trained head plus what the result reports about its training."""

    head: nn.Conv2d
    loss_curve: list[float]
    steps: int
    skipped_batches: int                  # batches whose masks held only ignore pixels (no gradient)
    val_curve: list[float] | None = None  # legacy select_on_val: val mIoU per epoch at train_mask_size
    selected_epoch: int | None = None     # 1-based epoch whose head is returned


def train_head(views: list[dict[str, np.ndarray]], num_classes: int, ignore_index: int, config: Config, *,
               device: str | torch.device = "cpu", val: dict[str, np.ndarray] | None = None,
               progress: bool = False) -> TrainedHead:
    """Train the 1x1 conv head on cached views; epoch ``e`` reads ``views[e % len(views)]``.

    Each view holds ``features`` (N, h, w, D) and ``masks`` (N, m, m) with m = ``config.train_mask_size``
    (already nearest-downsampled). Features are moved to ``device`` and upsampled one batch at a time, so
    no 100x100 feature map is ever stored. With ``config.select_on_val`` the head is scored on ``val``
    (features and masks at any size; masks are nearest-resized to m) after every epoch and the best
    epoch's weights are returned (the published checkpoint selection).
    """
    dev = torch.device(device)
    n = int(views[0]["features"].shape[0])
    if any(int(v["features"].shape[0]) != n for v in views):
        raise ConfigError("every cached training view must hold the same images")
    d = int(views[0]["features"].shape[-1])
    m = config.train_mask_size
    head = make_head(d, num_classes, config.seed).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_drop_epoch, gamma=config.lr_gamma)
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    val_curve: list[float] = []
    best: tuple[float, int, dict] | None = None
    steps = skipped = 0
    with progress_bar("linear head", total=config.epochs, enabled=progress) as advance:
        for epoch in range(config.epochs):
            store = views[epoch % len(views)]
            batches = epoch_batches(n, config.head_batch_size, config.drop_last, order)
            if not batches:
                raise ConfigError(f"no training batch: {n} images with --head-batch-size {config.head_batch_size} "
                                  "and --drop-last", hint="lower --head-batch-size or pass --no-drop-last")
            total, counted = 0.0, 0
            head.train()
            for idx in batches:
                feats = torch.from_numpy(np.asarray(store["features"][idx])).to(dev).float()
                target = torch.from_numpy(np.asarray(store["masks"][idx])).to(dev).long()
                if tuple(target.shape[1:]) != (m, m):
                    raise ConfigError(f"cached training masks are {tuple(target.shape[1:])}, expected {(m, m)}")
                if not bool((target != ignore_index).any()):
                    skipped += 1
                    continue
                logits = head_logits(head, feats, m, config.upsample)
                loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(loss.detach())
                counted += 1
            if not counted:
                raise DataError(f"epoch {epoch + 1}: every training batch holds only the ignore index "
                                  f"{ignore_index}, so the head cannot learn", hint="check the training split's masks")
            sched.step()
            losses.append(total / counted)
            if config.select_on_val and val is not None:
                conf = evaluate_head(head, val, num_classes, ignore_index, m, config.upsample, device=dev,
                                     chunk=config.eval_chunk)
                score = segmentation_scores(conf.matrix, matching="identity")["miou"]
                val_curve.append(score)
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(head.state_dict()))
            advance(1)
    selected = None
    if best is not None:
        head.load_state_dict(best[2])
        selected = best[1] + 1
    return TrainedHead(head=head, loss_curve=losses, steps=steps, skipped_batches=skipped,
                       val_curve=val_curve or None, selected_epoch=selected)


def evaluate_head(head: nn.Conv2d, store: dict[str, np.ndarray], num_classes: int, ignore_index: int, size: int,
                  upsample: str = "logits", *, device: str | torch.device = "cpu", chunk: int = 0,
                  progress: bool = False) -> ConfusionMatrix:
    """Pooled confusion matrix of argmax(head(features upsampled to ``size``)) against masks at ``size``.

    Stored masks at another resolution are nearest-resized (the published 448 -> 100 validation masks).
    Work is chunked so that at most ~32M logit (or feature) values exist at once.
    """
    dev = torch.device(device)
    feats_all, masks_all = store["features"], store["masks"]
    n, d = int(feats_all.shape[0]), int(feats_all.shape[-1])
    width = max(num_classes, d if upsample == "features" else 0)
    chunk = chunk or max(1, int(32e6 // (width * size * size)))
    conf = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=str(dev))
    head.eval()
    with torch.no_grad(), progress_bar("linear eval", total=n, enabled=progress) as advance:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            feats = torch.from_numpy(np.array(feats_all[start:stop])).to(dev).float()
            gt = torch.from_numpy(np.array(masks_all[start:stop])).to(dev)
            if tuple(gt.shape[1:]) != (size, size):
                gt = F.interpolate(gt[:, None].float(), size=(size, size), mode="nearest")[:, 0]
            pred = head_logits(head, feats, size, upsample).argmax(1)
            conf.update(pred, gt.long())
            advance(stop - start)
    return conf


# ---------------------------------------------------------------------------------------------------

def run(encoder, data_root, config: Config, *, device: str = "cpu", cache: FeatureCache | None = None,
        progress: bool = True, benchmark: str | None = None) -> dict:
    """Evaluate ``encoder`` with the linear segmentation probe; returns a validated result record."""
    config.validate()
    t_start = time.perf_counter()
    p = encoder.patch_size
    eval_size = config.eval_size or config.input_size
    check_input_size(config.input_size, encoder)
    mean, std = normalisation(config.normalization, encoder)
    train_split, val_split = dataset_splits(config.dataset)
    train = open_dataset(config.dataset, data_root, train_split, id_list=config.train_list)
    val = open_dataset(config.dataset, data_root, val_split)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"{config.dataset}: empty split (train {len(train)}, val {len(val)} images)")
    C, ignore = val.num_classes, val.ignore_index
    if train.num_classes != C or train.ignore_index != ignore:
        raise ConfigError(f"{config.dataset}: train and val disagree on classes/ignore index "
                          f"({train.num_classes}/{train.ignore_index} vs {C}/{ignore})")

    stats = ExtractionStats()
    common = {"cache": cache, "device": device, "batch_size": config.batch_size,
              "num_workers": config.num_workers, "progress": progress, "stats": stats}
    views = []
    for v in range(config.train_views):
        view = LinearTrainView(config.input_size, config.train_mask_size, seed=config.seed, view=v, mean=mean,
                               std=std, scale=(config.crop_min_scale, 1.0), flip=config.flip)
        views.append(extract(encoder, train, view, key_parts={"view": view.describe(), "reduce": "full-f16"},
                             desc=f"train view {v + 1}/{config.train_views}", **common))
    # mask_size=None when the masks are kept at the input size: the same cache key as other protocols' val views
    val_view = ResizeView(config.input_size, mask_size=None if eval_size == config.input_size else eval_size,
                          mean=mean, std=std)
    val_store = extract(encoder, val, val_view, key_parts={"view": val_view.describe(), "reduce": "full-f16"},
                        desc="val features", **common)
    t_extracted = time.perf_counter()

    trained = train_head(views, C, ignore, config, device=device, val=val_store if config.select_on_val else None,
                         progress=progress)
    conf = evaluate_head(trained.head, val_store, C, ignore, eval_size, config.upsample, device=device,
                         chunk=config.eval_chunk, progress=progress)
    t_done = time.perf_counter()

    scores = segmentation_scores(conf.matrix, matching="identity", class_names=val.class_names)
    metrics = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
               "per_class_iou": scores["per_class_iou"], "train_loss_curve": trained.loss_curve}
    if trained.val_curve is not None:
        metrics["val_miou_curve"] = trained.val_curve
    if config.dataset == "ade20k":
        metrics["miou_150"] = mean_iou(iou_per_class(conf.matrix), exclude=[0])

    s = config.input_size // p
    resolved = dataclasses.asdict(config)
    resolved.update(
        eval_size=eval_size, patch_grid=s, mean=list(mean), std=list(std), crop_scale=[config.crop_min_scale, 1.0],
        crop_ratio=[3 / 4, 4 / 3], train_list_resolved=config.train_list, steps=trained.steps,
        skipped_batches=trained.skipped_batches,
        reported_epoch=trained.selected_epoch or config.epochs,
        metric_notes={
            "miou": "identity-mapped mIoU pooled over val at eval_size, mean over all classes"
                    + (" (151 incl. the ignored class 0, as published)" if config.dataset == "ade20k" else ""),
            "miou_150": "ADE20K mean over the 150 real classes" if config.dataset == "ade20k" else None,
            "train_loss_curve": "mean cross-entropy of the head's SGD steps, per epoch",
            "reported_epoch": ("LEGACY --select-on-val: the epoch with the best val mIoU at train_mask_size, "
                               "i.e. model selection on the evaluation set" if config.select_on_val
                               else "the last epoch (no model selection on val)"),
        })
    return train_val_result(benchmark=benchmark or f"{config.dataset}-linear", dataset_name=config.dataset,
                            encoder=encoder, config=resolved, metrics=metrics, seed=config.seed, device=device,
                            stats=stats, cache=cache, train=train, val=val, t_start=t_start,
                            t_extracted=t_extracted, t_done=t_done,
                            dataset_extra={"train_id_source": train.extra.get("id_source")})


#: The embedded default's settings on the synthetic suite (seconds on a CPU). Its splits hold 48 training
#: images, so the published batch of 128 would make one SGD step per epoch: batches of 4 and lr 0.1 give the
#: head a usable optimisation budget (at lr 0.01 the 16-dimensional ``pixels`` features barely move it).
_SYNTHETIC = {"input_size": 112, "train_mask_size": 28, "head_batch_size": 4, "lr": 0.1}

register(Benchmark("voc-linear", "linear", "voc",
                   "Linear segmentation probe (Leopart/NeCo), Pascal VOC 2012 (trainaug -> val), 21 classes",
                   overrides={"drop_last": True}, synthetic=_SYNTHETIC))
register(Benchmark("coco-things-linear", "linear", "coco-things",
                   "Linear segmentation probe, COCO-Things (12 thing supercategories; fixed 10% train2017 list)",
                   synthetic=_SYNTHETIC))
register(Benchmark("coco-stuff-linear", "linear", "coco-stuff",
                   "Linear segmentation probe, COCO-Stuff (15 stuff supercategories; fixed 10% train2017 list)",
                   synthetic=_SYNTHETIC))
register(Benchmark("ade20k-linear", "linear", "ade20k",
                   "Linear segmentation probe, ADE20K (151-class mean as published; 150-class mean reported too)",
                   synthetic=_SYNTHETIC))
