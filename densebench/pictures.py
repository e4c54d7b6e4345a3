"""Pictures protocols save for people to look at: label maps next to their image and ground truth (with a
legend of the classes shown), and keypoint matches between two images. Every picture is written atomically
with the permission bits a result file gets, so a lab's web server can serve it."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .results import atomic_write_bytes

#: Caption and legend text size (px); the caption strip and legend rows are sized from it.
FONT_SIZE = 16


def _palette() -> np.ndarray:
    from .data.voc import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "image"


def _font(size: int = FONT_SIZE):
    return ImageFont.load_default(size=size)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """PNG pictures and plots, written atomically with readable permission bits
    (:func:`densebench.results.atomic_write_bytes`)."""
    return atomic_write_bytes(path, data)


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG through :func:`write_bytes_atomic`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


@dataclass(frozen=True)
class LegendEntry:
    """One swatch of a label-map legend: the label value, what it is called and its colour."""
    value: int
    name: str
    colour: tuple[int, int, int]


def legend_entries(maps: Sequence[np.ndarray], ignore_index: int | None,
                   class_names: Sequence[str] | None = None) -> list[LegendEntry]:
    """The labels present in ``maps`` (the maps of one picture, as drawn), in label order, with their palette
    colour and name: ``class_names[v]`` when given, "ignored (not scored)" for the ignore label, "unmatched" for a
    negative value (a cluster matched to no class), else ``label v``."""
    pal = _palette()
    present = np.unique(np.concatenate([np.unique(np.asarray(m)).astype(np.int64) for m in maps]))
    out = []
    for v in present.tolist():
        if ignore_index is not None and v == ignore_index:
            name = "ignored (not scored)"
        elif v < 0:
            name = "unmatched"
        elif class_names is not None and v < len(class_names):
            name = str(class_names[v])
        else:
            name = f"label {v}"
        out.append(LegendEntry(v, name, tuple(int(c) for c in pal[v % 256])))
    return out


def _legend_layout(entries: list[LegendEntry], width: int, font) -> list[tuple[int, int, LegendEntry]]:
    """(x, row, entry) for each swatch, flowing left to right in rows no wider than ``width``."""
    placed, x, row = [], 0, 0
    for e in entries:
        w = FONT_SIZE + 6 + round(font.getlength(e.name)) + 18
        if x and x + w > width:
            x, row = 0, row + 1
        placed.append((x, row, e))
        x += w
    return placed


def render_label_panels(out_dir: Path, prefix: str, images: list[tuple[str, Image.Image]], masks: np.ndarray,
                        panels: list[tuple[str, np.ndarray]], ignore_index: int | None, panel: int = 320, *,
                        class_names: Sequence[str] | None = None) -> list[str]:
    """One PNG per image: image | ground truth | one class map per entry of ``panels`` (VOC colours), and under
    them a legend of the labels shown (colour swatch + name; ``class_names`` index -> name, else the value).

    ``masks`` (n, H, W) are the scored label maps; ``panels`` are (caption, (n, H, W) class maps), e.g.
    matched cluster maps or predictions. Pixels the metric ignores are drawn in the ignore colour in every
    map, so what is shown is what is scored. Every tile is ``panel`` px tall and as wide as the maps' aspect
    ratio says (the image is resized to the same tile). Returns the written paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pal = _palette()
    font = _font()
    head, gap, row_h = FONT_SIZE + 8, 4, FONT_SIZE + 8
    paths = []
    captions = ["image", "ground truth"] + [c for c, _ in panels]
    for i, (id_, image) in enumerate(images):
        gt = np.asarray(masks[i])
        size = (max(1, round(panel * gt.shape[1] / gt.shape[0])), panel)
        ignored = gt == ignore_index if ignore_index is not None else np.zeros(gt.shape, dtype=bool)
        drawn = [np.where(ignored, ignore_index, np.asarray(m)) if ignore_index is not None else np.asarray(m)
                 for m in [gt] + [maps[i] for _, maps in panels]]
        tiles = [image.convert("RGB").resize(size, Image.BILINEAR)]
        tiles += [Image.fromarray(pal[m.astype(np.int64) % 256]).resize(size, Image.NEAREST) for m in drawn]
        width = size[0] * len(tiles) + gap * (len(tiles) - 1)
        legend = _legend_layout(legend_entries(drawn, ignore_index, class_names), width, font)
        n_rows = 1 + max((row for _, row, _ in legend), default=-1)
        canvas = Image.new("RGB", (width, head + panel + 8 + n_rows * row_h), "white")
        draw = ImageDraw.Draw(canvas)
        for j, (tile, cap) in enumerate(zip(tiles, captions, strict=True)):
            x = j * (size[0] + gap)
            canvas.paste(tile, (x, head))
            draw.text((x + 2, 3), cap, fill="black", font=font)
        top = head + panel + 8
        for x, row, e in legend:
            y = top + row * row_h
            draw.rectangle([x, y, x + FONT_SIZE, y + FONT_SIZE], fill=e.colour, outline=(0, 0, 0))
            draw.text((x + FONT_SIZE + 6, y), e.name, fill="black", font=font)
        path = out_dir / f"{prefix}_{i:03d}_{_safe_name(id_)}.png"
        paths.append(str(save_png(canvas, path).resolve()))
    return paths


#: One colour per keypoint slot (20 distinct colours), cycled beyond 20 slots.
SLOT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def draw_matches(src_image: Image.Image, trg_image: Image.Image, src_xy: np.ndarray, trg_xy: np.ndarray,
                 pred_xy: np.ndarray, visible: np.ndarray, correct: np.ndarray, path: Path, title: str = "",
                 height: int = 320) -> Path:
    """Source | target side by side: source keypoints (dots, one colour per slot), true target keypoints
    (rings) and predictions (dots), each prediction joined to its truth by a green (correct) or red line.

    Coordinates are (K, 2) pixels of the original images; a prediction that is not finite (a rejected
    match) is drawn on its truth. Writes ``path`` (creating its folder) and returns it.
    """

    def fit(im):
        f = height / im.height
        return im.convert("RGB").resize((max(1, round(im.width * f)), height), Image.Resampling.BILINEAR), f

    left, fs = fit(src_image)
    right, ft = fit(trg_image)
    gap, top = 8, FONT_SIZE + 8
    canvas = Image.new("RGB", (left.width + gap + right.width, height + top), (255, 255, 255))
    canvas.paste(left, (0, top))
    canvas.paste(right, (left.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    ox = left.width + gap
    r = 3
    for k in np.nonzero(visible)[0]:
        colour = SLOT_COLOURS[k % len(SLOT_COLOURS)]
        sx, sy = src_xy[k] * fs
        draw.ellipse([sx - r, sy + top - r, sx + r, sy + top + r], fill=colour, outline=(0, 0, 0))
        tx, ty = trg_xy[k] * ft
        px, py = np.clip(pred_xy[k] * ft, [0, 0], [right.width - 1, height - 1]) if np.all(
            np.isfinite(pred_xy[k])) else (tx, ty)
        draw.line([ox + px, py + top, ox + tx, ty + top], fill=(0, 170, 0) if correct[k] else (220, 0, 0),
                  width=2)
        draw.ellipse([ox + tx - r - 1, ty + top - r - 1, ox + tx + r + 1, ty + top + r + 1], outline=colour,
                     width=2)
        draw.ellipse([ox + px - r, py + top - r, ox + px + r, py + top + r], fill=colour, outline=(0, 0, 0))
    draw.text((2, 3), title, fill=(0, 0, 0), font=_font())
    save_png(canvas, path)
    return path
