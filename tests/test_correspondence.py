"""SPair-71k correspondence (probe3d protocol): geometry, matching, pair subset, PCK, bad input.

End-to-end cases run on hand-built SPair-71k trees whose answers are known in closed form: an
identity warp (PCK 100 % with any injective features), whole-cell translations with features that
encode position (PCK equals an analytic count), visibility and threshold edge cases.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densebench.encoders.base import IMAGENET_MEAN, IMAGENET_STD, DenseEncoder
from densebench.errors import ConfigError, DataError
from densebench.features import FeatureCache
from densebench.options import non_semantic_fields
from densebench.protocols.correspondence import (
    Config,
    Geometry,
    _match_pairs,
    extract_features,
    match_keypoints,
    plan_reads,
    prepare,
    resolve_canonical,
    run,
    score,
    select_pairs,
    unit_keypoints,
    upsample_features,
)
from densebench.protocols.common import RunContext
from densebench.transforms import SquarePadView

SIDE = 224          # test images are SIDE x SIDE, the input size, so the view is a pure normalisation
GRID = SIDE // 16   # 14 cells per side for /16 encoders


# ------------------------------------------------------------------------------------------ fakes

class CodeEncoder(DenseEncoder):
    """Reads the colour code painted on each 16x16 cell (R = 8 + 17 i, G = 8 + 17 j) and returns a one-hot
    of the cell id i * 14 + j (index 196 for anything else): features that encode the source position."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.patch_size, self.embed_dim, self.name, self.fingerprint = 16, GRID * GRID + 1, "code", "code-v1"

    def _features(self, images, layer, norm):
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = F.avg_pool2d((images * std + mean) * 255, 16)
        i, j = ((rgb[:, 0] - 8) / 17).round().long(), ((rgb[:, 1] - 8) / 17).round().long()
        valid = (i >= 0) & (i < GRID) & (j >= 0) & (j < GRID) & ((rgb[:, 2] - 128).abs() < 20)
        code = torch.where(valid, i * GRID + j, torch.full_like(i, GRID * GRID))
        return F.one_hot(code, self.embed_dim).float()


class ProjectionEncoder(DenseEncoder):
    """A fixed random linear map of each patch's pixels: injective on distinct patches, not orthogonal."""

    def __init__(self, dim=48, **kw):
        super().__init__(**kw)
        self.patch_size, self.embed_dim, self.name, self.fingerprint = 16, dim, "proj", "proj-v1"
        self.register_buffer("w", torch.randn(3 * 16 * 16, dim, generator=torch.Generator().manual_seed(1)))

    def _features(self, images, layer, norm):
        b, _, h, w = images.shape
        cols = F.unfold(images, 16, stride=16).transpose(1, 2)          # (B, L, 768)
        return (cols @ self.w).view(b, h // 16, w // 16, self.embed_dim)


def code_image(shift=(0, 0)) -> np.ndarray:
    """The code image with its content moved by ``shift`` whole cells (right, down); uncovered cells white."""
    img = np.full((SIDE, SIDE, 3), 250, np.uint8)
    for i in range(GRID):
        for j in range(GRID):
            ti, tj = i + shift[1], j + shift[0]
            if ti < GRID and tj < GRID:
                img[16 * ti:16 * ti + 16, 16 * tj:16 * tj + 16] = (8 + 17 * i, 8 + 17 * j, 128)
    return img


# ------------------------------------------------------------------------------------ SPair trees

def write_spair(home, images: dict, pairs: list[dict], split="test"):
    """A minimal SPair-71k tree under ``home``: images {(cat, name): (array, kps list of [x, y] | None)},
    pairs [{src, trg, cat, vp, trg_bbox, ...extra pair-JSON fields}]; returns the pair names."""
    root = home / "SPair-71k"
    for (cat, name), (arr, kps) in images.items():
        for d in ("JPEGImages", "ImageAnnotation"):
            (root / d / cat).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "JPEGImages" / cat / f"{name}.jpg", quality=100, subsampling=0)
        (root / "ImageAnnotation" / cat / f"{name}.json").write_text(json.dumps(
            {"filename": f"{name}.jpg", "category": cat, "image_width": arr.shape[1], "image_height": arr.shape[0],
             "kps": {str(k): v for k, v in enumerate(kps)}}))
    (root / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
    names = []
    for n, p in enumerate(pairs, 1):
        name = f"{n:06d}-{p['src']}-{p['trg']}:{p['cat']}"
        h_s, w_s = images[(p["cat"], p["src"])][0].shape[:2]
        h_t, w_t = images[(p["cat"], p["trg"])][0].shape[:2]
        body = {"pair_id": n, "filename": name, "category": p["cat"], "src_imname": f"{p['src']}.jpg",
                "trg_imname": f"{p['trg']}.jpg", "src_imsize": [w_s, h_s, 3], "trg_imsize": [w_t, h_t, 3],
                "src_bndbox": [0, 0, w_s, h_s], "trg_bndbox": p.get("trg_bbox", [0, 0, w_t, h_t]),
                "viewpoint_variation": p.get("vp", 0)}
        for k in p.get("drop", ()):
            body.pop(k)
        (root / "PairAnnotation" / split / f"{name}.json").write_text(json.dumps(body))
        names.append(name)
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "Layout" / "large" / f"{split}.txt").write_text("\r\n".join(names) + "\r\n")
    return names


def cfg(**kw) -> Config:
    return Config(**{"input_size": SIDE, "pairs_per_category": None, **kw})


# ----------------------------------------------------------------------------------- pure pieces

def test_config_thresholds_are_parsed_from_cli_strings_and_checked():
    assert Config().thresholds == (0.10,)
    assert Config(thresholds=("0.05", "0.10", "0.15")).thresholds == (0.05, 0.10, 0.15)
    assert Config(thresholds="0.15,0.05").thresholds == (0.15, 0.05)
    for bad in ("abc", "0", "1.5", ""):
        with pytest.raises(ConfigError):
            Config(thresholds=bad)
    for field, value in (("pck_norm", "box"), ("split", "train"), ("patch_padding", "reflect"), ("upsample", 0),
                         ("upsample", 17), ("pairs_per_category", 0), ("dataset", "voc"), ("square_fill", 300),
                         ("square_fill", -1), ("input_size", 0), ("save_matches_count", -1), ("batch_size", 0),
                         ("pair_batch", -1), ("num_workers", -1), ("grid_budget_mb", 0)):
        with pytest.raises(ConfigError) as e:
            Config(**{field: value})
        assert str(value) in str(e.value) and "--" + field.replace("_", "-") in str(e.value)
    with pytest.raises(ConfigError, match="--pair-list"):
        Config(pair_list="/no/such/pairs.txt")


def test_declared_options_non_semantic_fields_and_canonical_config():
    assert non_semantic_fields(Config) == {"batch_size", "num_workers", "pair_batch", "save_matches",
                                           "save_matches_count", "grid_budget_mb"}
    assert "dataset" not in {o.name for o in Config.options()}
    assert {o.name: o.accepts for o in Config.options()}["pairs_per_category"] == ">= 1 or all"
    model = {"patch_size": 14}
    assert resolve_canonical({"pairs_per_category": 200, "pair_list": None}, model)["pairs_per_category"] == 200
    assert resolve_canonical({"pairs_per_category": 200, "pair_list": "p.txt"}, model)["pairs_per_category"] is None


def test_published_defaults():
    c = Config()
    assert (c.split, c.input_size, c.pairs_per_category, c.seed, c.pck_norm) == ("test", 800, 200, 20, "bbox")
    assert (c.feature_norm, c.cell_centre, c.mutual, c.upsample, c.square_fill) == (False, False, False, 1, 255)


def _fake_pairs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    cats = ["cat", "dog", "bus"]
    return [{"name": f"{i:06d}-a{i}-b{i}:{cats[i % 3]}", "category": cats[i % 3],
             "viewpoint_variation": int(rng.integers(0, 3))} for i in range(n)]


def test_pair_subset_is_order_independent_and_follows_the_seeded_rule():
    pairs = _fake_pairs()
    sub = select_pairs(pairs, 20, seed=20)
    shuffled = pairs[:]
    random.Random(5).shuffle(shuffled)
    sub2 = select_pairs(shuffled, 20, seed=20)
    names = {b: [pairs[i]["name"] for i in v] for b, v in sub.items()}
    assert names == {b: [shuffled[i]["name"] for i in v] for b, v in sub2.items()}
    # independent re-statement of the rule: per group, sorted names, random.Random(20).shuffle, first 20
    for bucket in ("all", 0, 1, 2):
        for cat in ("cat", "dog", "bus"):
            group = sorted(p["name"] for p in pairs if p["category"] == cat
                           and (bucket == "all" or p["viewpoint_variation"] == bucket))
            random.Random(20).shuffle(group)
            got = [n for n in names[bucket] if n.endswith(":" + cat)]
            assert sorted(got) == sorted(group[:20])
    assert select_pairs(pairs, 20, seed=21)["all"] != sub["all"]
    full = select_pairs(pairs, None, seed=20)
    assert len(full["all"]) == 300 and sum(len(full[b]) for b in (0, 1, 2)) == 300


def test_geometry_corner_and_padding_aware_centre():
    g = Geometry(input_size=800, padded_size=812, offset=6, grid=58)
    idx = torch.tensor([0, 57, 58 * 3 + 2])
    np.testing.assert_allclose(g.cell_location(idx, False).numpy(), [[0, 0], [57 / 58, 0], [2 / 58, 3 / 58]])
    # centre of cell c in the 800 image: 14 c + 7 - 6 pixels
    np.testing.assert_allclose(g.cell_location(idx, True).numpy(),
                               [[1 / 800, 1 / 800], [(14 * 57 + 1) / 800, 1 / 800], [29 / 800, 43 / 800]])


def test_unit_keypoints_and_probe3d_integer_truncation():
    xy = np.array([[10.7, 99.2], [np.nan, np.nan]])
    np.testing.assert_allclose(unit_keypoints(xy, 300, 800), [[10.7 / 300, 99.2 / 300], [0, 0]])
    # probe3d: int(10.7) = 10 -> 10 * 800 / 300 = 26.67 -> 26 -> 26 / 800
    np.testing.assert_allclose(unit_keypoints(xy, 300, 800, integer=True)[0], [26 / 800, 264 / 800])


def _bilinear_align_corners(feat: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Independent float64 bilinear sample of an (S, S, D) grid at unit coords, corners on cell centres."""
    s = feat.shape[0]
    gx, gy = u[0] * (s - 1), u[1] * (s - 1)
    x0, y0 = int(np.floor(gx)), int(np.floor(gy))
    out = np.zeros(feat.shape[-1])
    for yy, wy in ((y0, 1 - (gy - y0)), (y0 + 1, gy - y0)):
        for xx, wx in ((x0, 1 - (gx - x0)), (x0 + 1, gx - x0)):
            if 0 <= xx < s and 0 <= yy < s:
                out += wx * wy * feat[yy, xx]
    return out


@pytest.mark.parametrize("cell_centre", [False, True])
def test_matching_equals_brute_force(cell_centre):
    gen = torch.Generator().manual_seed(0)
    b, s, d, k = 3, 7, 16, 9
    src = F.normalize(torch.randn(b, s, s, d, generator=gen), dim=-1)
    trg = F.normalize(torch.randn(b, s, s, d, generator=gen), dim=-1)
    uv = torch.rand(b, k, 2, generator=gen, dtype=torch.float64)
    geo = Geometry(112, 112, 0, s)
    pred, ok = match_keypoints(src, trg, uv, geo, cell_centre=cell_centre, mutual=True)
    for bi in range(b):
        fs, ft = src[bi].double().numpy(), trg[bi].double().numpy()
        for ki in range(k):
            desc = _bilinear_align_corners(fs, uv[bi, ki].numpy())
            best = max((float(desc @ ft[r, c]), r, c) for r in range(s) for c in range(s))
            _, r, c = best
            expect = np.array([c + 0.5, r + 0.5]) / s if cell_centre else np.array([c, r]) / s
            np.testing.assert_allclose(pred[bi, ki].numpy(), expect, atol=1e-12)
            back = max((float(ft[r, c] @ fs[rr, cc]), rr, cc) for rr in range(s) for cc in range(s))
            g = uv[bi, ki].numpy() * (s - 1)
            assert bool(ok[bi, ki]) == (abs(back[2] - g[0]) < 1 and abs(back[1] - g[1]) < 1)


def test_upsampling_keeps_unit_norm_and_matches_interpolate():
    f = F.normalize(torch.randn(1, 4, 4, 8), dim=-1)
    up = upsample_features(f, 3)
    assert up.shape == (1, 12, 12, 8)
    torch.testing.assert_close(up.norm(dim=-1), torch.ones(1, 12, 12))
    ref = F.interpolate(f.permute(0, 3, 1, 2), size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, F.normalize(ref, dim=1).permute(0, 2, 3, 1))


def test_square_pad_view_pads_bottom_right_with_white_then_centres_for_the_patch():
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[..., 0] = 100
    view = SquarePadView(28, patch=16, fill=255)
    img, mask = view(0, Image.fromarray(arr))
    assert img.shape == (3, 32, 32) and view.offset == 2 and mask.shape == (1, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.all(img[:, :2] == 0) and torch.all(img[:, -2:] == 0) and torch.all(img[:, :, :2] == 0)
    inner = img[:, 2:30, 2:30] * std + mean
    # 30x20 image -> 30x30 square (rows 20.. white) -> 28x28: top rows red-ish, bottom rows white
    torch.testing.assert_close(inner[:, 0, 0] * 255, torch.tensor([100.0, 0, 0]), atol=1, rtol=0)
    torch.testing.assert_close(inner[:, -1, 0] * 255, torch.tensor([255.0, 255, 255]), atol=1, rtol=0)
    square = Image.new("RGB", (30, 30), (255, 255, 255))
    square.paste(Image.fromarray(arr), (0, 0))
    direct = torch.from_numpy(np.array(square.resize((28, 28), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    torch.testing.assert_close(inner * 255, direct.float(), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------- end to end

def _aligned_keypoints():
    """Points whose bilinear sample is exactly one cell: x = c * SIDE / (GRID - 1), c in 0..12."""
    step = SIDE / (GRID - 1)
    return [[c * step, ((5 * c) % 13) * step] for c in range(13)]


@pytest.mark.parametrize("encoder", ["projection", "random-vit"])
@pytest.mark.parametrize("cell_centre", [False, True])
def test_identity_warp_scores_100_with_any_injective_features(tmp_path, encoder, cell_centre):
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    kps = _aligned_keypoints()
    images = {("cat", "a"): (noise, kps), ("cat", "b"): (noise, kps)}
    write_spair(tmp_path, images, [{"src": "a", "trg": "b", "cat": "cat", "vp": 1}])
    if encoder == "projection":
        enc = ProjectionEncoder()
    else:
        from densebench.encoders import load_encoder
        enc = load_encoder("random:vit_tiny_patch16_224")
    res = run(enc, tmp_path, cfg(cell_centre=cell_centre, thresholds="0.1"), cache=None, progress=False)
    m = res["metrics"]
    assert m["pck@0.10"] == 100.0 and m["pck@0.10_vp1"] == 100.0 and m["per_category_pck@0.10"] == {"cat": 100.0}
    assert res["provenance"]["dataset"]["visible_keypoints"] == {"cat": 13}
    assert res["config"]["feature_norm"] is False


def test_symmetric_patch_padding_and_padding_aware_cell_centre(tmp_path):
    """Input 200 with /16 patches: the view pads to 208 (offset 4, 13x13 grid). With keypoints on the
    13-cell sampling lattice (x = c * 224 / 12) an identity warp puts the centre prediction within 0.02 of
    the truth, while the published corner, which ignores the offset, is off by up to c / 156."""
    noise = np.random.default_rng(1).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    kps = [[c * SIDE / 12, 0.0] for c in range(12)]
    write_spair(tmp_path, {("cat", "a"): (noise, kps), ("cat", "b"): (noise, kps)},
                [{"src": "a", "trg": "b", "cat": "cat"}])
    centre = run(ProjectionEncoder(), tmp_path, cfg(input_size=200, cell_centre=True, thresholds="0.05"),
                 cache=None, progress=False)
    assert centre["derived"]["geometry"] == {"input_size": 200, "padded_size": 208, "offset": 4, "grid": 13}
    assert centre["metrics"]["pck@0.05"] == 100.0
    corner = run(ProjectionEncoder(), tmp_path, cfg(input_size=200, thresholds="0.05"), cache=None, progress=False)
    expected = 100 * np.mean([c / 156 < 0.05 for c in range(12)])      # |c/13 - c/12| per keypoint
    assert corner["metrics"]["pck@0.05"] == pytest.approx(expected)


def _translation_case(tmp_path, n_kps=40, seed=0):
    """Two categories; the source is the code image, targets are it moved by whole cells. Returns the
    per-pair data needed to state the expected PCK in closed form."""
    rng = np.random.default_rng(seed)
    shifts = {"t1": (2, 1), "t2": (1, 3), "t3": (0, 2)}
    images, pairs, truth = {}, [], []
    for cat, targets in (("cat", ("t1", "t2")), ("dog", ("t3",))):
        pts = []
        while len(pts) < n_kps:   # keep the bilinear argmax unambiguous: no point near a half-cell
            x, y = rng.uniform(0, SIDE - 1 - 16 * 3, 2)
            g = np.array([x, y]) / SIDE * (GRID - 1)
            if np.all(np.abs(g - np.floor(g) - 0.5) > 0.05):
                pts.append([float(x), float(y)])
        src_kps = [list(p) for p in pts]
        src_kps[0] = None                       # invisible in the source
        images[(cat, "src")] = (code_image(), src_kps)
        for t in targets:
            dx, dy = shifts[t]
            trg_kps = [[x + 16 * dx, y + 16 * dy] for x, y in pts]
            trg_kps[1] = None                   # invisible in the target
            trg_kps[2] = [SIDE + 5.0, 10.0]     # outside the image: must become invisible, not scored
            images[(cat, t)] = (code_image((dx, dy)), trg_kps)
            bbox = [8, 20, 8 + 150, 20 + 120]
            vp = 0 if t != "t2" else 2
            pairs.append({"src": "src", "trg": t, "cat": cat, "vp": vp, "trg_bbox": bbox})
            truth.append((cat, vp, np.array(pts[3:]), (dx, dy), bbox))
    write_spair(tmp_path, images, pairs)
    return truth


def _expected_pck(truth, alpha, cell_centre, pck_norm):
    """Closed form: the source point samples cell round(u * 13) most strongly; the target cell holding
    that content is shifted by (dx, dy); the prediction is that cell's corner (or centre) / 14."""
    per_cat, per_cat_vp = {}, {}
    for cat, vp, pts, (dx, dy), bbox in truth:
        cell = np.round(pts / SIDE * (GRID - 1)) + [dx, dy]
        pred = (cell + (0.5 if cell_centre else 0.0)) / GRID
        true = (pts + 16 * np.array([dx, dy])) / SIDE
        scale = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) / SIDE if pck_norm == "bbox" else 1.0
        ok = np.linalg.norm(pred - true, axis=1) / scale < alpha
        per_cat.setdefault(cat, []).extend(ok)
        per_cat_vp.setdefault(vp, {}).setdefault(cat, []).extend(ok)
    def mean(d):
        return 100 * float(np.mean([np.mean(v) for v in d.values()]))

    return (mean(per_cat), {vp: mean(d) for vp, d in per_cat_vp.items()},
            {c: 100 * np.mean(v) for c, v in per_cat.items()})


@pytest.mark.parametrize("cell_centre,pck_norm", [(False, "bbox"), (True, "bbox"), (False, "image")])
def test_known_translation_with_position_features_matches_the_analytic_pck(tmp_path, cell_centre, pck_norm):
    truth = _translation_case(tmp_path)
    alphas = (0.05, 0.10, 0.15)
    enc = CodeEncoder()
    res = run(enc, tmp_path, cfg(cell_centre=cell_centre, pck_norm=pck_norm, thresholds=alphas), cache=None,
              progress=False)
    m = res["metrics"]
    informative = 0
    for a in alphas:
        overall, by_vp, per_cat = _expected_pck(truth, a, cell_centre, pck_norm)
        name = f"pck@{a:.2f}"
        assert m[name] == pytest.approx(overall, abs=1e-9)
        assert m[f"{name}_vp0"] == pytest.approx(by_vp[0], abs=1e-9)
        assert m[f"{name}_vp2"] == pytest.approx(by_vp[2], abs=1e-9)
        assert f"{name}_vp1" not in m           # no pair in bucket 1: no number, not a zero
        assert m[f"per_category_{name}"] == pytest.approx(per_cat, abs=1e-9)
        informative += 0 < overall < 100
    assert informative >= 1, "the case must discriminate: some thresholds strictly between 0 and 100"
    ds = res["provenance"]["dataset"]
    # 40 slots, minus one invisible in the source, one invisible in the target, one outside the target image
    assert ds["visible_keypoints"] == {"cat": 2 * 37, "dog": 37}
    assert ds["keypoints_outside_image"] >= 3
    assert enc.images_forwarded == 5            # 2 sources + 3 targets, each once


def test_corner_and_centre_differ_and_centre_is_closer_on_this_case(tmp_path):
    truth = _translation_case(tmp_path, seed=3)
    corner = _expected_pck(truth, 0.05, False, "bbox")[0]
    centre = _expected_pck(truth, 0.05, True, "bbox")[0]
    assert centre > corner   # a sanity check of the closed form itself, not of the code under test


def test_cache_reuse_across_matching_options_and_mutual_upsample_run(tmp_path):
    _translation_case(tmp_path)
    enc, cache = CodeEncoder(), FeatureCache(tmp_path / "cache")
    first = run(enc, tmp_path, cfg(), cache=cache, progress=False)
    assert enc.images_forwarded == 5
    for kw in ({"cell_centre": True}, {"mutual": True}, {"upsample": 2}, {"thresholds": "0.05,0.15"}):
        res = run(enc, tmp_path, cfg(**kw), cache=cache, progress=False)
        assert res["provenance"]["cache"]["images_forwarded"] == 0
    assert enc.images_forwarded == 5, "matching options must not re-run the encoder"
    again = run(enc, tmp_path, cfg(), cache=cache, progress=False)
    assert again["metrics"] == first["metrics"]
    mutual = run(enc, tmp_path, cfg(mutual=True), cache=cache, progress=False)["metrics"]
    # one-hot position codes: every match is mutual except where the target cell's content is not in the
    # source's 2x2 support, which cannot happen for translated content
    assert mutual["mutual_match_rate"] == 100.0 and mutual["pck@0.10"] == first["metrics"]["pck@0.10"]


def test_subset_per_category_and_bucket_is_recorded(tmp_path):
    truth = _translation_case(tmp_path)
    assert len(truth) == 3
    res = run(CodeEncoder(), tmp_path, cfg(pairs_per_category=1), cache=None, progress=False)
    sel = res["derived"]["pair_selection"]
    assert sel["counts"] == {"all": 2, "0": 2, "2": 1} and sel["seed"] == 20 and len(sel["pairs_hash"]) == 16
    assert res["config"]["pairs_per_category"] == 1
    assert "pair_selection" not in res["config"] and res["provenance"]["seeds"] == {"pair_selection": 20}
    # 0 = automatic: the config keeps what was asked, derived records the batch used
    assert res["config"]["pair_batch"] == 0 and res["derived"]["pair_batch"] >= 1
    assert res["derived"]["feature_grid"] == GRID and res["derived"]["layer"] == -1


def test_pair_list_restricts_and_save_matches_writes_pictures(tmp_path):
    _translation_case(tmp_path)
    names = (tmp_path / "SPair-71k" / "Layout" / "large" / "test.txt").read_text().split()
    lst = tmp_path / "pairs.txt"
    lst.write_text(names[2] + "\n")
    res = run(CodeEncoder(), tmp_path, cfg(pair_list=str(lst), save_matches=str(tmp_path / "pics"),
                                           pairs_per_category=5), cache=None, progress=False)
    assert res["provenance"]["dataset"]["n_pairs_evaluated"] == 1
    assert res["config"]["pairs_per_category"] is None      # an explicit list is not subsampled
    assert res["derived"]["pair_selection"]["rule"] == "explicit --pair-list"
    assert set(res["metrics"]["per_category_pck@0.10"]) == {"dog"}
    arts = res["provenance"]["artifacts"]
    assert len(arts) == 1 and Image.open(arts[0]).size[1] > 200
    assert arts[0].endswith(names[2].replace(":", "_") + ".png")


# --------------------------------------------------------- reading each grid once per category

def _pair_rows(seed=0, cats=("cat", "dog", "bus"), n_pairs=60, n_images=9):
    """(category, src row, trg row) with repeated images, flipped (a->b, b->a), self (a->a) and duplicate pairs."""
    rng = np.random.default_rng(seed)
    out = []
    for c, cat in enumerate(cats):
        base = c * n_images
        for _ in range(n_pairs // len(cats)):
            a, b = (int(v) for v in base + rng.integers(0, n_images, 2))
            out.append((cat, a, b))
        out += [(cat, base, base + 1), (cat, base + 1, base), (cat, base, base), (cat, base, base + 1)]
    random.Random(seed).shuffle(out)
    return out


def _simulate(steps, pair_rows):
    """Replay a plan: the grids read (a block not held by the previous step is read) and the most held."""
    held, reads, peak = set(), [], 0
    for step in steps:
        rows = [r for b in step.blocks for r in b]
        assert len(set(rows)) == len(rows), "a row sits in one block of a step"
        assert {pair_rows[p][0] for p in step.pairs} == {step.category}
        for p in step.pairs:   # a step holds both grids of every pair it matches
            assert {pair_rows[p][1], pair_rows[p][2]} <= set(rows)
        reads += [r for b in step.blocks if b not in held for r in b]
        held = set(step.blocks)
        peak = max(peak, len(rows))
    return reads, peak


def test_plan_reads_each_image_once_per_category_and_blocks_over_the_budget():
    pair_rows = _pair_rows()
    distinct = {(cat, r) for cat, s, t in pair_rows for r in (s, t)}
    steps = plan_reads(pair_rows, max_images=100)
    assert [st.category for st in steps] == ["bus", "cat", "dog"] and not any(st.blocked for st in steps)
    covered = [p for st in steps for p in st.pairs]
    assert sorted(covered) == list(range(len(pair_rows)))
    for st in steps:   # a category's pairs keep their given order
        assert list(st.pairs) == [p for p, (c, _, _) in enumerate(pair_rows) if c == st.category]
    reads, peak = _simulate(steps, pair_rows)
    assert sorted(reads) == sorted(r for _, r in distinct) and peak == 9
    for budget in (2, 3, 5, 8):
        steps = plan_reads(pair_rows, max_images=budget)
        covered = [p for st in steps for p in st.pairs]
        assert sorted(covered) == list(range(len(pair_rows))), "every pair matched exactly once"
        reads, peak = _simulate(steps, pair_rows)
        assert peak <= budget and all(st.blocked for st in steps)
        assert set(reads) == {r for _, r in distinct} and len(reads) > len(distinct)


def test_a_blocked_category_reads_each_block_once_per_earlier_block_it_pairs_with():
    """8 images, every pair, room for 4: blocks of 2 images, {0,1} {2,3} {4,5} {6,7}. Worked by hand: the steps
    are the 10 block pairs (a, b), a <= b, in order; a step reads the blocks it does not already hold: block 0
    once, block 1 twice (with 0, then with itself), block 2 three times, block 3 three times ((3, 3) follows (2, 3),
    which holds it) = 9 block reads = 18 grid reads, at most 4 grids held."""
    pair_rows = [("cat", i, j) for i in range(8) for j in range(8) if i != j]
    steps = plan_reads(pair_rows, max_images=4)
    assert len(steps) == 10 and all(st.blocked for st in steps)
    assert sorted(p for st in steps for p in st.pairs) == list(range(len(pair_rows)))
    reads, peak = _simulate(steps, pair_rows)
    assert len(reads) == 18 and peak == 4
    # a category that fits is read once even when another one does not
    mixed = [("big", r, (r + 1) % 6) for r in range(6)] + [("small", 10, 11), ("small", 11, 10)]
    steps = plan_reads(mixed, max_images=4)
    assert [(st.category, st.blocked) for st in steps if st.category == "small"] == [("small", False)]
    assert [st.blocks for st in steps if st.category == "small"] == [((10, 11),)]


class CountingGrids:
    """The cached feature array, counting which rows are read (fancy indexing with a list of rows)."""

    def __init__(self, array):
        self.array, self.rows = array, []

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, key):
        if isinstance(key, list):
            self.rows += key
        return self.array[key]


def _hand_tree(tmp_path):
    """Three categories of non-square noise images; pairs share images, come flipped (a->b and b->a), as
    an image against itself and twice under two pair ids; all three viewpoint buckets."""
    rng = np.random.default_rng(7)
    images, pairs = {}, []
    for c, (cat, n_img, n_kps) in enumerate((("cat", 5, 12), ("dog", 4, 9), ("bus", 3, 15))):
        for i in range(n_img):
            h, w = SIDE - 16 * ((i + c) % 3), SIDE - 24 * (i % 2)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            kps = [None if rng.uniform() < 0.15 else [float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))]
                   for _ in range(n_kps)]
            images[(cat, f"{cat}{i}")] = (arr, kps)
        names = [f"{cat}{i}" for i in range(n_img)]
        links = [(a, b) for a in range(n_img) for b in range(n_img) if a != b][: 3 * n_img]
        links += [(0, 1), (1, 0), (0, 0), (0, 1)]
        for k, (a, b) in enumerate(links):
            pairs.append({"src": names[a], "trg": names[b], "cat": cat, "vp": k % 3,
                          "trg_bbox": [4, 6, 4 + 90 + 7 * (k % 5), 6 + 80 + 5 * (k % 4)]})
    write_spair(tmp_path, images, pairs)
    return tmp_path


def _per_pair_reference(config, prep, feats):
    """The per-pair recipe: both grids read for every pair, one pair per batch, float64 PCK of my own."""
    s = feats.shape[1] * config.upsample
    geo = Geometry(config.input_size, prep.view.padded_size, prep.view.offset, s)
    row = {id_: r for r, id_ in enumerate(prep.images.ids)}
    preds, correct = {}, {}
    for i in prep.used:
        p = prep.pairs[i]
        src, trg = (upsample_features(torch.from_numpy(np.asarray(feats[[row[p[k]]]])).float(), config.upsample)
                    for k in ("src_id", "trg_id"))
        uv = unit_keypoints(p["src_kps"], max(p["src_size"]), config.input_size, config.integer_keypoints)
        pred, ok = match_keypoints(src, trg, torch.from_numpy(uv)[None], geo, cell_centre=config.cell_centre,
                                   mutual=config.mutual)
        preds[i] = pred[0].numpy()
        side = float(max(p["trg_size"]))
        true = unit_keypoints(p["trg_kps"], side, config.input_size, config.integer_keypoints)
        x1, y1, x2, y2 = p["trg_bbox"]
        scale = max(x2 - x1, y2 - y1) / side if config.pck_norm == "bbox" else 1.0
        err = np.sqrt(((preds[i] - true) ** 2).sum(axis=1)) / scale
        vis = p["src_vis"] & p["trg_vis"]
        correct[i] = {a: ((err < a) & ok[0].numpy())[vis] for a in config.thresholds}
    metrics = {}
    for bucket, suffix in (("all", ""), (0, "_vp0"), (1, "_vp1"), (2, "_vp2")):
        for a in config.thresholds:
            pooled = {}
            for i in prep.subsets.get(bucket, []):
                pooled.setdefault(prep.pairs[i]["category"], []).extend(correct[i][a])
            if pooled:
                metrics[f"pck@{a:.2f}{suffix}"] = float(np.mean([100 * np.mean(v) for v in pooled.values()]))
    return preds, metrics


CASES = {
    "synthetic-pixels": ("synthetic", "pixels", {"input_size": 160}),
    "synthetic-vit-upsample-mutual": ("synthetic", "random:vit_tiny_patch16_224",
                                      {"input_size": 160, "upsample": 2, "mutual": True}),
    "hand-projection": ("hand", "projection", {"pairs_per_category": 4, "thresholds": "0.05,0.1,0.2"}),
    "hand-projection-options": ("hand", "projection", {"cell_centre": True, "upsample": 3, "mutual": True,
                                                       "integer_keypoints": True, "pck_norm": "image",
                                                       "pair_batch": 3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_category_scoring_equals_the_per_pair_recipe_and_reads_each_grid_once(case, synth_root, tmp_path):
    data, model, options = CASES[case]
    root = synth_root if data == "synthetic" else _hand_tree(tmp_path)
    if model == "projection":
        enc = ProjectionEncoder()
    else:
        from densebench.encoders import load_encoder
        enc = load_encoder(model)
    ctx = RunContext(encoder=enc, data_root=root, config=cfg(**options, num_workers=0),
                     device="cpu", cache=None, progress=False, benchmark="spair-correspondence")
    prep = prepare(ctx)
    feats = extract_features(ctx, prep)
    results = {}
    ref_preds, ref_metrics = _per_pair_reference(ctx.config, prep, feats)   # independent of the read plan
    for budget in (4096.0, 1e-6):     # everything held / two grids at a time (image blocks of one)
        ctx.config = dataclasses.replace(ctx.config, grid_budget_mb=budget)
        counted = CountingGrids(feats)
        outcome = score(ctx, prep, counted)
        results[budget] = outcome
        pairs = [prep.pairs[i] for i in prep.used]
        distinct = {(p["category"], p[k]) for p in pairs for k in ("src_id", "trg_id")}
        d = outcome.derived
        assert d["pairs"] == len(pairs) and d["grid_reads"] == len(counted.rows)
        assert d["grid_read_bytes"] == len(counted.rows) * feats[0].nbytes
        if budget == 4096.0:
            assert sorted(counted.rows) == list(range(len(prep.images.ids)))    # every image read exactly once
            assert d["grid_reads"] == len(distinct) < 2 * len(pairs) and d["grid_blocked_categories"] == 0
        else:
            assert d["grid_reads"] > len(distinct) and d["grid_blocked_categories"] >= 1
        s = feats.shape[1] * ctx.config.upsample
        geo = Geometry(ctx.config.input_size, prep.view.padded_size, prep.view.offset, s)
        matched = _match_pairs(ctx, prep, feats, geo, d["pair_batch"])   # the batches score used
        for i in prep.used:   # bit-identical predictions
            assert np.array_equal(matched.preds[i], ref_preds[i]), prep.pairs[i]["name"]
        assert set(ref_metrics) == {k for k in outcome.metrics if k.startswith("pck@")}
        for k, v in ref_metrics.items():
            assert outcome.metrics[k] == pytest.approx(v, abs=1e-9), k
    assert results[4096.0].metrics == results[1e-6].metrics, "the read plan never changes a bit of a metric"
    assert 0 < results[4096.0].metrics["pck@0.10"] < 100, "the case must discriminate"
    if data == "hand":
        assert any(p["src_id"] == p["trg_id"] for p in pairs), "the case has a pair of an image with itself"


# -------------------------------------------------------------------------------------- bad input

def test_missing_pair_field_is_a_data_error_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    images = {("cat", "a"): (noise, _aligned_keypoints()), ("cat", "b"): (noise, _aligned_keypoints())}
    write_spair(tmp_path, images, [{"src": "a", "trg": "b", "cat": "cat", "drop": ["trg_bndbox"]}])
    with pytest.raises(DataError) as e:
        run(ProjectionEncoder(), tmp_path, cfg(), cache=None, progress=False)
    assert "trg_bndbox" in str(e.value) and ".json" in str(e.value)


def test_image_annotation_without_kps_is_a_data_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    images = {("cat", "a"): (noise, _aligned_keypoints()), ("cat", "b"): (noise, _aligned_keypoints())}
    write_spair(tmp_path, images, [{"src": "a", "trg": "b", "cat": "cat"}])
    ann = tmp_path / "SPair-71k" / "ImageAnnotation" / "cat" / "b.json"
    ann.write_text(json.dumps({"filename": "b.jpg", "category": "cat"}))
    with pytest.raises(DataError) as e:
        run(ProjectionEncoder(), tmp_path, cfg(), cache=None, progress=False)
    assert "kps" in str(e.value) and "b.json" in str(e.value)


def test_empty_bbox_is_a_data_error_and_image_norm_still_works(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    images = {("cat", "a"): (noise, _aligned_keypoints()), ("cat", "b"): (noise, _aligned_keypoints())}
    write_spair(tmp_path, images, [{"src": "a", "trg": "b", "cat": "cat", "trg_bbox": [5, 5, 5, 5]}])
    with pytest.raises(DataError, match="bounding box"):
        run(ProjectionEncoder(), tmp_path, cfg(), cache=None, progress=False)
    res = run(ProjectionEncoder(), tmp_path, cfg(pck_norm="image"), cache=None, progress=False)
    assert res["metrics"]["pck@0.10"] == 100.0


def test_no_visible_keypoint_and_indivisible_input_are_clear_errors(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    images = {("cat", "a"): (noise, [[10.0, 10.0], None]), ("cat", "b"): (noise, [None, [10.0, 10.0]])}
    write_spair(tmp_path, images, [{"src": "a", "trg": "b", "cat": "cat"}])
    with pytest.raises(DataError, match="visible"):
        run(ProjectionEncoder(), tmp_path, cfg(), cache=None, progress=False)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        run(ProjectionEncoder(), tmp_path, cfg(input_size=200, patch_padding="none"), cache=None, progress=False)


# ---------------------------------------------------------------------------- registry / CLI path

def test_benchmark_runs_through_the_api_on_the_synthetic_suite(synth_root, tmp_path):
    from densebench import get_benchmark
    from densebench.api import evaluate
    from densebench.results import read_result

    bench = get_benchmark("spair-correspondence")
    assert bench.main_metric == "pck@0.10" and bench.dataset.name == "spair"
    out = tmp_path / "r.json"
    [res] = evaluate("pixels", benchmarks="spair-correspondence", data_root=synth_root, output=out,
                     cache_dir=tmp_path / "cache", progress=False,
                     options={"input_size": "160", "thresholds": "0.05,0.10", "pairs_per_category": "all",
                              "cell_centre": "true"})
    stored = read_result(out)
    m = stored["metrics"]
    assert set(m) >= {"pck@0.05", "pck@0.10", "per_category_pck@0.10"} and 0 <= m["pck@0.10"] <= 100
    assert m["pck@0.05"] <= m["pck@0.10"]
    assert stored["config"]["cell_centre"] is True and stored["config"]["thresholds"] == [0.05, 0.10]
    assert stored["provenance"]["dataset"]["synthetic"] is True
    assert res["metrics"] == m
