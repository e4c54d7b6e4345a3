"""Pictures protocols save for people to look at: label maps next to their image and ground truth, and
keypoint matches between two images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _palette() -> np.ndarray:
    from .data.voc import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "image"


def render_label_panels(out_dir: Path, prefix: str, images: list[tuple[str, Image.Image]], masks: np.ndarray,
                        panels: list[tuple[str, np.ndarray]], ignore_index: int | None, panel: int = 160) -> list[str]:
    """One PNG per image: image | ground truth | one class map per entry of ``panels`` (VOC colours).

    ``masks`` (n, M, M) are the scored label maps; ``panels`` are (caption, (n, M, M) class maps), e.g.
    matched cluster maps or predictions. Pixels the metric ignores are drawn in the ignore colour in every
    map, so what is shown is what is scored. Returns the written paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pal = _palette()
    head = 14
    paths = []
    captions = ["image", "ground truth"] + [c for c, _ in panels]
    for i, (id_, image) in enumerate(images):
        tiles = [np.asarray(image.convert("RGB").resize((panel, panel), Image.BILINEAR))]
        gt = masks[i]
        ignored = gt == ignore_index if ignore_index is not None else np.zeros_like(gt, dtype=bool)
        for m in [gt] + [maps[i] for _, maps in panels]:
            m = np.where(ignored, ignore_index, m) if ignore_index is not None else m
            rgb = pal[np.asarray(m, dtype=np.int64) % 256]
            tiles.append(np.asarray(Image.fromarray(rgb).resize((panel, panel), Image.NEAREST)))
        canvas = Image.new("RGB", (panel * len(tiles) + 2 * (len(tiles) - 1), panel + head), "white")
        draw = ImageDraw.Draw(canvas)
        for j, (tile, cap) in enumerate(zip(tiles, captions, strict=True)):
            x = j * (panel + 2)
            canvas.paste(Image.fromarray(tile), (x, head))
            draw.text((x + 2, 1), cap, fill="black")
        path = out_dir / f"{prefix}_{i:03d}_{_safe_name(id_)}.png"
        canvas.save(path)
        paths.append(str(path.resolve()))
    return paths


#: One colour per keypoint slot (20 distinct colours), cycled beyond 20 slots.
SLOT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def draw_matches(src_image: Image.Image, trg_image: Image.Image, src_xy: np.ndarray, trg_xy: np.ndarray,
                 pred_xy: np.ndarray, visible: np.ndarray, correct: np.ndarray, path: Path, title: str = "",
                 height: int = 256) -> Path:
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
    gap, top = 8, 18
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
    draw.text((2, 2), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
