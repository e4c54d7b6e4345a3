"""The in-context protocol end to end: a useful encoder beats a useless one by a wide margin, the
warm cache does zero forwards and gives identical numbers, and the memory-size bookkeeping is right."""

import torch

from densebench.api import evaluate
from densebench.encoders import load_encoder
from densebench.encoders.base import DenseEncoder


class ConstantEncoder(DenseEncoder):
    """Every patch gets the same feature: retrieval carries no information."""

    def __init__(self):
        super().__init__()
        self.patch_size, self.embed_dim, self.name, self.fingerprint = 16, 8, "constant", "constant-v1"

    def _features(self, images, layer, norm):
        b, _, h, w = images.shape
        return torch.ones(b, h // 16, w // 16, 8)


OPTS = {"input_size": 128, "augment_epochs": 1}


def test_informative_features_beat_constant_ones(synth_root):
    useful = evaluate(load_encoder("pixels"), benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False,
                      progress=False, **OPTS)[0]["metrics"]["miou"]
    useless = evaluate(ConstantEncoder(), benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False,
                       progress=False, **OPTS)[0]["metrics"]["miou"]
    assert useless < 8, useless
    assert useful > 25 and useful > 4 * useless, (useful, useless)


def test_warm_cache_run_is_identical_and_forward_free(synth_root, tmp_path):
    enc = load_encoder("pixels")
    first = evaluate(enc, benchmarks=["voc-incontext"], data_root=synth_root, cache_dir=tmp_path, progress=False,
                     **OPTS)[0]
    n = enc.images_forwarded
    assert n == first["provenance"]["dataset"]["n_train"] + first["provenance"]["dataset"]["n_val"]
    second = evaluate(enc, benchmarks=["voc-incontext"], data_root=synth_root, cache_dir=tmp_path, progress=False,
                      **OPTS)[0]
    assert enc.images_forwarded == n
    assert second["provenance"]["cache"]["images_forwarded"] == 0
    assert second["metrics"] == first["metrics"]


def test_memory_size_splits_over_views_and_clamps(synth_root):
    enc = load_encoder("pixels")
    small = evaluate(enc, benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False, progress=False,
                     memory_size=96, **OPTS)[0]["derived"]
    n_train = 48
    assert small["memory_per_image"] == max(1, 96 // n_train) and not small["memory_per_image_clamped"]
    assert small["memory_rows"] <= 96
    huge = evaluate(enc, benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False, progress=False,
                    memory_size=10**9, **OPTS)[0]["derived"]
    assert huge["memory_per_image"] == (128 // 16) ** 2 and huge["memory_per_image_clamped"]


def test_save_predictions_writes_pictures_recorded_as_artifacts(synth_root, tmp_path):
    from PIL import Image

    res = evaluate(load_encoder("pixels"), benchmarks=["voc-incontext"], data_root=synth_root, use_cache=False,
                   progress=False, save_predictions=str(tmp_path / "pics"), save_predictions_count=3, **OPTS)[0]
    paths = res["provenance"]["artifacts"]
    assert len(paths) == 3 and all(p.endswith(".png") for p in paths)
    im = Image.open(paths[0])
    assert im.width > 2.5 * (im.height - 14)  # image | ground truth | prediction side by side
    assert "save_predictions" in res["config"]
