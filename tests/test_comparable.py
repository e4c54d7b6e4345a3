"""Comparable numbers (issue 12): data from any source in the official layouts, position-embedding resampling
as a recorded per-benchmark choice, named protocol versions, and the reference behaviours behind options.

Every dataset here is laid out by hand in the official formats (JPEG images, palette / L-mode PNG masks, split
files); every switch is checked against an independent computation of what it must do."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densebench import leaderboard as lb
from densebench.api import evaluate
from densebench.data import open_dataset
from densebench.data.ids import shipped_path
from densebench.data.voc import voc_palette
from densebench.encoders import load_encoder
from densebench.encoders.timm_encoder import TimmEncoder, auto_pos_interp
from densebench.errors import ConfigError, DataError
from densebench.protocols import incontext, linear
from densebench.retrieval import build_index
from densebench.transforms import HummingbirdTrainView

SIZE = (48, 40)   # image width, height

# Tiny, fast settings per protocol (the pixels encoder is /16; the random ViTs are /14).
INCONTEXT = {"input_size": 64, "augment_epochs": 1, "memory_size": None}
LINEAR = {"input_size": 64, "train_mask_size": 16, "epochs": 3, "train_views": 1, "head_batch_size": 2, "lr": 0.1}
OVERCLUSTER = {"input_size": 64, "mask_size": 16, "clusters": "gt,6", "seeds": 1, "kmeans_iters": 5,
               "kmeans_restarts": 1}


# ---------------------------------------------------------------------------------------------------------
# Datasets laid out by hand

def _scene(rng: np.random.Generator, num_classes: int, ignore: int | None, first_class: int = 0):
    """An image whose colour follows its label map (so features can learn the classes) and the label map."""
    w, h = SIZE
    mask = np.full((h, w), first_class, np.uint8)
    for _ in range(3):
        c = int(rng.integers(first_class, num_classes))
        x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
        mask[y0:y0 + 16, x0:x0 + 16] = c
    colours = np.stack([(np.arange(256) * 53) % 256, (np.arange(256) * 97) % 256, (np.arange(256) * 29) % 256], 1)
    img = colours[mask].astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    if ignore is not None:
        mask[:, w // 2] = ignore                       # a boundary line of ignore pixels
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), mask


def write_voc(root, splits: dict[str, list[str]], *, num_classes: int = 21, seed: int = 0, classes=None):
    """``VOCSegmentation/``: images/<id>.jpg, SegmentationClassAug (train splits) / SegmentationClass (val) palette
    PNGs, sets/<split>.txt; optional densebench_classes.json."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "SegmentationClass", "SegmentationClassAug", "sets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        folder = "SegmentationClassAug" if split in ("train", "trainaug") else "SegmentationClass"
        for id_ in ids:
            img, mask = _scene(rng, num_classes, 255)
            img.save(root / "images" / f"{id_}.jpg", quality=95)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(voc_palette())
            png.save(root / folder / f"{id_}.png")
        (root / "sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if classes is not None:
        (root / "densebench_classes.json").write_text(json.dumps(classes))
    return root


def write_ade20k(root, splits: dict[str, list[str]], seed: int = 1):
    """``ADEChallengeData2016/``: images/<split>/<id>.jpg and annotations/<split>/<id>.png (L mode, 0 = other);
    plus a stray text file among the images and a mask without an image, which pairing by id must ignore."""
    rng = np.random.default_rng(seed)
    for split, ids in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for id_ in ids:
            img, mask = _scene(rng, 8, None, first_class=1)
            mask[:4] = 0                                   # some "other" (ignored) pixels
            img.save(root / "images" / split / f"{id_}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "annotations" / split / f"{id_}.png")
        (root / "images" / split / "notes.txt").write_text("not an image")
        Image.fromarray(np.full(SIZE[::-1], 7, np.uint8), mode="L").save(
            root / "annotations" / split / f"{ids[0][:-8]}00000000.png")   # sorts first: a position pairing breaks
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """A small VOC-layout dataset with its own split files (8 trainaug, 4 val)."""
    root = tmp_path_factory.mktemp("voc") / "VOCSegmentation"
    return write_voc(root, {"trainaug": [f"t{i:02d}" for i in range(8)], "val": [f"v{i:02d}" for i in range(4)]})


def _run(model, benchmarks, root, **options):
    return evaluate(model, benchmarks=benchmarks, data_root=root, use_cache=False, progress=False, **options)


# ---------------------------------------------------------------------------------------------------------
# §1 Data from any source

def test_voc_folder_with_its_own_split_files_runs_end_to_end_non_standard(tmp_path, caplog):
    train = [f"img_{i:03d}" for i in range(8)]
    val = [f"img_{i:03d}" for i in range(8, 12)]
    root = write_voc(tmp_path / "VOCSegmentation", {"trainaug": train, "val": val})
    with caplog.at_level(logging.WARNING, logger="densebench.data"):
        ds = open_dataset("voc", tmp_path, "val")
    assert ds.ids == val and ds.num_classes == 21
    assert ds.extra["published_ids"] is False
    assert (ds.extra["published_missing"], ds.extra["published_extra"]) == (1449, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "densebench.data"]
    assert len(lines) == 1 and "1449 missing, 4 extra" in lines[0] and "sets/val.txt" in lines[0]

    results = {**{r["benchmark"]: r for r in _run("pixels", ["voc-incontext"], root, **INCONTEXT)},
               **{r["benchmark"]: r for r in _run("pixels", ["voc-linear"], root, **LINEAR)},
               **{r["benchmark"]: r for r in _run("pixels", ["voc-overcluster"], root, **OVERCLUSTER)}}
    for name, res in results.items():
        data = res["provenance"]["dataset"]
        assert data["published_ids"] is False and data["synthetic"] is False, name
        assert data["ids"]["val"] == {"source": str(root / "sets" / "val.txt"), "n": 4, "published": False,
                                      "missing": 1449, "extra": 4, "count": 1449}
        assert 0 <= res["metrics"]["miou" if "overcluster" not in name else "miou@gt"] <= 100
        _, _, reasons = lb.check_config(res)
        assert any("own split differs from the published ids" in r and "val: 1449 of 1449" in r for r in reasons)
    assert results["voc-incontext"]["provenance"]["dataset"]["ids"]["train"]["missing"] == 10582
    assert results["voc-incontext"]["provenance"]["dataset"]["n_train"] == 8


def test_split_file_with_the_published_ids_in_another_order_reads_the_published_order(tmp_path, caplog):
    published = shipped_path("voc", "val.txt").read_text().split()
    root = tmp_path / "VOCSegmentation"
    for sub in ("images", "SegmentationClass", "sets"):
        (root / sub).mkdir(parents=True)
    (root / "sets" / "val.txt").write_text("\n".join(reversed(published)) + "\n")
    with caplog.at_level(logging.WARNING, logger="densebench.data"):
        ds = open_dataset("voc", root, "val")
    assert ds.ids == published and ds.extra["published_ids"] is True
    assert not [r for r in caplog.records if r.name == "densebench.data"]
    # no split file at all: the shipped published list
    (root / "sets" / "val.txt").unlink()
    ds = open_dataset("voc", root, "val")
    assert ds.ids == published and ds.extra["id_source"] == str(shipped_path("voc", "val.txt"))


def test_ade20k_folder_with_a_subset_of_images_pairs_by_id_and_runs_end_to_end(tmp_path):
    train = [f"ADE_train_{i:08d}" for i in (3, 7, 11, 15, 19, 23)]
    val = [f"ADE_val_{i:08d}" for i in (2, 5, 9, 13)]
    root = write_ade20k(tmp_path / "ADEChallengeData2016", {"training": train, "validation": val})
    ds = open_dataset("ade20k", tmp_path, "training")
    assert ds.ids == train                                       # the .jpg files present, not the stray files
    assert (ds.extra["published_missing"], ds.extra["published_extra"]) == (20210 - 6, 0)
    for i, id_ in enumerate(ds.ids):                             # each mask is its own image's, by id
        got_id, image, mask = ds[i]
        want = np.array(Image.open(root / "annotations" / "training" / f"{id_}.png"))
        assert got_id == id_ and np.array_equal(mask, want) and image.size == SIZE

    results = _run("pixels", ["ade20k-incontext"], root, **INCONTEXT) + _run("pixels", ["ade20k-linear"], root,
                                                                             **LINEAR)
    for res in results:
        data = res["provenance"]["dataset"]
        assert data["published_ids"] is False and data["ids"]["val"]["missing"] == 2000 - 4
        assert "miou_150" in res["metrics"] and len(res["metrics"]["per_class_iou"]) == 151
        assert any("own split differs" in r for r in lb.check_config(res)[2])


def test_custom_five_class_voc_layout_dataset_end_to_end(tmp_path):
    names = ["background", "road", "car", "tree", "sky"]
    train = [f"s{i:02d}" for i in range(8)]
    val = [f"s{i:02d}" for i in range(8, 12)]
    root = write_voc(tmp_path / "mydata", {"trainaug": train, "val": val}, num_classes=5,
                     classes={"class_names": names, "ignore_index": 255})
    ds = open_dataset("voc", root, "val")
    assert (ds.num_classes, ds.class_names, ds.ignore_index) == (5, names, 255)

    results = (_run("pixels", ["voc-incontext"], root, **INCONTEXT) + _run("pixels", ["voc-linear"], root, **LINEAR)
               + _run("pixels", ["voc-overcluster"], root, **{**OVERCLUSTER, "clusters": "gt,6"}))
    for res in results:
        data = res["provenance"]["dataset"]
        assert data["classes"] == {"source": str(root / "densebench_classes.json"), "num_classes": 5,
                                   "ignore_index": 255}
        assert list(res["metrics"]["per_class_iou"]) == names
        reasons = lb.check_config(res)[2]
        assert any("own classes (5" in r for r in reasons)
    inc = results[0]["metrics"]
    assert inc["miou_identity"] == pytest.approx(np.mean(list(inc["per_class_iou"].values())), abs=1e-9)
    assert results[2]["derived"]["clusters_resolved"]["gt"] == 5

    # the one-name-per-line form, and a metadata file that does not fit uint8 label maps
    (root / "densebench_classes.json").unlink()
    (root / "classes.txt").write_text("\n".join(names[:3]) + "\n")
    assert open_dataset("voc", root, "val").class_names == names[:3]
    (root / "densebench_classes.json").write_text(json.dumps({"class_names": names, "ignore_index": 3}))
    with pytest.raises(DataError, match="uint8 label maps"):
        open_dataset("voc", root, "val")


def test_val_list_restricts_the_val_split_and_is_recorded(tmp_path):
    root = write_voc(tmp_path / "VOCSegmentation", {"trainaug": [f"a{i}" for i in range(6)],
                                                    "val": [f"b{i}" for i in range(5)]})
    listing = tmp_path / "val_subset.txt"
    listing.write_text("b1\nb3\n")
    res = _run("pixels", ["voc-incontext"], root, val_list=str(listing), **INCONTEXT)[0]
    assert res["config"]["val_list"] == str(listing)
    assert res["provenance"]["dataset"]["n_val"] == 2
    assert res["provenance"]["dataset"]["ids"]["val"] == {"source": str(listing), "n": 2}
    assert any(r.startswith("val_list=") for r in lb.check_config(res)[2])


# ---------------------------------------------------------------------------------------------------------
# §2 Position-embedding resampling

def _by_hand(vit, x: torch.Tensor, rule: str) -> torch.Tensor:
    """The ViT forward written out, with the position-embedding grid resampled by ``rule`` directly with
    F.interpolate: timm = bicubic to the target size with antialias; meta-offset = bicubic by the scale factor
    (n + 0.1) / N without antialias (DINO / DINOv2 / NeCo's vit_v2)."""
    b, _, h_in, w_in = x.shape
    p = vit.patch_embed.patch_size[0]
    h, w = h_in // p, w_in // p
    tokens = vit.patch_embed(x).reshape(b, h * w, -1)
    d = tokens.shape[-1]
    gh, gw = vit.patch_embed.grid_size
    grid = vit.pos_embed[:, vit.pos_embed.shape[1] - gh * gw:].reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    if rule == "timm":
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                             align_corners=False, antialias=False)
    pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, d)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    assert vit.no_embed_class                                    # DINOv2-reg layout: patches carry the positions
    seq = torch.cat(prefix + [tokens + pos], dim=1)
    for blk in vit.blocks:
        seq = blk(seq)
    return vit.norm(seq)[:, vit.num_prefix_tokens:].reshape(b, h, w, d)


@pytest.mark.parametrize("size", [(70, 56), (28, 42)])      # up- and downsampling of the 4x4 native grid
def test_pos_interp_modes_differ_and_each_equals_its_rule(size):
    enc = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs={"depth": 2, "img_size": 56})
    with torch.no_grad():
        enc.model.pos_embed.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    net = enc.model
    # two encoders wrapping the SAME module keep their own modes, whichever wrapped it first or ran last
    meta = TimmEncoder(net, name="meta", fingerprint="x", pos_interp="meta-offset")
    timm_ = TimmEncoder(net, name="timm", fingerprint="x", pos_interp="timm")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f_timm, f_meta = timm_(x), meta(x)
        torch.testing.assert_close(timm_(x), f_timm, rtol=0, atol=0)
        want_meta, want_timm = _by_hand(net, x, "meta-offset"), _by_hand(net, x, "timm")
    torch.testing.assert_close(f_meta, want_meta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_timm, want_timm, rtol=1e-4, atol=1e-4)
    cos = F.cosine_similarity(f_meta.flatten(0, 2), f_timm.flatten(0, 2), dim=-1)
    assert float((f_meta - f_timm).abs().max()) > 1e-2 and float(cos.min()) < 0.9999
    assert meta.feature_key() != timm_.feature_key()             # never the same cache entry
    # an encoder switched for one run and back
    with timm_.using_pos_interp("auto", "linear") as mode, torch.inference_mode():
        assert mode == "meta-offset" and timm_.describe()["pos_interp_choice"] == "auto"
        torch.testing.assert_close(timm_(x), want_meta, rtol=1e-4, atol=1e-4)
    assert timm_.pos_interp == "timm" and "pos_interp_choice" not in timm_.describe()


def test_auto_pos_interp_follows_the_code_behind_each_benchmark():
    assert auto_pos_interp("linear", "timm") == auto_pos_interp("overcluster", "timm") == "meta-offset"
    assert auto_pos_interp("incontext", "timm") == auto_pos_interp("correspondence", "timm") == "timm"
    assert auto_pos_interp("incontext", "meta-offset") == "meta-offset"      # DINO v1, DINOv2 without registers
    from densebench.encoders import REGISTRY
    assert REGISTRY["dinov2_vits14_reg"].pos_interp == "timm" and REGISTRY["dinov2_vits14"].pos_interp == "meta-offset"


def test_pos_interp_is_recorded_per_benchmark_and_checked_by_the_leaderboard(tmp_path):
    root = write_voc(tmp_path / "VOCSegmentation", {"trainaug": [f"a{i}" for i in range(6)],
                                                    "val": [f"b{i}" for i in range(4)]})
    kw = {"model_kwargs": {"depth": 1, "img_size": 28}}
    enc = load_encoder("random:vit_small_patch14_reg4_dinov2", **kw)
    lin = {**LINEAR, "input_size": 56, "train_mask_size": 14}
    auto = {r["benchmark"]: r for r in evaluate(enc, benchmarks=["voc-incontext", "voc-linear"], data_root=root,
                                                progress=False, cache_dir=tmp_path / "c",
                                                options={**INCONTEXT, **lin, "input_size": 56})}
    assert auto["voc-incontext"]["model"]["pos_interp"] == "timm"          # hub models (open-hummingbird-eval)
    assert auto["voc-linear"]["model"]["pos_interp"] == "meta-offset"     # NeCo's vit_v2
    assert {r["model"]["pos_interp_choice"] for r in auto.values()} == {"auto"}
    assert enc.pos_interp == "timm"                                        # restored after the runs
    forced = evaluate(enc, benchmarks=["voc-linear"], data_root=root, progress=False, cache_dir=tmp_path / "c",
                      pos_interp="timm", options=lin)[0]
    assert forced["model"]["pos_interp"] == "timm" and forced["provenance"]["cache"]["images_forwarded"] > 0
    assert forced["metrics"]["train_loss_curve"] != auto["voc-linear"]["metrics"]["train_loss_curve"]
    assert not any("pos_interp" in r for r in lb.check_config(auto["voc-linear"])[2])
    assert "pos_interp='timm' (canonical 'meta-offset')" in lb.check_config(forced)[2]
    with pytest.raises(ConfigError, match="applies to timm ViTs"):
        evaluate("pixels", benchmarks=["voc-linear"], data_root=root, progress=False, use_cache=False,
                 pos_interp="meta-offset", options=LINEAR)
    with pytest.raises(ConfigError, match="--pos-interp"):
        evaluate("pixels", benchmarks=["voc-linear"], data_root=root, progress=False, pos_interp="bilinear")


# ---------------------------------------------------------------------------------------------------------
# §4 Named protocol versions

def test_hbird_11_keys_are_normalised_over_the_patch_axis_literally():
    gen = torch.Generator().manual_seed(0)
    b, s, p, d, C = 2, 4, 4, 8, 3
    feats = torch.randn(b, s, s, d, generator=gen, dtype=torch.float64)
    masks = torch.randint(0, C, (b, s * p, s * p), generator=gen)
    # unbounded memory: HB11 `features / torch.norm(features, dim=1, keepdim=True)` on (B, S², D)
    red = incontext.MemoryReducer(p, C, 255, "class0", None, seed=0, epoch=0, key_norm="patch-axis")
    out = red(feats.float(), masks, torch.arange(b))
    flat = feats.reshape(b, s * s, d)
    want = (flat / torch.norm(flat, dim=1, keepdim=True)).reshape(b * s * s, d)
    torch.testing.assert_close(out["keys"].double(), want, rtol=2e-3, atol=2e-4)
    assert not torch.allclose(out["keys"].double().norm(dim=1), torch.ones(b * s * s, dtype=torch.float64),
                              atol=0.05)
    # bounded memory: the sampled features of each image, normalised over the sampled patches
    red = incontext.MemoryReducer(p, C, 255, "class0", 5, seed=0, epoch=0, key_norm="patch-axis")
    out = red(feats.float(), masks, torch.arange(b))
    counts = incontext.patch_label_counts(masks, p, C, 255).reshape(b, s * s, C)
    for i in range(b):
        from densebench.transforms import generator_for
        sel = torch.sort(incontext.rarity_sample(counts[i], 5, generator_for(0, 10_000, i))).values
        sampled = flat[i, sel]
        want = sampled / torch.norm(sampled, dim=0, keepdim=True)
        torch.testing.assert_close(out["keys"][i * 5:(i + 1) * 5].double(), want, rtol=2e-3, atol=2e-4)


def test_hbird_11_label_transfer_ranks_by_inner_product_and_weighs_by_cosine():
    """HB11: the search ranks raw queries against patch-axis keys by inner product; the cross-attention then
    re-normalises queries and the gathered keys: softmax(cos / 0.02) · soft labels. Literal computation vs
    densebench's (search with unit queries, similarities divided by the key norms, labels only gathered)."""
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    keys = keys / torch.norm(keys, dim=0, keepdim=True)                   # not unit rows
    labels = torch.randint(0, 5, (200, 3), generator=gen)
    q = torch.randn(30, 16, generator=gen, dtype=torch.float64) * 7
    k = 10
    idx_ref = torch.topk(q @ keys.T, k, dim=1).indices
    kf = F.normalize(keys[idx_ref], dim=-1)
    attn = torch.softmax(torch.einsum("qd,qkd->qk", F.normalize(q, dim=-1), kf) / 0.02, dim=-1)
    want = torch.einsum("qk,qkc->qc", attn, labels[idx_ref].double() / 4)
    index = build_index(keys.float(), backend="torch", device="cpu")
    sims, idx = index.search(F.normalize(q.float(), dim=-1), k)
    sims, idx = torch.as_tensor(sims), torch.as_tensor(idx)
    assert torch.equal(torch.sort(idx, 1).values, torch.sort(idx_ref, 1).values)
    got = incontext.transfer_labels(sims.float() / keys.float().norm(dim=1)[idx], idx, labels, 0.02, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_hue_field_scales_only_the_hue_range():
    base = HummingbirdTrainView(64, seed=5, epoch=0)
    wide = HummingbirdTrainView(64, seed=5, epoch=0, hue=0.5)
    for index in range(20):
        ops0, box0 = base.draw(index, 40, 48)
        ops1, box1 = wide.draw(index, 40, 48)
        assert box0 == box1 and [o for o, _ in ops0] == [o for o, _ in ops1]
        for (op, f0), (_, f1) in zip(ops0, ops1):
            assert f1 == pytest.approx(f0 * 5 if op == "hue" else f0, abs=1e-12)
    assert "hue" not in base.describe() and wide.describe()["hue"] == 0.5


def test_protocol_versions_set_their_choices_and_are_compared_like_with_like(voc_root, tmp_path):
    opts = {"input_size": 64, "augment_epochs": 1}
    v11, v20 = (evaluate("pixels", benchmarks=["voc-incontext"], data_root=voc_root, progress=False,
                         cache_dir=tmp_path, protocol=v, **opts)[0] for v in ("hbird-1.1", "hbird-2.0"))
    c = v11["config"]
    assert (c["protocol"], c["key_norm"], c["hue"], c["normalization"]) == ("hbird-1.1", "patch-axis", 0.5,
                                                                            "hbird-legacy")
    assert v11["derived"]["std"] == [0.229, 0.224, 0.255]
    assert any("ScaNN" in n for n in v11["derived"]["protocol_version"]["not_reproduced"])
    assert (v20["config"]["key_norm"], v20["config"]["hue"], v20["config"]["normalization"]) == (
        "feature", 0.1, "imagenet")
    assert v11["metrics"]["miou"] != v20["metrics"]["miou"]
    # each is checked against its own version's canonical config: only the small settings and the data differ
    for res in (v11, v20):
        reasons = lb.check_config(res)[2]
        assert {r for r in reasons if "=" in r} == {"input_size=64 (canonical 512)", "augment_epochs=1 (canonical 2)"}
        assert len(reasons) == 3 and "own split differs" in reasons[2]
    assert lb.entry_from_result(v11)["protocol"] == "hbird-1.1"
    # one choice overridden inside a version is recorded and non-standard for that version
    mixed = evaluate("pixels", benchmarks=["voc-incontext"], data_root=voc_root, progress=False,
                     cache_dir=tmp_path, protocol="hbird-1.1", normalization="imagenet", **opts)[0]
    assert mixed["config"]["normalization"] == "imagenet" and mixed["config"]["key_norm"] == "patch-axis"
    assert "normalization='imagenet' (canonical 'hbird-legacy')" in lb.check_config(mixed)[2]
    # --protocol applies to the benchmarks of the protocol that has the version
    both = evaluate("pixels", benchmarks=["voc-incontext", "voc-linear"], data_root=voc_root, progress=False,
                    cache_dir=tmp_path, protocol="hbird-1.1", **opts, train_mask_size=16, epochs=2,
                    head_batch_size=4)
    assert [r["config"]["protocol"] for r in both] == ["hbird-1.1", "neco-leopart"]
    with pytest.raises(ConfigError, match="hbird-3.0"):
        evaluate("pixels", benchmarks=["voc-incontext"], data_root=voc_root, progress=False, protocol="hbird-3.0")


def test_published_rows_carry_their_protocol_version_and_compare_within_it():
    doc = lb.load_leaderboard(lb.default_leaderboard())
    versions = {(e["citation"]["short"], e["benchmark"]): e["protocol"] for e in doc["entries"]}
    assert all(e.get("protocol") for e in doc["entries"])
    assert versions[("open-hummingbird-eval README", "voc-incontext")] == "hbird-1.1"
    assert versions[("NeCo Table 2", "voc-linear")] == "neco-leopart"
    assert versions[("NeCo README", "voc-incontext")] == "hbird-unknown"
    view = lb.build_view(doc, benchmarks=["voc-incontext"])
    assert {c.version for c in view.columns} == {"hbird-1.1", "hbird-paper", "hbird-unknown"}
    for row in view.rows:
        assert all(lb.entry_version(e) == c.version for c, e in row.cells.items())
    # two standard entries of one version from different tables pair as the same protocol; across versions never
    e1 = next(e for e in doc["entries"] if e["citation"]["short"] == "NeCo Table 2" and e["benchmark"] == "voc-linear"
              and e["model"]["name"] == "dinov2_vits14_reg")
    e2 = next(e for e in doc["entries"] if e["citation"]["short"] == "NeCo README" and e["benchmark"] == "voc-linear"
              and e["model"]["name"] == "neco_dinov2r_vits14")
    rows = lb.compare_models({**doc, "entries": [e1, e2]}, "dinov2_vits14_reg", "neco_dinov2r_vits14")
    assert rows[0]["same_protocol"] and rows[0]["delta"] == pytest.approx(81.5 - 74.2)
    hb = [e for e in doc["entries"] if e["benchmark"] == "voc-incontext" and e["standard"]
          and e["model"]["name"] in ("dinov2_vits14", "neco_dinov2_vits14")]
    rows = lb.compare_models({**doc, "entries": hb}, "dinov2_vits14", "neco_dinov2_vits14")
    assert not rows[0]["same_protocol"] and (rows[0]["a_protocol"], rows[0]["b_protocol"]) == (
        "hbird-1.1", "hbird-unknown")


# ---------------------------------------------------------------------------------------------------------
# §5 Reference behaviours behind options

def test_linear_file_order_batches_are_consecutive_and_recorded(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    batches = linear.epoch_batches(10, 4, False, gen, "file-order")
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(gen.get_state(), state)                              # no draw: file order
    assert [b.tolist() for b in linear.epoch_batches(10, 4, True, gen, "file-order")] == [[0, 1, 2, 3],
                                                                                           [4, 5, 6, 7]]
    shuffled = linear.epoch_batches(10, 4, False, torch.Generator().manual_seed(0))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10)) and shuffled[0].tolist() != [0, 1, 2, 3]
    root = write_ade20k(tmp_path / "ADEChallengeData2016", {"training": [f"ADE_train_{i:08d}" for i in range(1, 9)],
                                                            "validation": ["ADE_val_00000001", "ADE_val_00000002"]})
    opts = {"input_size": 64, "train_mask_size": 16, "epochs": 2, "head_batch_size": 3, "lr": 0.1}
    legacy, default = (evaluate("pixels", benchmarks=["ade20k-linear"], data_root=root, progress=False,
                                cache_dir=tmp_path / "c", batch_order=o, **opts)[0] for o in ("file-order", "shuffled"))
    assert legacy["config"]["batch_order"] == "file-order"
    assert legacy["metrics"]["train_loss_curve"] != default["metrics"]["train_loss_curve"]
    assert "batch_order='file-order' (canonical 'shuffled')" in lb.check_config(legacy)[2]
    assert any("file order" in n for n in default["derived"]["protocol_version"]["not_reproduced"])
    assert not any("file order" in n for n in legacy["derived"]["protocol_version"]["not_reproduced"])
    assert math.isfinite(legacy["metrics"]["miou"])


def test_cli_protocol_and_pos_interp_flags(voc_root, tmp_path, capsys):
    from densebench.cli import main
    from densebench.results import read_result

    def cli(*args):
        try:
            main(list(args))
        except SystemExit as e:
            return e.code, capsys.readouterr().err
        return 0, capsys.readouterr().err

    out = tmp_path / "r.json"
    code, err = cli("run", "--model", "random:vit_small_patch16_224", "--benchmark", "voc-incontext", "--data-root",
                    str(voc_root), "--input-size", "64", "--augment-epochs", "1", "--quiet", "--protocol",
                    "hbird-1.1", "--pos-interp", "meta-offset", "--output", str(out))
    assert code == 0, err
    res = read_result(out)
    assert res["config"]["protocol"] == "hbird-1.1" and res["config"]["key_norm"] == "patch-axis"
    assert (res["model"]["pos_interp"], res["model"]["pos_interp_choice"]) == ("meta-offset", "meta-offset")
    assert "pos_interp='meta-offset' (canonical 'timm')" in lb.check_config(res)[2]
    code, err = cli("run", "--model", "pixels", "--benchmark", "voc-incontext", "--data-root", str(voc_root),
                    "--pos-interp", "bilinear", "--quiet", "--output", str(tmp_path / "x.json"))
    assert code == 2 and "--pos-interp" in err and "Traceback" not in err


def test_precision_is_applied_recorded_and_keyed(synth_root, tmp_path):
    import densebench
    from densebench.encoders import load_encoder
    from densebench.errors import ConfigError

    enc = load_encoder("random:vit_tiny_patch16_224")
    opts = {"input_size": 64, "augment_epochs": 1}
    fp32 = densebench.evaluate(enc, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                               progress=False, options=opts)[0]
    bf16 = densebench.evaluate(enc, benchmarks="voc-incontext", data_root=synth_root, cache_dir=tmp_path,
                               progress=False, options=opts, precision="bf16")[0]
    assert fp32["derived"]["precision"] == {"requested": "auto", "extraction": "fp32", "retrieval": "fp32"}
    assert bf16["derived"]["precision"] == {"requested": "bf16", "extraction": "bf16", "retrieval": "fp32"}
    # bf16 features are others: a cache miss, never the fp32 entry
    assert bf16["provenance"]["cache"]["images_forwarded"] == fp32["provenance"]["cache"]["images_forwarded"] > 0
    with pytest.raises(ConfigError, match="--precision"):
        densebench.evaluate(enc, benchmarks="voc-incontext", data_root=synth_root, precision="int8")


def test_an_explicit_low_precision_is_non_standard():
    from densebench.leaderboard.entries import precision_reasons

    assert precision_reasons({"precision": {"requested": "auto"}}) == []
    assert precision_reasons({"precision": {"requested": "fp32"}}) == []
    assert precision_reasons({}) == []
    assert precision_reasons({"precision": {"requested": "bf16"}}) == ["precision='bf16' (standard: auto or fp32)"]
