"""Image/mask views used by the protocols, deterministic per (seed, epoch, image index).

Every random view draws from its own ``torch.Generator`` seeded from (seed, epoch, index), so the
augmented memory bank is identical whatever the batch size, worker count or order (the reference
draws from the global RNG and is reproducible only with the same batch order). Each view has a
``describe()`` that goes into the feature-cache key.

The data path (:mod:`densebench.features`) calls a view in parts: ``image(index, image)`` in a worker,
then ``finish`` (a :class:`DeviceFinish`, or None when ``image`` already returns the encoder input) on the
whole batch on the device, and ``mask(index, mask)`` in a separate, cheap pass. ``describe_image()`` and
``describe_mask()`` say what each part's output depends on, so image features are keyed without the
masks and masks without the normalisation. ``view(index, image, mask)`` is the same computation in one call.

Exactness: each part returns bitwise the values the one-call, full-image float recipe gives (the tests
compare them): crops are taken on the uint8 image before the float conversion; the colour jitter runs on
the crop only, which is exact because every jitter op is per pixel except contrast, whose grey mean is
taken over the whole (jittered so far) image first, as torchvision does; the hue op is a leaner
formulation of torchvision's with the same float operations per pixel; normalisation, where it is the
last step, moves to the device. Resizing stays in float: a uint8 resize would round.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # made once per device: building a CUDA tensor from a list copies from pageable memory and waits
    return torch.tensor(values, dtype=dtype, device=device).view(3, 1, 1)


def normalise(img: torch.Tensor, mean, std) -> torch.Tensor:
    """(img - mean) / std per channel, for (3, H, W) images and (B, 3, H, W) batches on any device."""
    m = _channel_values(tuple(float(v) for v in mean), img.dtype, img.device)
    s = _channel_values(tuple(float(v) for v in std), img.dtype, img.device)
    return torch.sub(img, m).div_(s)


@dataclass(frozen=True)
class DeviceFinish:
    """The last, per-pixel steps of a view, applied to a whole batch on the encoder's device.

    The worker's output is uint8 (B, H, W, 3) when ``uint8`` (channel-last, a quarter of the bytes of
    float), else float (B, 3, H, W) in [0, 1]; this divides by 255 when needed, normalises and zero-pads
    ``pad`` = (left, right, top, bottom) in normalised space: the same float operations as on the CPU.
    """

    mean: tuple
    std: tuple
    uint8: bool = False
    pad: tuple = (0, 0, 0, 0)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float().div_(255.0) if self.uint8 else batch.float()
        x = normalise(x, self.mean, self.std)
        return F.pad(x, self.pad) if any(self.pad) else x


# ---------------------------------------------------------------------------------------------------
# Colour jitter: torchvision's tensor ops on float images in [0, 1], with the same float operations per
# pixel (bitwise equal; tests/test_data_path.py compares them), written so that they can run on a crop.

def _blend(img1: torch.Tensor, img2, ratio: float) -> torch.Tensor:
    # torchvision: (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 1); the same operations, fewer temporaries
    return torch.mul(img1, ratio).add_((1.0 - ratio) * img2).clamp_(0.0, 1.0)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale: (..., 3, H, W) -> (..., 1, H, W)."""
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def contrast_mean(img: torch.Tensor) -> torch.Tensor:
    """The grey mean adjust_contrast blends towards, over the image given (take it over the whole image)."""
    return torch.mean(grayscale(img), dim=(-3, -2, -1), keepdim=True)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    # torchvision blends with zeros_like(img); (1 - factor) * 0 is the same signed zero as a scalar
    return _blend(img, 0.0, factor)


def adjust_contrast(img: torch.Tensor, factor: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``mean``: :func:`contrast_mean` of the whole image when ``img`` is a crop of it."""
    return _blend(img, contrast_mean(img) if mean is None else mean, factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, grayscale(img), factor)


#: hue sector (0..5) -> which of (v, w, p) each output channel takes; w is q in odd sectors, t in even ones
_HSV_SOURCES = torch.tensor([[0, 1, 2, 2, 1, 0], [1, 0, 0, 1, 2, 2], [2, 2, 1, 0, 0, 1]])


def adjust_hue(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_hue (rgb -> hsv, shift h, hsv -> rgb) for a (3, H, W) float image, 2-4x faster.

    The per-pixel float operations are torchvision's; the differences are exact rewrites: the branch
    sums ``(maxc == r) * x + ...`` become selections (the other terms are signed zeros that the
    following ``+ 1.0`` absorbs), only the one of q and t that a pixel's sector uses is computed, and the
    one-hot einsum that assembles r, g, b becomes a gather.
    """
    r, g, b = img.unbind(dim=0)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r).div_(divisor)
    gc = (maxc - g).div_(divisor)
    bc = (maxc - b).div_(divisor)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (2.0 + rc) - bc, (4.0 + gc) - rc))
    h = torch.fmod(h.div_(6.0).add_(1.0), 1.0)
    h = (h + factor) % 1.0
    h6 = h.mul_(6.0)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sector = sector.to(torch.int64) % 6
    ff = torch.where((sector & 1).bool(), f, 1.0 - f)
    p = (1.0 - s).mul_(maxc).clamp_(0.0, 1.0)
    w = (1.0 - s.mul_(ff)).mul_(maxc).clamp_(0.0, 1.0)
    return torch.gather(torch.stack((maxc, w, p)), 0, _HSV_SOURCES[:, sector])


_JITTER_OPS = {"brightness": adjust_brightness, "saturation": adjust_saturation, "hue": adjust_hue}


def jitter_crop(image_u8: torch.Tensor, ops: list[tuple[str, float]], box: tuple[int, int, int, int]) -> torch.Tensor:
    """``ops`` applied to the whole uint8 (3, H, W) image in float, then the ``box`` (top, left, h, w) crop:
    computed on the crop only. Contrast's grey mean is taken over the whole image after the ops before it."""
    mean = None
    names = [op for op, _ in ops]
    if "contrast" in names:
        full = image_u8.float().div_(255.0)
        for op, factor in ops[:names.index("contrast")]:
            full = _JITTER_OPS[op](full, factor)
        mean = contrast_mean(full)
    top, left, h, w = box
    img = image_u8[:, top:top + h, left:left + w].float().div_(255.0)
    for op, factor in ops:
        img = adjust_contrast(img, factor, mean) if op == "contrast" else _JITTER_OPS[op](img, factor)
    return img


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


def _fields(view, drop: tuple[str, ...] = ()) -> dict:
    """The view's fields but ``drop``; a field named ``view`` (LinearTrainView's draw) becomes ``draw``, so that
    ``view`` stays the kind of view (``{"view": "linear-train", **_fields(v)}``)."""
    return {("draw" if k == "view" else k): v for k, v in asdict(view).items() if k not in drop}


def _as_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask))


@dataclass(frozen=True)
class ResizeView:
    """Evaluation view: image resized (bilinear, antialias) and mask resized (nearest) to a square."""

    size: int
    mask_size: int | None = None   # None -> same as size
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        return self.finish(self.image(index, image)[None])[0], self.mask(index, mask)

    def image(self, index: int, image: Image.Image) -> torch.Tensor:
        """Float (3, size, size) in [0, 1]; :attr:`finish` normalises."""
        return resize_image(to_tensor(image), (self.size, self.size))

    @property
    def finish(self) -> DeviceFinish:
        return DeviceFinish(tuple(self.mean), tuple(self.std))

    def mask(self, index: int, mask: np.ndarray) -> torch.Tensor:
        ms = self.mask_size or self.size
        return resize_mask(_as_tensor(mask), (ms, ms))

    def describe(self) -> dict:
        return {"view": "resize", **asdict(self)}

    def describe_image(self) -> dict:
        return {"view": "resize", **_fields(self, ("mask_size",))}

    def describe_mask(self) -> dict:
        return {"view": "resize", "mask_size": self.mask_size or self.size}


@dataclass(frozen=True)
class HummingbirdTrainView:
    """The open-hummingbird-eval memory-bank augmentation (spec §3.2).

    Colour jitter (brightness, contrast, saturation, hue 0.1, each with p=0.5) on the image only, then a
    paired RandomResizedCrop(size, scale=(0.5, 2.0), ratio=(3/4, 4/3)): bilinear+antialias for the
    image, nearest for the mask. No flip. The draws depend only on (seed, epoch, index) and the image size.
    """

    size: int
    seed: int
    epoch: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    jitter: float = 0.1
    scale: tuple = (0.5, 2.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hue: float | None = None   # hue range; None: ``jitter`` (hbird 1.1 used ColorJitter(hue=0.5))

    finish = None   # image() returns the encoder input (normalisation comes before the resize)

    def draw(self, index: int, height: int, width: int) -> tuple[list[tuple[str, float]], tuple[int, int, int, int]]:
        """The jitter ops applied (in order, with their factors) and the crop box (top, left, h, w)."""
        g = generator_for(self.seed, self.epoch, index)
        j = self.jitter
        h = j if self.hue is None else self.hue
        ops = []
        for op, lo, hi in (("brightness", 1 - j, 1 + j), ("contrast", 1 - j, 1 + j),
                           ("saturation", 1 - j, 1 + j), ("hue", -h, h)):
            if float(torch.rand((), generator=g)) < 0.5:
                ops.append((op, _uniform(g, lo, hi)))
        return ops, random_resized_crop_params(g, height, width, self.scale, self.ratio)

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        return self.image(index, image), self.mask(index, mask)

    def image(self, index: int, image: Image.Image) -> torch.Tensor:
        u8 = TF.pil_to_tensor(image)
        ops, box = self.draw(index, u8.shape[1], u8.shape[2])
        img = normalise(jitter_crop(u8, ops, box), self.mean, self.std)
        return resize_image(img, (self.size, self.size))

    def mask(self, index: int, mask: np.ndarray) -> torch.Tensor:
        m = _as_tensor(mask)
        _, (top, left, h, w) = self.draw(index, m.shape[0], m.shape[1])
        return resize_mask(m[top:top + h, left:left + w], (self.size, self.size))

    def describe(self) -> dict:
        return {"view": "hbird-train", **_fields(self, ("hue",) if self.hue is None else ())}

    def describe_image(self) -> dict:
        return self.describe()

    def describe_mask(self) -> dict:
        # the jitter factors do not move the crop: each op consumes the same draws whatever its range
        return {"view": "hbird-train", **_fields(self, ("mean", "std", "jitter", "hue"))}


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

    def draw(self, index: int, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box (top, left, h, w) and whether the view is flipped."""
        g = generator_for(self.seed, self.view, index)
        box = random_resized_crop_params(g, height, width, self.scale, self.ratio)
        return box, bool(self.flip and float(torch.rand((), generator=g)) < 0.5)

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray):
        return self.finish(self.image(index, image)[None])[0], self.mask(index, mask)

    def image(self, index: int, image: Image.Image) -> torch.Tensor:
        """Float (3, size, size) in [0, 1]; :attr:`finish` normalises (normalising commutes with the flip)."""
        u8 = TF.pil_to_tensor(image)
        (top, left, h, w), flip = self.draw(index, u8.shape[1], u8.shape[2])
        img = resize_image(u8[:, top:top + h, left:left + w].float().div_(255.0), (self.size, self.size))
        return img.flip(-1) if flip else img

    @property
    def finish(self) -> DeviceFinish:
        return DeviceFinish(tuple(self.mean), tuple(self.std))

    def mask(self, index: int, mask: np.ndarray) -> torch.Tensor:
        m = _as_tensor(mask)
        (top, left, h, w), flip = self.draw(index, m.shape[0], m.shape[1])
        m = resize_mask(m[top:top + h, left:left + w], (self.size, self.size))
        if flip:
            m = m.flip(-1)
        if self.mask_size != self.size:
            m = resize_mask(m, (self.mask_size, self.mask_size))
        return m

    def describe(self) -> dict:
        return {"view": "linear-train", **asdict(self)}

    def describe_image(self) -> dict:
        return {"view": "linear-train", **_fields(self, ("mask_size",))}

    def describe_mask(self) -> dict:
        return {"view": "linear-train", **_fields(self, ("mean", "std"))}


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
        return self.finish(self.image(index, image)[None])[0], self.mask(index, mask)

    def image(self, index: int, image: Image.Image) -> torch.Tensor:
        """uint8 (size, size, 3), channel-last; :attr:`finish` converts, normalises and pads on the device."""
        side = max(image.size)
        square = Image.new("RGB", (side, side), (self.fill,) * 3)
        square.paste(image.convert("RGB"), (0, 0))
        return torch.from_numpy(np.array(square.resize((self.size, self.size), Image.Resampling.BICUBIC)))

    @property
    def finish(self) -> DeviceFinish:
        extra, lo = self.padded_size - self.size, self.offset
        return DeviceFinish(tuple(self.mean), tuple(self.std), uint8=True, pad=(lo, extra - lo, lo, extra - lo))

    def mask(self, index: int, mask: np.ndarray | None = None) -> torch.Tensor:
        return torch.zeros((1, 1), dtype=torch.uint8)

    def describe(self) -> dict:
        return {"view": "square-pad", **asdict(self), "padded_size": self.padded_size, "offset": self.offset}

    def describe_image(self) -> dict:
        return self.describe()

    def describe_mask(self) -> dict:
        return {"view": "square-pad", "mask": "placeholder"}
