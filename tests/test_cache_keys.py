"""Cache keys: everything the stored features depend on is in the key (a change must miss), nothing
else is (the same settings must hit), and the cache never changes the values a run gets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from densebench.data import open_dataset
from densebench.encoders import load_encoder
from densebench.features import ExtractionStats, FeatureCache, extract
from densebench.protocols.incontext import MemoryReducer
from densebench.transforms import ResizeView


@pytest.fixture()
def voc_val(synth_root):
    return open_dataset("voc", synth_root, "val").subset(open_dataset("voc", synth_root, "val").ids[:4])


def _run(encoder, dataset, cache, *, size=32, reducer=None, layer=None, norm=None):
    view = ResizeView(size)
    stats = ExtractionStats()
    more = {} if reducer is None else {"reducer": reducer}
    out = extract(encoder, dataset, view, cache=cache, progress=False, stats=stats, layer=layer, norm=norm,
                  key_parts={"view": view.describe(), "reduce": reducer.describe() if reducer else "full-f16"},
                  **more)
    return out, stats


def test_same_settings_hit_and_match_an_uncached_run(voc_val, tmp_path):
    enc = load_encoder("random:vit_tiny_patch16_224")
    cache = FeatureCache(tmp_path)
    first, s1 = _run(enc, voc_val, cache)
    again, s2 = _run(enc, voc_val, cache)
    plain, s3 = _run(enc, voc_val, FeatureCache(None))
    assert (s1.cache_misses, s2.cache_hits, s2.images_forwarded) == (1, 1, 0)
    assert s3.images_forwarded == len(voc_val)
    for name in ("features", "masks"):
        np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(again[name]))
        np.testing.assert_array_equal(np.asarray(plain[name]), np.asarray(again[name]))
    assert plain["features"].dtype == again["features"].dtype == np.float16


@pytest.mark.parametrize("change", ["manifest", "split", "reducer", "fingerprint", "layer", "norm", "input_size"])
def test_a_change_the_features_depend_on_misses(voc_val, tmp_path, change):
    enc = load_encoder("random:vit_tiny_patch16_224")
    cache = FeatureCache(tmp_path)
    reducer = MemoryReducer(16, 21, 255, "class0", 4, seed=0, epoch=0)
    _, base = _run(enc, voc_val, cache, reducer=reducer)
    assert base.cache_misses == 1
    kwargs: dict = {"reducer": reducer}
    dataset, encoder = voc_val, enc
    if change == "manifest":
        dataset = voc_val.subset(voc_val.ids[:3])
    elif change == "split":
        dataset = copy.copy(voc_val)
        dataset.split = "val-renamed"  # same files, another split name
    elif change == "reducer":
        kwargs["reducer"] = MemoryReducer(16, 21, 255, "class0", 5, seed=0, epoch=0)
    elif change == "fingerprint":
        encoder = load_encoder("random:vit_tiny_patch16_224")
        encoder.fingerprint = enc.fingerprint + "-other-weights"
    elif change == "layer":
        kwargs["layer"] = -2
    elif change == "norm":
        kwargs["norm"] = not enc.norm
    elif change == "input_size":
        kwargs["size"] = 48
    _, changed = _run(encoder, dataset, cache, **kwargs)
    assert changed.cache_misses == 1 and changed.cache_hits == 0, change
    assert changed.images_forwarded == len(dataset), change
    assert changed.entries != base.entries


def test_the_compute_precision_is_part_of_the_key(voc_val, tmp_path):
    """A CPU (fp32) run must not reuse features a CUDA (fp16 autocast) run cached, and the reverse."""
    from densebench.features import _Engine

    enc = load_encoder("random:vit_tiny_patch16_224")
    common = dict(encoder=enc, dataset=voc_val, view=ResizeView(32), cache=None, batch_size=2, num_workers=0,
                  layer=None, norm=None, desc="", progress=False, stats=ExtractionStats())
    cpu = _Engine(device=torch.device("cpu"), **common).encoder_key()
    gpu = _Engine(device=torch.device("cuda"), **common).encoder_key()
    assert cpu["compute"] == "fp32" and gpu["compute"] == "fp16"
    from densebench.precision import precision

    with precision("bf16"):
        assert _Engine(device=torch.device("cpu"), **common).encoder_key()["compute"] == "bf16"
    assert {k: v for k, v in cpu.items() if k != "compute"} == {k: v for k, v in gpu.items() if k != "compute"}
