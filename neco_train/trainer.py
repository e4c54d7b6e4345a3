"""The NeCo training loop (spec §1-§2), with the reference's slips fixed by default (spec §7).

One step, for a per-process batch of B images with 2 global and L local crops:

1. student on all crops (two backbone calls, one per resolution), EMA teacher on the global crops
   under ``no_grad`` (the reference keeps the teacher's graph, §7.2); bf16 autocast on CUDA;
2. projection head + L2 norm per patch; ROI-Align (7x7, aligned=True) of each overlap, for the 10
   (teacher crop g, other crop v) pairs: teacher crop g against student crop v;
3. references: R = 49 teacher vectors per (pair, image), from the FIFO queue of teacher patches
   (8192 per teacher crop, refreshed each step) or from the shuffled aligned teacher features;
4. cosine similarities of each aligned query to its references; the differentiable sort of all
   10·B·49 rows in one call (student with gradient, teacher without); the rank cross-entropy;
5. AdamW (backbone 1e-5 / head 1e-4, no decay on biases and 1-D params, cosine LR, weight decay
   0.04 -> 0.5), then the EMA (0.9995 -> 1.0) after the optimizer step.

Legacy options reproduce the reference where it differs: ``ema="before"``, ``queue_sampling="legacy"``,
``log_floor=False``, ``queue_scope="process"``. The teacher head starts as an independent random init, as in
the reference (a method choice, not a slip); ``teacher_head="copy"`` starts it as the student's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from densebench.errors import ConfigError, DataError, DenseBenchError, choices_message
from densebench.results import atomic_write_text

from . import checkpoint as ckpt
from .crops import CropConfig
from .data import GlobalBatchSampler, NecoViews, collate, data_identity, find_images
from .distributed import DistContext, init_distributed
from .loss import DEFAULT_LOG_FLOOR, neighbor_ranking_loss
from .model import (
    BaseModel,
    NecoNet,
    build_student_teacher,
    cosine_schedule,
    ema_update,
    load_base,
    param_groups,
)
from .sorting import DISTRIBUTIONS, NETWORKS


class TrainingError(DenseBenchError):
    """Training cannot continue (e.g. the loss became non-finite); the message says what was kept."""


@dataclass
class TrainConfig:
    """All settings of a run. Defaults are the published ViT-S/14 DINOv2R recipe (spec §6)."""

    # model
    model: str = "dinov2_vits14_reg"
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pos_interp: str | None = "meta-offset"
    # data and crops
    data: str = ""
    output: str = "neco-run"
    epochs: int = 25
    batch_size: int = 64
    # crop options exposed on the command line; their published defaults live in CropConfig only
    global_size: int | None = None           # None: 518 for /14 backbones, 224 for /16
    local_size: int = CropConfig.local_size
    n_local: int = CropConfig.n_local
    global_scale: tuple[float, float] = CropConfig.global_scale
    local_scale: tuple[float, float] = CropConfig.local_scale
    min_intersection: float = CropConfig.min_intersection
    photometric: bool = CropConfig.photometric
    # the method
    roi_size: int = 7
    head_hidden: int = 2048
    head_out: int = 256
    head_layers: int = 3
    references: str = "queue"
    queue_length: int = 8192
    queue_per_image: int = 10
    queue_scope: str = "global"
    queue_sampling: str = "uniform"
    student_steepness: float = 100.0
    teacher_steepness: float = 100.0
    network: str = "bitonic"
    distribution: str = "cauchy"
    log_floor: bool = True
    # optimisation
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    final_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5
    momentum: float = 0.9995
    momentum_end: float = 1.0
    drop_path: float = 0.1
    teacher_head: str = "independent"
    ema: str = "after"
    seed: int = 400
    # execution
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    workers: int = 4
    max_steps: int | None = None
    save_every: int = 0
    log_every: int = 10
    progress: bool = True
    resume: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        choices = {"references": ("queue", "batch"), "queue_scope": ("global", "process"),
                   "queue_sampling": ("uniform", "legacy"), "network": NETWORKS, "distribution": DISTRIBUTIONS,
                   "teacher_head": ("copy", "independent"), "ema": ("after", "before"),
                   "precision": ("auto", "bf16", "fp32"), "pos_interp": (None, "timm", "meta-offset")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ConfigError(choices_message(name.replace("_", "-"), getattr(self, name),
                                                  [a for a in accepted if a is not None]))
        rules = {
            ">= 1": (lambda v: v >= 1, ("epochs", "batch_size", "local_size", "roi_size", "head_hidden", "head_out",
                                        "head_layers", "queue_length", "queue_per_image", "log_every")),
            ">= 0": (lambda v: v >= 0, ("workers", "save_every", "warmup_steps", "final_lr", "weight_decay",
                                        "weight_decay_end")),
            "> 0": (lambda v: v > 0, ("lr_backbone", "lr_head", "student_steepness", "teacher_steepness")),
        }
        for rule, (ok, names) in rules.items():  # every value is checked before any work is done
            for name in names:
                value = getattr(self, name)
                if not (math.isfinite(value) and ok(value)):
                    raise ConfigError(f"--{name.replace('_', '-')} must be {rule}; got {value}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1); got {self.drop_path}")
        if not (0 <= self.momentum <= 1 and 0 <= self.momentum_end <= 1):
            raise ConfigError(f"EMA momentum must be in [0, 1]; got {self.momentum} -> {self.momentum_end}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1; got {self.max_steps}")
        if not self.data:
            raise ConfigError("no training data given",
                              hint="pass --data DIR (COCO, ImageNet-style or any image folder)")

    def crop_config(self, patch_size: int) -> CropConfig:
        cfg = CropConfig(global_size=self.global_size or default_global_size(patch_size), local_size=self.local_size,
                         n_local=self.n_local, global_scale=tuple(self.global_scale),
                         local_scale=tuple(self.local_scale), min_intersection=self.min_intersection,
                         photometric=self.photometric)
        cfg.validate()
        for name in ("global_size", "local_size"):
            if getattr(cfg, name) % patch_size:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not a multiple of the "
                                  f"patch size {patch_size}", hint=f"use a multiple of {patch_size}")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def default_global_size(patch_size: int) -> int:
    """518 for /14 models and 224 for /16 ones (the published configs); 14·p-ish otherwise."""
    return {14: 518, 16: 224}.get(patch_size, 16 * patch_size)


#: Settings that may change between a run and its resumption (they do not change what is computed).
RESUME_FREE = {"output", "data", "device", "compile", "workers", "max_steps", "save_every", "log_every", "progress",
               "resume", "overwrite"}

#: What a run writes into its --output folder (besides checkpoints/); any of them marks the folder as a run.
RUN_FILES = ("train_state.pt", "last.safetensors", "last.json", "log.jsonl", "config.json")


# ----------------------------------------------------------------------------------------------------
# the loss of one batch


def pair_list(n_crops: int, n_global: int = 2) -> list[tuple[int, int]]:
    """(teacher crop g, student crop v) for every global g and every other crop v: 10 pairs for 2+4 crops."""
    return [(g, v) for g in range(n_global) for v in range(n_crops) if v != g]


def align_pairs(teacher_global: torch.Tensor, student_global: torch.Tensor, student_local: torch.Tensor,
                boxes_global: torch.Tensor, boxes_all: torch.Tensor, patch_size: int,
                roi_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ROI-Align each pair's overlap on both sides (spec §1.3), all pairs at once.

    Inputs are crop-major feature maps: teacher/student global (2, B, D, h, w), student local
    (L, B, D, hl, wl); boxes (B, 2, V, 4) and (B, V, 2, 4) in crop pixels. Returns teacher and student
    features (P·B, D, k, k), pair-major in :func:`pair_list` order. Boxes are divided by the patch
    size, so cell i of the grid spans [i, i+1) (aligned=True).
    """
    from torchvision.ops import roi_align

    n_global, batch = teacher_global.shape[:2]
    n_crops = n_global + student_local.shape[0]
    pairs = pair_list(n_crops, n_global)
    image = torch.arange(batch, device=boxes_global.device, dtype=boxes_global.dtype)

    def rois(crop_index: int, box: torch.Tensor) -> torch.Tensor:
        return torch.cat([(crop_index * batch + image).unsqueeze(1), box / patch_size], dim=1)

    teacher_rois = torch.cat([rois(g, boxes_global[:, g, v]) for g, v in pairs])
    flat = lambda t: t.reshape(-1, *t.shape[2:])
    teacher = roi_align(flat(teacher_global), teacher_rois, roi_size, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)
    global_pairs = [i for i, (g, v) in enumerate(pairs) if v < n_global]
    local_pairs = [i for i, (g, v) in enumerate(pairs) if v >= n_global]
    parts = {}
    if global_pairs:
        r = torch.cat([rois(pairs[i][1], boxes_all[:, pairs[i][1], pairs[i][0]]) for i in global_pairs])
        out = roi_align(flat(student_global), r, roi_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        parts.update({i: chunk for i, chunk in zip(global_pairs, out.split(batch))})
    if local_pairs:
        r = torch.cat([rois(pairs[i][1] - n_global, boxes_all[:, pairs[i][1], pairs[i][0]]) for i in local_pairs])
        out = roi_align(flat(student_local), r, roi_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        parts.update({i: chunk for i, chunk in zip(local_pairs, out.split(batch))})
    student = torch.cat([parts[i] for i in range(len(pairs))])
    return teacher, student


class ReferenceQueue:
    """One FIFO of teacher patch embeddings per teacher crop (spec §1.4), newest first."""

    def __init__(self, n_global: int, length: int, dim: int, device: torch.device):
        self.data = torch.zeros(n_global, length, dim, device=device)
        self.entries = [0] * n_global

    @property
    def length(self) -> int:
        return self.data.shape[1]

    def push(self, crop: int, rows: torch.Tensor) -> None:
        k = min(rows.shape[0], self.length)
        q = self.data[crop]
        if k < self.length:
            q[k:] = q[:-k].clone()
        q[:k] = rows[:k].to(q.dtype)
        self.entries[crop] = min(self.entries[crop] + k, self.length)

    def sample_indices(self, crop: int, count: int, gen: torch.Generator, legacy: bool) -> torch.Tensor:
        """``count`` row indices: uniform over the filled rows, without duplicates when there are enough.

        ``legacy`` is the reference's ``randperm(length)[:count] % entries``, which repeats rows and is
        non-uniform until the queue is full (spec §7.10)."""
        n = self.entries[crop]
        if n == 0:
            raise TrainingError("the reference queue is empty; it must be filled before sampling")
        if legacy:
            return torch.randperm(self.length, generator=gen)[:count] % n
        if n >= count:
            return torch.randperm(n, generator=gen)[:count]
        return torch.randint(0, n, (count,), generator=gen)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.detach().cpu(), "entries": torch.tensor(self.entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.copy_(state["data"].to(self.data.device))
        self.entries = [int(v) for v in state["entries"]]


@dataclass
class StepInputs:
    """A batch on the device, crop-major: global (2, B, 3, S, S), local (L, B, 3, s, s)."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    boxes_global: torch.Tensor
    boxes_all: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device) -> StepInputs:
        move = lambda t: t.to(device, non_blocking=True)
        return cls(move(batch["global"].transpose(0, 1)), move(batch["local"].transpose(0, 1)),
                   move(batch["boxes_global"]), move(batch["boxes_all"]))


class NecoObjective:
    """Computes the loss of a batch; owns the reference queue and the generator for reference sampling."""

    def __init__(self, cfg: TrainConfig, *, patch_size: int, dim: int, device: torch.device, dist: DistContext):
        self.cfg = cfg
        self.patch_size = patch_size
        self.device = device
        self.dist = dist
        self.global_scope = cfg.queue_scope == "global"
        length = cfg.queue_length if self.global_scope else max(1, cfg.queue_length // dist.world_size)
        self.queue = ReferenceQueue(2, length, dim, device) if cfg.references == "queue" else None
        # identical on every rank in global scope (so all ranks draw the same global indices)
        seed = cfg.seed * 7919 + (0 if self.global_scope else dist.rank)
        self.gen = torch.Generator().manual_seed(seed)
        self.log_floor = DEFAULT_LOG_FLOOR if cfg.log_floor else None

    # -- references ------------------------------------------------------------------------------------
    def _update_queue(self, teacher_global: torch.Tensor) -> None:
        """Push teacher patches of each global crop: (2, B, h, w, D) full maps, before the loss (§1.4)."""
        n_global, batch = teacher_global.shape[:2]
        flat = teacher_global.reshape(n_global, batch, -1, teacher_global.shape[-1])
        hw = flat.shape[2]
        per_image = min(self.cfg.queue_per_image, hw)
        for crop in range(n_global):
            if self.global_scope:
                # per image a fixed number of patches, chosen with the shared generator for the global batch,
                # so the queue is the same on every rank and for any number of ranks
                global_batch = batch * self.dist.world_size
                choice = torch.rand(global_batch, hw, generator=self.gen).argsort(dim=1)[:, :per_image]
                mine = choice[self.dist.rank * batch:(self.dist.rank + 1) * batch].to(self.device)
                rows = torch.gather(flat[crop], 1, mine.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))
                rows = self.dist.all_gather_cat(rows.reshape(-1, flat.shape[-1]).float())
            else:
                # the reference: min(10·B, length) patches drawn from the whole local batch
                count = min(per_image * batch, self.queue.length)
                idx = torch.randperm(batch * hw, generator=self.gen)[:count].to(self.device)
                rows = flat[crop].reshape(batch * hw, -1)[idx].float()
            self.queue.push(crop, rows)

    def _references(self, teacher_aligned: torch.Tensor, pairs: list[tuple[int, int]], batch: int) -> torch.Tensor:
        """(P·B, R, D) reference vectors: one set per (pair, image), shared by student and teacher."""
        r = teacher_aligned.shape[-1] * teacher_aligned.shape[-2]
        dim = teacher_aligned.shape[1]
        refs = []
        for p, (g, _) in enumerate(pairs):
            if self.queue is not None:
                if self.global_scope:
                    count = batch * self.dist.world_size * r
                    idx = self.queue.sample_indices(g, count, self.gen, self.cfg.queue_sampling == "legacy")
                    idx = idx[self.dist.rank * batch * r:(self.dist.rank + 1) * batch * r]
                else:
                    idx = self.queue.sample_indices(g, batch * r, self.gen, self.cfg.queue_sampling == "legacy")
                refs.append(self.queue.data[g][idx.to(self.device)].view(batch, r, dim))
            else:
                pair_feats = teacher_aligned[p * batch:(p + 1) * batch].flatten(2).transpose(1, 2).reshape(-1, dim)
                order = torch.randperm(batch * r, generator=self.gen).to(self.device)
                refs.append(pair_feats[order].view(batch, r, dim))
        return torch.cat(refs)

    # -- the loss --------------------------------------------------------------------------------------
    def loss(self, student: torch.nn.Module, teacher: NecoNet, inputs: StepInputs, *, autocast: bool) -> torch.Tensor:
        cfg = self.cfg
        n_global, batch = inputs.global_crops.shape[:2]
        n_local = inputs.local_crops.shape[0]
        pairs = pair_list(n_global + n_local, n_global)
        dtype = torch.bfloat16
        crops = [inputs.global_crops.flatten(0, 1)] + ([inputs.local_crops.flatten(0, 1)] if n_local else [])
        with torch.autocast(self.device.type, dtype=dtype, enabled=autocast):
            # one call of the (possibly DDP-wrapped) student for both resolutions
            student_out = student(*crops)
            zs_global, zs_local = student_out[0], (student_out[1] if n_local else None)
            with torch.no_grad():
                (zt_global,) = teacher(crops[0])
        # everything after the networks in float32 (ROI-Align, cosines, sorting, log)
        grid = lambda z, n: z.float().unflatten(0, (n, batch)).permute(0, 1, 4, 2, 3)
        zt = zt_global.float().unflatten(0, (n_global, batch))
        s_local = grid(zs_local, n_local) if n_local else torch.zeros(0, batch, zs_global.shape[-1], 1, 1,
                                                                     device=self.device)
        with torch.no_grad():
            if self.queue is not None:
                self._update_queue(zt)
        t_aligned, s_aligned = align_pairs(zt.permute(0, 1, 4, 2, 3), grid(zs_global, n_global), s_local,
                                           inputs.boxes_global, inputs.boxes_all, self.patch_size, cfg.roi_size)
        with torch.no_grad():
            refs = F.normalize(self._references(t_aligned, pairs, batch), dim=-1)
            t_query = F.normalize(t_aligned.flatten(2).transpose(1, 2), dim=-1)
            teacher_sim = torch.bmm(t_query, refs.transpose(1, 2))
        s_query = F.normalize(s_aligned.flatten(2).transpose(1, 2), dim=-1)
        student_sim = torch.bmm(s_query, refs.transpose(1, 2))
        r = student_sim.shape[-1]
        return neighbor_ranking_loss(student_sim.reshape(-1, r), teacher_sim.reshape(-1, r), cfg.student_steepness,
                                     cfg.teacher_steepness, cfg.network, cfg.distribution, log_floor=self.log_floor)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"gen": self.gen.get_state()}
        if self.queue is not None:
            state["queue"] = self.queue.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        if self.queue is not None and "queue" in state:
            self.queue.load_state_dict(state["queue"])


# ----------------------------------------------------------------------------------------------------
# the run


def resolve_device(device: str, dist: DistContext) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} requested but CUDA is not available", hint="use --device cpu")
        if device == "cuda":  # local rank -> GPU; a task that sees one GPU (srun --gpus-per-task) uses it
            device = f"cuda:{dist.local_rank % max(1, torch.cuda.device_count())}"
        torch.cuda.set_device(torch.device(device))
    elif device != "cpu":
        raise ConfigError(choices_message("device", device, ["auto", "cpu", "cuda", "cuda:N"]))
    return torch.device(device)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs it; one instance per process."""

    def __init__(self, cfg: TrainConfig, dist: DistContext | None = None, *, base: BaseModel | None = None,
                 dry_run: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.dist = dist or DistContext()
        self.out = Path(cfg.output).expanduser()
        # before any rank writes (DDP's construction below synchronises the ranks) and before any work;
        # a dry run writes nothing, so any --output is fine for it
        self.replace_output = False if dry_run else self._check_output()
        self.device = resolve_device(cfg.device, self.dist)
        self.dist.device = self.device
        torch.manual_seed(cfg.seed + self.dist.rank)  # drop-path draws
        self.autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.files, self.layout = find_images(cfg.data)  # cheap checks before loading any weights
        self.data_identity = data_identity(cfg.data, self.files)
        self.base = base or load_base(cfg.model, weights=cfg.weights, model_kwargs=cfg.model_kwargs or None,
                                      pos_interp=cfg.pos_interp)
        self.crops = cfg.crop_config(self.base.patch_size)
        self.global_batch = cfg.batch_size * self.dist.world_size
        self.steps_per_epoch = len(self.files) // self.global_batch
        if self.steps_per_epoch < 1:
            raise DataError(f"{len(self.files)} training images under {cfg.data} are fewer than one global batch "
                            f"of {self.global_batch}", hint="lower --batch-size or add images")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.student, self.teacher = build_student_teacher(
            self.base, drop_path=cfg.drop_path, head_hidden=cfg.head_hidden, head_out=cfg.head_out,
            head_layers=cfg.head_layers, teacher_head=cfg.teacher_head, seed=cfg.seed)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.groups = param_groups(self.student, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.groups, **fused)
        self.model: torch.nn.Module = self.student
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.objective = NecoObjective(cfg, patch_size=self.base.patch_size, dim=cfg.head_out, device=self.device,
                                       dist=self.dist)
        self.dataset = NecoViews(self.files, self.crops, cfg.seed)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None  # the step of the newest train_state, and where it is
        self.state_path: Path | None = None
        self.skipped_images = 0
        if cfg.resume:
            self._resume(cfg.resume)

    def _check_output(self) -> bool:
        """Refuse an --output that is a file, or that holds a run this one is not resuming (unless
        --overwrite). Returns whether an existing run's files are to be replaced."""
        cfg, out = self.cfg, self.out
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"--output {out} cannot be a run folder: {existing} is a file",
                              hint="pass a folder path to --output (it is created if missing)")
        found = [name for name in (*RUN_FILES, "checkpoints") if (out / name).exists()]
        if not found:
            return False
        resume_dir = None
        if cfg.resume:
            resume_dir = Path(cfg.resume).expanduser()
            resume_dir = resume_dir if resume_dir.is_dir() else resume_dir.parent
        if resume_dir is not None and resume_dir.resolve() == out.resolve():
            return False  # continuing this run in its own folder
        if cfg.overwrite:
            return True
        if resume_dir is not None:
            raise ConfigError(f"--output {out} already holds another run ({', '.join(found)}); continuing "
                              f"{cfg.resume} into it would mix the two",
                              hint=f"continue in the resumed run's folder (--output {resume_dir}), choose a new "
                                   "--output folder, or pass --overwrite to replace that run")
        raise ConfigError(f"--output {out} already holds a run ({', '.join(found)}); refusing to overwrite it",
                          hint=f"continue it with --resume {out}, choose a new --output folder, or pass "
                               "--overwrite to replace it")

    def _clear_output(self) -> None:
        """--overwrite: remove the replaced run's files, so its checkpoints and log do not mix with this run's."""
        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        checkpoints = self.out / "checkpoints"
        if checkpoints.is_dir():
            for p in checkpoints.glob("step-*"):
                if p.suffix in (".safetensors", ".json"):
                    p.unlink()

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A failed write (full disk, quota, permissions) becomes one message naming what is kept."""
        try:
            yield
        except OSError as e:
            kept = (f"; the last complete checkpoint is kept at {self.last_checkpoint}" if self.last_checkpoint
                    else "")
            then = f"continue with --resume {self.state_path}" if self.state_path else "run again with --overwrite"
            raise TrainingError(f"could not write {what} in {self.out} at step {self.step}: "
                                f"{e.strerror or e}{kept}",
                                hint=f"free space in (or fix the permissions of) {self.out}, then {then}") from None

    # -- schedules -------------------------------------------------------------------------------------
    def schedule(self, step: int) -> dict[str, float]:
        c, total = self.cfg, self.total_steps
        return {
            "lr_backbone": cosine_schedule(c.lr_backbone, c.final_lr, step, total, c.warmup_steps),
            "lr_head": cosine_schedule(c.lr_head, c.final_lr, step, total, c.warmup_steps),
            "weight_decay": cosine_schedule(c.weight_decay, c.weight_decay_end, step, total),
            "momentum": cosine_schedule(c.momentum, c.momentum_end, step, total),
        }

    def _apply_schedule(self, values: dict[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr_head"] if group["name"].startswith("head") else values["lr_backbone"]
            if group["decay"]:
                group["weight_decay"] = values["weight_decay"]

    # -- one step --------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> float:
        values = self.schedule(self.step)
        self._apply_schedule(values)
        inputs = StepInputs.from_batch(batch, self.device)
        loss = self.objective.loss(self.model, self.teacher, inputs, autocast=self.autocast)
        finite = self.dist.mean(torch.isfinite(loss.detach()).float())
        if float(finite) < 1.0:
            kept = f"; the last finite checkpoint is kept at {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingError(f"the loss became non-finite at step {self.step + 1}{kept}",
                                hint="lower the learning rates or the steepness, or keep the log floor "
                                     "(--log-floor) on")
        if self.cfg.ema == "before":
            ema_update(self.teacher, self.student, values["momentum"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.cfg.ema == "after":
            ema_update(self.teacher, self.student, values["momentum"])
        self.step += 1
        return float(loss.detach())

    def loader(self, epoch: int, start_step: int = 0) -> torch.utils.data.DataLoader:
        sampler = GlobalBatchSampler(len(self.files), self.global_batch, self.dist.rank, self.dist.world_size,
                                     self.cfg.seed, epoch, start_step)
        # an own generator: creating a loader must not draw from the global RNG (drop-path), or a resumed
        # run would diverge from an uninterrupted one
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                                           collate_fn=collate, num_workers=self.cfg.workers, drop_last=True,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False,
                                           generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def _check_batch(self, batch: dict) -> None:
        if "error" in batch:
            raise DataError(batch["error"], hint=batch.get("hint"))
        self.skipped_images += int(batch["skipped"].sum())

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from densebench.progress import progress_bar

        cfg = self.cfg
        last_step = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        log_path = self.out / "log.jsonl"
        if self.dist.is_main:
            with self._writing("the run folder"):
                self.out.mkdir(parents=True, exist_ok=True)
                if self.replace_output:
                    self._clear_output()
                self._trim_log(log_path)
                atomic_write_text(self.out / "config.json", json.dumps(self._run_info(), indent=2, sort_keys=True))
        losses: list[float] = []
        window: list[float] = []
        t_window = time.perf_counter()
        data_wait = 0.0  # seconds of the window spent waiting for batches
        show = cfg.progress and self.dist.is_main
        with progress_bar("neco_train", total=last_step, enabled=show) as advance:
            advance(self.step)
            while self.step < last_step:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                t_ready = time.perf_counter()
                for batch in self.loader(epoch, in_epoch):
                    data_wait += time.perf_counter() - t_ready
                    self._check_batch(batch)
                    loss = self.train_step(batch)
                    losses.append(loss)
                    window.append(loss)
                    advance(1)
                    at_epoch_end = self.step % self.steps_per_epoch == 0
                    if self.step % cfg.log_every == 0 or self.step == last_step or at_epoch_end:
                        elapsed = max(time.perf_counter() - t_window, 1e-9)
                        mean = torch.tensor(sum(window) / len(window), device=self.device)  # NCCL: not on the CPU
                        mean_loss = float(self.dist.mean(mean))
                        self._log(log_path, mean_loss, len(window) * self.global_batch / elapsed,
                                  min(1.0, data_wait / elapsed))
                        window, t_window, data_wait = [], time.perf_counter(), 0.0
                    if (cfg.save_every and self.step % cfg.save_every == 0) or at_epoch_end or self.step == last_step:
                        self.save()
                    if self.step >= last_step:
                        break
                    t_ready = time.perf_counter()
        return {"steps": self.step, "losses": losses, "checkpoint": str(self.last_checkpoint),
                "skipped_images": self.skipped_images, "output": str(self.out)}

    def _log(self, path: Path, loss: float, images_per_s: float, data_wait_share: float) -> None:
        if not self.dist.is_main:
            return
        values = self.schedule(self.step - 1)
        record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss,
                  **values, "images_per_s": images_per_s, "data_wait_share": data_wait_share,
                  "skipped_images": self.skipped_images, "time": time.time()}
        with self._writing(path.name), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.cfg.progress:
            return
        print(f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {values['lr_backbone']:.2e}/"
              f"{values['lr_head']:.2e} m {values['momentum']:.5f} {images_per_s:.1f} img/s "
              f"(data wait {100 * data_wait_share:.0f}%)", file=sys.stderr)

    def _trim_log(self, path: Path) -> None:
        """Keep the log lines of steps up to the one this run starts from (a resumed run logs the later ones
        again), and drop a line a crash cut short; rewritten atomically."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= self.step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    # -- checkpoints -----------------------------------------------------------------------------------
    def _run_info(self) -> dict[str, Any]:
        return {"config": self.cfg.to_json(), "world_size": self.dist.world_size, "n_images": len(self.files),
                "data": self.data_identity, "layout": self.layout, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "crops": dataclasses.asdict(self.crops), "base_model": self.base.name,
                "base_fingerprint": self.base.fingerprint, "arch": self.base.arch}

    def sidecar(self) -> dict[str, Any]:
        """The JSON written next to every backbone checkpoint (read by densebench's neco: loader)."""
        import timm

        import densebench
        return {"arch": self.base.arch, "model_kwargs": self.base.model_kwargs, "pos_interp": self.base.pos_interp,
                "patch_size": self.base.patch_size, "base_model": self.base.name, "base_weights": self.base.weights,
                "base_fingerprint": self.base.fingerprint, "step": self.step,
                "epoch": self.step / self.steps_per_epoch, "total_steps": self.total_steps,
                "config": self.cfg.to_json(), "world_size": self.dist.world_size,
                "versions": {"densebench": densebench.__version__, "torch": torch.__version__,
                             "timm": timm.__version__}}

    def save(self) -> Path | None:
        """Write ``checkpoints/step-N`` (+ ``last``) backbone checkpoints and ``train_state.pt``."""
        objective_state = self.objective.state_dict()
        if self.objective.queue is not None and not self.objective.global_scope and self.dist.enabled:
            # per-process queues: keep every rank's so a resume with the same world size restores them
            objective_state["queue_all"] = self.dist.all_gather_cat(self.objective.queue.data.unsqueeze(0)).cpu()
        finite = torch.stack([torch.isfinite(p).all() for p in self.student.parameters()]).all()
        if not bool(finite):  # never let a diverged model replace the last good checkpoint
            kept = f"; the last finite checkpoint is kept at {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingError(f"the student's parameters became non-finite by step {self.step}{kept}",
                                hint="lower the learning rates")
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        backbone = self.student.timm_model.state_dict()
        meta = self.sidecar()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        stem = self.out / "checkpoints" / f"step-{self.step:07d}"
        try:
            with self._writing(f"the checkpoint of step {self.step}"):
                path = ckpt.save_backbone(stem, backbone, meta)
                ckpt.save_backbone(self.out / "last", backbone, meta)
                ckpt.save_state(self.out / "train_state.pt", {
                    "step": self.step, "config": self.cfg.to_json(), "world_size": self.dist.world_size,
                    "n_images": len(self.files), "data": self.data_identity, "student": self.student.state_dict(),
                    "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "objective": objective_state, "rng": rng, "last_checkpoint": str(path),
                    "skipped_images": self.skipped_images})
        except TrainingError:  # each file is written atomically; drop step weights left without their sidecar
            weights, sidecar = ckpt.checkpoint_paths(stem)
            if not sidecar.exists():
                weights.unlink(missing_ok=True)
            raise
        self.last_checkpoint = path
        self.saved_step, self.state_path = self.step, self.out / "train_state.pt"
        self.dist.barrier()
        return path

    def _resume(self, where: str) -> None:
        state = ckpt.load_state(where)
        saved, now = state["config"], self.cfg.to_json()
        differ = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
        if differ:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in differ[:6])
            raise ConfigError(f"resume checkpoint {where} comes from another configuration ({details})",
                              hint="resume with the same settings, or start a new run")
        if int(state["n_images"]) != len(self.files):
            raise ConfigError(f"resume checkpoint {where} was trained on {state['n_images']} images; "
                              f"{self.cfg.data} has {len(self.files)}", hint="resume on the same data")
        saved, now = state.get("data"), self.data_identity  # no "data" in states from before it was recorded
        if saved and saved["sha256"] != now["sha256"]:
            raise ConfigError(f"resume checkpoint {where} was trained on other images: {saved['n_images']} files "
                              f"under {saved['root']} (file list sha256 {saved['sha256'][:12]}), now "
                              f"{now['n_images']} files under {now['root']} (sha256 {now['sha256'][:12]})",
                              hint="resume on the same --data, or start a new run")
        if saved and saved["root"] != now["root"] and self.dist.is_main:
            print(f"neco_train: resuming on the same {now['n_images']} image files, now under {now['root']} "
                  f"(was {saved['root']})", file=sys.stderr)
        same_world = int(state["world_size"]) == self.dist.world_size
        if not same_world and self.cfg.queue_scope == "process":
            raise ConfigError(f"resume checkpoint {where} ran on {state['world_size']} processes, this run on "
                              f"{self.dist.world_size}; per-process queues cannot be redistributed",
                              hint="resume with the same number of processes, or use --queue-scope global")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        objective_state = dict(state["objective"])
        if "queue_all" in objective_state:
            objective_state["queue"] = {"data": objective_state["queue_all"][self.dist.rank],
                                        "entries": objective_state["queue"]["entries"]}
        self.objective.load_state_dict(objective_state)
        if self.dist.is_main:
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + int(state["step"]))
        self.step = self.saved_step = int(state["step"])
        self.state_path = Path(where).expanduser()
        self.skipped_images = int(state.get("skipped_images", 0))
        self.last_checkpoint = Path(state["last_checkpoint"]) if state.get("last_checkpoint") else None

    # -- dry run ---------------------------------------------------------------------------------------
    def dry_run(self, steps: int = 3) -> dict[str, Any]:
        """Time ``steps`` steps after one warm-up step on real batches; nothing is written."""
        times = []
        loader = iter(self.loader(0))
        for i in range(steps + 1):
            try:
                batch = next(loader)
            except StopIteration:
                loader = iter(self.loader(0))
                batch = next(loader)
            self._check_batch(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i:
                times.append(time.perf_counter() - t0)
        per_step = sum(times) / len(times)
        return {"seconds_per_step": per_step, "images_per_s": self.global_batch / per_step,
                "steps_per_epoch": self.steps_per_epoch, "seconds_per_epoch": per_step * self.steps_per_epoch,
                "seconds_total": per_step * self.total_steps, "device": str(self.device),
                "global_batch": self.global_batch, "measured_steps": len(times)}


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train in this process (joining the torchrun process group if there is one)."""
    dist = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, dist)
        return trainer.fit()
    finally:
        dist.close()
