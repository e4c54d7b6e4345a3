"""NeCo's multi-crop views and the boxes that tie them together (spec §1.1).

Every image gives 2 global crops (``RandomResizedCrop(518 or 224, scale=(0.25, 1))``) and 4 local crops
(``RandomResizedCrop(98, scale=(0.05, 0.25))``), in the order [g0, g1, l0..l3]. Crop 0 is free; every
later crop is re-sampled until it overlaps each global crop already drawn by more than 1 % of the
image area (2 % for the second global crop). The reference retries forever; here the tries are
capped and an image where the constraint cannot be met is a DataError naming the image.

For global crop g and any crop c, the intersection of their image boxes is returned twice: in g's
resized-crop pixels (``boxes_global[g, c]``) and in c's (``boxes_all[c, g]``), as x1, y1, x2, y2.
Dividing by the patch size puts them in patch-grid units for ROI-Align.

Randomness comes from an explicit ``numpy.random.Generator`` (seeded per (seed, epoch, image) by the
dataset), so views are reproducible across workers, processes and resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from densebench.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # x1, y1, w, h in image pixels


@dataclass(frozen=True)
class CropConfig:
    """Published defaults (spec §1.1, §6): jitter and blur strength 1.0, no flip, no solarisation."""

    global_size: int = 518
    local_size: int = 98
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_intersection: float = 0.01
    max_tries: int = 1000
    jitter_strength: float = 1.0
    blur_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def validate(self) -> None:
        if self.n_global != 2:
            raise ConfigError("NeCo uses exactly 2 global crops (one teacher view each way); "
                              f"got n_global={self.n_global}")
        if self.n_local < 0:
            raise ConfigError(f"n_local must be >= 0; got {self.n_local}")
        for name in ("global_size", "local_size", "max_tries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("global_scale", "local_scale", "ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"{name} must be (low, high) with 0 < low <= high; got {(lo, hi)}")
        if not 0 <= self.min_intersection < 1:
            raise ConfigError(f"min_intersection must be in [0, 1); got {self.min_intersection}")

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def size_of(self, crop: int) -> int:
        return self.global_size if crop < self.n_global else self.local_size


def sample_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop box: 10 draws of area and log-aspect, else the clamped centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def intersection(a: Box, b: Box) -> tuple[int, int, int, int]:
    """Intersection of two (x, y, w, h) boxes as (x1, y1, x2, y2); empty means x2 <= x1 or y2 <= y1."""
    return max(a[0], b[0]), max(a[1], b[1]), min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])


def _overlap_area(a: Box, b: Box) -> int:
    x1, y1, x2, y2 = intersection(a, b)
    return max(0, x2 - x1) * max(0, y2 - y1)


def sample_crop_boxes(width: int, height: int, cfg: CropConfig, rng: np.random.Generator,
                      name: str = "image") -> list[Box]:
    """All crop boxes of one image, honouring the overlap constraint with the global crops."""
    threshold = int(width * height * cfg.min_intersection)
    boxes: list[Box] = []
    for i in range(cfg.n_crops):
        scale = cfg.global_scale if i < cfg.n_global else cfg.local_scale
        need = 2 * threshold if i == 1 else threshold
        for _ in range(cfg.max_tries):
            box = sample_box(width, height, scale, cfg.ratio, rng)
            if all(_overlap_area(box, g) > need for g in boxes[:cfg.n_global]):
                break
        else:
            raise DataError(
                f"{name} ({width}x{height} px) is too small for NeCo's crops: crop {i} could not overlap the global "
                f"crops by more than {need} px² in {cfg.max_tries} tries",
                hint="remove such tiny images from the training folder, or lower --min-intersection")
        boxes.append(box)
    return boxes


def relative_boxes(boxes: list[Box], cfg: CropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlap of each global crop g with each crop c, in g's and in c's resized-crop pixels.

    Returns ``(boxes_global (G, V, 4), boxes_all (V, G, 4))`` as float32 x1, y1, x2, y2.
    """
    g_n, v_n = cfg.n_global, cfg.n_crops
    boxes_global = torch.zeros(g_n, v_n, 4)
    boxes_all = torch.zeros(v_n, g_n, 4)
    for g in range(g_n):
        for c in range(v_n):
            ix1, iy1, ix2, iy2 = intersection(boxes[g], boxes[c])
            for target, crop in ((boxes_global[g, c], g), (boxes_all[c, g], c)):
                x, y, w, h = boxes[crop]
                s = cfg.size_of(crop)
                target[0] = (ix1 - x) * s / w
                target[1] = (iy1 - y) * s / h
                target[2] = (ix2 - x) * s / w
                target[3] = (iy2 - y) * s / h
    return boxes_global, boxes_all


def _adjust(img: Image.Image, op: int, factor: float) -> Image.Image:
    import torchvision.transforms.functional as TF

    return (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op](img, factor)


def photometric(img: Image.Image, cfg: CropConfig, rng: np.random.Generator) -> Image.Image:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 (random op order, as torchvision), grayscale with
    p=0.2, PIL Gaussian blur with radius ~ U(0.1b, 2.0b) with p=0.5."""
    import torchvision.transforms.functional as TF

    s = cfg.jitter_strength
    if rng.random() < cfg.jitter_p:
        ranges = [(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]
        factors = [rng.uniform(lo, hi) for lo, hi in ranges]
        for op in rng.permutation(4):
            img = _adjust(img, int(op), float(factors[op]))
    if rng.random() < cfg.grayscale_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < cfg.blur_p:
        b = cfg.blur_strength
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1 * b, 2.0 * b))))
    return img


def to_tensor(img: Image.Image, cfg: CropConfig) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (arr - mean) / std


def make_views(img: Image.Image, cfg: CropConfig, rng: np.random.Generator, name: str = "image") -> dict:
    """One image's crops and boxes: {"global": (G,3,S,S), "local": (L,3,s,s), "boxes_global", "boxes_all"}."""
    img = img.convert("RGB")
    width, height = img.size
    boxes = sample_crop_boxes(width, height, cfg, rng, name)
    crops = []
    for i, (x, y, w, h) in enumerate(boxes):
        size = cfg.size_of(i)
        crop = img.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
        if cfg.photometric:
            crop = photometric(crop, cfg, rng)
        crops.append(to_tensor(crop, cfg))
    boxes_global, boxes_all = relative_boxes(boxes, cfg)
    local = torch.stack(crops[cfg.n_global:]) if cfg.n_local else torch.zeros(0, 3, cfg.local_size, cfg.local_size)
    return {"global": torch.stack(crops[:cfg.n_global]), "local": local,
            "boxes_global": boxes_global, "boxes_all": boxes_all,
            "crop_boxes": torch.tensor(boxes, dtype=torch.float32)}
