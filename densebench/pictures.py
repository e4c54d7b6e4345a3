"""Pictures protocols save for people to look at: label maps next to their image and ground truth."""

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
        for j, (tile, cap) in enumerate(zip(tiles, captions)):
            x = j * (panel + 2)
            canvas.paste(Image.fromarray(tile), (x, head))
            draw.text((x + 2, 1), cap, fill="black")
        path = out_dir / f"{prefix}_{i:03d}_{_safe_name(id_)}.png"
        canvas.save(path)
        paths.append(str(path.resolve()))
    return paths
