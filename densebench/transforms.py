"""Image/mask views used by the protocols, deterministic per (seed, epoch, image index).

Every random view draws from its own ``torch.Generator`` seeded from (seed, epoch, index), so the
augmented memory bank is identical whatever the batch size, worker count or order (the reference
draws from the global RNG and is reproducible only with the same batch order). Each view has a
``describe()`` that goes into the feature-cache key.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from .encoders.base import IMAGENET_MEAN, IMAGENET_STD

#: The open-hummingbird-eval std, with its 0.255 typo for the blue channel (legacy parity only).
HBIRD_LEGACY_STD = (0.229, 0.224, 0.255)


def normalisation(name: str, encoder=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """'imagenet' (default), 'hbird-legacy' (std typo), or 'encoder' (what the encoder declares)."""
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if name == "hbird-legacy":
        return IMAGENET_MEAN, HBIRD_LEGACY_STD
    if name == "encoder" and encoder is not None:
        return tuple(encoder.mean), tuple(encoder.std)
    from .errors import ConfigError, choices_message
    raise ConfigError(choices_message("normalisation", name, ["imagenet", "hbird-legacy", "encoder"]))


def generator_for(seed: int, epoch: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [0, 1] (ToTensor semantics)."""
    return TF.pil_to_tensor(image).float().div_(255.0)


def normalise(img: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(3, 1, 1)
    return (img - m) / s


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)


def random_resized_crop_params(g: torch.Generator, height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampler (10 tries, then a centre crop), on a private generator.

    Crops larger than the image are rejected, so with scale=(0.5, 2.0) the area is in practice 50–100 %.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ResizeView:
    """Evaluation view: image resized (bilinear, antialias) and mask resized (nearest) to a square."""

    size: int
    mask_size: int | None = None   # None -> same as size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        img = normalise(resize_image(to_tensor(image), (self.size, self.size)), self.mean, self.std)
        ms = self.mask_size or self.size
        return img, resize_mask(torch.from_numpy(np.asarray(mask)), (ms, ms))

    def describe(self) -> dict:
        return {"view": "resize", **asdict(self)}


@dataclass(frozen=True)
class HummingbirdTrainView:
    """The open-hummingbird-eval memory-bank augmentation (spec §3.2).

    Colour jitter (brightness, contrast, saturation, hue 0.1, each with p=0.5) on the image only, then a
    paired RandomResizedCrop(size, scale=(0.5, 2.0), ratio=(3/4, 4/3)): bilinear+antialias for the
    image, nearest for the mask. No flip.
    """

    size: int
    seed: int
    epoch: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    jitter: float = 0.1
    scale: tuple = (0.5, 2.0)
    ratio: tuple = (3 / 4, 4 / 3)

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        g = generator_for(self.seed, self.epoch, index)
        img = to_tensor(image)
        j = self.jitter
        if float(torch.rand((), generator=g)) < 0.5:
            img = TF.adjust_brightness(img, _uniform(g, 1 - j, 1 + j))
        if float(torch.rand((), generator=g)) < 0.5:
            img = TF.adjust_contrast(img, _uniform(g, 1 - j, 1 + j))
        if float(torch.rand((), generator=g)) < 0.5:
            img = TF.adjust_saturation(img, _uniform(g, 1 - j, 1 + j))
        if float(torch.rand((), generator=g)) < 0.5:
            img = TF.adjust_hue(img, _uniform(g, -j, j))
        img = normalise(img, self.mean, self.std)
        m = torch.from_numpy(np.asarray(mask))
        top, left, h, w = random_resized_crop_params(g, img.shape[1], img.shape[2], self.scale, self.ratio)
        img = resize_image(img[:, top:top + h, left:left + w], (self.size, self.size))
        m = resize_mask(m[top:top + h, left:left + w], (self.size, self.size))
        return img, m

    def describe(self) -> dict:
        return {"view": "hbird-train", **asdict(self)}


@dataclass(frozen=True)
class LinearTrainView:
    """The Leopart/NeCo linear-probe training augmentation (spec §4.1), one fixed draw per (seed, view, index).

    Paired RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(3/4, 4/3)) (bilinear+antialias image, nearest
    mask), then a horizontal flip with p=0.5, then the mask is nearest-resized to ``mask_size`` (the
    published 100x100 training masks). The linear probe caches a few such views per image instead of
    drawing a fresh one every epoch; ``view`` says which draw this is.
    """

    size: int
    mask_size: int
    seed: int
    view: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    scale: tuple = (0.8, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        g = generator_for(self.seed, self.view, index)
        img = to_tensor(image)
        m = torch.from_numpy(np.asarray(mask))
        top, left, h, w = random_resized_crop_params(g, img.shape[1], img.shape[2], self.scale, self.ratio)
        img = resize_image(img[:, top:top + h, left:left + w], (self.size, self.size))
        m = resize_mask(m[top:top + h, left:left + w], (self.size, self.size))
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            img, m = img.flip(-1), m.flip(-1)
        if self.mask_size != self.size:
            m = resize_mask(m, (self.mask_size, self.mask_size))
        return normalise(img, self.mean, self.std), m

    def describe(self) -> dict:
        return {"view": "linear-train", **asdict(self)}


@dataclass(frozen=True)
class SquarePadView:
    """probe3d's SPair-71k view (spec §6.2-6.3), one fixed result per image (no randomness).

    The whole image (no bounding-box crop) is padded on the bottom and right to a square of side
    max(H, W) with ``fill`` (published: 255, white), resized to ``size`` (PIL bicubic, which antialiases,
    as torchvision's Resize on a PIL image does), normalised, and finally zero-padded symmetrically (zeros
    in normalised space, i.e. the mean colour) up to a multiple of ``patch`` when ``size`` is not one:
    800 becomes 812 for /14 models, as probe3d pads inside its backbone wrapper. A pixel x of the original
    image therefore sits at ``x * size / max(H, W) + offset`` in the encoder input. The mask is not used
    by the correspondence protocol; a 1x1 placeholder keeps the feature extractor's batching uniform.
    """

    size: int
    patch: int = 1
    fill: int = 255
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def padded_size(self) -> int:
        """Side of the encoder input: ``size`` rounded up to a multiple of ``patch``."""
        return -(-self.size // self.patch) * self.patch

    @property
    def offset(self) -> int:
        """Pixels of symmetric padding before the image (top and left)."""
        return (self.padded_size - self.size) // 2

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray | None = None):
        side = max(image.size)
        square = Image.new("RGB", (side, side), (self.fill,) * 3)
        square.paste(image.convert("RGB"), (0, 0))
        img = to_tensor(square.resize((self.size, self.size), Image.Resampling.BICUBIC))
        img = normalise(img, self.mean, self.std)
        extra = self.padded_size - self.size
        if extra:
            lo = self.offset
            img = F.pad(img, (lo, extra - lo, lo, extra - lo))
        return img, torch.zeros((1, 1), dtype=torch.uint8)

    def describe(self) -> dict:
        return {"view": "square-pad", **asdict(self), "padded_size": self.padded_size, "offset": self.offset}
