"""NeCo crops: the overlap constraint, the box math (checked with features that encode image
coordinates), the photometric pipeline, and the errors for images that cannot be cropped."""

import numpy as np
import pytest
import torch
from PIL import Image

from densebench.errors import ConfigError, DataError
from neco_train.crops import (
    CropConfig,
    intersection,
    make_views,
    relative_boxes,
    sample_box,
    sample_crop_boxes,
)
from neco_train.trainer import align_pairs, pair_list

W, H = 200, 160


def _coordinate_images():
    """Two float images whose pixel values are the x and y image coordinates of the pixel centres."""
    xs = np.tile((np.arange(W) + 0.5).astype(np.float32), (H, 1))
    ys = np.tile((np.arange(H) + 0.5).astype(np.float32)[:, None], (1, W))
    return Image.fromarray(xs, mode="F"), Image.fromarray(ys, mode="F")


def _coordinate_features(boxes, cfg, patch):
    """Per crop: resize the coordinate images exactly as make_views does, then average per patch, so a
    feature is the mean image coordinate its patch sees. Returns crop-major (C, 1, 2, h, w) maps."""
    maps = []
    for i, (x, y, w, h) in enumerate(boxes):
        size = cfg.size_of(i)
        chans = [np.asarray(im.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h)))
                 for im in _coordinate_images()]
        maps.append(torch.nn.functional.avg_pool2d(torch.from_numpy(np.stack(chans))[None], patch)[0])
    return torch.stack(maps[:cfg.n_global]).unsqueeze(1), torch.stack(maps[cfg.n_global:]).unsqueeze(1)


@pytest.mark.parametrize("seed", range(6))
def test_aligned_regions_of_two_crops_see_the_same_image_points(seed):
    patch, k = 8, 7
    cfg = CropConfig(global_size=64, local_size=32, photometric=False)
    boxes = sample_crop_boxes(W, H, cfg, np.random.default_rng(seed))
    glob, loc = _coordinate_features(boxes, cfg, patch)
    boxes_global, boxes_all = relative_boxes(boxes, cfg)
    teacher, student = align_pairs(glob, glob, loc, boxes_global[None], boxes_all[None], patch, k)
    for n, (g, v) in enumerate(pair_list(cfg.n_crops)):
        # the image points of the overlap's k x k cell centres, computed in image space
        x1, y1, x2, y2 = intersection(boxes[g], boxes[v])
        cx = x1 + (torch.arange(k) + 0.5) * (x2 - x1) / k
        cy = y1 + (torch.arange(k) + 0.5) * (y2 - y1) / k
        expected = torch.stack([cx.expand(k, k), cy[:, None].expand(k, k)])
        # one patch of the coarser crop, in image pixels: bilinear sampling is exact for the linear
        # coordinate maps except within half a patch of a crop border
        unit = max(boxes[g][2] / cfg.size_of(g), boxes[v][2] / cfg.size_of(v),
                   boxes[g][3] / cfg.size_of(g), boxes[v][3] / cfg.size_of(v)) * patch
        diff = (teacher[n] - student[n]).abs() / unit
        assert diff.max() < 0.5, (g, v)
        assert diff.mean() < 0.2, (g, v)
        assert ((teacher[n] - expected).abs() / unit).mean() < 0.2
        assert ((student[n] - expected).abs() / unit).mean() < 0.2
    # negative control: the student's boxes shifted by two patches no longer see the same points
    shifted = boxes_all.clone()
    shifted[..., [0, 2]] += 2 * patch
    _, wrong = align_pairs(glob, glob, loc, boxes_global[None], shifted[None], patch, k)
    assert (teacher - wrong).abs().mean() > (teacher - student).abs().mean() * 5


def test_overlap_constraint_and_box_ranges():
    cfg = CropConfig(global_size=64, local_size=32)
    for seed in range(30):
        boxes = sample_crop_boxes(W, H, cfg, np.random.default_rng(seed))
        assert len(boxes) == 6
        threshold = int(W * H * cfg.min_intersection)
        for i, b in enumerate(boxes):
            x, y, w, h = b
            assert 0 <= x and x + w <= W and 0 <= y and y + h <= H and w > 0 and h > 0
            for g in boxes[:min(i, 2)]:
                ix1, iy1, ix2, iy2 = intersection(b, g)
                assert (ix2 - ix1) * (iy2 - iy1) > (2 * threshold if i == 1 else threshold)
            area = w * h / (W * H)
            lo, hi = cfg.global_scale if i < 2 else cfg.local_scale
            assert lo * 0.9 <= area <= hi * 1.1  # rounding of w and h
        bg, ba = relative_boxes(boxes, cfg)
        assert bg.shape == (2, 6, 4) and ba.shape == (6, 2, 4)
        for g in range(2):
            torch.testing.assert_close(bg[g, g], torch.tensor([0.0, 0.0, 64.0, 64.0]))  # a crop with itself
            for c in range(6):
                size = cfg.size_of(c)
                assert bool((bg[g, c] >= 0).all() and (bg[g, c] <= 64).all())
                assert bool((ba[c, g] >= 0).all() and (ba[c, g] <= size).all())
                assert ba[c, g, 2] > ba[c, g, 0] and ba[c, g, 3] > ba[c, g, 1]


def test_sample_box_falls_back_to_a_centre_crop():
    # an extreme aspect ratio: no draw fits, so torchvision's clamped centre crop is used
    x, y, w, h = sample_box(400, 10, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert (w, h) == (13, 10) and x == (400 - 13) // 2 and y == 0


def test_views_shapes_normalisation_and_reproducibility():
    cfg = CropConfig(global_size=32, local_size=16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    a = make_views(img, cfg, np.random.default_rng([1, 2, 3]))
    b = make_views(img, cfg, np.random.default_rng([1, 2, 3]))
    assert a["global"].shape == (2, 3, 32, 32) and a["local"].shape == (4, 3, 16, 16)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    plain = make_views(img, CropConfig(global_size=32, local_size=16, photometric=False), np.random.default_rng(0))
    # without photometric changes, de-normalised crops are the bilinear resize of the crop box
    x, y, w, h = (int(v) for v in plain["crop_boxes"][0])
    ref = np.asarray(img.resize((32, 32), Image.BILINEAR, box=(x, y, x + w, y + h)), dtype=np.float32) / 255
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(plain["global"][0] * std + mean, torch.from_numpy(ref).permute(2, 0, 1),
                               atol=1e-5, rtol=0)


def test_crops_that_cannot_overlap_raise_a_data_error_naming_the_image():
    cfg = CropConfig(global_size=32, local_size=16, min_intersection=0.5, max_tries=20)
    with pytest.raises(DataError, match=r"photo\.jpg \(40x30 px\).*20 tries"):
        sample_crop_boxes(40, 30, cfg, np.random.default_rng(0), name="photo.jpg")


def test_crop_config_validation():
    with pytest.raises(ConfigError, match="2 global crops"):
        CropConfig(n_global=3).validate()
    with pytest.raises(ConfigError, match="local_scale"):
        CropConfig(local_scale=(0.3, 0.1)).validate()
