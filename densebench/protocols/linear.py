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

At published sizes (docs/linear.md): the training features reach the head through a :class:`HeadFeed`
(resident on the device when they fit, else prefetched from the memory map by a background thread; never a
different number), and under torchrun / srun the head trains with DDP, each rank on its images' part of every
global batch, with val scored in shares and the confusion counts summed exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import devices, distributed
from ..retrieval import StackedRows
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
#: How head training reads the cached training features (``--head-feed``; none changes a number).
HEAD_FEEDS = ("auto", "resident", "prefetch", "stream")
#: Share of the free memory (CUDA: free device memory; CPU: the host's available memory, where the page cache keeps
#: the memory map) that ``--head-feed auto`` lets the resident training features take. The rest holds the head's
#: activations (128 x 151 x 100 x 100 float32 logits and their gradients: ~3 GB) and the evaluation chunks; 0.8
#: keeps one ADE20K view of a ViT-L (53.6 GB) on an 80 GB GPU and both (107 GB) on a 141 GB one.
RESIDENT_FRACTION = 0.8
#: Host buffers the prefetch thread fills ahead of the batch in training.
PREFETCH_DEPTH = 3
#: ``score`` runs on every rank of a torchrun / srun launch: DDP head training, val shared (common._score).
SHARDED_SCORE = True

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
    head_feed: str = option("auto", "how head training reads the cached features: resident = kept on the device "
                                    "(CPU: the memory map), prefetch = a background thread gathers the next batches "
                                    "(pinned buffers on CUDA), stream = read each batch when needed; auto = resident "
                                    "when they fit, else prefetch", choices=HEAD_FEEDS, non_semantic=True)

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


# ---------------------------------------------------------------------------------------------------
# Feeding the cached training features to the head (kept on the device, or prefetched by a thread)

def feed_budget(device: str | torch.device, group: distributed.Group | None = None) -> int | None:
    """Bytes this process's resident training features may take: ``RESIDENT_FRACTION`` of the free CUDA memory,
    or on the CPU of the host's available memory (there "resident" means the page cache keeps the memory map),
    divided among the ranks of this machine that share it; None: unknown."""
    dev = torch.device(device)
    sharing = distributed.local_world_size() if group is not None and group.enabled else 1
    if dev.type == "cuda":
        torch.cuda.empty_cache()   # blocks the extraction's allocator kept are free for the features
        per_device = -(-sharing // max(1, torch.cuda.device_count()))
        return int(RESIDENT_FRACTION * torch.cuda.mem_get_info(dev)[0]) // per_device
    available = devices.host_available()
    return None if available is None else int(RESIDENT_FRACTION * available) // sharing


def plan_feed(view_bytes: list[int], masks_bytes: int, budget: int | None, choice: str = "auto") -> list[str]:
    """How each cached view reaches the head: ``resident`` (kept on the device for every epoch), ``prefetch``
    (gathered batch by batch from the memory map by a background thread) or ``stream`` (gathered when needed).

    ``auto`` keeps views resident, in view order, while their bytes and every view's masks fit ``budget`` (None:
    no limit), and prefetches the others.
    """
    if choice not in HEAD_FEEDS:
        raise ConfigError(choices_message("--head-feed", choice, HEAD_FEEDS))
    if choice != "auto":
        return [choice] * len(view_bytes)
    left = None if budget is None else budget - masks_bytes
    modes = []
    for nbytes in view_bytes:
        fits = left is None or nbytes <= left
        modes.append("resident" if fits else "prefetch")
        left = left - nbytes if fits and left is not None else left
    return modes


def _on_device(array, lo: int, hi: int, dev: torch.device):
    """Rows ``lo:hi`` of a cached array, held for the whole run: the memory map itself on the CPU (the page cache is
    the device; nothing is copied twice), one copy in device memory, uploaded block by block, on CUDA."""
    if dev.type != "cuda":
        return array
    return StackedRows([array]).shard(lo, hi).to(dev)


def _rows(held, idx: np.ndarray, lo: int, dev: torch.device) -> torch.Tensor:
    """Rows ``idx`` of what :func:`_on_device` holds (it starts at row ``lo``), on ``dev``, in the stored dtype."""
    if isinstance(held, torch.Tensor):
        return held.index_select(0, torch.from_numpy(idx - lo).to(dev))
    return torch.from_numpy(np.asarray(held[idx])).to(dev)


class _Prefetcher:
    """The features of one batch after another, read from the memory map by a background thread that runs up to
    ``depth`` batches ahead of the one in training (``threaded=False``: each batch is read when asked for).

    On CUDA the thread gathers the float16 rows into pinned host buffers, copied to the device asynchronously and
    widened to float32 there; on the CPU it gathers and widens them itself, so the training thread only trains.
    """

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]], dev: torch.device, *, threaded: bool = True,
                 depth: int = PREFETCH_DEPTH):
        self.items, self.dev, self.cuda = items, dev, dev.type == "cuda"
        slots = depth if threaded else 1
        self.buffers = []
        if self.cuda:
            first, rows = items[0][0], max(1, max(len(idx) for _, idx in items))
            self.buffers = [torch.empty((rows, *first.shape[1:]), dtype=StackedRows([first]).dtype, pin_memory=True)
                            for _ in range(slots)]
        self.free: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        for slot in range(slots):
            self.free.put((slot, None))
        self.stop = threading.Event()
        self.pos, self.wait_s = 0, 0.0
        self.thread = None
        if threaded:
            self.thread = threading.Thread(target=self._fill, name="densebench-head-prefetch", daemon=True)
            self.thread.start()

    def _read(self, slot: int, event) -> tuple[int, Any]:
        """Batch ``pos`` into buffer ``slot`` (CUDA), or as a float32 tensor (CPU)."""
        array, idx = self.items[self.pos]
        self.pos += 1
        if not self.cuda:
            return slot, torch.from_numpy(np.take(array, idx, axis=0)).float()
        if event is not None:           # the device copy that last read this buffer has finished
            event.synchronize()
        np.take(array, idx, axis=0, out=self.buffers[slot][:len(idx)].numpy(), mode="clip")   # indices are valid
        return slot, len(idx)

    def _next_free(self):
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self.free.get(timeout=0.1)
        return None

    def _fill(self) -> None:
        try:
            while self.pos < len(self.items):
                free = self._next_free()
                if free is None:
                    return
                self.ready.put(self._read(*free))
        except BaseException as e:  # noqa: BLE001 - raised in the training thread
            self.ready.put(e)

    def next(self) -> torch.Tensor:
        """The next batch's features, float32, on the device."""
        t0 = time.perf_counter()
        item = self.ready.get() if self.thread is not None else self._read(*self.free.get())
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        slot, got = item
        event = None
        if self.cuda:
            got = self.buffers[slot][:got].to(self.dev, non_blocking=True).float()
            event = torch.cuda.Event()
            event.record()
        else:
            got = got.to(self.dev)   # the CPU: the same tensor
        self.free.put((slot, event))
        return got

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


class HeadFeed:
    """The cached training views fed to the head in the batch order of the whole run (``schedule[e]``: epoch e's
    batches of sorted image indices; epoch e reads view e mod len(views)).

    ``rows = (lo, hi)``: the images whose features this process reads (all of them in one process; under DDP the
    rank's contiguous share, whose part of every global batch it trains on). Masks are small (one byte per pixel of
    the loss grid) and held whole, so every rank sees every label of the batch. Features reach the head as float32
    from the stored float16 whichever way they travel, so the mode never changes a number.
    """

    def __init__(self, views: list[dict], schedule: list[list[np.ndarray]], rows: tuple[int, int],
                 device: str | torch.device, choice: str = "auto", *, budget: int | None | str = "measure",
                 group: distributed.Group | None = None):
        self.dev, self.rows, self.schedule, self.n_views = torch.device(device), rows, schedule, len(views)
        self.per_image = [int(np.prod(v["features"].shape[1:])) * v["features"].dtype.itemsize for v in views]
        view_bytes = [(rows[1] - rows[0]) * b for b in self.per_image]
        self.budget = feed_budget(self.dev, group) if budget == "measure" else budget
        self.modes = plan_feed(view_bytes, sum(int(v["masks"].nbytes) for v in views), self.budget, choice)
        self.masks = [_on_device(v["masks"], 0, len(v["masks"]), self.dev) for v in views]
        self.held = {i: _on_device(v["features"], rows[0], rows[1], self.dev)
                     for i, (v, mode) in enumerate(zip(views, self.modes)) if mode == "resident"}
        self.resident_bytes = sum(view_bytes[i] for i in self.held)
        self.shares = [[(int(np.searchsorted(idx, rows[0])), int(np.searchsorted(idx, rows[1]))) for idx in batches]
                       for batches in schedule]
        streamed = [(views[e % self.n_views]["features"], batches[k][a:b])
                    for e, batches in enumerate(schedule) if e % self.n_views not in self.held
                    for k, (a, b) in enumerate(self.shares[e])]
        self.stream = (_Prefetcher(streamed, self.dev, threaded="prefetch" in self.modes) if streamed else None)
        self.fed_bytes = 0

    def batch(self, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Epoch ``epoch``'s batch ``k``: this process's share of its features (float32), the whole batch's masks
        (int64), both on the device, and where the share lies in the batch (start, stop)."""
        v, idx = epoch % self.n_views, self.schedule[epoch][k]
        a, b = self.shares[epoch][k]
        if v in self.held:
            feats = _rows(self.held[v], idx[a:b], self.rows[0], self.dev).float()
        else:
            feats = self.stream.next()
        self.fed_bytes += (b - a) * self.per_image[v]
        return feats, _rows(self.masks[v], idx, 0, self.dev).long(), (a, b)

    @property
    def wait_s(self) -> float:
        """Seconds the training waited for prefetched features."""
        return self.stream.wait_s if self.stream is not None else 0.0

    def describe(self) -> dict:
        """What the result records (derived.head_feed): how each view was fed, and the memory it took."""
        return {"views": list(self.modes), "device": self.dev.type, "images": self.rows[1] - self.rows[0],
                "resident_bytes": self.resident_bytes, "budget_bytes": self.budget,
                "bytes_fed": self.fed_bytes}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


# ---------------------------------------------------------------------------------------------------
# Training and evaluation

@dataclass
class TrainedHead:
    """A trained head plus what the result reports about its training."""

    head: nn.Conv2d
    loss_curve: list[float]
    steps: int
    skipped_batches: int                  # batches whose masks held only ignore pixels (no gradient)
    val_curve: list[float] | None = None  # legacy select_on_val: val mIoU per epoch at train_mask_size
    selected_epoch: int | None = None     # 1-based epoch whose head is returned
    feed: dict | None = None              # how the features reached the head (HeadFeed.describe())
    empty_shares: int = 0                 # DDP: steps in which this rank held no image of the batch
    feed_wait_s: float = 0.0              # time the training waited for prefetched features


def _ddp(head: nn.Module, dev: torch.device, group: distributed.Group) -> nn.Module:
    """The head as DDP trains it across the ranks (gradients averaged), or the head itself in one process."""
    if not group.enabled:
        return head
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(head, device_ids=ids, broadcast_buffers=False)


def _step(model: nn.Module, opt, feats: torch.Tensor, target: torch.Tensor, share: tuple[int, int],
          ignore_index: int, config: Config, world: int) -> float | None:
    """One SGD step on a batch; returns this rank's part of the batch's mean loss (None: only ignore pixels).

    One process: the mean cross-entropy of the batch. DDP: each rank's summed loss over its share divided by the
    whole batch's labelled pixels (every rank counts them from the whole batch's masks) and scaled by the number
    of ranks, because DDP averages the ranks' gradients: their sum is the gradient of the batch's mean loss.
    A rank without an image of the batch still takes part (zero loss, zero gradient) in the gradient all-reduce.
    """
    labelled = int((target != ignore_index).sum())
    if not labelled:
        return None
    logits = head_logits(model, feats, config.train_mask_size, config.upsample)
    if world == 1:
        loss = part = F.cross_entropy(logits, target, ignore_index=ignore_index)
    else:
        part = F.cross_entropy(logits, target[share[0]:share[1]], ignore_index=ignore_index,
                               reduction="sum") / labelled
        loss = part * world
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(part.detach())


def _epoch_losses(parts: list[float | None], group: distributed.Group) -> list[float]:
    """The batches' mean losses, in order (skipped batches left out): each rank's parts summed over the ranks."""
    if group.enabled:
        summed = group.all_reduce_sum(torch.tensor([p or 0.0 for p in parts], dtype=torch.float64)).tolist()
        parts = [s if p is not None else None for s, p in zip(summed, parts)]
    return [p for p in parts if p is not None]


def train_head(views: list[dict[str, np.ndarray]], num_classes: int, ignore_index: int, config: Config, *,
               device: str | torch.device = "cpu", val: dict[str, np.ndarray] | None = None,
               progress: bool = False, group: distributed.Group | None = None,
               budget: int | None | str = "measure") -> TrainedHead:
    """Train the 1x1 conv head on cached views; epoch ``e`` reads ``views[e % len(views)]``.

    Each view holds ``features`` (N, h, w, D) and ``masks`` (N, m, m) with m = ``config.train_mask_size``
    (already nearest-downsampled). Features reach ``device`` through a :class:`HeadFeed` (``config.head_feed``;
    ``budget``: the bytes it may keep resident, by default measured) and are upsampled one batch at a time, so no
    100x100 feature map is ever stored. With ``config.select_on_val`` the head is scored on ``val`` (features and
    masks at any size; masks are nearest-resized to m) after every epoch and the best epoch's weights are returned
    (the published checkpoint selection).

    ``group`` (several ranks, every one calling this): DDP over the ranks, each training on its contiguous share of
    the images' part of every global batch (same global batches, in the same order, as one process) and scoring
    its share of ``val``; every rank returns the same head, curves and counts.
    """
    group = group or distributed.Group()
    dev = torch.device(device)
    n = int(views[0]["features"].shape[0])
    if any(int(v["features"].shape[0]) != n for v in views):
        raise ConfigError("every cached training view must hold the same images")
    m = config.train_mask_size
    for v in views:
        if tuple(v["masks"].shape[1:]) != (m, m):
            raise ConfigError(f"cached training masks are {tuple(v['masks'].shape[1:])}, expected {(m, m)}")
    head = make_head(int(views[0]["features"].shape[-1]), num_classes, config.seed).to(dev)
    model = _ddp(head, dev, group)
    opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_drop_epoch, gamma=config.lr_gamma)
    order = torch.Generator().manual_seed(config.seed)
    schedule = [epoch_batches(n, config.head_batch_size, config.drop_last, order, config.batch_order)
                for _ in range(config.epochs)]
    if not schedule[0]:
        raise ConfigError(f"no training batch: {n} images with --head-batch-size {config.head_batch_size} "
                          "and --drop-last", hint="lower --head-batch-size or pass --no-drop-last")
    feed = HeadFeed(views, schedule, group.shard(n), dev, config.head_feed, budget=budget, group=group)
    try:
        # a rank whose features could not be placed (out of memory) must stop the others here, by name, not
        # leave them waiting in DDP's first all-reduce until the process-group timeout
        group.sync("linear: training features placed")
        out = _train_epochs(model, head, opt, sched, feed, num_classes, ignore_index, config, dev, val, progress,
                            group)
    finally:
        feed.close()
    out.feed, out.feed_wait_s = feed.describe(), feed.wait_s
    return out


def _train_epochs(model, head, opt, sched, feed: HeadFeed, num_classes: int, ignore_index: int, config: Config,
                  dev: torch.device, val, progress: bool, group: distributed.Group) -> TrainedHead:
    losses: list[float] = []
    val_curve: list[float] = []
    best: tuple[float, int, dict] | None = None
    steps = skipped = empty = 0
    with progress_bar("linear head", total=config.epochs, enabled=progress) as advance:
        for epoch, batches in enumerate(feed.schedule):
            model.train()
            parts = []
            for k in range(len(batches)):
                feats, target, share = feed.batch(epoch, k)
                empty += int(share[0] == share[1])
                parts.append(_step(model, opt, feats, target, share, ignore_index, config, group.world))
            counted = _epoch_losses(parts, group)
            skipped += len(parts) - len(counted)
            steps += len(counted)
            if not counted:
                raise DataError(f"epoch {epoch + 1}: every training batch holds only the ignore index "
                                f"{ignore_index}, so the head cannot learn", hint="check the training split's masks")
            total = 0.0
            for loss in counted:
                total += loss
            sched.step()
            losses.append(total / len(counted))
            if config.select_on_val and val is not None:
                matrix = evaluate_shared(head, val, num_classes, ignore_index, config.train_mask_size, config,
                                         device=dev, group=group)
                score = segmentation_scores(matrix, matching="identity")["miou"]
                val_curve.append(score)
                if best is None or score > best[0]:
                    best = (score, epoch, copy.deepcopy(head.state_dict()))
            advance(1)
    selected = None
    if best is not None:
        head.load_state_dict(best[2])
        selected = best[1] + 1
    return TrainedHead(head=head, loss_curve=losses, steps=steps, skipped_batches=skipped,
                       val_curve=val_curve or None, selected_epoch=selected, empty_shares=empty)


def evaluate_head(head: nn.Conv2d, store: dict[str, np.ndarray], num_classes: int, ignore_index: int, size: int,
                  upsample: str = "logits", *, device: str | torch.device = "cpu", chunk: int = 0,
                  progress: bool = False, rows: tuple[int, int] | None = None) -> ConfusionMatrix:
    """Pooled confusion matrix of argmax(head(features upsampled to ``size``)) against masks at ``size``.

    Stored masks at another resolution are nearest-resized (the published 448 -> 100 validation masks).
    Work is chunked so that at most ~32M logit (or feature) values exist at once. ``rows`` = (lo, hi): only
    those images (a rank's share).
    """
    dev = torch.device(device)
    feats_all, masks_all = store["features"], store["masks"]
    n, d = int(feats_all.shape[0]), int(feats_all.shape[-1])
    lo, hi = rows if rows is not None else (0, n)
    width = max(num_classes, d if upsample == "features" else 0)
    chunk = chunk or max(1, int(32e6 // (width * size * size)))
    conf = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=str(dev))
    head.eval()
    with torch.no_grad(), progress_bar("linear eval", total=hi - lo, enabled=progress) as advance:
        for start in range(lo, hi, chunk):
            stop = min(hi, start + chunk)
            feats = torch.from_numpy(np.array(feats_all[start:stop])).to(dev).float()
            gt = torch.from_numpy(np.array(masks_all[start:stop])).to(dev)
            if tuple(gt.shape[1:]) != (size, size):
                gt = F.interpolate(gt[:, None].float(), size=(size, size), mode="nearest")[:, 0]
            pred = head_logits(head, feats, size, upsample).argmax(1)
            conf.update(pred, gt.long())
            advance(stop - start)
    return conf


def evaluate_shared(head: nn.Conv2d, store: dict[str, np.ndarray], num_classes: int, ignore_index: int, size: int,
                    config: Config, *, device: str | torch.device = "cpu", group: distributed.Group | None = None,
                    progress: bool = False) -> np.ndarray:
    """:func:`evaluate_head` over the val split shared among the ranks: each scores its contiguous share and the
    int64 counts are summed exactly over the ranks; every rank gets the whole (C, C) matrix."""
    group = group or distributed.Group()
    conf = evaluate_head(head, store, num_classes, ignore_index, size, config.upsample, device=device,
                         chunk=config.eval_chunk, progress=progress, rows=group.shard(len(store["features"])))
    return group.all_reduce_sum(torch.from_numpy(conf.matrix)).numpy()

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
    """Train the head on the cached views, evaluate it on val at eval_size with identity-mapped mIoU.

    Under torchrun / srun every rank runs this (``SHARDED_SCORE``): DDP head training and the val split shared,
    with the confusion counts summed exactly; every rank returns rank 0's Outcome."""
    config, group = ctx.config, ctx.group
    C, ignore = prep.val.num_classes, prep.val.ignore_index
    val_store = feats["val"]
    progress = ctx.progress and group.is_main
    t0 = time.perf_counter()
    trained = train_head(feats["views"], C, ignore, config, device=ctx.device,
                         val=val_store if config.select_on_val else None, progress=progress, group=group)
    t1 = time.perf_counter()
    matrix = evaluate_shared(trained.head, val_store, C, ignore, config.eval_size, config, device=ctx.device,
                             group=group, progress=progress)
    timings = {"head_training_s": t1 - t0, "head_feed_wait_s": trained.feed_wait_s,
               "evaluation_s": time.perf_counter() - t1}

    scores = segmentation_scores(matrix, matching="identity", class_names=prep.val.class_names)
    metrics = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
               "per_class_iou": scores["per_class_iou"], "train_loss_curve": trained.loss_curve}
    if trained.val_curve is not None:
        metrics["val_miou_curve"] = trained.val_curve
    metrics.update(prep.family.class_means(matrix, "identity"))
    feed = trained.feed
    if group.enabled:
        ranks = group.gather({**trained.feed, "empty_shares": trained.empty_shares}, f"{ctx.benchmark}: head feed")
        feed = {**feed, "per_rank": ranks}

    derived = {
        "patch_grid": config.input_size // ctx.encoder.patch_size, "mean": list(prep.mean), "std": list(prep.std),
        "crop_scale": [config.crop_min_scale, 1.0], "crop_ratio": [3 / 4, 4 / 3],
        "train_list_resolved": config.train_list, "steps": trained.steps,
        "skipped_batches": trained.skipped_batches, "reported_epoch": trained.selected_epoch or config.epochs,
        "head_feed": feed,
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
    if group.enabled:
        derived["sharding"] = (f"DDP head training on {group.world} ranks (each its images' part of every global "
                               "batch), val shared, confusion counts summed")
    outcome = Outcome(metrics=metrics, derived=derived, dataset=dataset, seeds={"protocol": config.seed},
                      timings=timings)
    return group.share(outcome, f"{ctx.benchmark}: the result of rank 0")
