"""The DenseEncoder interface every protocol relies on.

A DenseEncoder maps normalised images (B, 3, H, W) to patch features (B, H/p, W/p, D). Prefix
tokens (CLS, registers) are never part of the output. Which block and whether the final norm is
applied are instance settings (``layer``, ``norm``) that each call may override, and both are part
of :meth:`feature_key`, so cached features never mix settings.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_layer(layer: int, depth: int, name: str) -> int:
    """The non-negative block index for ``layer`` (negative counts from the end), or a ConfigError."""
    if not -depth <= layer < depth:
        raise ConfigError(f"layer {layer} is out of range for {name}, which has {depth} blocks",
                          hint=f"use -{depth}..{depth - 1} (-1 = last block)")
    return layer % depth


def incontext_input_size(patch_size: int) -> int:
    """The in-context input size of the published runs: 504 for /14 models, 512 for /16 and /8, else 32 patches."""
    return {14: 504, 16: 512, 8: 512}.get(patch_size, 32 * patch_size)


class DenseEncoder(nn.Module, abc.ABC):
    """Base class. Subclasses implement :meth:`_features` and set the attributes below.

    Attributes:
        patch_size: side of a patch in input pixels.
        embed_dim: D, the feature width.
        fingerprint: sha256 of the weights (or ``name+seed`` for seeded random/non-learned encoders).
        name: the model string the user gave (``timm:vit_small_patch14_dinov2``, ``dinov2_vits14``...).
        native_size: the resolution the weights were trained at (None if not meaningful).
        layer: default block index (negative counts from the end; -1 = last block).
        norm: default for applying the final norm to the chosen block's output.
        mean, std: the input normalisation the encoder expects.
    """

    patch_size: int
    embed_dim: int
    fingerprint: str
    name: str
    native_size: int | None = None
    #: Set by densebench.evaluate for an encoder object whose caller-chosen fingerprint is not a hash of its
    #: weights: the weights' sha256 then joins the cache key, so two weight sets never share features.
    weights_hash: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, *, layer: int = -1, norm: bool = True):
        super().__init__()
        self.layer = layer
        self.norm = norm
        #: Number of images passed through the backbone since construction; the cache tests count it.
        self.images_forwarded = 0

    # --- the one method subclasses implement -------------------------------------------------------
    @abc.abstractmethod
    def _features(self, images: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        """Return (B, H/p, W/p, D) patch features for already-checked input."""

    # --- public API --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, layer: int | None = None, norm: bool | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"encoder input must be (B, 3, H, W); got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ConfigError(
                f"input size {h}x{w} is not a multiple of the patch size {p} of {self.name}",
                hint=f"use an input size divisible by {p}, e.g. --input-size {max(p, (h // p) * p)}",
            )
        self.images_forwarded += images.shape[0]
        out = self._features(images, self.layer if layer is None else layer, self.norm if norm is None else norm)
        expected = (images.shape[0], h // p, w // p, self.embed_dim)
        if tuple(out.shape) != expected:  # a plugin returning the wrong layout is a bug worth naming
            raise ConfigError(f"encoder {self.name} returned features of shape {tuple(out.shape)}, expected {expected}")
        return out

    def feature_key(self, layer: int | None = None, norm: bool | None = None) -> dict[str, Any]:
        """What identifies the features this encoder produces: part of every cache key."""
        key = {
            "fingerprint": self.fingerprint,
            "layer": self.layer if layer is None else layer,
            "norm": self.norm if norm is None else norm,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.weights_hash is not None:   # a caller-chosen fingerprint, checked against the weights
            key["weights_hash"] = self.weights_hash
        return key

    def describe(self) -> dict[str, Any]:
        """The model block recorded in every result."""
        return {
            "name": self.name,
            "class": type(self).__name__,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "fingerprint": self.fingerprint,
            "native_size": self.native_size,
            "layer": self.layer,
            "norm": self.norm,
            "n_parameters": int(sum(p.numel() for p in self.parameters())),
            "mean": list(self.mean),
            "std": list(self.std),
        }
