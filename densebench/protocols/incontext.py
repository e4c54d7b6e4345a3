"""Protocol A: Hummingbird-style in-context retrieval segmentation (spec protocols.md §3).

Memory bank: every train image (or a fraction list) is viewed ``augment_epochs`` times with the
published augmentation; each view's patch features are L2-normalised and stored with the patch's
class histogram (pixel counts, uint8/uint16), subsampled per image by the published rarity rule to
fit ``memory_size``. Queries: val images resized to the input size; exact inner-product k-NN over the
memory; softmax(sim / temperature) label transfer using the similarities the search returned;
bilinear upsampling of the class scores to the input size; argmax; one streaming confusion matrix.
Scores: Hungarian-matched mIoU (as published), identity mIoU, per-class IoU; ADE20K also reports
the 150-class mean next to the published 151-class mean.

Protocol versions (``--protocol``, spec §3.9): the published rows come from different open-hummingbird-eval
code. ``hbird-2.0`` (default; Nov 2024 on): per-patch L2-normalised keys, hue jitter 0.1. ``hbird-1.1`` (the
Apr 2024 release behind the open-hummingbird-eval README numbers): keys divided by their norm over the patch
axis (each feature dimension over an image's stored patches, so keys are not unit vectors; the label transfer
still uses cosines, as the reference re-normalises the neighbours it gathers), ``ColorJitter(hue=0.5)`` and the
0.255 std typo. A version sets these choices at once (``key_norm``, ``hue``, ``normalization`` left unset take
the version's values); what densebench cannot reproduce (ScaNN's approximate search: the search stays exact
unless ``--backend faiss-ivf``) is recorded in the result's ``derived.protocol_version``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import human_bytes
from ..data import DatasetFamily, SegmentationDataset, fraction_list, get_family, open_dataset
from ..data.ids import id_provenance
from ..distributed import Group, shard_range
from ..encoders.base import incontext_input_size
from ..errors import ConfigError
from ..metrics import ConfusionMatrix, segmentation_scores
from ..options import ProtocolConfig, option
from ..pictures import render_label_panels
from ..progress import progress_bar
from .. import devices, distributed, precision
from ..retrieval import (DEFAULT_BLOCK_ELEMENTS, DEFAULT_KEY_CHUNK, MIN_QUERY_CHUNK, StackedRows, build_index,
                         choose_backend, topk_order)
from ..transforms import HummingbirdTrainView, ResizeView, generator_for, normalisation
from .common import Outcome, RunContext, check_input_size, check_splits, protocol_runner, split_record

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf")
FRACTIONS = (128, 64, 8)
KEY_NORMS = ("feature", "patch-axis")
SHARDINGS = ("auto", "queries", "bank")
#: the ranks of a torchrun / srun run share the scoring (densebench.protocols.common.run_protocol)
SHARDED_SCORE = True
#: a k-NN search call holds at least this many search blocks of queries: the bank is walked once per call
CALL_BLOCKS = 32
#: auto search blocks: at most this many queries per similarity block (tiny banks would ask for more)
MAX_SEARCH_BLOCK = 4096
#: auto sharding: a replicated bank may take this share of the free memory (device, or host on the CPU)
BANK_SHARE = 0.5

#: Every choice a named protocol version sets (Config fields left at None take these values).
VERSIONS: dict[str, dict[str, object]] = {
    "hbird-2.0": {"key_norm": "feature", "hue": 0.1, "normalization": "imagenet"},
    "hbird-1.1": {"key_norm": "patch-axis", "hue": 0.5, "normalization": "hbird-legacy"},
}
#: What each version's reference code did that densebench does not reproduce (recorded in ``derived``).
NOT_REPRODUCED: dict[str, list[str]] = {
    "hbird-2.0": ["std 0.255 typo fixed by default (--normalization hbird-legacy restores it)",
                  "ScaNN / faiss approximate search replaced by exact search unless --backend faiss-ivf",
                  "memory-bank noise drawn per image from the seed (the reference draws it from the global RNG)"],
    "hbird-1.1": ["ScaNN approximate search (tree 128 leaves, 32 searched, AH scoring, reorder 32): exact search "
                  "unless --backend faiss-ivf",
                  "shuffled memory-bank loader and global-RNG noise: augmentations and sampling seeded per image",
                  "PredsmIoU(21, 21) hard-coded class count: the dataset's class count is used (same for VOC)"],
}


@dataclass(frozen=True)
class Config(ProtocolConfig):
    dataset: str = option("voc", "dataset family (set by the benchmark)")
    input_size: int | None = option(None, "image side fed to the encoder; auto: 504 for /14 models, 512 for /16",
                                    min=1, max=4096, none="auto")
    augment_epochs: int = option(2, "augmented passes over the train split for the memory bank; 0 = resized, "
                                    "un-augmented images", min=0)
    memory_size: int | None = option(10_240_000, "patches kept in the memory bank", min=1, none="all")
    neighbours: int = option(30, "nearest neighbours per query patch", min=1)
    temperature: float = option(0.02, "softmax temperature of the label transfer", min=0, min_exclusive=True)
    protocol: str = option("hbird-2.0", "named protocol version; sets key_norm, hue and normalization "
                                        "(module docstring)", choices=tuple(VERSIONS))
    key_norm: str | None = option(None, "memory keys: feature = L2 per patch (hbird 2.0); patch-axis = each "
                                        "dimension over the image's patches (hbird 1.1)", choices=KEY_NORMS,
                                  none="by --protocol")
    hue: float | None = option(None, "hue jitter range of the memory-bank augmentation (hbird 2.0: 0.1, "
                                     "hbird 1.1: 0.5)", min=0, max=0.5, none="by --protocol")
    train_list: str | None = option(None, "file of ids for the memory bank (instead of the whole train split)")
    val_list: str | None = option(None, "file of val ids to query (instead of the dataset's val split)")
    train_fraction: int | None = option(None, "use the shipped Hummingbird 1/N list of the train split",
                                        choices=FRACTIONS)
    fraction_seed: int = option(42, "which published fraction list", choices=(42, 400, 783, 1293, 4019))
    memory_ignore: str = option("class0", "ignore pixels in the memory bank: counted as class 0 (published) or "
                                          "dropped", choices=("class0", "drop"))
    normalization: str | None = option(None, "input normalisation; hbird-legacy = the reference's 0.255 std typo",
                                       choices=("imagenet", "hbird-legacy"), none="by --protocol")
    backend: str = option("auto", "k-NN backend: auto (faiss on GPU, else torch), torch, faiss (exact), "
                                  "faiss-ivf (approximate)", choices=BACKENDS)
    seed: int = option(0, "seed of the augmentations and the memory-bank sampling", min=0)
    batch_size: int = option(16, "images per backbone forward", min=1, non_semantic=True)
    num_workers: int | None = option(None, "data-loading worker processes; auto: the usable cores, at most 8",
                                     min=0, none="auto", non_semantic=True)
    query_chunk: int = option(0, "val images per label-transfer chunk (class scores upsampled at once); 0 = sized "
                                 "automatically", min=0, non_semantic=True)
    search_block: int = option(0, "query patches per similarity block of the k-NN search (rows of the queries x "
                                  "bank-block matrix); 0 = sized by a memory budget", min=0, non_semantic=True)
    sharding: str = option("auto", "under torchrun / srun: queries = each process scores a share of the val images "
                                   "against the whole bank; bank = each searches its share of the bank, top-k lists "
                                   "merged; auto = by memory", choices=SHARDINGS, non_semantic=True)
    save_predictions: str | None = option(None, "folder for image | ground truth | prediction PNGs",
                                          non_semantic=True)
    save_predictions_count: int = option(8, "how many val images (the first ones) to draw", min=0,
                                         non_semantic=True)

    def check(self) -> None:
        if self.train_fraction is not None and self.train_list is not None:
            raise ConfigError("give either --train-list or --train-fraction, not both")
        if self.sharding == "bank" and self.backend in ("faiss", "faiss-ivf"):
            raise ConfigError(f"--sharding bank merges the torch backend's top-k lists, not {self.backend}'s",
                              hint="use --backend torch (or auto), or --sharding queries")


def resolve_input_size(input_size: int | None, patch_size: int) -> int:
    """The published input size when none is given: 504 for /14 models, 512 for /16 (and /8)."""
    return input_size if input_size is not None else incontext_input_size(patch_size)


def version_choices(config: dict) -> dict:
    """The fields a protocol version sets, filled where ``config`` leaves them unset (None)."""
    preset = VERSIONS.get(config.get("protocol") or "hbird-2.0", {})
    return {k: (config.get(k) if config.get(k) is not None else v) for k, v in preset.items()}


def resolve_canonical(config: dict, model: dict) -> dict:
    """A config as a run of ``model`` records it, in the form leaderboards compare: the input size by patch
    size, the protocol version's choices filled, and every exact backend as ``exact`` (they return the same
    neighbours)."""
    config = dict(config)
    config["input_size"] = resolve_input_size(config.get("input_size"), int(model["patch_size"]))
    config.update(version_choices(config))
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


def rarity_sample(counts: torch.Tensor, k: int, generator) -> torch.Tensor:
    """Indices of the ``k`` patches to keep, by the published rule (spec §3.3 step 5).

    presence[p, c] = class c occurs in patch p; freq[c] = number of patches of this image containing c;
    score[p] = Σ_c presence·freq times U(0, 1) noise; keep the k smallest scores (classes rare within
    the image win). Patches with no labelled pixel (only possible with memory_ignore=drop) are never kept.

    ``counts`` (N, C) with one generator: the kept indices, smallest score first (fewer than k when the
    image has fewer labelled patches). Batched, ``counts`` (B, N, C) with one generator per image: a
    (B, min(k, N)) tensor of each image's kept indices in ascending order, -1 (sorted first) where an image
    has fewer labelled patches; computed on ``counts``' device without waiting for it. The noise is the
    same float64 draw per image either way, and the scores are exact integer sums times it, so both forms
    select the same patches.
    """
    batched = counts.dim() == 3
    c = counts if batched else counts[None]
    gens = list(generator) if batched else [generator]
    noise = torch.stack([torch.rand(c.shape[1], generator=g, dtype=torch.float64) for g in gens])
    if c.device.type == "cuda":
        noise = noise.pin_memory().to(c.device, non_blocking=True)
    else:
        noise = noise.to(c.device)
    presence = (c > 0).to(torch.float64)
    freq = presence.sum(1, keepdim=True)
    score = (presence * freq).sum(2) * noise
    empty = presence.sum(2) == 0
    score = score.masked_fill(empty, math.inf)
    values, idx = torch.topk(score, min(k, c.shape[1]), dim=1, largest=False)
    if not batched:
        return idx[0][values[0] < math.inf]
    return torch.sort(torch.where(values < math.inf, idx, -1), dim=1).values


def normalise_keys(feats: torch.Tensor, key_norm: str, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, D) features of the N stored patches of each image -> memory keys.

    ``feature`` (hbird 2.0): each patch's feature over its L2 norm. ``patch-axis`` (hbird 1.1, ``F / ‖F‖`` over
    dim 1): each feature dimension over its L2 norm across the image's N stored patches (all S² patches for an
    unbounded memory, the sampled ones otherwise); ``keep`` (B, N) leaves padding rows out of that norm.
    """
    if key_norm == "feature":
        return F.normalize(feats, dim=-1)
    if keep is not None:
        feats = feats * keep[..., None].to(feats.dtype)
    return F.normalize(feats, dim=1)


class MemoryReducer:
    """Per train view: normalise patch features, sample patches, keep (features f16, label counts)."""

    def __init__(self, patch: int, num_classes: int, ignore_index: int, memory_ignore: str,
                 per_image: int | None, seed: int, epoch: int, key_norm: str = "feature"):
        self.patch, self.num_classes, self.ignore_index = patch, num_classes, ignore_index
        self.memory_ignore, self.per_image, self.seed, self.epoch = memory_ignore, per_image, seed, epoch
        self.key_norm = key_norm
        self.count_dtype = np.uint8 if patch * patch <= 255 else np.uint16

    def describe(self) -> dict:
        return {"reducer": "hbird-memory", "per_image": self.per_image, "memory_ignore": self.memory_ignore,
                "seed": self.seed, "epoch": self.epoch, "count_dtype": np.dtype(self.count_dtype).str,
                **({"key_norm": self.key_norm} if self.key_norm != "feature" else {})}

    def __call__(self, feats: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole batch at once on the features' device; rows of a drop-mode image with fewer labelled
        patches than ``per_image`` are marked False in ``_keep`` (the cache drops them, keeping the order)."""
        b, s_h, s_w, d = feats.shape
        n, C = s_h * s_w, self.num_classes
        counts = patch_label_counts(masks.to(feats.device), self.patch, C, self.ignore_index, self.memory_ignore)
        feats = feats.reshape(b, n, d)
        counts = counts.reshape(b, n, C)
        label_dtype = torch.from_numpy(np.zeros(0, dtype=self.count_dtype)).dtype
        if self.per_image is None and self.memory_ignore == "class0":
            keys = normalise_keys(feats, self.key_norm)
            return {"keys": keys.reshape(b * n, d).to(torch.float16),
                    "labels": counts.reshape(b * n, C).to(label_dtype)}
        gens = [generator_for(self.seed, 10_000 + self.epoch, int(i)) for i in indices]
        sel = rarity_sample(counts, self.per_image if self.per_image is not None else n, gens)   # (b, k)
        keep = sel >= 0
        sel = sel.clamp(min=0)
        k = sel.shape[1]
        out_f = normalise_keys(feats.gather(1, sel[..., None].expand(b, k, d)), self.key_norm, keep)
        out_c = counts.gather(1, sel[..., None].expand(b, k, C))
        return {"keys": out_f.reshape(b * k, d).to(torch.float16), "labels": out_c.reshape(b * k, C).to(label_dtype),
                "_keep": keep.reshape(b * k)}


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
    val_list: str | None = None


def prepare(ctx: RunContext) -> Prepared:
    """Open the memory (train or a fraction list) and query (val) splits; size the memory per image."""
    config = ctx.config
    ctx.config = config = dataclasses.replace(
        config, input_size=resolve_input_size(config.input_size, ctx.encoder.patch_size),
        **version_choices(dataclasses.asdict(config)))
    check_input_size(config.input_size, ctx.encoder)
    family = get_family(config.dataset)
    id_list = config.train_list
    if config.train_fraction is not None:
        id_list = str(fraction_list(family, config.train_fraction, config.fraction_seed, data_root=ctx.data_root))
    train = open_dataset(family, ctx.data_root, family.train_split, id_list=id_list)
    val = open_dataset(family, ctx.data_root, family.val_split, id_list=config.val_list)
    check_splits(family.name, train=train, val=val)
    family = family.for_classes(val.num_classes, val.ignore_index)
    s = config.input_size // ctx.encoder.patch_size
    per_image, clamped = _memory_per_image(config, len(train), s * s)
    mean, std = normalisation(config.normalization)
    return Prepared(family, train, val, id_list, mean, std, per_image, clamped, config.val_list)


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
                                        std=prep.std, **({"hue": config.hue} if config.hue != 0.1 else {}))
        reducer = MemoryReducer(p, prep.val.num_classes, prep.val.ignore_index, config.memory_ignore,
                                prep.per_image, config.seed, epoch, config.key_norm)
        mem = ctx.extract(prep.train, view, reducer=reducer, desc=f"memory bank {epoch + 1}/{epochs}")
        keys.append(mem["keys"])
        labels.append(mem["labels"])
    val = ctx.extract(prep.val, ResizeView(config.input_size, mean=prep.mean, std=prep.std), desc="val features")
    return {"keys": keys, "labels": labels, "val": val}


# ---------------------------------------------------------------------------------------------------
# The search: block sizes, sharding across ranks, the bank where it lies

@dataclass(frozen=True)
class SearchPlan:
    """How the k-NN search and the label transfer are blocked (none of it changes a number).

    ``bank_block`` keys x ``search_block`` queries is the similarity matrix held at once; a search call takes
    ``images_per_call`` val images (their queries padded to whole search blocks, so every matmul has one shape)
    and walks the bank once; the label transfer upsamples ``transfer_chunk`` images' class scores at once."""

    bank_block: int
    search_block: int
    images_per_call: int
    transfer_chunk: int

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    def bank_rows(self, n_keys: int, rank: int, world: int) -> tuple[int, int]:
        """Rank ``rank``'s shard of the bank in whole bank blocks (the blocks a single process multiplies)."""
        lo, hi = shard_range(-(-n_keys // self.bank_block), rank, world)
        return min(n_keys, lo * self.bank_block), min(n_keys, hi * self.bank_block)


def search_plan(config: Config, device_type: str, n_keys: int, tokens_per_image: int, num_classes: int) -> SearchPlan:
    """Block sizes from memory budgets: the similarity block (``DEFAULT_BLOCK_ELEMENTS``) and, independently,
    the label-transfer chunk (64M upsampled class scores; ``query_chunk``)."""
    bank_block = min(n_keys, DEFAULT_KEY_CHUNK[device_type])
    search_block = config.search_block or min(MAX_SEARCH_BLOCK, max(
        MIN_QUERY_CHUNK, DEFAULT_BLOCK_ELEMENTS[device_type] // bank_block))
    transfer = config.query_chunk or max(1, int(64e6 // (num_classes * config.input_size ** 2)))
    per_call = max(transfer, -(-CALL_BLOCKS * search_block // tokens_per_image))
    return SearchPlan(bank_block, search_block, per_call, transfer)


def bank_budget(device: torch.device) -> int:
    """Bytes a replicated bank may take on this rank: a share of the free device memory (CUDA) or of the
    available host memory (the CPU search reads the memory map, whose pages the ranks of a machine share)."""
    if device.type == "cuda":   # ranks sharing one GPU (more ranks than GPUs) share its free memory
        sharing = -(-distributed.local_world_size() // max(1, torch.cuda.device_count()))
        free = torch.cuda.mem_get_info(device)[0] // sharing
    else:
        free = devices.host_available() or 0
    return int(free * BANK_SHARE)


def choose_sharding(config: Config, group: Group, device: torch.device, bank_bytes: int) -> dict:
    """``queries`` (val images split across ranks, the bank replicated) or ``bank`` (the bank split, every
    rank searching all queries), the same on every rank, and why."""
    if config.sharding != "auto":
        return {"mode": config.sharding, "reason": "--sharding"}
    if choose_backend(config.backend, device.type)[0] != "torch":
        return {"mode": "queries", "reason": f"the {config.backend} backend (bank sharding merges the torch "
                                             "backend's top-k lists)"}
    budget = min(group.gather(bank_budget(device), "in-context: memory budget"))
    fits = bank_bytes <= budget
    where = "device" if device.type == "cuda" else "host"
    return {"mode": "queries" if fits else "bank", "bank_bytes": int(bank_bytes), "budget_bytes": int(budget),
            "reason": f"the bank ({human_bytes(bank_bytes)}) {'fits in' if fits else 'exceeds'} "
                      f"{BANK_SHARE:.0%} of the free {where} memory of the tightest rank ({human_bytes(budget)})"}


def _all_gather(group: Group, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's (M, k) tensors side by side, (M, world * k), in rank order."""
    import torch.distributed as dist

    group.check_abort()
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(group.world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts, dim=1))
    return out


class BankSearch:
    """The protocol's k-NN over the memory bank, or over this rank's shard of it (``mode == "bank"``: per-query
    candidates of every shard gathered and merged into the canonical top-k a single search returns).

    Keys and labels stay in the cache's memory maps: the CPU search reads them in place, CUDA gets one
    preallocated device tensor filled block by block (retrieval.StackedRows). Returns, per query, the weights'
    similarities (cosines; hbird-1.1 divides the ranking inner products by the key norms) and bank indices."""

    def __init__(self, config: Config, keys: StackedRows, labels: StackedRows, plan: SearchPlan,
                 device: torch.device, group: Group, mode: str | None):
        self.group, self.mode, self.n_keys = group, mode, len(keys)
        self.k = min(config.neighbours, self.n_keys)
        lo, hi = plan.bank_rows(self.n_keys, group.rank, group.world) if mode == "bank" else (0, self.n_keys)
        local = keys.shard(lo, hi)
        self.offset, self.k_local = lo, min(self.k, len(local))
        blocks = {"query_chunk": plan.search_block, "key_chunk": plan.bank_block}
        torch_backend = choose_backend(config.backend, device.type)[0] == "torch"
        self.index = build_index(local, config.backend, str(device), **(blocks if torch_backend else {})) \
            if len(local) else None
        self.labels = labels.to(device) if device.type == "cuda" and mode != "bank" else labels
        self.norms = None
        if config.key_norm == "patch-axis":   # hbird 1.1 keys are not unit vectors: the softmax uses cos(q, key)
            self.norms = torch.cat([torch.zeros(0)] + [
                torch.linalg.vector_norm(local.block(a, min(len(local), a + plan.bank_block), torch.float32), dim=1)
                for a in range(0, len(local), plan.bank_block)]).to(device)
        self.device = device

    def __call__(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = queries.shape[0]
        if self.index is not None:
            sims, idx = self.index.search(queries, self.k_local)
            sims, idx = torch.as_tensor(sims, device=self.device), torch.as_tensor(idx, device=self.device)
        else:
            sims = torch.empty((m, 0), dtype=torch.float32, device=self.device)
            idx = torch.empty((m, 0), dtype=torch.int64, device=self.device)
        weights = sims / self.norms[idx] if self.norms is not None else sims
        if self.mode != "bank":
            return weights, idx
        pad = self.k - idx.shape[1]   # a shard smaller than k: padding sorts last
        sims = F.pad(sims, (0, pad), value=-math.inf)
        weights = F.pad(weights, (0, pad))
        idx = F.pad(idx + self.offset, (0, pad), value=-1)
        sims, weights, idx = _all_gather(self.group, sims, weights, idx)
        pos = topk_order(sims, idx, self.k)
        return weights.gather(1, pos), idx.gather(1, pos)

    def describe(self) -> dict:
        return {**self.index.describe(), "num_keys": self.n_keys}


def _queries(features, start: int, stop: int, device: torch.device, block: int) -> torch.Tensor:
    """Val images ``[start, stop)``: their patch features L2-normalised, padded to whole blocks with copies of the
    last row (thrown away after the search; a zero row would tie with every key and take the slow tie path)."""
    val_feats = torch.from_numpy(np.array(features[start:stop], dtype=np.float32)).to(device)
    queries = F.normalize(val_feats.reshape(-1, val_feats.shape[-1]), dim=-1)
    pad = -queries.shape[0] % block
    return torch.cat([queries, queries[-1:].expand(pad, -1)]) if pad else queries


def score(ctx: RunContext, prep: Prepared, feats: dict) -> Outcome:
    """Exact k-NN of every val patch in the memory bank, label transfer, one streaming confusion matrix.

    Under torchrun / srun every rank runs this: either each scores its share of the val images against the
    whole bank (``queries``), or each searches its share of the bank for every query and the candidates are
    merged exactly (``bank``); the confusion counts are summed, so the metrics equal a single process's."""
    config, p, group = ctx.config, ctx.encoder.patch_size, ctx.group
    input_size, s = config.input_size, config.input_size // p
    C, ignore = prep.val.num_classes, prep.val.ignore_index
    dev = torch.device(ctx.device)
    keys, labels = StackedRows(feats["keys"]), StackedRows(feats["labels"])
    if len(keys) == 0:
        raise ConfigError("the memory bank is empty (no labelled patches in the train split)")
    plan = search_plan(config, dev.type, len(keys), s * s, C)
    # the replicated bank as the search holds it: fp16 keys on CUDA unless --precision fp32 widens them
    key_bytes = keys.nbytes * (2 if dev.type == "cuda" and not precision.fp16_search(dev.type) else 1)
    sharding = choose_sharding(config, group, dev, key_bytes + labels.nbytes) if group.enabled else None
    mode = sharding["mode"] if sharding else None
    search = BankSearch(config, keys, labels, plan, dev, group, mode)
    q = feats["val"]
    conf = ConfusionMatrix(C, ignore_index=ignore, device=str(dev))
    n_val = len(prep.val)
    lo, hi = group.shard(n_val) if mode == "queries" else (0, n_val)
    n_draw = min(config.save_predictions_count, n_val) if config.save_predictions else 0
    drawn: dict[int, np.ndarray] = {}
    with progress_bar("retrieval", total=hi - lo, enabled=ctx.progress and group.is_main) as advance:
        for start in range(lo, hi, plan.images_per_call):
            stop = min(hi, start + plan.images_per_call)
            weights, idx = search(_queries(q["features"], start, stop, dev, plan.search_block))
            mine = (start, stop) if mode != "bank" else \
                tuple(start + i for i in shard_range(stop - start, group.rank, group.world))
            for t0 in range(mine[0], mine[1], plan.transfer_chunk):
                t1 = min(mine[1], t0 + plan.transfer_chunk)
                rows = slice((t0 - start) * s * s, (t1 - start) * s * s)
                scores = transfer_labels(weights[rows], idx[rows], search.labels, config.temperature, p * p)
                scores = scores.view(t1 - t0, s, s, C).permute(0, 3, 1, 2)
                scores = F.interpolate(scores, size=(input_size, input_size), mode="bilinear", align_corners=False)
                pred = scores.argmax(1)
                conf.update(pred, torch.from_numpy(np.array(q["masks"][t0:t1])).to(dev))
                drawn.update({i: pred[i - t0].to(torch.uint8).cpu().numpy() for i in range(t0, min(t1, n_draw))})
            advance(stop - start)
    matrix = conf.matrix
    if group.enabled:
        matrix = group.all_reduce_sum(torch.from_numpy(matrix)).numpy()
        drawn = {i: a for part in group.gather(drawn, "in-context: predictions to draw") for i, a in part.items()}
    artifacts = []
    if n_draw and group.is_main:
        images = [(prep.val.ids[i], prep.val[i][1]) for i in range(n_draw)]
        artifacts = render_label_panels(Path(config.save_predictions), ctx.benchmark, images,
                                        np.asarray(q["masks"][:n_draw]),
                                        [("prediction", np.stack([drawn[i] for i in range(n_draw)]))], ignore)
    retrieval = {**search.describe(), "blocks": plan.describe()} if group.is_main else None
    if group.enabled:
        artifacts, retrieval = group.share((artifacts, {**retrieval, "sharding": sharding} if retrieval else None),
                                           "in-context: the record")

    names = prep.val.class_names
    hung = segmentation_scores(matrix, matching="hungarian", class_names=names)
    ident = segmentation_scores(matrix, matching="identity", class_names=names)
    metrics = {"miou": hung["miou"], "miou_identity": ident["miou"], "pixel_accuracy": ident["pixel_accuracy"],
               "per_class_iou": ident["per_class_iou"],
               **prep.family.class_means(matrix, "hungarian"),
               **prep.family.class_means(matrix, "identity", prefix="miou_identity")}
    derived = {"memory_per_image": prep.per_image, "memory_per_image_clamped": prep.clamped,
               "memory_rows": len(keys), "neighbours_used": search.k, "mean": list(prep.mean),
               "std": list(prep.std), "train_list_resolved": prep.train_list, "retrieval": retrieval,
               "protocol_version": {"name": config.protocol, "sets": VERSIONS[config.protocol],
                                    "not_reproduced": NOT_REPRODUCED[config.protocol]},
               "metric_notes": {"miou": f"Hungarian-matched, pooled over val, {prep.family.mean_note()}",
                                **prep.family.class_mean_notes()}}
    if mode is not None:
        derived["sharding"] = mode
    dataset = split_record(prep.family.name, prep.val, prep.train, **id_provenance(train=prep.train, val=prep.val))
    return Outcome(metrics=metrics, derived=derived, dataset=dataset, seeds={"protocol": config.seed},
                   artifacts=artifacts)
