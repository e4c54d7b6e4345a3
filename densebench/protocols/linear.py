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
- **Shuffled batches.** The reference trains VOC and ADE20K in file order (ADE20K ids are ordered by
  scene, so its batches are scene-homogeneous) and shuffles COCO (with ``drop_last``). Here every dataset's
  batches are reshuffled each epoch; ``batch_order="file-order"`` is the labelled legacy order.

The recipe is the named protocol version ``neco-leopart`` (``--protocol``); other linear recipes (e.g.
DINOv2's) would be further versions.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetFamily, SegmentationDataset, get_family, open_dataset
from ..data.ids import id_provenance
from ..errors import ConfigError, DataError, choices_message
from ..metrics import ConfusionMatrix, segmentation_scores
from ..options import ProtocolConfig, option
from ..progress import progress_bar
from ..transforms import LinearTrainView, ResizeView, normalisation
from .common import Outcome, RunContext, check_input_size, check_splits, protocol_runner, split_record

UPSAMPLE_MODES = ("logits", "features")
NORMALISATIONS = ("imagenet", "hbird-legacy", "encoder")
#: Named protocol versions (``--protocol``): the Leopart/NeCo linear_finetune recipe is the one implemented.
VERSIONS = ("neco-leopart",)
BATCH_ORDERS = ("shuffled", "file-order")

#: Default number of cached augmented views per training image. Chosen from the bench/linear.py
#: measurement on the synthetic suite (docs/linear.md): mIoU with 1, 2, 4 views vs fresh views every epoch.
DEFAULT_TRAIN_VIEWS = 2


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("voc", "dataset family (set by the benchmark)")
    protocol: str = option("neco-leopart", "named protocol version: neco-leopart = the Leopart/NeCo "
                                           "linear_finetune recipe", choices=VERSIONS)
    input_size: int = option(448, "image side fed to the encoder, a multiple of the patch size (published 448)",
                             min=1, max=4096)
    train_views: int = option(DEFAULT_TRAIN_VIEWS, "cached augmented views per training image; epoch e trains "
                                                   "on view e mod N (N = --epochs: the published data stream)",
                              min=1)
    crop_min_scale: float = option(0.8, "RandomResizedCrop scale range (crop-min-scale, 1.0) of the training views",
                                   min=0, max=1, min_exclusive=True)
    flip: bool = option(True, "random horizontal flip (p=0.5) in the training views")
    train_mask_size: int = option(100, "side of the training loss: logits and masks are brought to it", min=1)
    eval_size: int | None = option(None, "evaluation resolution (published: the input size)", min=1,
                                   none="input size")
    epochs: int = option(25, "epochs of head training", min=1)
    lr: float = option(0.01, "SGD learning rate of the head", min=0, min_exclusive=True)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1, max_exclusive=True)
    weight_decay: float = option(1e-4, "SGD weight decay", min=0)
    lr_drop_epoch: int = option(20, "StepLR step size in epochs", min=1)
    lr_gamma: float = option(0.1, "StepLR factor", min=0, max=1, min_exclusive=True)
    head_batch_size: int = option(128, "images per SGD step of the head (published 128)", min=1)
    drop_last: bool = option(False, "drop the last incomplete head batch (the published VOC and COCO loaders do; "
                                    "on by default for VOC)")
    batch_order: str = option("shuffled", "head batches: reshuffled every epoch, or file-order (LEGACY: the "
                                          "reference's VOC and ADE20K loaders do not shuffle)", choices=BATCH_ORDERS)
    select_on_val: bool = option(False, "LEGACY: report the epoch with the best val mIoU (at --train-mask-size), "
                                        "i.e. model selection on the evaluation set")
    train_list: str | None = option(None, "file of ids for the training split (instead of the whole split)")
    val_list: str | None = option(None, "file of ids for the val split (instead of the dataset's val split)")
    normalization: str = option("imagenet", "input normalisation; hbird-legacy = the reference's 0.255 std typo, "
                                            "encoder = what the encoder declares", choices=NORMALISATIONS)
    upsample: str = option("logits", "logits: head at the patch grid, then upsample (the same function, cheap); "
                                     "features: the literal order", choices=UPSAMPLE_MODES, non_semantic=True)
    seed: int = option(400, "seed of the head init, the batch order and the augmentation draws")
    batch_size: int = option(16, "images per backbone forward", min=1, non_semantic=True)
    num_workers: int | None = option(None, "data-loading worker processes; auto: the usable cores, at most 8",
                                     min=0, none="auto", non_semantic=True)
    eval_chunk: int = option(0, "val images per evaluation chunk; 0 = sized automatically", min=0,
                             non_semantic=True)

    def check(self) -> None:
        if self.train_views > self.epochs:
            raise ConfigError(f"--train-views {self.train_views} exceeds --epochs {self.epochs}: epoch e trains on "
                              "view e mod train-views, so views beyond the number of epochs would never be used",
                              hint=f"use --train-views <= {self.epochs}")


def not_reproduced(config: Config, family: str) -> list[str]:
    """Where this run differs from the reference code of its protocol version (recorded in ``derived``)."""
    out = []
    if config.train_views < config.epochs:
        out.append(f"{config.train_views} cached augmented views per image, not a fresh view every epoch")
    if not config.select_on_val:
        out.append("the last epoch is reported (the reference selects the best val epoch)")
    if config.batch_order == "shuffled" and family in ("voc", "ade20k"):
        out.append("batches reshuffled every epoch (the reference trains VOC and ADE20K in file order)")
    return out


def resolve_eval_size(eval_size: int | None, input_size: int) -> int:
    """The evaluation resolution: the input size unless one is given (the published evaluation is at 448)."""
    return eval_size if eval_size is not None else input_size


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run of ``model`` records it: the evaluation size filled from the input size."""
    config = dict(config)
    config["eval_size"] = resolve_eval_size(config.get("eval_size"), int(config["input_size"]))
    return config


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


def epoch_batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
                  order: str = "shuffled") -> list[np.ndarray]:
    """One epoch's batches of image indices (each batch sorted, for memory-map locality): a fresh permutation
    (``shuffled``), or consecutive images in the split's order (``file-order``, the reference's VOC/ADE20K
    loaders; the generator is not drawn from).

    The order inside a batch does not change a mean loss, so sorting only makes reads sequential.
    """
    if order not in BATCH_ORDERS:
        raise ConfigError(choices_message("--batch-order", order, BATCH_ORDERS))
    perm = torch.randperm(n, generator=generator).numpy() if order == "shuffled" else np.arange(n)
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
            batches = epoch_batches(n, config.head_batch_size, config.drop_last, order, config.batch_order)
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

run = protocol_runner(__name__, "-linear", "Evaluate ``encoder`` with the linear segmentation probe")


@dataclass
class Prepared:
    family: DatasetFamily
    train: SegmentationDataset
    val: SegmentationDataset
    mean: tuple
    std: tuple


def check_head_batches(n_train: int, config: Config, family: str, split: str) -> None:
    """Refuse a head batch that leaves no training batch (drop_last and more images per batch than the split).

    Without drop_last a batch larger than the split is legal: each epoch is one smaller batch.
    """
    if config.drop_last and config.head_batch_size > n_train:
        raise ConfigError(f"--head-batch-size {config.head_batch_size} exceeds the {n_train} images of the "
                          f"{family} {split} split: with --drop-last there would be no training batch",
                          hint=f"use --head-batch-size <= {n_train} or pass --no-drop-last")


def prepare(ctx: RunContext) -> Prepared:
    """Open the train and val splits, resolve the evaluation size, refuse what cannot train."""
    config = ctx.config
    ctx.config = config = dataclasses.replace(
        config, eval_size=resolve_eval_size(config.eval_size, config.input_size))
    check_input_size(config.input_size, ctx.encoder)
    mean, std = normalisation(config.normalization, ctx.encoder)
    family = get_family(config.dataset)
    train = open_dataset(family, ctx.data_root, family.train_split, id_list=config.train_list)
    val = open_dataset(family, ctx.data_root, family.val_split, id_list=config.val_list)
    check_splits(family.name, train=train, val=val)
    C, ignore = val.num_classes, val.ignore_index
    if train.num_classes != C or train.ignore_index != ignore:
        raise ConfigError(f"{family.name}: train and val disagree on classes/ignore index "
                          f"({train.num_classes}/{train.ignore_index} vs {C}/{ignore})")
    check_head_batches(len(train), config, family.name, train.split)
    return Prepared(family.for_classes(C, ignore), train, val, mean, std)


def extract_features(ctx: RunContext, prep: Prepared) -> dict:
    """``train_views`` cached augmented views of the train split (full grids, masks at train_mask_size); val grids."""
    config = ctx.config
    views = []
    for v in range(config.train_views):
        view = LinearTrainView(config.input_size, config.train_mask_size, seed=config.seed, view=v, mean=prep.mean,
                               std=prep.std, scale=(config.crop_min_scale, 1.0), flip=config.flip)
        views.append(ctx.extract(prep.train, view, desc=f"train view {v + 1}/{config.train_views}"))
    # mask_size=None when the masks are kept at the input size: the same cache entry as the overclustering
    # protocol's val view, so one val pass serves both.
    mask_size = None if config.eval_size == config.input_size else config.eval_size
    val = ctx.extract(prep.val, ResizeView(config.input_size, mask_size=mask_size, mean=prep.mean, std=prep.std),
                      desc="val features")
    return {"views": views, "val": val}


def score(ctx: RunContext, prep: Prepared, feats: dict) -> Outcome:
    """Train the head on the cached views, evaluate it on val at eval_size with identity-mapped mIoU."""
    config = ctx.config
    C, ignore = prep.val.num_classes, prep.val.ignore_index
    val_store = feats["val"]
    trained = train_head(feats["views"], C, ignore, config, device=ctx.device,
                         val=val_store if config.select_on_val else None, progress=ctx.progress)
    conf = evaluate_head(trained.head, val_store, C, ignore, config.eval_size, config.upsample, device=ctx.device,
                         chunk=config.eval_chunk, progress=ctx.progress)

    scores = segmentation_scores(conf.matrix, matching="identity", class_names=prep.val.class_names)
    metrics = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
               "per_class_iou": scores["per_class_iou"], "train_loss_curve": trained.loss_curve}
    if trained.val_curve is not None:
        metrics["val_miou_curve"] = trained.val_curve
    metrics.update(prep.family.class_means(conf.matrix, "identity"))

    derived = {
        "patch_grid": config.input_size // ctx.encoder.patch_size, "mean": list(prep.mean), "std": list(prep.std),
        "crop_scale": [config.crop_min_scale, 1.0], "crop_ratio": [3 / 4, 4 / 3],
        "train_list_resolved": config.train_list, "steps": trained.steps,
        "skipped_batches": trained.skipped_batches, "reported_epoch": trained.selected_epoch or config.epochs,
        "protocol_version": {"name": config.protocol, "not_reproduced": not_reproduced(config, prep.family.name)},
        "metric_notes": {
            "miou": f"identity-mapped mIoU pooled over val at eval_size, {prep.family.mean_note()}",
            **prep.family.class_mean_notes(),
            "train_loss_curve": "mean cross-entropy of the head's SGD steps, per epoch",
            "reported_epoch": ("LEGACY --select-on-val: the epoch with the best val mIoU at train_mask_size, "
                               "i.e. model selection on the evaluation set" if config.select_on_val
                               else "the last epoch (no model selection on val)"),
        }}
    dataset = split_record(prep.family.name, prep.val, prep.train,
                           train_id_source=prep.train.extra.get("id_source"),
                           **id_provenance(train=prep.train, val=prep.val))
    return Outcome(metrics=metrics, derived=derived, dataset=dataset, seeds={"protocol": config.seed})
