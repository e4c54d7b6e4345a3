"""The linear segmentation probe: its pieces against literal/brute-force computations, and end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TVF
from PIL import Image

from densebench.benchmark_table import get_benchmark
from densebench.data.base import MANIFEST_NAME
from densebench.data.families import ADE20K, VOC
from densebench.encoders.base import IMAGENET_MEAN, IMAGENET_STD, DenseEncoder
from densebench.errors import ConfigError, DataError
from densebench.features import FeatureCache
from densebench.metrics import ConfusionMatrix, iou_per_class, mean_iou
from densebench.protocols.linear import (
    Config,
    epoch_batches,
    evaluate_head,
    head_logits,
    make_head,
    resolve_canonical,
    run,
    train_head,
)
from densebench.transforms import LinearTrainView, ResizeView, generator_for, random_resized_crop_params

# --------------------------------------------------------------------------------------- fixtures

#: 21 well-separated RGB colours (levels 0/128/255 per channel, first 21 of the 27 combinations).
PALETTE = np.array([(r, g, b) for r in (0, 128, 255) for g in (0, 128, 255) for b in (0, 128, 255)][:21],
                   dtype=np.uint8)


class PaletteEncoder(DenseEncoder):
    """A fake encoder whose features *are* the label: per patch, the fraction of pixels of each palette colour.

    Images painted with PALETTE[class] therefore give features from which a linear head recovers the
    class of every pure patch exactly: a perfectly separable feature map.
    """

    def __init__(self, patch: int = 8, scale: float = 10.0):
        super().__init__()
        self.patch_size, self.embed_dim = patch, len(PALETTE)
        self.fingerprint, self.name = f"palette-test-{patch}-{scale}", "palette-test"
        self.scale = scale
        self.register_buffer("palette", torch.tensor(PALETTE, dtype=torch.float32) / 255.0)

    def _features(self, images, layer, norm):
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = images * std + mean
        dist = ((rgb[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)     # (B, C, H, W)
        onehot = F.one_hot(dist.argmin(1), len(PALETTE)).permute(0, 3, 1, 2).float()
        return (F.avg_pool2d(onehot, self.patch_size) * self.scale).permute(0, 2, 3, 1)


def write_palette_voc(root, n_train: int = 12, n_val: int = 12, size: int = 64, block: int = 32, seed: int = 0):
    """A VOC-layout dataset (with a synthetic manifest) of blocks painted with PALETTE[class].

    Every class of the 21 appears in val; a few pixels per image are the 255 boundary label.
    """
    rng = np.random.default_rng(seed)
    voc = root / "VOCSegmentation"
    for d in ("images", "SegmentationClass", "SegmentationClassAug"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    splits = {"trainaug": [], "val": []}
    k = 0
    for split, n in (("trainaug", n_train), ("val", n_val)):
        for i in range(n):
            g = size // block
            cls = (np.arange(g * g) + k) % len(PALETTE)
            k += g * g
            rng.shuffle(cls)
            label = np.kron(cls.reshape(g, g), np.ones((block, block), dtype=np.int64)).astype(np.uint8)
            img = PALETTE[label]
            label[rng.random(label.shape) < 0.01] = 255
            id_ = f"{split}_{i:03d}"
            Image.fromarray(img).save(voc / "images" / f"{id_}.jpg", quality=98)
            folder = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
            Image.fromarray(label, "L").save(voc / folder / f"{id_}.png")
            splits[split].append(id_)
    (voc / MANIFEST_NAME).write_text(json.dumps({"synthetic": True, "splits": splits}))
    return root


def small_config(**kw) -> Config:
    base = {"dataset": "voc", "input_size": 64, "train_mask_size": 32, "head_batch_size": 4, "epochs": 6,
            "lr_drop_epoch": 4, "train_views": 2, "batch_size": 8}
    base.update(kw)
    return Config(**base)


# ------------------------------------------------------------------------- head / upsampling order

@pytest.mark.parametrize("grid,size", [(7, 100), (4, 32), (5, 13), (3, 3)])
def test_head_commutes_with_bilinear_upsampling(grid, size):
    """head(up(f)) == up(head(f)): logits, loss and gradients agree to float64 rounding."""
    torch.manual_seed(0)
    feats = torch.randn(3, grid, grid, 10, dtype=torch.float64)
    head = make_head(10, 4, seed=1).double()
    a = head_logits(head, feats, size, "features")
    b = head_logits(head, feats, size, "logits")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(a.argmax(1), b.argmax(1))
    target = torch.randint(0, 4, (3, size, size))
    target[:, 0] = 255
    grads = []
    for mode in ("features", "logits"):
        head.zero_grad()
        F.cross_entropy(head_logits(head, feats, size, mode), target, ignore_index=255).backward()
        grads.append((head.weight.grad.clone(), head.bias.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_head_is_the_published_conv_and_seeded():
    h1, h2 = make_head(16, 5, seed=400), make_head(16, 5, seed=400)
    assert isinstance(h1, torch.nn.Conv2d) and h1.kernel_size == (1, 1) and h1.bias is not None
    assert torch.equal(h1.weight, h2.weight) and torch.equal(h1.bias, h2.bias)
    assert not torch.equal(h1.weight, make_head(16, 5, seed=401).weight)
    # building a head does not consume the global RNG
    torch.manual_seed(3)
    a = torch.rand(1)
    torch.manual_seed(3)
    make_head(16, 5, seed=0)
    assert torch.equal(torch.rand(1), a)


def test_epoch_batches_cover_every_image_once_and_drop_last():
    g = torch.Generator().manual_seed(0)
    batches = epoch_batches(10, 4, False, g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert all((np.diff(b) > 0).all() for b in batches)
    dropped = epoch_batches(10, 4, True, torch.Generator().manual_seed(0))
    assert [len(b) for b in dropped] == [4, 4]
    assert [b.tolist() for b in dropped] == [b.tolist() for b in batches[:2]]


# --------------------------------------------------------------------------------- evaluation

def test_evaluate_head_matches_per_image_brute_force():
    """Confusion matrix of the chunked, head-first evaluation == a per-image, features-first numpy count."""
    g = torch.Generator().manual_seed(2)
    n, s, d, C, size, ignore = 5, 4, 6, 3, 16, 255
    feats = torch.randn(n, s, s, d, generator=g).half().numpy()
    masks = torch.randint(0, C, (n, size, size), generator=g).to(torch.uint8)
    masks[torch.rand(masks.shape, generator=g) < 0.1] = ignore
    head = make_head(d, C, seed=0)
    conf = evaluate_head(head, {"features": feats, "masks": masks.numpy()}, C, ignore, size, "logits", chunk=2)
    expect = np.zeros((C, C), dtype=np.int64)
    with torch.no_grad():
        for i in range(n):
            f = torch.from_numpy(feats[i:i + 1]).float().permute(0, 3, 1, 2)
            up = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
            pred = head(up).argmax(1)[0].numpy()
            for y in range(size):
                for x in range(size):
                    t = int(masks[i, y, x])
                    if t != ignore:
                        expect[t, pred[y, x]] += 1
    assert np.array_equal(conf.matrix, expect)


def test_evaluate_head_downsamples_masks_by_nearest():
    """Validation at 100 from 448 masks (the published training-time validation): nearest 448 -> size."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 3, 4, generator=g).half().numpy()
    masks = torch.randint(0, 2, (2, 12, 12), generator=g).to(torch.uint8)
    head = make_head(4, 2, seed=0)
    conf = evaluate_head(head, {"features": feats, "masks": masks.numpy()}, 2, 255, 5)
    small = masks[:, (np.arange(5) * 12 // 5)][:, :, (np.arange(5) * 12 // 5)]   # nearest index = floor(i*12/5)
    ref = ConfusionMatrix(2, ignore_index=255)
    with torch.no_grad():
        ref.update(head_logits(head, torch.from_numpy(feats).float(), 5).argmax(1), small.long())
    assert np.array_equal(conf.matrix, ref.matrix)


# ----------------------------------------------------------------------------------- training

def _literal_training(views, C, ignore, cfg, dtype=torch.float64, order="features"):
    """The published loop written out plainly: a fresh permutation per epoch (epoch e reads views[e % N]), one SGD
    step of mean cross-entropy per batch (batches of only ignore pixels skipped, the last one dropped with
    drop_last), StepLR per epoch. ``dtype=float64, order="features"``: features upsampled before the head (the
    recipe); ``float32, "logits"``: the head at the patch grid, the plain synchronous loop densebench ran before it
    had feed modes, to compare with bit for bit."""
    head = make_head(views[0]["features"].shape[-1], C, cfg.seed).to(dtype)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_drop_epoch, gamma=cfg.lr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    size, bs = (cfg.train_mask_size,) * 2, cfg.head_batch_size
    curve = []
    for epoch in range(cfg.epochs):
        v = views[epoch % len(views)]   # len(views) == epochs: one fresh view per epoch, the on-the-fly recipe
        perm = torch.randperm(len(v["features"]), generator=gen).numpy()
        stop = len(perm) // bs * bs if cfg.drop_last else len(perm)
        losses = []
        for start in range(0, stop, bs):
            idx = np.sort(perm[start:start + bs])
            target = torch.from_numpy(np.asarray(v["masks"][idx])).long()
            if not bool((target != ignore).any()):
                continue
            f = torch.from_numpy(np.asarray(v["features"][idx])).to(dtype).permute(0, 3, 1, 2)
            if order == "features":
                logits = head(F.interpolate(f, size=size, mode="bilinear", align_corners=False))
            else:
                logits = F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target, ignore_index=ignore)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        total = 0.0
        for x in losses:
            total += x
        curve.append(total / len(losses))
    return head, curve


def _random_views(n_views, n=6, s=3, d=5, C=3, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_views):
        masks = torch.randint(0, C, (n, m, m), generator=g).to(torch.uint8)
        masks[torch.rand(masks.shape, generator=g) < 0.05] = 255
        out.append({"features": torch.randn(n, s, s, d, generator=g).half().numpy(), "masks": masks.numpy()})
    return out


def test_cached_training_with_one_view_per_epoch_equals_the_literal_recipe():
    """train_views == epochs reproduces the on-the-fly data stream; head-first == features-first training."""
    cfg = Config(epochs=5, train_views=5, head_batch_size=4, train_mask_size=8, lr_drop_epoch=3, lr=0.1, seed=7)
    views = _random_views(5)
    trained = train_head(views, 3, 255, cfg)
    ref_head, ref_curve = _literal_training(views, 3, 255, cfg)
    assert trained.steps == 5 * 2 and trained.skipped_batches == 0
    np.testing.assert_allclose(trained.loss_curve, ref_curve, rtol=1e-5)
    torch.testing.assert_close(trained.head.weight.double(), ref_head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trained.head.bias.double(), ref_head.bias, rtol=1e-4, atol=1e-5)


def test_cached_views_cycle_over_epochs():
    """With N views, epoch e trains on view e mod N: same result as the literal loop fed that cycle."""
    cfg = Config(epochs=5, train_views=2, head_batch_size=4, train_mask_size=8, lr_drop_epoch=3, lr=0.1)
    views = _random_views(2, seed=1)
    trained = train_head(views, 3, 255, cfg)
    _, ref_curve = _literal_training([views[e % 2] for e in range(5)], 3, 255, cfg)
    np.testing.assert_allclose(trained.loss_curve, ref_curve, rtol=1e-5)


def test_select_on_val_returns_the_best_epochs_head():
    views = _random_views(1, n=8, seed=3)
    val = _random_views(1, n=4, seed=4)[0]
    cfg = Config(epochs=6, train_views=1, head_batch_size=4, train_mask_size=8, lr=0.5, select_on_val=True)
    trained = train_head(views, 3, 255, cfg, val=val)
    assert len(trained.val_curve) == 6
    best = int(np.argmax(trained.val_curve)) + 1
    assert trained.selected_epoch == best
    # the returned head is the one a run of `best` epochs ends with (same seeds, same schedule)
    short = train_head(views, 3, 255, dataclasses.replace(cfg, epochs=best, select_on_val=False))
    torch.testing.assert_close(trained.head.weight, short.head.weight)


def test_batches_with_only_ignore_pixels_are_skipped_not_nan():
    views = _random_views(1, n=4)
    views[0]["masks"][:2] = 255     # two of four images hold only ignore pixels: with batch 1, two skipped per epoch
    cfg = Config(epochs=3, train_views=1, head_batch_size=1, train_mask_size=8)
    trained = train_head(views, 3, 255, cfg)
    assert trained.skipped_batches == 3 * 2 and trained.steps == 3 * 2
    assert all(np.isfinite(trained.loss_curve))
    views[0]["masks"][:] = 255
    with pytest.raises(DataError, match="only the ignore index"):
        train_head(views, 3, 255, cfg)


# ------------------------------------------------------------------------------------ the view

def test_linear_train_view_is_torchvision_crop_flip_with_seeded_params():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    mask = rng.integers(0, 7, (50, 70), dtype=np.uint8)
    view = LinearTrainView(32, 16, seed=400, view=1)
    x, m = view(3, img, mask)
    x2, m2 = view(3, img, mask)
    assert torch.equal(x, x2) and torch.equal(m, m2) and x.shape == (3, 32, 32) and m.shape == (16, 16)
    assert not torch.equal(x, LinearTrainView(32, 16, seed=400, view=2)(3, img, mask)[0])
    # independent recomputation with torchvision's functional ops and the same draw
    g = generator_for(400, 1, 3)
    top, left, h, w = random_resized_crop_params(g, 50, 70, (0.8, 1.0), (3 / 4, 4 / 3))
    assert h * w >= 0.8 * 50 * 70 * 0.95
    flip = float(torch.rand((), generator=g)) < 0.5
    ref = TVF.resized_crop(TVF.pil_to_tensor(img).float() / 255, top, left, h, w, [32, 32], antialias=True)
    ref_m = TVF.resized_crop(torch.from_numpy(mask)[None], top, left, h, w, [32, 32],
                             interpolation=TVF.InterpolationMode.NEAREST)
    if flip:
        ref, ref_m = TVF.hflip(ref), TVF.hflip(ref_m)
    ref = TVF.normalize(ref, IMAGENET_MEAN, IMAGENET_STD)
    ref_m = TVF.resize(ref_m, [16, 16], interpolation=TVF.InterpolationMode.NEAREST)[0]
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(m, ref_m)


def test_linear_train_view_flips_about_half_of_the_draws():
    img = Image.fromarray(np.zeros((20, 20, 3), np.uint8))
    mask = np.tile(np.arange(20, dtype=np.uint8), (20, 1))   # increasing left to right
    flips = 0
    for i in range(200):
        _, m = LinearTrainView(20, 20, seed=0, view=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))(i, img, mask)
        flips += int(m[0, 0] > m[0, -1])
    assert 70 < flips < 130


# ---------------------------------------------------------------------------------- end to end

def test_separable_feature_map_is_learnt_to_about_100_miou(tmp_path):
    root = write_palette_voc(tmp_path / "data")
    enc = PaletteEncoder()
    cfg = small_config(epochs=25, lr_drop_epoch=20, head_batch_size=2)   # published lr, momentum, decay, schedule
    res = run(enc, root, cfg, cache=FeatureCache(tmp_path / "cache"), progress=False, benchmark="voc-linear")
    m = res["metrics"]
    # the only errors left are pixels next to block borders, where bilinear logits cross over
    assert m["miou"] > 98.5, m["per_class_iou"]
    assert min(m["per_class_iou"].values()) > 94.0
    assert len(m["per_class_iou"]) == 21
    curve = m["train_loss_curve"]
    assert len(curve) == 25 and curve[-1] < 0.5 * curve[0]
    assert res["derived"]["reported_epoch"] == 25 and res["config"]["upsample"] == "logits"
    assert res["config"]["eval_size"] == 64 and res["derived"]["patch_grid"] == 8   # resolved from input 64
    assert res["derived"]["steps"] == 25 * 6 and res["derived"]["skipped_batches"] == 0
    assert "reported_epoch" not in res["config"] and "metric_notes" not in res["config"]
    assert res["provenance"]["dataset"]["n_train"] == 12 and res["provenance"]["dataset"]["synthetic"]


def test_features_first_order_gives_the_same_numbers(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=6, n_val=3)
    enc = PaletteEncoder()
    cache = FeatureCache(tmp_path / "cache")
    a = run(enc, root, small_config(), cache=cache, progress=False)
    b = run(enc, root, small_config(upsample="features"), cache=cache, progress=False)
    assert abs(a["metrics"]["miou"] - b["metrics"]["miou"]) < 0.05
    np.testing.assert_allclose(a["metrics"]["train_loss_curve"], b["metrics"]["train_loss_curve"], rtol=1e-4)


def test_cache_is_reused_and_extra_views_only_cost_their_own_forwards(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=6, n_val=3)
    enc = PaletteEncoder()
    cache = FeatureCache(tmp_path / "cache")
    first = run(enc, root, small_config(train_views=2), cache=cache, progress=False)
    assert enc.images_forwarded == 2 * 6 + 3
    before = enc.images_forwarded
    second = run(enc, root, small_config(train_views=2), cache=cache, progress=False)
    assert enc.images_forwarded == before          # zero forwards on the warm run
    assert second["provenance"]["cache"]["images_forwarded"] == 0
    assert second["metrics"]["miou"] == first["metrics"]["miou"]
    assert second["metrics"]["train_loss_curve"] == first["metrics"]["train_loss_curve"]
    # head hyper-parameters do not touch the features: still zero forwards
    run(enc, root, small_config(train_views=2, lr=0.05, epochs=4), cache=cache, progress=False)
    assert enc.images_forwarded == before
    # a third view costs exactly one pass over the training images
    run(enc, root, small_config(train_views=3), cache=cache, progress=False)
    assert enc.images_forwarded == before + 6


def test_result_records_the_legacy_selection_and_curves(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=6, n_val=3)
    res = run(PaletteEncoder(), root, small_config(select_on_val=True), progress=False)
    m, c = res["metrics"], res["derived"]
    assert len(m["val_miou_curve"]) == 6 and len(m["train_loss_curve"]) == 6
    assert c["reported_epoch"] == int(np.argmax(m["val_miou_curve"])) + 1
    assert "LEGACY" in c["metric_notes"]["reported_epoch"]


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("field,value,match", [
    ("train_views", 0, "train-views"), ("train_views", 30, "exceeds --epochs"), ("epochs", 0, "epochs"),
    ("lr", 0.0, "--lr"), ("momentum", 1.0, "momentum"), ("crop_min_scale", 1.5, "crop-min-scale"),
    ("upsample", "nearest", "accepted: features, logits"), ("normalization", "foo", "accepted"),
    ("head_batch_size", 0, "head-batch-size"), ("lr_gamma", 0.0, "lr-gamma"), ("eval_size", 0, "eval-size"),
])
def test_bad_config_values_are_refused_with_the_value(field, value, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(Config(), **{field: value}).validate()


def test_cli_options_are_coerced_and_checked():
    from densebench.api import build_config

    bench = get_benchmark("voc-linear")
    cfg = build_config(bench, {"train_views": "3", "select_on_val": "true", "eval_size": "none"})
    assert cfg.train_views == 3 and cfg.select_on_val is True and cfg.eval_size is None
    assert cfg.drop_last is True and cfg.head_batch_size == 128 and cfg.seed == 400   # published VOC recipe
    with pytest.raises(ConfigError, match="expects int"):
        build_config(bench, {"train_views": "many"})
    with pytest.raises(ConfigError, match="accepted"):
        build_config(bench, {"upsample": "bicubic"})


def test_input_size_must_be_a_multiple_of_the_patch(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=2, n_val=1)
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        run(PaletteEncoder(), root, small_config(input_size=60), progress=False)


def test_drop_last_with_too_few_images_is_explained(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=3, n_val=1)
    with pytest.raises(ConfigError, match="no training batch"):
        run(PaletteEncoder(), root, small_config(drop_last=True), progress=False)


def test_head_batch_larger_than_the_split_with_drop_last_is_refused_before_any_forward(tmp_path):
    root = write_palette_voc(tmp_path / "data", n_train=3, n_val=2)
    enc, cache = PaletteEncoder(), FeatureCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"--head-batch-size 4 exceeds the 3 images .*no training batch") as e:
        run(enc, root, small_config(drop_last=True, head_batch_size=4), cache=cache, progress=False)
    assert "--no-drop-last" in str(e.value.hint) and "<= 3" in str(e.value.hint)
    assert enc.images_forwarded == 0
    assert not (tmp_path / "cache" / "features").exists()      # no cache entry was started either
    # without drop_last a batch larger than the split is legal: one smaller batch per epoch
    res = run(enc, root, small_config(drop_last=False, head_batch_size=4), cache=cache, progress=False)
    assert res["derived"]["steps"] == 6
    # with drop_last and a batch that fits, the incomplete last batch is dropped: one step of 2 per epoch
    res = run(enc, root, small_config(drop_last=True, head_batch_size=2), cache=cache, progress=False)
    assert res["derived"]["steps"] == 6


def test_eval_size_resolves_to_the_input_size_and_the_val_entry_is_shared(tmp_path):
    """eval_size None == input_size: one cache key, the one a plain ResizeView(input_size) val pass uses."""
    from densebench.data import open_dataset
    from densebench.features import extract

    root = write_palette_voc(tmp_path / "data", n_train=4, n_val=3)
    enc, cache = PaletteEncoder(), FeatureCache(tmp_path / "cache")
    a = run(enc, root, small_config(), cache=cache, progress=False)
    before = enc.images_forwarded
    b = run(enc, root, small_config(eval_size=64), cache=cache, progress=False)
    assert enc.images_forwarded == before and a["config"] == b["config"] and a["metrics"] == b["metrics"]
    assert a["config"]["eval_size"] == 64
    val = open_dataset("voc", root, "val")
    view = ResizeView(64)
    extract(enc, val, view, key_parts={"view": view.describe(), "reduce": "full-f16"}, cache=cache, progress=False)
    assert enc.images_forwarded == before       # the overclustering protocol's val entry is this one
    # another evaluation size only stores other masks: the val features are shared, no forward
    c = run(enc, root, small_config(eval_size=32), cache=cache, progress=False)
    assert enc.images_forwarded == before and c["config"]["eval_size"] == 32


def test_resolve_canonical_fills_the_eval_size():
    cfg = dataclasses.asdict(get_benchmark("voc-linear").default_config())
    out = resolve_canonical(cfg, {"patch_size": 14})
    assert out["eval_size"] == 448 and cfg["eval_size"] is None
    assert {k: v for k, v in out.items() if k != "eval_size"} == {k: v for k, v in cfg.items() if k != "eval_size"}
    assert resolve_canonical({**cfg, "eval_size": 100}, {"patch_size": 16})["eval_size"] == 100


def test_ade20k_150_class_mean_is_the_old_formula_exactly():
    rng = np.random.default_rng(0)
    for _ in range(5):
        conf = rng.integers(0, 1000, (151, 151)) * (rng.random((151, 151)) < 0.3)
        conf[0] = 0                                  # class 0 is the ignore label: never counted as ground truth
        assert ADE20K.class_means(conf, "identity") == {"miou_150": mean_iou(iou_per_class(conf), exclude=[0])}
    assert VOC.class_means(conf[:21, :21], "identity") == {}


def test_benchmarks_are_registered_with_published_defaults():
    for name, family in (("voc-linear", "voc"), ("coco-things-linear", "coco-things"),
                         ("coco-stuff-linear", "coco-stuff"), ("ade20k-linear", "ade20k")):
        b = get_benchmark(name)
        cfg = b.default_config()
        assert b.main_metric == "miou" and cfg.dataset == family
        assert (cfg.input_size, cfg.train_mask_size, cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay,
                cfg.lr_drop_epoch, cfg.lr_gamma, cfg.head_batch_size, cfg.seed) == \
               (448, 100, 25, 0.01, 0.9, 1e-4, 20, 0.1, 128, 400)
        assert cfg.eval_size is None and cfg.select_on_val is False and cfg.crop_min_scale == 0.8


# ------------------------------------------------------------------------- COCO label spaces

#: Raw COCO panoptic category id -> COCO-Things class id, written out from spec §2.3 (sorted thing
#: supercategories: accessory 0, animal 1, appliance 2, electronic 3, food 4, furniture 5, indoor 6,
#: kitchen 7, outdoor 8, person 9, sports 10, vehicle 11); stuff and void -> ignored (None).
THINGS_EXPECTED = {27: 0, 16: 1, 18: 1, 78: 2, 72: 3, 52: 4, 62: 5, 84: 6, 44: 7, 10: 8, 1: 9, 34: 10, 2: 11,
                   0: None, 149: None}
#: Raw stuff pixelmap id -> COCO-Stuff class id (building 0, ceiling 1, floor 2, food-stuff 3, furniture-stuff 4,
#: ground 5, plant 6, raw-material 7, sky 8, solid 9, structural 10, textile 11, wall 12, water 13, window 14);
#: 0 (things) and 183 (other) -> ignored.
STUFF_EXPECTED = {96: 0, 102: 1, 115: 2, 122: 3, 98: 4, 111: 5, 97: 6, 132: 7, 157: 8, 135: 9, 113: 10, 92: 11,
                  171: 12, 155: 13, 181: 14, 0: None, 183: None}
THING_NAMES = ["accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen",
               "outdoor", "person", "sports", "vehicle"]
STUFF_NAMES = ["building", "ceiling", "floor", "food-stuff", "furniture-stuff", "ground", "plant", "raw-material",
               "sky", "solid", "structural", "textile", "wall", "water", "window"]


def write_palette_coco(root, family: str, n_train: int = 12, n_val: int = 12, size: int = 64, block: int = 32):
    """A COCO-layout dataset whose raw masks hold COCO ids and whose images are painted with the colour of the
    class spec §2.3 says the id belongs to (ignored ids: the last palette colour). The probe can only score
    ~100% if the reader maps raw ids exactly as the spec does."""
    table = THINGS_EXPECTED if family == "coco-things" else STUFF_EXPECTED
    entries = list(table.items())
    coco = root / "coco"
    splits = {"train": [], "val": []}
    k = 0
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir = coco / "images" / f"{split}2017"
        mask_dir = (coco / "annotations" / f"{split}2017" if family == "coco-things" else
                    coco / "annotations" / "stuff_annotations" / f"stuff_{split}2017_pixelmaps")
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            g = size // block
            raw = np.zeros((g, g), np.uint8)
            colour = np.zeros((g, g), np.int64)
            for cell in range(g * g):
                rid, cls = entries[k % len(entries)]
                k += 1
                raw.flat[cell] = rid
                colour.flat[cell] = len(PALETTE) - 1 if cls is None else cls
            up = np.ones((block, block), np.int64)
            id_ = f"{split}{i:010d}"
            Image.fromarray(PALETTE[np.kron(colour, up)]).save(img_dir / f"{id_}.jpg", quality=98)
            Image.fromarray(np.kron(raw, up).astype(np.uint8), "L").save(mask_dir / f"{id_}.png")
            splits[split].append(id_)
    (coco / MANIFEST_NAME).write_text(json.dumps({"synthetic": True, "splits": splits}))
    return root


@pytest.mark.parametrize("family,names", [("coco-things", THING_NAMES), ("coco-stuff", STUFF_NAMES)])
def test_coco_label_spaces_match_the_spec_through_the_probe(tmp_path, family, names):
    root = write_palette_coco(tmp_path / "data", family)
    cfg = small_config(dataset=family, epochs=25, lr_drop_epoch=20, head_batch_size=2)
    res = run(PaletteEncoder(), root, cfg, progress=False, benchmark=f"{family}-linear")
    per_class = res["metrics"]["per_class_iou"]
    assert list(per_class) == names
    assert res["metrics"]["miou"] > 98.0, per_class
    assert min(per_class.values()) > 94.0


def test_coco_things_on_zero_indexed_stuffthingmaps_exits_2_with_the_explanation(tmp_path, capsys):
    """The thing-mask folder filled with COCO-Stuff-164k stuffthingmaps (id - 1, 255 unlabelled) is refused."""
    from densebench.cli import main

    root = write_palette_coco(tmp_path / "data", "coco-things")
    for png in (root / "coco" / "annotations").rglob("*.png"):
        raw = np.array(Image.open(png))
        shifted = np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)
        Image.fromarray(shifted, "L").save(png)
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "pixels", "--benchmark", "coco-things-linear", "--data-root", str(root),
              "--input-size", "64", "--quiet", "--output", str(tmp_path / "r.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "0-indexed" in err and "stuffthingmaps" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------ CLI on the synthetic suite

SMALL_CLI = ["--input-size", "64", "--train-mask-size", "32", "--epochs", "3", "--head-batch-size", "8",
             "--train-views", "1", "--quiet"]


def _cli(args, capsys):
    from densebench.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_runs_voc_and_ade20k_linear_and_writes_valid_results(synth_root, tmp_path, capsys):
    from densebench.results import read_result

    out = tmp_path / "results"
    code, stdout, stderr = _cli(["run", "--model", "pixels", "--benchmark", "voc-linear,ade20k-linear",
                                 "--data-root", str(synth_root), *SMALL_CLI, "--output", str(out)], capsys)
    assert code == 0, stderr
    voc, ade = read_result(out / "voc-linear.json"), read_result(out / "ade20k-linear.json")   # schema + integrity
    for res in (voc, ade):
        assert res["config"]["epochs"] == 3 and res["config"]["input_size"] == 64
        assert len(res["metrics"]["train_loss_curve"]) == 3
        assert 0 <= res["metrics"]["miou"] <= 100
        assert res["provenance"]["dataset"]["synthetic"] is True
    assert len(voc["metrics"]["per_class_iou"]) == 21 and voc["config"]["drop_last"] is True
    # ADE20K: 151 classes with the ignored class 0 scoring 0, so the published mean is 150/151 of the real one
    assert len(ade["metrics"]["per_class_iou"]) == 151
    assert next(iter(ade["metrics"]["per_class_iou"].values())) == 0.0
    assert ade["metrics"]["miou"] == pytest.approx(ade["metrics"]["miou_150"] * 150 / 151, rel=1e-9)
    assert "voc-linear" in stdout and "ade20k-linear" in stdout


@pytest.mark.parametrize("args,needle", [
    (["--upsample", "bicubic"], "accepted: features, logits"),
    (["--train-views", "0"], "--train-views must be >= 1"),
    (["--train-views", "two"], "--train-views expects int"),
    (["--epochs", "2", "--train-views", "3"], "exceeds --epochs"),
    (["--input-size", "60"], "not a multiple of the patch size 16"),
    (["--normalization", "nope"], "accepted"),
])
def test_cli_bad_linear_options_exit_2(synth_root, tmp_path, capsys, args, needle):
    code, _, stderr = _cli(["run", "--model", "pixels", "--benchmark", "voc-linear", "--data-root", str(synth_root),
                            "--quiet", *args], capsys)
    assert code == 2 and needle in stderr and "Traceback" not in stderr
