"""Overclustering protocol: each piece against an independent computation, then end to end on the synthetic suite."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from densebench.errors import ConfigError
from densebench.kmeans import faiss_kmeans, fit_standard_pca
from densebench.metrics import ConfusionMatrix, segmentation_scores
from densebench.protocols.overcluster import (
    Config,
    TokenPixelCounts,
    cluster_and_score,
    matching_for,
    nearest_source_index,
    parse_clusters,
    resolve_clusters,
    upsample_nearest,
)
from densebench.results import read_result

FAST = {"input_size": 64, "clusters": "gt,12", "seeds": 2, "kmeans_iters": 10, "kmeans_restarts": 1}


# ------------------------------------------------------------------------------------------ options

def test_clusters_option_accepts_cli_string_and_python_values():
    assert Config(clusters="gt, 300,500").clusters == ("gt", "300", "500")
    assert Config(clusters=("gt", 300, 500)).clusters == ("gt", "300", "500")
    assert parse_clusters(21) == ("21",)
    assert Config().clusters == ("gt", "300", "500")
    # "gt" resolves to the class count; the same K twice is clustered once
    assert resolve_clusters(("gt", "300", "21"), 21) == [("gt", 21), ("300", 300)]


@pytest.mark.parametrize("kwargs, needle", [
    ({"matching": "greedy"}, "'greedy'; accepted: auto, hungarian, many-to-one"),
    ({"clusters": "gt,lots"}, "'lots'"),
    ({"clusters": ""}, "--clusters is empty"),
    ({"seeds": 0}, "--seeds must be >= 1"),
    ({"kmeans_max_points_per_centroid": 0}, "must be >= 1 or all"),
    ({"pca_dim": 0}, "--pca-dim"),
    ({"normalization": "hbird-legacy"}, "'hbird-legacy'; accepted: encoder, imagenet"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"num_workers": -1}, "--num-workers must be >= 0"),
    ({"save_maps_count": -1}, "--save-maps-count must be >= 0"),
])
def test_bad_options_name_the_value(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        Config(**kwargs).validate()
    assert needle in str(e.value)


def test_auto_matching_follows_the_reference_code():
    assert matching_for("auto", 21, 21) == "hungarian"
    assert matching_for("auto", 500, 21) == "many-to-one"
    assert matching_for("auto", 10, 21) == "many-to-one"
    assert matching_for("hungarian", 500, 21) == "hungarian"
    with pytest.raises(ConfigError, match="identity"):
        matching_for("identity", 21, 21)


# ------------------------------------------------------------------------------ upsampling and counts

@pytest.mark.parametrize("s, m", [(28, 100), (32, 100), (14, 100), (25, 100), (7, 10), (5, 3), (4, 4)])
def test_nearest_upsampling_is_torch_interpolate(s, m):
    g = torch.Generator().manual_seed(s * m)
    maps = torch.randint(0, 600, (3, s, s), generator=g)
    expect = F.interpolate(maps[:, None].float(), size=(m, m), mode="nearest")[:, 0].long()   # the reference's call
    assert torch.equal(upsample_nearest(maps, m), expect)
    assert nearest_source_index(s, m).max() < s


def _literal_confusion(labels, masks, s, num_classes, num_clusters, ignore):
    """The reference's way: upsample every cluster map, drop ignore pixels, scan pixels per (class, cluster)."""
    up = F.interpolate(torch.from_numpy(labels).view(-1, 1, s, s).float(), size=masks.shape[1:], mode="nearest")
    pred = up[:, 0].long().numpy().reshape(-1)
    gt = masks.reshape(-1).astype(np.int64)
    keep = gt != ignore
    pred, gt = pred[keep], gt[keep]
    out = np.zeros((num_classes, num_clusters), dtype=np.int64)
    for c in range(num_classes):
        for k in range(num_clusters):
            out[c, k] = np.sum((gt == c) & (pred == k))
    return out


@pytest.mark.parametrize("ignore", [255, 0])   # VOC-style (outside the classes) and ADE20K-style (class 0)
def test_token_pixel_counts_give_the_pixel_confusion(ignore):
    rng = np.random.default_rng(1)
    n, s, m, C, K = 5, 7, 20, 6, 9
    masks = rng.integers(0, C, (n, m, m)).astype(np.uint8)
    masks[rng.random(masks.shape) < 0.15] = ignore
    labels = rng.integers(0, K, n * s * s)
    counts = TokenPixelCounts.from_masks(masks, s, C, ignore, max_elements=s * s * C * 2)   # forces 3 chunks
    conf = counts.confusion(labels, K)
    assert np.array_equal(conf, _literal_confusion(labels, masks, s, C, K, ignore))
    # and the shared streaming ConfusionMatrix (gt x pred) over the upsampled maps agrees
    cm = ConfusionMatrix(C, num_pred=K, ignore_index=ignore)
    cm.update(upsample_nearest(torch.from_numpy(labels).view(n, s, s), m), torch.from_numpy(masks))
    assert np.array_equal(conf, cm.matrix)
    assert counts.num_pixels == int((masks != ignore).sum())


# ----------------------------------------------------------------------------------------- matching

def _miou_of_relabelled(gt, pred, mapping, C):
    r = np.asarray(mapping)[pred]
    ious = [((gt == c) & (r == c)).sum() / max(((gt == c) | (r == c)).sum(), 1e-8) for c in range(C)]
    return float(np.mean(ious) * 100)


@pytest.mark.parametrize("seed", range(4))
def test_hungarian_is_the_best_permutation(seed):
    rng = np.random.default_rng(seed)
    C = 4
    gt = rng.integers(0, C, 300)
    pred = np.where(rng.random(300) < 0.6, (gt + seed) % C, rng.integers(0, C, 300))
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (gt, pred), 1)
    best = max(_miou_of_relabelled(gt, pred, perm, C) for perm in itertools.permutations(range(C)))
    got = segmentation_scores(conf, matching=matching_for("auto", C, C))
    assert got["miou"] == pytest.approx(best, abs=1e-9)
    assert got["miou"] == pytest.approx(_miou_of_relabelled(gt, pred, got["mapping"], C), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_many_to_one_is_the_majority_class_per_cluster(seed):
    rng = np.random.default_rng(10 + seed)
    C, K = 3, 8
    gt = rng.integers(0, C, 400)
    pred = rng.integers(0, K, 400)
    pred[:5] = K - 1                         # make sure cluster ids exist; one cluster may end up with a tie
    conf = np.zeros((C, K), dtype=np.int64)
    np.add.at(conf, (gt, pred), 1)
    majority = []
    for k in range(K):
        votes = Counter(gt[pred == k].tolist())
        top = max(votes.values()) if votes else 0
        majority.append(min([c for c in range(C) if votes.get(c, 0) == top]))   # ties -> lowest class id
    got = segmentation_scores(conf, matching=matching_for("auto", K, C))
    assert got["mapping"] == majority
    assert got["miou"] == pytest.approx(_miou_of_relabelled(gt, pred, majority, C), abs=1e-9)


# ------------------------------------------------------------------------------ standardise + PCA

def test_streaming_standardise_and_pca_match_sklearn():
    rng = np.random.default_rng(0)
    n, d, k = 2500, 12, 4
    x = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 3 + 7).astype(np.float16)
    x[:, 5] = 2.5                                        # a constant dimension: scale 1, as sklearn
    pca = fit_standard_pca(x, k, chunk_rows=333)         # 8 chunks
    x64 = x.astype(np.float64)
    scaler = StandardScaler().fit(x64)
    # float32 arithmetic within a chunk, float64 across chunks: agreement to float32 precision
    np.testing.assert_allclose(pca.mean, scaler.mean_, rtol=1e-7)
    np.testing.assert_allclose(pca.scale, scaler.scale_, rtol=1e-6)
    assert pca.scale[5] == 1.0 and scaler.scale_[5] == 1.0
    z = scaler.transform(x64)
    ref = PCA(n_components=k, svd_solver="full").fit(z)
    # same subspace and variances (sklearn's variance is the n-1 one)
    np.testing.assert_allclose(pca.explained_variance * n / (n - 1), ref.explained_variance_, rtol=1e-5)
    dots = np.abs(np.sum(pca.components * ref.components_.T, axis=0))
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)
    y = pca.transform(x, chunk_rows=700)
    y_ref = ref.transform(z)
    signs = np.sign(np.sum(y * y_ref, axis=0))
    np.testing.assert_allclose(y, y_ref * signs, atol=2e-4)
    assert y.dtype == np.float32 and y.flags["C_CONTIGUOUS"]
    # PCA to >= D dims is a rotation; it is skipped (z-scores returned) and recorded
    full = fit_standard_pca(x, 50)
    np.testing.assert_allclose(full.transform(x), z, atol=1e-5)
    assert "skipped" in full.describe()["pca"]


# ------------------------------------------------------------------------------------------ k-means

def test_faiss_kmeans_records_subsampling_and_is_reproducible():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 5)).astype(np.float32)
    a = faiss_kmeans(x, 4, niter=5, nredo=2, seed=3, max_points_per_centroid=256)
    b = faiss_kmeans(x, 4, niter=5, nredo=2, seed=3, max_points_per_centroid=256)
    assert np.array_equal(a.labels, b.labels)
    assert a.info["training_points"] == 1024 and a.info["subsampled"]
    assert a.info["parameters"]["max_points_per_centroid"] == 256
    assert a.info["parameters"]["niter"] == 5 and a.info["parameters"]["nredo"] == 2
    full = faiss_kmeans(x, 4, niter=5, nredo=2, seed=3, max_points_per_centroid=None)
    assert full.info["training_points"] == 3000 and not full.info["subsampled"]
    assert full.info["parameters"]["max_points_per_centroid"] == "all"
    with pytest.raises(ConfigError, match="K=3001"):
        faiss_kmeans(x, 3001)


def _planted(n=6, s=8, m=24, C=5, d=32, noise=0.05, seed=0):
    """Masks constant on each token's footprint; each token's feature = its class centroid + small noise."""
    rng = np.random.default_rng(seed)
    token_class = rng.integers(0, C, (n, s, s))
    token_class[0].reshape(-1)[:C] = np.arange(C)          # every class present
    masks = upsample_nearest(torch.from_numpy(token_class), m).numpy().astype(np.uint8)
    centroids = rng.standard_normal((C, d)) * 3
    feats = (centroids[token_class] + noise * rng.standard_normal((n, s, s, d))).astype(np.float16)
    return feats, masks


def test_planted_clusters_are_recovered_at_k_gt():
    feats, masks = _planted()
    # random-init k-means can merge two planted groups; 10 restarts keep the best objective, which is the truth
    cfg = Config(clusters="gt,15", seeds=3, pca_dim=8, kmeans_iters=20, kmeans_restarts=10)
    out = cluster_and_score(feats, masks, num_classes=5, ignore_index=255, class_names=None, config=cfg)
    assert out.metrics["miou@gt"] == pytest.approx(100.0)
    assert out.metrics["miou@5"] == out.metrics["miou@gt"] and out.metrics["miou@gt_std"] == 0.0
    assert out.metrics["miou@15"] == pytest.approx(100.0)          # many-to-one keeps pure clusters pure
    assert list(out.metrics["per_class_iou"].values()) == pytest.approx([100.0] * 5)
    assert out.modes == {5: "hungarian", 15: "many-to-one"}
    # same seeds, same numbers
    again = cluster_and_score(feats, masks, num_classes=5, ignore_index=255, class_names=None, config=cfg)
    assert again.metrics == out.metrics


def test_ignored_class_adds_the_mean_over_the_other_classes():
    feats, masks = _planted()
    cfg = Config(clusters="gt,15", seeds=1, pca_dim=8, kmeans_iters=20, kmeans_restarts=10)
    # ADE20K-style: class 0 is the ignore label yet counted in the mean (the family's ignored_class)
    plain = cluster_and_score(feats, masks, num_classes=5, ignore_index=0, class_names=None, config=cfg)
    ade = cluster_and_score(feats, masks, num_classes=5, ignore_index=0, class_names=None, config=cfg,
                            ignored_class=0)
    assert "miou@5_4" not in plain.metrics and "miou@15_4" not in plain.metrics
    assert {k: v for k, v in ade.metrics.items() if not k.endswith("_4")} == plain.metrics
    assert ade.metrics["per_class_iou"]["0"] == 0.0
    for k in (5, 15):
        assert ade.metrics[f"miou@{k}_4"] == pytest.approx(ade.metrics[f"miou@{k}"] * 5 / 4)


def test_seeds_are_reproducible_and_different_seeds_differ():
    feats, masks = _planted(noise=8.0, seed=1)                      # hard enough that seeds disagree
    cfg = Config(clusters="gt,20", seeds=3, pca_dim=8, kmeans_iters=10, kmeans_restarts=1)
    a = cluster_and_score(feats, masks, num_classes=5, ignore_index=255, class_names=None, config=cfg)
    b = cluster_and_score(feats, masks, num_classes=5, ignore_index=255, class_names=None, config=cfg)
    assert a.metrics == b.metrics
    assert len(set(a.metrics["miou@20_seeds"])) > 1
    assert a.metrics["miou@20"] == pytest.approx(np.mean(a.metrics["miou@20_seeds"]))
    assert a.metrics["miou@20_std"] == pytest.approx(np.std(a.metrics["miou@20_seeds"]))


def test_k_larger_than_the_tokens_is_a_config_error():
    feats, masks = _planted(n=2, s=4)
    with pytest.raises(ConfigError) as e:
        cluster_and_score(feats, masks, num_classes=5, ignore_index=255, class_names=None,
                          config=Config(clusters="gt,33"))
    assert "--clusters 33 exceeds the 32 val tokens" in str(e.value)


# ------------------------------------------------------------------------------------------ end to end

def test_run_on_the_synthetic_suite(synth_root, tmp_path):
    from densebench.api import evaluate
    from densebench.encoders import load_encoder

    enc = load_encoder("pixels")
    opts = dict(FAST, save_maps=str(tmp_path / "maps"), save_maps_count=2)
    out = tmp_path / "r.json"
    (res,) = evaluate(enc, benchmarks=["voc-overcluster"], data_root=synth_root, cache_dir=tmp_path / "cache",
                      output=out, progress=False, options=opts)
    read_result(out)                                     # schema + integrity
    m = res["metrics"]
    for key in ("miou@21", "miou@21_std", "miou@gt", "miou@gt_std", "miou@12", "miou@12_std", "per_class_iou"):
        assert key in m
    assert 0 < m["miou@gt"] <= 100 and len(m["per_class_iou"]) == 21
    cfg = res["derived"]
    assert cfg["matching_used"] == {"21": "hungarian", "12": "many-to-one"}
    assert cfg["kmeans"]["parameters"]["max_points_per_centroid"] == 256
    assert cfg["kmeans"]["parameters"]["niter"] == 10 and len(cfg["kmeans"]["runs"]) == 4
    assert cfg["num_tokens"] == res["provenance"]["dataset"]["n_val_clustered"] * 16
    for key in ("extraction_s", "forward_s", "protocol_s", "kmeans_s", "matching_s", "total_s"):
        assert key in res["provenance"]["timings"]
    arts = res["provenance"]["artifacts"]
    assert len(arts) == 2
    with Image.open(arts[0]) as im:
        assert im.width > 3 * im.height           # image | gt | K=gt | K=12 side by side
    # a second run reuses the cached features (no forward) and reproduces every number
    before = enc.images_forwarded
    (again,) = evaluate(enc, benchmarks=["voc-overcluster"], data_root=synth_root, cache_dir=tmp_path / "cache",
                        progress=False, options=dict(FAST))
    assert enc.images_forwarded == before
    assert again["metrics"] == m


def test_ade20k_reports_the_151_and_150_class_means(synth_root, tmp_path):
    from densebench.api import evaluate

    (res,) = evaluate("pixels", benchmarks=["ade20k-overcluster"], data_root=synth_root,
                      cache_dir=tmp_path / "cache", progress=False, options=dict(FAST, clusters="gt"))
    m = res["metrics"]
    assert m["miou@151_150"] == pytest.approx(m["miou@151"] * 151 / 150)
    assert m["per_class_iou"][next(iter(m["per_class_iou"]))] == 0.0     # class 0 is the ignore label
    notes = res["derived"]["metric_notes"]
    assert "ignored class 0" in notes["miou@<K>_150"] and "151 classes" in notes["miou@<K>"]


def test_cli_run_and_bad_inputs(synth_root, tmp_path, capsys):
    from densebench.cli import main

    def cli(*args):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
        cap = capsys.readouterr()
        return code, cap.err

    base = ["run", "--model", "pixels", "--benchmark", "coco-things-overcluster", "--data-root", str(synth_root),
            "--cache-dir", str(tmp_path / "cache"), "--input-size", "64", "--seeds", "1", "--kmeans-iters", "5",
            "--kmeans-restarts", "1", "--quiet"]
    out = tmp_path / "r.json"
    code, err = cli(*base, "--clusters", "gt,20", "--kmeans-max-points-per-centroid", "all", "--output", str(out))
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["config"]["clusters"] == ["gt", "20"]
    assert res["derived"]["kmeans"]["parameters"]["max_points_per_centroid"] == "all"
    assert set(res["derived"]["kmeans"]["training_points"].values()) == {res["derived"]["num_tokens"]}
    code, err = cli(*base, "--clusters", "gt,100000")
    assert code == 2 and "exceeds the" in err and "val tokens" in err and "Traceback" not in err
    code, err = cli(*base, "--matching", "greedy")
    assert code == 2 and "greedy" in err and "many-to-one" in err
