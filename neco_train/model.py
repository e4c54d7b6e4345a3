"""Student and teacher networks: a timm ViT backbone from densebench's loaders plus NeCo's projection head.

The base model is loaded through ``densebench.encoders.load_encoder`` (registry names, ``timm:<arch>``,
``random:<arch>``, ``neco:<checkpoint>``, ``--weights`` in timm/Meta/NeCo format, all strict), so
neco_train reads exactly the weights densebench evaluates. The student and teacher are then rebuilt from
the same timm architecture (the student with drop-path) and loaded strictly from that state dict; this is
the one place where weights enter the trainer.
"""

from __future__ import annotations

import copy
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densebench.errors import DenseBenchError, ModelError


class ProjectionHead(nn.Module):
    """NeCo's head (spec §2.2): Linear(C, h) - GELU - ... - Linear(h, out), trunc-normal(0.02) init,
    zero biases; the output is L2-normalised by :class:`NecoNet`."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ModelError(f"the projection head needs at least one layer; got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class NecoNet(nn.Module):
    """Backbone (a densebench TimmEncoder) + projection head: images -> (B, h, w, D) unit vectors per patch.

    The backbone returns the final-norm patch tokens with class and register tokens removed, which is
    what NeCo projects (spec §1.2)."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def timm_model(self) -> nn.Module:
        return self.backbone.model

    def forward(self, *crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One output per crop batch (crops of one resolution each), so that a DDP-wrapped student runs
        every resolution in a single forward call."""
        return tuple(F.normalize(self.head(self.features(images)), dim=-1) for images in crops)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's (B, h, w, C) patch tokens, without ``DenseEncoder.forward``'s bookkeeping: its
        Python counter (``images_forwarded``) would change on every call and make ``torch.compile``
        recompile the student every step. Crop sizes are checked once, by ``TrainConfig.crop_config``."""
        return self.backbone._features(images, self.backbone.layer, self.backbone.norm)


@dataclass
class BaseModel:
    """What the trainer needs to know about the model it starts from (written into every sidecar)."""

    name: str
    weights: str | None
    arch: str
    model_kwargs: dict[str, Any]
    fingerprint: str
    patch_size: int
    embed_dim: int
    native_size: int | None
    pos_interp: str
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    #: the model kwargs the user passed (to rebuild the same base encoder through densebench)
    model_kwargs_given: dict[str, Any] = field(default_factory=dict)


def load_base(model: str, *, weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
              pos_interp: str | None = None) -> BaseModel:
    """Load the base encoder through densebench and describe how to rebuild it with timm.

    ``pos_interp`` defaults to the base model's own (registry) setting; NeCo's training code resamples
    position embeddings Meta's way (``meta-offset``), which matters only at non-native crop sizes.
    """
    from densebench.encoders import REGISTRY, load_encoder
    from densebench.encoders.timm_encoder import TimmEncoder

    with download_lock(model, weights):
        encoder = load_encoder(model, weights=weights, model_kwargs=model_kwargs, pos_interp=pos_interp)
    if not isinstance(encoder, TimmEncoder):
        raise ModelError(f"neco_train needs a timm ViT backbone; {model!r} loads as {type(encoder).__name__}",
                         hint="use a registry name, timm:<arch>, random:<arch> or neco:<checkpoint>")
    net = encoder.model
    kwargs: dict[str, Any] = {}
    if model in REGISTRY:
        kwargs.update(REGISTRY[model].model_kwargs)
    elif model.startswith("neco:"):  # continuing from a neco_train checkpoint: its sidecar has the kwargs
        from .checkpoint import read_sidecar
        kwargs.update(read_sidecar(model[5:]).get("model_kwargs", {}))
    kwargs.update(model_kwargs or {})
    for key in ("num_classes", "dynamic_img_size", "pretrained", "drop_path_rate"):
        kwargs.pop(key, None)
    img = getattr(net.patch_embed, "img_size", None)
    if isinstance(img, (tuple, list)):
        kwargs["img_size"] = int(img[0]) if img[0] == img[1] else [int(v) for v in img]
    return BaseModel(name=model, weights=weights, arch=encoder.arch, model_kwargs=kwargs,
                     fingerprint=encoder.fingerprint, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
                     native_size=encoder.native_size, pos_interp=encoder.pos_interp,
                     state_dict={k: v.detach().clone() for k, v in net.state_dict().items()},
                     model_kwargs_given=dict(model_kwargs or {}))


def download_lock(model: str, weights: str | None) -> AbstractContextManager:
    """A file lock next to the cached file of ``model``'s published weights, taken only when they still
    have to be downloaded: of several ranks (or jobs) sharing the cache one downloads, the others wait
    for the lock and then read the file it wrote."""
    from densebench.encoders import REGISTRY
    from densebench.encoders.weights import offline

    if weights or offline():
        return nullcontext()
    try:
        if model in REGISTRY:
            source = REGISTRY[model].source
        elif model.startswith("timm:"):
            from densebench.encoders import _timm_pretrained_source
            source = _timm_pretrained_source(model[5:])
        else:
            return nullcontext()
    except DenseBenchError:  # no published weights: load_encoder reports it
        return nullcontext()
    if source.find_local() is not None:
        return nullcontext()
    import filelock

    lock = source.local_path().with_name(source.filename + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(lock))


def build_backbone(base: BaseModel, *, drop_path: float = 0.0, name: str = "neco-student") -> nn.Module:
    """A trainable TimmEncoder of the base architecture holding the base weights (loaded strictly)."""
    from densebench.encoders.convert import load_strict
    from densebench.encoders.timm_encoder import TimmEncoder, create_timm_vit

    net = create_timm_vit(base.arch, {**base.model_kwargs, "drop_path_rate": float(drop_path)})
    load_strict(net, base.state_dict, source=f"base model {base.name}", arch=base.arch)
    encoder = TimmEncoder(net, name=name, fingerprint=base.fingerprint, pos_interp=base.pos_interp,
                          loader="neco_train", arch=base.arch)
    return encoder.train()


def build_student_teacher(base: BaseModel, *, drop_path: float = 0.1, head_hidden: int = 2048,
                          head_out: int = 256, head_layers: int = 3, teacher_head: str = "independent",
                          seed: int = 0) -> tuple[NecoNet, NecoNet]:
    """Student (drop-path) and EMA teacher (no drop-path, no gradients), both from the base weights.

    ``teacher_head="independent"`` (default) draws the teacher head separately, as the reference code does (its
    loader drops the head keys, so the first phase of training aligns the two heads: part of the method as
    published, spec neco.md §7.8); ``"copy"`` starts it as a copy of the student head (the DINO/BYOL practice).
    """
    if teacher_head not in ("copy", "independent"):
        from densebench.errors import ConfigError, choices_message
        raise ConfigError(choices_message("teacher head init", teacher_head, ["copy", "independent"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student_head = ProjectionHead(base.embed_dim, head_hidden, head_out, head_layers)
        teacher_head_module = (copy.deepcopy(student_head) if teacher_head == "copy"
                               else ProjectionHead(base.embed_dim, head_hidden, head_out, head_layers))
    student = NecoNet(build_backbone(base, drop_path=drop_path), student_head)
    teacher = NecoNet(build_backbone(base, drop_path=0.0, name="neco-teacher"), teacher_head_module)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m·teacher + (1-m)·student over all parameters (not buffers), as one fused foreach op."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ModelError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - float(momentum))


def cosine_schedule(base: float, final: float, step: int, total: int, warmup: int = 0,
                    warmup_start: float = 0.0) -> float:
    """``final + (base - final)/2 · (1 + cos(π t / T))`` at step t (the reference's LR, weight decay and
    momentum schedules; optional linear warm-up from ``warmup_start``, none by default)."""
    if warmup > 0 and step < warmup:
        return warmup_start + (base - warmup_start) * step / warmup
    span = max(1, total - warmup)
    t = min(max(step - warmup, 0), span)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / span))


def param_groups(student: NecoNet, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict]:
    """AdamW groups as the reference: [backbone decay, backbone no-decay, head decay, head no-decay];
    biases and 1-D parameters (norms, LayerScale) have no decay; cls/pos/register tokens do decay."""
    groups = {k: [] for k in ("backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay")}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if name.startswith("head.") else "backbone"
        decay = not (name.endswith(".bias") or p.ndim <= 1)
        groups[f"{part}_{'decay' if decay else 'no_decay'}"].append(p)
    return [
        {"name": "backbone_decay", "params": groups["backbone_decay"], "lr": lr_backbone, "weight_decay": weight_decay,
         "base_lr": lr_backbone, "decay": True},
        {"name": "backbone_no_decay", "params": groups["backbone_no_decay"], "lr": lr_backbone, "weight_decay": 0.0,
         "base_lr": lr_backbone, "decay": False},
        {"name": "head_decay", "params": groups["head_decay"], "lr": lr_head, "weight_decay": weight_decay,
         "base_lr": lr_head, "decay": True},
        {"name": "head_no_decay", "params": groups["head_no_decay"], "lr": lr_head, "weight_decay": 0.0,
         "base_lr": lr_head, "decay": False},
    ]
