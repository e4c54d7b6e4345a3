"""The fast data path computes what the one-call, full-image float recipe computed, bit for bit: each view
op (jitter on the crop, contrast mean over the whole image, the leaner hue, uint8 crops, normalisation on the
device) against the literal recipe it replaced; the batched memory-bank sampling against the per-image loop;
and the extracted features do not depend on the worker count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from densebench import transforms as T
from densebench.api import evaluate
from densebench.data import open_dataset
from densebench.encoders import load_encoder
from densebench.features import ExtractionStats, FeatureCache, default_workers, extract
from densebench.protocols.incontext import MemoryReducer, patch_label_counts, rarity_sample
from densebench.transforms import generator_for


def _images(n=6, seed=0):
    """Images of assorted sizes with grey (hue-less), saturated and clipped regions, and their masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 260))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[: h // 4] = a[: h // 4, :, :1]          # r = g = b
        a[h // 4: h // 3, : w // 3] = 255         # white
        a[-3:, :, 2] = 0
        out.append((Image.fromarray(a), rng.integers(0, 21, (h, w), dtype=np.uint8)))
    return out


# --- the recipes the data path replaced, literally (full image, float, torchvision's colour ops) --------

def ref_hbird(view: T.HummingbirdTrainView, index, image, mask):
    g = generator_for(view.seed, view.epoch, index)
    img = T.to_tensor(image)
    j = view.jitter
    if float(torch.rand((), generator=g)) < 0.5:
        img = TF.adjust_brightness(img, T._uniform(g, 1 - j, 1 + j))
    if float(torch.rand((), generator=g)) < 0.5:
        img = TF.adjust_contrast(img, T._uniform(g, 1 - j, 1 + j))
    if float(torch.rand((), generator=g)) < 0.5:
        img = TF.adjust_saturation(img, T._uniform(g, 1 - j, 1 + j))
    h = j if view.hue is None else view.hue
    if float(torch.rand((), generator=g)) < 0.5:
        img = TF.adjust_hue(img, T._uniform(g, -h, h))
    img = T.normalise(img, view.mean, view.std)
    m = torch.from_numpy(np.asarray(mask))
    top, left, h, w = T.random_resized_crop_params(g, img.shape[1], img.shape[2], view.scale, view.ratio)
    img = T.resize_image(img[:, top:top + h, left:left + w], (view.size, view.size))
    return img, T.resize_mask(m[top:top + h, left:left + w], (view.size, view.size))


def ref_linear(view: T.LinearTrainView, index, image, mask):
    g = generator_for(view.seed, view.view, index)
    img = T.to_tensor(image)
    m = torch.from_numpy(np.asarray(mask))
    top, left, h, w = T.random_resized_crop_params(g, img.shape[1], img.shape[2], view.scale, view.ratio)
    img = T.resize_image(img[:, top:top + h, left:left + w], (view.size, view.size))
    m = T.resize_mask(m[top:top + h, left:left + w], (view.size, view.size))
    if view.flip and float(torch.rand((), generator=g)) < 0.5:
        img, m = img.flip(-1), m.flip(-1)
    if view.mask_size != view.size:
        m = T.resize_mask(m, (view.mask_size, view.mask_size))
    return T.normalise(img, view.mean, view.std), m


def ref_resize(view: T.ResizeView, index, image, mask):
    img = T.normalise(T.resize_image(T.to_tensor(image), (view.size, view.size)), view.mean, view.std)
    ms = view.mask_size or view.size
    return img, T.resize_mask(torch.from_numpy(np.asarray(mask)), (ms, ms))


def ref_square(view: T.SquarePadView, index, image, mask):
    side = max(image.size)
    square = Image.new("RGB", (side, side), (view.fill,) * 3)
    square.paste(image.convert("RGB"), (0, 0))
    img = T.normalise(T.to_tensor(square.resize((view.size, view.size), Image.Resampling.BICUBIC)), view.mean,
                      view.std)
    extra = view.padded_size - view.size
    if extra:
        lo = view.offset
        img = F.pad(img, (lo, extra - lo, lo, extra - lo))
    return img, torch.zeros((1, 1), dtype=torch.uint8)


VIEWS = [
    (T.HummingbirdTrainView(96, seed=3, epoch=0), ref_hbird),
    (T.HummingbirdTrainView(64, seed=0, epoch=1, jitter=0.4), ref_hbird),
    (T.HummingbirdTrainView(64, seed=2, epoch=0, hue=0.5), ref_hbird),
    (T.LinearTrainView(80, 20, seed=1, view=2), ref_linear),
    (T.LinearTrainView(48, 48, seed=5, view=0, flip=False, scale=(0.3, 1.0)), ref_linear),
    (T.ResizeView(64), ref_resize),
    (T.ResizeView(112, mask_size=28, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4)), ref_resize),
    (T.SquarePadView(90, patch=14), ref_square),
    (T.SquarePadView(98, patch=14, fill=0), ref_square),
]


@pytest.mark.parametrize("view,reference", VIEWS, ids=lambda v: getattr(v, "__name__", type(v).__name__))
def test_every_view_and_its_parts_equal_the_full_image_float_recipe_bitwise(view, reference):
    for index, (image, mask) in enumerate(_images()):
        want_img, want_mask = reference(view, index, image, mask)
        img, m = view(index, image, mask)
        assert torch.equal(img, want_img) and torch.equal(m, want_mask), index
        part = view.image(index, image)                       # what a worker computes
        if view.finish is not None:                           # what the device then does to the batch
            assert part.dtype == (torch.uint8 if view.finish.uint8 else torch.float32)
            part = view.finish(part[None])[0]
        assert torch.equal(part, want_img), index
        assert torch.equal(view.mask(index, mask), want_mask), index


@pytest.mark.parametrize("factor", [-0.5, -0.31, -0.1, -0.02, 0.0, 0.013, 0.07, 0.1, 0.25, 0.5])
def test_colour_ops_equal_torchvision_bitwise(factor):
    for image, _ in _images(3, seed=1):
        x = T.to_tensor(image)
        assert torch.equal(T.adjust_hue(x, factor), TF.adjust_hue(x, factor))
        f = 1.0 + factor
        assert torch.equal(T.adjust_brightness(x, f), TF.adjust_brightness(x, f))
        assert torch.equal(T.adjust_contrast(x, f), TF.adjust_contrast(x, f))
        assert torch.equal(T.adjust_saturation(x, f), TF.adjust_saturation(x, f))


@pytest.mark.parametrize("ops", [[("contrast", 1.08)], [("brightness", 0.93), ("contrast", 1.1)],
                                 [("brightness", 1.1), ("contrast", 0.9), ("saturation", 1.07), ("hue", -0.06)],
                                 [("saturation", 0.95), ("hue", 0.1)]])
def test_jitter_on_the_crop_equals_jitter_on_the_image_then_the_crop(ops):
    tv = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
          "hue": TF.adjust_hue}
    image, _ = _images(1, seed=2)[0]
    u8 = TF.pil_to_tensor(image)
    full = u8.float().div(255.0)
    for op, f in ops:
        full = tv[op](full, f)
    box = (5, 7, u8.shape[1] - 20, u8.shape[2] - 30)
    want = full[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    assert torch.equal(T.jitter_crop(u8, ops, box), want)


def test_device_finish_of_a_batch_equals_each_image_finished_alone():
    imgs = [T.SquarePadView(70, patch=16).image(i, im) for i, (im, _) in enumerate(_images(3))]
    fin = T.SquarePadView(70, patch=16).finish
    batch = fin(torch.stack(imgs))
    assert batch.shape == (3, 3, 80, 80)
    for i, im in enumerate(imgs):
        assert torch.equal(batch[i], fin(im[None])[0])


# --- the memory bank ----------------------------------------------------------------------------------

def ref_memory(red: MemoryReducer, feats, masks, indices):
    """The per-image loop the batched reducer replaced."""
    b, s_h, s_w, d = feats.shape
    counts = patch_label_counts(masks, red.patch, red.num_classes, red.ignore_index, red.memory_ignore)
    keys = F.normalize(feats.reshape(b, s_h * s_w, d), dim=-1)
    counts = counts.reshape(b, s_h * s_w, red.num_classes)
    out_f, out_c = [], []
    for i in range(b):
        c = counts[i]
        if red.per_image is None and red.memory_ignore == "class0":
            sel = torch.arange(c.shape[0])
        else:
            g = generator_for(red.seed, 10_000 + red.epoch, int(indices[i]))
            noise = torch.rand(c.shape[0], generator=g, dtype=torch.float64)
            presence = (c > 0).double()
            score = (presence * presence.sum(0)).sum(1) * noise
            empty = presence.sum(1) == 0
            score[empty] = math.inf
            k = min(red.per_image or c.shape[0], int((~empty).sum()))
            sel = torch.sort(torch.topk(score, k, largest=False).indices).values
        out_f.append(keys[i, sel].to(torch.float16).numpy())
        out_c.append(c[sel].numpy().astype(red.count_dtype))
    return np.concatenate(out_f), np.concatenate(out_c)


@pytest.mark.parametrize("memory_ignore,per_image,patch", [("class0", 5, 4), ("drop", 5, 4), ("drop", None, 4),
                                                             ("class0", None, 4), ("class0", 7, 16)])
def test_batched_memory_sampling_equals_the_per_image_loop(memory_ignore, per_image, patch):
    g = torch.Generator().manual_seed(7)
    b, s = 5, 4
    masks = torch.randint(0, 4, (b, s * patch, s * patch), generator=g, dtype=torch.uint8)
    masks[1] = 255                                             # no labelled pixel at all
    masks[2, : 2 * patch] = 255                                # half the patches unlabelled
    feats = torch.randn(b, s, s, 8, generator=g)
    red = MemoryReducer(patch, 4, 255, memory_ignore, per_image, seed=2, epoch=1)
    indices = torch.tensor([3, 9, 0, 4, 11])
    out = red(feats, masks, indices)
    keep = out.pop("_keep", None)
    keys, labels = out["keys"].numpy(), out["labels"].numpy()
    if keep is not None:
        keys, labels = keys[keep.numpy()], labels[keep.numpy()]
    want_keys, want_labels = ref_memory(red, feats, masks, indices)
    assert keys.dtype == want_keys.dtype and labels.dtype == want_labels.dtype == red.count_dtype
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_array_equal(labels, want_labels)


def test_batched_rarity_sample_keeps_what_each_image_keeps_alone():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 3, (4, 30, 5), generator=g)
    counts[2, 5:] = 0
    for k in (1, 7, 30, 40):
        batched = rarity_sample(counts, k, [generator_for(0, 1, i) for i in range(4)])
        assert batched.shape == (4, min(k, 30))
        for i in range(4):
            alone = rarity_sample(counts[i], k, generator_for(0, 1, i))
            row = batched[i][batched[i] >= 0]
            assert row.tolist() == sorted(alone.tolist())
            assert torch.all(row[1:] > row[:-1])


# --- workers --------------------------------------------------------------------------------------------

def test_the_worker_count_does_not_change_the_features(synth_root, monkeypatch):
    import densebench.features as features

    started = []

    class Loader(features.DataLoader):
        def __init__(self, *a, num_workers=0, **kw):
            started.append(num_workers)
            super().__init__(*a, num_workers=num_workers, **kw)

    monkeypatch.setattr(features, "DataLoader", Loader)
    monkeypatch.setattr(features, "VIEWS_PER_WORKER", 1)   # workers even for these few images
    train = open_dataset("voc", synth_root, "trainaug")
    train = train.subset(train.ids[:12])
    enc = load_encoder("random:vit_tiny_patch16_224")
    runs = []
    for workers in (0, 2):
        stats = ExtractionStats()
        view = T.HummingbirdTrainView(64, seed=0, epoch=1)
        red = MemoryReducer(16, 21, 255, "drop", 5, seed=0, epoch=1)
        mem = extract(enc, train, view, reducer=red, cache=FeatureCache(None), batch_size=5, num_workers=workers,
                      progress=False, stats=stats)
        grids = extract(enc, train, T.LinearTrainView(64, 16, seed=4, view=1), cache=FeatureCache(None),
                        batch_size=5, num_workers=workers, progress=False, stats=stats)
        assert stats.images_forwarded == 24
        runs.append({**{f"mem_{k}": np.asarray(v) for k, v in mem.items()},
                     **{f"grid_{k}": np.asarray(v) for k, v in grids.items()}})
    assert started == [0, 0, 0, 2, 2, 2], "one pass each (memory bank, masks, features) per worker count"
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 4
    for name, a in runs[0].items():
        assert a.dtype == runs[1][name].dtype
        np.testing.assert_array_equal(a, runs[1][name], err_msg=name)


def test_automatic_workers_are_resolved_recorded_and_change_no_metric(synth_root, tmp_path):
    opts = dict(data_root=synth_root, progress=False, input_size=64, clusters="gt", seeds=1)
    auto = evaluate("pixels", benchmarks=["voc-overcluster"], cache_dir=tmp_path / "a", **opts)[0]
    none = evaluate("pixels", benchmarks=["voc-overcluster"], use_cache=False, num_workers=0, **opts)[0]
    assert auto["config"]["num_workers"] == default_workers() >= 1
    assert none["config"]["num_workers"] == 0
    assert auto["metrics"] == none["metrics"]


def test_an_error_on_the_writer_thread_stops_the_run_and_keeps_the_stored_batches(synth_root, tmp_path):
    val = open_dataset("voc", synth_root, "val")
    val = val.subset(val.ids[:10])
    enc = load_encoder("random:vit_tiny_patch16_224")
    red = MemoryReducer(16, 21, 255, "class0", 3, seed=0, epoch=0)
    calls = []

    def failing(feats, masks, indices):
        calls.append(len(indices))            # the first call, with one view, sizes the entry before any forward
        if calls.count(2) == 3:
            raise RuntimeError("reducer failed on the third batch")
        return red(feats, masks, indices)

    failing.describe = red.describe
    view = T.HummingbirdTrainView(32, seed=0, epoch=0)
    with pytest.raises(RuntimeError, match="third batch"):
        extract(enc, val, view, reducer=failing, cache=FeatureCache(tmp_path), batch_size=2, progress=False)
    stats = ExtractionStats()
    out = extract(enc, val, view, reducer=red, cache=FeatureCache(tmp_path), batch_size=2, progress=False,
                  stats=stats)
    assert stats.views_reused == 4 and stats.images_forwarded == 6, "the two stored batches are not forwarded again"
    plain = extract(enc, val, view, reducer=red, cache=FeatureCache(None), batch_size=2, progress=False)
    for name in ("keys", "labels"):
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(plain[name]))
