"""The feature cache: second runs do zero backbone forwards; keys separate settings; no half entries."""

import numpy as np
import pytest
import torch

from densebench.encoders.base import DenseEncoder
from densebench.features import ExtractionStats, FeatureCache, extract
from densebench.transforms import ResizeView


class MeanColourEncoder(DenseEncoder):
    """Per-patch mean colour, projected by a fixed random matrix (deterministic, cheap)."""

    def __init__(self, patch=8, dim=6, **kw):
        super().__init__(**kw)
        self.patch_size, self.embed_dim, self.name, self.fingerprint = patch, dim, "meancolour", "meancolour-v1"
        self.register_buffer("proj", torch.randn(3, dim, generator=torch.Generator().manual_seed(0)))

    def _features(self, images, layer, norm):
        pooled = torch.nn.functional.avg_pool2d(images, self.patch_size)  # (B, 3, h, w)
        f = pooled.permute(0, 2, 3, 1) @ self.proj
        return torch.nn.functional.layer_norm(f, (self.embed_dim,)) if norm else f


class TinySeg:
    """A minimal dataset: 5 random images with masks."""

    name, split, num_classes, ignore_index, synthetic = "tiny", "val", 3, 255, True

    def __init__(self, n=5):
        rng = np.random.default_rng(0)
        from PIL import Image
        self.items = [(f"id{i}", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
                       rng.integers(0, 3, (20, 24), dtype=np.uint8)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def manifest_hash(self):
        return "tiny-manifest"


def test_second_run_performs_zero_forwards(tmp_path):
    enc, ds, cache = MeanColourEncoder(), TinySeg(), FeatureCache(tmp_path)
    view = ResizeView(16)
    first = extract(enc, ds, view, key_parts={"view": view.describe()}, cache=cache, batch_size=2, progress=False)
    assert enc.images_forwarded == 5
    stats = ExtractionStats()
    second = extract(enc, ds, view, key_parts={"view": view.describe()}, cache=cache, batch_size=3,
                     progress=False, stats=stats)
    assert enc.images_forwarded == 5, "the warm run must not call the backbone"
    assert stats.cache_hits == 1 and stats.images_forwarded == 0
    assert isinstance(second["features"], np.memmap) and second["features"].dtype == np.float16
    np.testing.assert_array_equal(np.asarray(first["features"]), np.asarray(second["features"]))
    assert second["features"].shape == (5, 2, 2, 6) and second["masks"].shape == (5, 16, 16)
    # stored features equal a direct forward (up to float16)
    x = torch.stack([view(i, *ds[i][1:])[0] for i in range(5)])
    direct = enc(x).numpy()
    np.testing.assert_allclose(np.asarray(second["features"], dtype=np.float32), direct, rtol=2e-3, atol=2e-3)


def test_settings_that_change_features_change_the_key(tmp_path):
    enc, ds, cache = MeanColourEncoder(), TinySeg(), FeatureCache(tmp_path)
    view = ResizeView(16)
    extract(enc, ds, view, key_parts={"view": view.describe()}, cache=cache, progress=False)
    extract(enc, ds, view, key_parts={"view": view.describe()}, cache=cache, norm=False, progress=False)
    v2 = ResizeView(24)
    extract(enc, ds, v2, key_parts={"view": v2.describe()}, cache=cache, progress=False)
    assert enc.images_forwarded == 15 and cache.hits == 0 and cache.misses == 3


def test_interrupted_extraction_leaves_no_entry(tmp_path):
    enc, ds, cache = MeanColourEncoder(), TinySeg(), FeatureCache(tmp_path)

    def exploding_view(i, image, mask):
        if i == 3:
            raise RuntimeError("disk on fire")
        return ResizeView(16)(i, image, mask)

    with pytest.raises(RuntimeError):
        extract(enc, ds, exploding_view, key_parts={"view": "x"}, cache=cache, batch_size=2, progress=False)
    assert not list((tmp_path / "features").rglob("meta.json"))
    assert not [p for p in (tmp_path / "features").rglob("*") if p.is_dir() and p.name.startswith(".")]


def test_disabled_cache_returns_arrays(tmp_path):
    enc, ds = MeanColourEncoder(), TinySeg()
    out = extract(enc, ds, ResizeView(16), key_parts={"view": 1}, cache=FeatureCache(None), progress=False)
    assert out["features"].shape == (5, 2, 2, 6)
