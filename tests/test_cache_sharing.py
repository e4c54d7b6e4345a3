"""Protocols that look at the same images share one extraction: image features are keyed by the images, the
view and the encoder only, masks live in their own entry. `densebench run` over every benchmark of a dataset
pays each forward pass once, COCO-Things and COCO-Stuff (same images, other masks) share theirs, and a
rewritten mask costs a re-read of the masks, never a forward or a stale number."""

import shutil
import time

import numpy as np
from PIL import Image

from densebench.api import evaluate
from densebench.encoders import load_encoder

LINEAR = dict(input_size=112, train_mask_size=28, head_batch_size=4, epochs=2, train_views=1)


def test_overcluster_reuses_the_linear_probe_val_features(synth_root, tmp_path):
    enc = load_encoder("pixels")
    evaluate(enc, benchmarks=["voc-linear"], data_root=synth_root, cache_dir=tmp_path, progress=False, **LINEAR)
    before = enc.images_forwarded
    res = evaluate(enc, benchmarks=["voc-overcluster"], data_root=synth_root, cache_dir=tmp_path, progress=False,
                   input_size=112, clusters="gt,30", seeds=1)[0]
    assert enc.images_forwarded == before
    cache = res["provenance"]["cache"]
    assert cache["cache_hits"] == 1 and cache["images_forwarded"] == 0 and cache["masks_read"] == 0
    assert 0 <= res["metrics"]["miou@gt"] <= 100


def test_coco_stuff_after_coco_things_forwards_nothing(synth_root, tmp_path):
    enc = load_encoder("pixels")
    things = evaluate(enc, benchmarks=["coco-things-linear"], data_root=synth_root, cache_dir=tmp_path,
                      progress=False, **LINEAR)[0]
    assert things["provenance"]["cache"]["images_forwarded"] == enc.images_forwarded > 0
    before = enc.images_forwarded
    stuff = evaluate(enc, benchmarks=["coco-stuff-linear"], data_root=synth_root, cache_dir=tmp_path,
                     progress=False, **LINEAR)[0]
    cache = stuff["provenance"]["cache"]
    assert enc.images_forwarded == before and cache["images_forwarded"] == 0, "train and val views are shared"
    n_train, n_val = stuff["provenance"]["dataset"]["n_train"], stuff["provenance"]["dataset"]["n_val"]
    assert cache["masks_read"] == n_train + n_val, "the stuff masks are read, not the thing masks reused"
    plain = evaluate(load_encoder("pixels"), benchmarks=["coco-stuff-linear"], data_root=synth_root,
                     use_cache=False, progress=False, **LINEAR)[0]
    assert stuff["metrics"] == plain["metrics"]
    assert stuff["metrics"] != things["metrics"]


def test_a_rewritten_mask_rereads_the_masks_and_matches_an_uncached_run(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "coco", root / "coco")
    enc, cache = load_encoder("pixels"), tmp_path / "cache"
    first = evaluate(enc, benchmarks=["coco-stuff-linear"], data_root=root, cache_dir=cache, progress=False,
                     **LINEAR)[0]
    before = enc.images_forwarded
    # relabel one val mask: every stuff pixel of the image becomes the class of its most frequent stuff pixel
    val_id = _first_val_id(root)
    path = root / "coco" / "annotations" / "stuff_annotations" / "stuff_val2017_pixelmaps" / f"{val_id}.png"
    m = np.asarray(Image.open(path)).copy()
    stuff = (m >= 92) & (m < 183)
    values, counts = np.unique(m[stuff], return_counts=True)
    m[stuff] = values[np.argmax(counts)]
    time.sleep(0.01)
    Image.fromarray(m, "L").save(path)
    again = evaluate(enc, benchmarks=["coco-stuff-linear"], data_root=root, cache_dir=cache, progress=False,
                     **LINEAR)[0]
    c = again["provenance"]["cache"]
    assert enc.images_forwarded == before and c["images_forwarded"] == 0, "image features do not depend on masks"
    assert c["masks_read"] == again["provenance"]["dataset"]["n_val"], "only the val masks changed"
    assert again["provenance"]["dataset"]["manifest_hash"] != first["provenance"]["dataset"]["manifest_hash"]
    plain = evaluate(load_encoder("pixels"), benchmarks=["coco-stuff-linear"], data_root=root, use_cache=False,
                     progress=False, **LINEAR)[0]
    assert again["metrics"] == plain["metrics"]
    assert again["metrics"] != first["metrics"]


def _first_val_id(root) -> str:
    import json

    return json.loads((root / "coco" / "densebench_manifest.json").read_text())["splits"]["val"][0]
