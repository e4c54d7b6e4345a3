"""Training images: COCO train2017, an ImageNet-style class-folder tree, or any folder of images.

NeCo trains on unlabelled images, so a dataset is just a sorted list of image files. The layout is
recognised from the folder given to ``--data``: ``train2017/`` or ``images/train2017/`` (COCO; the
reference reads the former, its docs the latter, spec §7.14), ``train/`` (ImageNet-style), else every
image below the folder. Files that cannot be decoded are skipped (the next file takes their place) and
counted; an image too small for the crops is an error naming the file.

Which images a step sees, and how they are cropped, is a function of (seed, epoch, step) only: the
sampler permutes the dataset per epoch with its own generator and hands each process its slice of the
global batch, and each image's crops use a generator seeded by (seed, epoch, image index). A run on
any number of processes or workers, and a resumed run, therefore sees the same global batches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densebench.errors import DataError

from .crops import CropConfig, make_views

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
#: How many following files may stand in for an unreadable one before the dataset gives up.
MAX_SUBSTITUTIONS = 64


def resolve_image_root(root: str | os.PathLike) -> tuple[Path, str]:
    """The folder holding the training images and the layout recognised ("coco", "imagenet", "folder")."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"training data folder {root} does not exist or is not a folder",
                        hint="pass --data DIR: COCO (with train2017/), an ImageNet-style tree, or a folder of images")
    for sub, layout in (("train2017", "coco"), ("images/train2017", "coco"), ("train", "imagenet")):
        if (root / sub).is_dir():
            return root / sub, layout
    return root, "folder"


def find_images(root: str | os.PathLike) -> tuple[list[Path], str]:
    """Every image file under the recognised image folder, sorted by relative path."""
    folder, layout = resolve_image_root(root)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images found under {folder} (looked for {', '.join(IMAGE_SUFFIXES)})",
                        hint="point --data at a folder that contains training images")
    return files, layout


def data_identity(root: str | os.PathLike, files: list[Path]) -> dict:
    """What a resumed run checks it trains on: the image folder and the sha256 of its sorted list of
    (relative path, size in bytes), which tells other images apart even when their names repeat."""
    folder, _ = resolve_image_root(root)
    names = "\n".join(sorted(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}" for p in files))
    return {"root": str(folder.resolve()), "n_images": len(files),
            "sha256": hashlib.sha256(names.encode()).hexdigest()}


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class NecoViews(torch.utils.data.Dataset):
    """Items are ``(epoch, index)`` pairs (from :class:`GlobalBatchSampler`); each yields one image's views."""

    def __init__(self, files: list[Path], crops: CropConfig, seed: int):
        crops.validate()
        self.files = files
        self.crops = crops
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        skipped = 0
        for attempt in range(MAX_SUBSTITUTIONS + 1):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                img = _load_rgb(path)
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # what PIL raises
                skipped += 1
        else:
            return {"error": f"{MAX_SUBSTITUTIONS + 1} consecutive images starting at {self.files[index]} "
                             f"cannot be decoded", "hint": "check the --data folder for corrupt files"}
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            views = make_views(img, self.crops, rng, name=f"image {path}")
        except DataError as e:
            return {"error": e.message, "hint": e.hint}
        views["index"] = torch.tensor(index)
        views["skipped"] = torch.tensor(skipped)
        return views


def collate(samples: list[dict]) -> dict:
    """Stack the views; a sample that failed turns the batch into its error (raised by the trainer)."""
    for s in samples:
        if "error" in s:
            return s
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of each global batch: a seeded permutation per epoch, ``drop_last``.

    Step s of an epoch uses images ``perm[s·G : (s+1)·G]`` (G = global batch); process r takes the r-th
    contiguous slice of it. ``start_step`` skips the steps a resumed run has already done.
    """

    def __init__(self, n_images: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                 start_step: int = 0):
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.n_images, self.global_batch = n_images, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.local_batch = global_batch // world_size

    @property
    def steps(self) -> int:
        return self.n_images // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
        perm = torch.randperm(self.n_images, generator=gen).tolist()
        for step in range(self.start_step, self.steps):
            batch = perm[step * self.global_batch:(step + 1) * self.global_batch]
            for index in batch[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]:
                yield self.epoch, index
