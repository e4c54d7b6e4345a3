"""Protocols that look at the same val view share one extraction: `densebench run` over every benchmark of
a dataset pays the val forward pass once."""

from densebench.api import evaluate
from densebench.encoders import load_encoder


def test_overcluster_reuses_the_linear_probe_val_features(synth_root, tmp_path):
    enc = load_encoder("pixels")
    evaluate(enc, benchmarks=["voc-linear"], data_root=synth_root, cache_dir=tmp_path, progress=False,
             input_size=112, train_mask_size=28, head_batch_size=4, epochs=2, train_views=1)
    before = enc.images_forwarded
    res = evaluate(enc, benchmarks=["voc-overcluster"], data_root=synth_root, cache_dir=tmp_path, progress=False,
                   input_size=112, clusters="gt,30", seeds=1)[0]
    assert enc.images_forwarded == before
    assert res["provenance"]["cache"]["cache_hits"] == 1
    assert 0 <= res["metrics"]["miou@gt"] <= 100
