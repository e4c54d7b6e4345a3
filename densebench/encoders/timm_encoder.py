"""timm ViTs as DenseEncoders: one wrapper for every timm-built backbone (timm:, registry names, random:,
neco: and plugins that return a timm ViT).

Features come from ``forward_intermediates``, which splits off the prefix tokens (class, registers) and can
apply the final norm to any block, so "last block after the final norm" and "block k without the norm" are
the same code path. Models are built with ``dynamic_img_size=True`` so any multiple of the patch size works;
the position embeddings are resampled on every forward, either timm's way or Meta's (see ``POS_INTERP``).
The mode belongs to the encoder, not to the wrapped module: a module one of whose encoders resamples Meta's way
gets a dispatcher as its ``_pos_embed`` (installed once, outside any forward, so ``torch.compile`` sees one stable
method), and every encoder sets the module's mode to its own before its forward, so two encoders wrapping one
module keep their own modes.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError
from .base import DenseEncoder, resolve_layer

#: How position embeddings are resampled to another grid. "timm": bicubic to the target size with
#: antialias (timm; also DINOv2 hub ``_reg`` models). "meta-offset": bicubic by scale factor
#: ``(n + 0.1) / N`` without antialias, as DINO v1, the DINOv2 hub non-register models and NeCo's training
#: code do; it changes the numbers slightly at non-native sizes, so published DINO-family numbers use it.
POS_INTERP = ("timm", "meta-offset")
#: What ``--pos-interp`` accepts: a mode, or ``auto`` = per benchmark, the mode of the code behind its published
#: rows (:func:`auto_pos_interp`).
POS_INTERP_CHOICES = ("auto", *POS_INTERP)
#: Protocols whose published rows come from code that resamples Meta's way whatever the weights: Leopart's and
#: NeCo's ViTs (NeCo's ``vit_v2`` also for DINOv2 with registers, spec neco.md §4). The other protocols' reference
#: code (open-hummingbird-eval, probe3d, DINO's video script) runs the hub models, i.e. each model's own mode.
META_OFFSET_PROTOCOLS = ("linear", "overcluster")


def auto_pos_interp(protocol: str, model_default: str) -> str:
    """The resampling the code behind ``protocol``'s published rows used for a model whose own (hub/registry)
    mode is ``model_default``."""
    return "meta-offset" if protocol in META_OFFSET_PROTOCOLS else model_default


def resolve_pos_interp(choice: str, protocol: str, model_default: str) -> str:
    """``choice`` (``auto`` or a mode) -> the mode a run of ``protocol`` uses."""
    if choice not in POS_INTERP_CHOICES:
        raise ConfigError(f"unknown pos-embed interpolation {choice!r}; accepted: {', '.join(POS_INTERP_CHOICES)}",
                          hint="leave --pos-interp at auto for the published choice")
    return auto_pos_interp(protocol, model_default) if choice == "auto" else choice


def is_timm_vit(model: Any) -> bool:
    """Whether ``model`` exposes the timm ViT API this wrapper relies on."""
    return all(hasattr(model, a) for a in ("forward_intermediates", "patch_embed", "blocks", "num_prefix_tokens"))


def check_arch(arch: str) -> str:
    """The architecture part of a timm name (``arch.tag`` -> ``arch``), or a ModelError with close matches."""
    import timm

    base = arch.split(".")[0]
    if not timm.is_model(base):
        import difflib
        close = difflib.get_close_matches(base, timm.list_models("*vit*") + timm.list_models("*eva*"), n=5)
        raise ModelError(f"timm has no architecture {arch!r}"
                         + (f"; close matches: {', '.join(close)}" if close else ""),
                         hint="run `python -c \"import timm; print(timm.list_models('*vit*'))\"` for the names")
    return base


def create_timm_vit(arch: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(arch)`` without pretrained weights, headless, with dynamic input sizes."""
    import timm

    base = check_arch(arch)
    kwargs = {**(model_kwargs or {}), "num_classes": 0, "dynamic_img_size": True}
    try:
        model = timm.create_model(base, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # timm asserts on inconsistent sizes
        raise ModelError(f"timm architecture {arch!r} cannot be built with {kwargs} ({type(e).__name__}: {e})",
                         hint="densebench needs a ViT that supports dynamic_img_size") from e
    if not is_timm_vit(model):
        raise ModelError(f"timm architecture {arch!r} is not a ViT with forward_intermediates",
                         hint="use a timm VisionTransformer (vit_*, eva*, deit*) or a plugin")
    return model.eval()


def enable_dynamic_size(model: nn.Module, name: str) -> None:
    """Switch a timm VisionTransformer built with a fixed size (e.g. by a plugin) to dynamic input sizes.

    This sets exactly what ``dynamic_img_size=True`` sets at construction (NHWC patch-embed output, no size
    check), so the position embeddings are resampled per forward.
    """
    from timm.layers import Format
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{name} was built without dynamic_img_size=True and is not a timm VisionTransformer "
                         "that densebench can switch to dynamic sizes",
                         hint="build it with timm.create_model(..., dynamic_img_size=True)")
    model.dynamic_img_size = True
    model.patch_embed.flatten = False
    model.patch_embed.output_fmt = Format.NHWC
    model.patch_embed.strict_img_size = False


def grid_from_pos_embed(model: nn.Module, pos_embed: torch.Tensor) -> int | None:
    """The square patch grid a checkpoint's ``pos_embed`` was trained at, or None if not square."""
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    n = pos_embed.shape[1] - n_prefix
    side = math.isqrt(max(n, 0))
    return side if side * side == n and side > 0 else None


#: The module attribute holding the resampling mode its dispatcher follows (absent: no dispatcher, timm's own).
_MODE = "_densebench_pos_interp"


def _dispatch_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``_pos_embed`` of a module once one of its encoders resamples Meta's way: the module's current mode
    (set by the encoder about to run it) picks Meta's resampling or timm's own method."""
    if getattr(self, _MODE) == "meta-offset":
        return _meta_offset_pos_embed(self, x)
    return type(self)._pos_embed(self, x)


def set_pos_embed_mode(model: nn.Module, mode: str) -> None:
    """From now on ``model`` resamples as ``mode``; Meta's mode installs the dispatcher on first use."""
    if mode == "meta-offset" and getattr(model, _MODE, None) is None:
        model.__dict__["_pos_embed"] = types.MethodType(_dispatch_pos_embed, model)
    if mode == "meta-offset" or getattr(model, _MODE, None) is not None:
        setattr(model, _MODE, mode)


@contextlib.contextmanager
def pos_embed_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """While active ``model`` resamples as ``mode``; its previous mode afterwards."""
    before = getattr(model, _MODE, None) or "timm"
    set_pos_embed_mode(model, mode)
    try:
        yield
    finally:
        set_pos_embed_mode(model, before)


def _meta_offset_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed`` with Meta's resampling (bicubic, scale factor with a 0.1 offset, no antialias)."""
    B, H, W, C = x.shape
    x = x.reshape(B, H * W, C)
    n_embed_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    pos = self.pos_embed
    prefix_pos, patch_pos = pos[:, :n_embed_prefix], pos[:, n_embed_prefix:]
    gh, gw = self.patch_embed.grid_size
    if (H, W) != (gh, gw):
        grid = patch_pos.reshape(1, gh, gw, C).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, scale_factor=((H + 0.1) / gh, (W + 0.1) / gw), mode="bicubic",
                             align_corners=False, antialias=False)
        if grid.shape[-2:] != (H, W):  # the offset exists precisely to make this impossible; keep it loud
            raise RuntimeError(f"meta-offset resampling produced {tuple(grid.shape[-2:])} for {(H, W)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, H * W, C).to(pos.dtype)
    to_cat = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = x + patch_pos
        x = torch.cat(to_cat + [x], dim=1) if to_cat else x
    else:
        x = torch.cat(to_cat + [x], dim=1) if to_cat else x
        x = x + torch.cat([prefix_pos, patch_pos], dim=1)
    return self.pos_drop(x)


class TimmEncoder(DenseEncoder):
    """A timm ViT. ``layer`` indexes ``model.blocks`` (negative from the end); ``norm`` applies the final norm."""

    def __init__(self, model: nn.Module, *, name: str, fingerprint: str, layer: int = -1, norm: bool = True,
                 loader: str = "timm", arch: str | None = None, pos_interp: str = "timm",
                 weights: dict[str, Any] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(layer=layer, norm=norm)
        if not is_timm_vit(model):
            raise ModelError(f"{name} is not a timm ViT (needs forward_intermediates, patch_embed, blocks)")
        ps = model.patch_embed.patch_size
        ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
        if ps[0] != ps[1]:
            raise ModelError(f"{name} has a non-square patch {ps}; densebench needs square patches")
        if pos_interp not in POS_INTERP:
            raise ConfigError(f"unknown pos-embed interpolation {pos_interp!r}; accepted: {', '.join(POS_INTERP)}")
        if not getattr(model, "dynamic_img_size", False):
            enable_dynamic_size(model, name)
        self.model = model.eval()
        self.patch_size = ps[0]
        self.embed_dim = int(model.embed_dim)
        self.name = name
        self.fingerprint = fingerprint
        self.depth = len(model.blocks)
        img = getattr(model.patch_embed, "img_size", None)
        self.native_size = int(img[0]) if isinstance(img, (tuple, list)) and img[0] == img[1] else None
        self.loader = loader
        self.arch = arch or type(model).__name__
        self.pos_interp = self.pos_interp_default = pos_interp
        self.pos_interp_choice: str | None = None   # what --pos-interp asked for, while a benchmark runs
        self._check_pos_interp(pos_interp)
        set_pos_embed_mode(model, pos_interp)
        self.weights_info = dict(weights or {})
        self.extra = dict(extra or {})
        self.check_layer(layer)

    def _check_pos_interp(self, mode: str) -> None:
        if mode not in POS_INTERP:
            raise ConfigError(f"unknown pos-embed interpolation {mode!r}; accepted: {', '.join(POS_INTERP)}")
        if mode == "meta-offset" and getattr(self.model, "pos_embed", None) is None:
            raise ModelError(f"{self.name} has no absolute position embedding to resample the Meta way",
                             hint="use --pos-interp timm (or auto) for this model")

    @contextlib.contextmanager
    def using_pos_interp(self, choice: str, protocol: str) -> Iterator[str]:
        """While active the encoder resamples as ``choice`` (``auto`` or a mode) resolves for ``protocol``; the
        mode enters :meth:`feature_key` (cache keys) and :meth:`describe` (results). Yields the mode."""
        mode = resolve_pos_interp(choice, protocol, self.pos_interp_default)
        self._check_pos_interp(mode)
        set_pos_embed_mode(self.model, mode)
        saved = self.pos_interp, self.pos_interp_choice
        self.pos_interp, self.pos_interp_choice = mode, choice
        try:
            yield mode
        finally:
            self.pos_interp, self.pos_interp_choice = saved

    def check_layer(self, layer: int) -> int:
        return resolve_layer(layer, self.depth, self.name)

    def feature_key(self, layer: int | None = None, norm: bool | None = None) -> dict[str, Any]:
        return {**super().feature_key(layer, norm), "pos_interp": self.pos_interp}

    def _features(self, images: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        idx = self.check_layer(layer)
        if getattr(self.model, _MODE, self.pos_interp) != self.pos_interp:   # another encoder of the module ran
            setattr(self.model, _MODE, self.pos_interp)
        (tokens,) = self.model.forward_intermediates(images, indices=[idx], norm=norm, stop_early=True,
                                                     output_fmt="NLC", intermediates_only=True)
        b, _, h, w = images.shape
        return tokens.reshape(b, h // self.patch_size, w // self.patch_size, tokens.shape[-1])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"loader": self.loader, "arch": self.arch, "depth": self.depth,
                  "num_prefix_tokens": int(self.model.num_prefix_tokens),
                  "num_register_tokens": int(getattr(self.model, "num_reg_tokens", 0)),
                  "pos_interp": self.pos_interp, "pos_interp_default": self.pos_interp_default,
                  **({"pos_interp_choice": self.pos_interp_choice} if self.pos_interp_choice else {}),
                  **self.weights_info, **self.extra})
        return d
