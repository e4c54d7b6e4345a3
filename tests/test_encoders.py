"""Encoder loaders: prefix stripping, layer/norm, weight conversion, strict loading, fingerprints, registry,
plugins, NeCo checkpoints, hf models and the pixels descriptor.

Models are tiny timm ViTs (2 blocks, 2x2 or 2x3 patch grids) with random weights; every expected value is
computed independently of the code under test (timm's full token sequence, blocks run by hand, inverse key
mappings written here, CIE Lab reference colours).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from densebench.encoders import NECO_FORMAT, REGISTRY, list_models, load_encoder
from densebench.encoders.convert import fingerprint_state_dict
from densebench.encoders.pixels import rgb_to_lab
from densebench.errors import ConfigError, ModelError

S14 = {"depth": 2, "img_size": 28}                       # /14: 2x2 native grid
G14 = {"depth": 2, "img_size": 28, "embed_dim": 48, "num_heads": 2}   # SwiGLU giant layout, shrunk
S16 = {"depth": 2, "img_size": 32}                       # /16: 2x2 native grid


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _images(h: int = 28, w: int = 42, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _feats(enc, x, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return enc(x, **kw)


def _tokens_by_hand(vit, x):
    """Run a timm ViT block by block (not via forward_intermediates): every block's raw output."""
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(t)
    return outs


# --- shapes, prefix tokens, layer and norm ------------------------------------------------------------------

@pytest.mark.parametrize("arch,n_prefix", [("vit_small_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2", 5)])
def test_prefix_tokens_stripped_against_full_sequence(arch, n_prefix):
    enc = load_encoder(f"random:{arch}", model_kwargs=S14)
    x = _images(28, 42)
    f = _feats(enc, x)
    assert f.shape == (2, 2, 3, 384)
    with torch.inference_mode():
        full = enc.model.forward_features(x)            # (B, prefix + 6, C) after the final norm
    assert full.shape[1] == n_prefix + 6
    assert enc.describe()["num_prefix_tokens"] == n_prefix
    torch.testing.assert_close(f, full[:, n_prefix:].reshape(2, 2, 3, 384), rtol=0, atol=0)
    # row-major patch order: feature (i, j) is token n_prefix + i * W/p + j
    torch.testing.assert_close(f[1, 1, 2], full[1, n_prefix + 5], rtol=0, atol=0)


def test_non_multiple_input_size_is_config_error():
    enc = load_encoder("random:vit_small_patch14_dinov2", model_kwargs=S14)
    with pytest.raises(ConfigError, match="not a multiple of the patch size 14"):
        enc(_images(30, 28))
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 28, 28))


def test_layer_and_norm_match_blocks_run_by_hand():
    enc = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs={**S14, "depth": 3})
    vit = enc.model
    x = _images(28, 28)
    with torch.inference_mode():
        blocks = _tokens_by_hand(vit, x)
        for layer, idx in [(-1, 2), (-2, 1), (0, 0), (1, 1)]:
            raw = blocks[idx][:, 5:].reshape(2, 2, 2, -1)
            torch.testing.assert_close(enc(x, layer=layer, norm=False), raw)
            expected = vit.norm(blocks[idx])[:, 5:].reshape(2, 2, 2, -1)
            torch.testing.assert_close(enc(x, layer=layer, norm=True), expected)
    # instance defaults are used when a call does not override them
    enc2 = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs={**S14, "depth": 3}, layer=0, norm=False)
    torch.testing.assert_close(_feats(enc2, x), _feats(enc, x, layer=0, norm=False), rtol=0, atol=0)
    assert enc2.feature_key() != enc.feature_key()
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        enc(x, layer=3)
    with pytest.raises(ConfigError, match="out of range"):
        load_encoder("random:vit_small_patch14_dinov2", model_kwargs=S14, layer=-3)


def test_images_forwarded_counts_batches():
    enc = load_encoder("random:vit_small_patch16_224", model_kwargs=S16)
    _feats(enc, _images(32, 32, b=3))
    _feats(enc, _images(32, 48, b=2))
    assert enc.images_forwarded == 5


def test_dynamic_sizes_resample_position_embeddings():
    enc = load_encoder("random:vit_small_patch16_224", model_kwargs=S16)
    assert enc.native_size == 32
    for h, w in [(32, 32), (48, 64), (16, 80)]:
        assert _feats(enc, _images(h, w, b=1)).shape == (1, h // 16, w // 16, 384)


def test_meta_offset_interpolation():
    x = _images(42, 56, b=1)
    timm_enc = load_encoder("random:vit_small_patch14_dinov2", model_kwargs=S14)
    meta_enc = load_encoder("random:vit_small_patch14_dinov2", model_kwargs=S14, pos_interp="meta-offset")
    assert meta_enc.describe()["pos_interp"] == "meta-offset"
    same = _images(28, 28, b=1)
    torch.testing.assert_close(_feats(meta_enc, same), _feats(timm_enc, same), rtol=0, atol=0)  # native: no resampling
    assert not torch.allclose(_feats(meta_enc, x), _feats(timm_enc, x))
    # independent reconstruction of Meta's resampling: scale factors (n + 0.1) / N, bicubic, no antialias
    vit = meta_enc.model
    pos = vit.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(3.1 / 2, 4.1 / 2), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, 12, -1)], dim=1)
    from densebench.encoders.timm_encoder import pos_embed_mode

    with torch.inference_mode(), pos_embed_mode(vit, "meta-offset"):   # the encoder installs it per forward
        emb = vit.patch_embed(x)
        got = vit._pos_embed(emb) - torch.cat([vit.cls_token, emb.reshape(1, 12, -1)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="interpolation"):
        load_encoder("random:vit_small_patch14_dinov2", model_kwargs=S14, pos_interp="bilinear")


# --- random: seeding --------------------------------------------------------------------------------------

def test_random_seeding():
    x = _images(32, 32)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_encoder("random:vit_small_patch16_224", model_kwargs=S16, seed=0)
    after = torch.rand(3)
    torch.testing.assert_close(before, after, rtol=0, atol=0)     # the caller's RNG stream is untouched
    b = load_encoder("random:vit_small_patch16_224", model_kwargs=S16, seed=0)
    c = load_encoder("random:vit_small_patch16_224", model_kwargs=S16, seed=1)
    torch.testing.assert_close(_feats(a, x), _feats(b, x), rtol=0, atol=0)
    assert (_feats(a, x) - _feats(c, x)).abs().max() > 1e-3
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert "seed=0" in a.fingerprint and "vit_small_patch16_224" in a.fingerprint
    with pytest.raises(ConfigError, match="--weights does not apply"):
        load_encoder("random:vit_small_patch16_224", weights="x.pth")


# --- --weights: format conversion -------------------------------------------------------------------------

def _quantise_prefix(vit, seed=0):
    """Class/register tokens on a 2^-10 grid, so folding pos_embed[:, 0] in and out is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vit.cls_token.copy_(torch.round(torch.randn(vit.cls_token.shape, generator=g) * 256) / 1024)


def timm_to_meta_dinov2(sd, *, reg: bool, swiglu: bool = False, chunked: bool = False, seed: int = 0):
    """The inverse of Meta DINOv2 -> timm (written independently of densebench.encoders.convert)."""
    out = {}
    for k, v in sd.items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if chunked and k.startswith("blocks."):
            k = "blocks.0." + k[len("blocks."):]       # one chunk holding every block
        out[k] = v.clone()
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if reg:
        g = torch.Generator().manual_seed(seed + 1)
        pos0 = torch.round(torch.randn(1, 1, dim, generator=g) * 256) / 1024
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = sd["cls_token"] - pos0         # Meta adds pos_embed[:, 0] back at run time
        out["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    return out


def timm_to_dino_full_checkpoint(sd):
    """A DINO v1 training checkpoint: student/teacher, backbone./module.backbone. prefixes, DINOHead, args."""
    head = {"head.mlp.0.weight": torch.randn(16, 384), "head.last_layer.weight_g": torch.ones(8, 1)}
    teacher = {**{f"backbone.{k}": v.clone() for k, v in sd.items()}, **head}
    student = {f"module.backbone.{k}": torch.randn_like(v) for k, v in sd.items()}   # must NOT be used
    return {"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}


@pytest.mark.parametrize("arch,kwargs,meta", [
    ("vit_small_patch14_dinov2", S14, {"reg": False}),
    ("vit_small_patch14_reg4_dinov2", S14, {"reg": True}),
    ("vit_giant_patch14_dinov2", G14, {"reg": False, "swiglu": True, "chunked": True}),
])
def test_meta_dinov2_and_timm_copies_are_identical(tmp_path, arch, kwargs, meta):
    src = load_encoder(f"random:{arch}", model_kwargs=kwargs, seed=3)
    _quantise_prefix(src.model)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    torch.save(sd, tmp_path / "timm.pth")
    save_file(sd, str(tmp_path / "timm.safetensors"))
    torch.save({"model": timm_to_meta_dinov2(sd, **meta)}, tmp_path / "meta.pth")
    x = _images(28, 42)
    want = _feats(src, x)
    encs = {name: load_encoder(f"timm:{arch}", weights=str(tmp_path / name), model_kwargs=kwargs)
            for name in ("timm.pth", "timm.safetensors", "meta.pth")}
    for name, enc in encs.items():
        torch.testing.assert_close(_feats(enc, x), want, rtol=0, atol=0, msg=name)
    assert len({e.fingerprint for e in encs.values()}) == 1
    assert encs["meta.pth"].describe()["weights_format"] == ("meta-dinov2-reg" if meta["reg"] else "meta-dinov2")
    assert encs["timm.pth"].describe()["weights_format"] == "timm"
    assert encs["meta.pth"].fingerprint.startswith("sha256:")


def test_meta_dino_full_checkpoint_and_neco_lightning_format(tmp_path):
    src = load_encoder("random:vit_small_patch16_224", model_kwargs=S16, seed=5)
    sd = src.model.state_dict()
    save_file(sd, str(tmp_path / "timm.safetensors"))
    torch.save(timm_to_dino_full_checkpoint(sd), tmp_path / "dino_full.pth")
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "dino_backbone.pth")   # dino_deitsmall16_pretrain.pth
    neco = {f"model.{k}": v.clone() for k, v in sd.items()}
    neco.update({f"teacher.{k}": torch.randn_like(v) for k, v in sd.items()})             # EMA copy: not evaluated
    neco.update({"model.head.mlp.0.weight": torch.randn(8, 384), "model.head.last_layer.weight": torch.randn(4, 8)})
    torch.save({"state_dict": neco}, tmp_path / "neco_model.ckpt")
    plain_plus_ema = {**{k: v.clone() for k, v in sd.items()},
                      **{f"teacher.{k}": torch.randn_like(v) for k, v in sd.items()}}
    torch.save(plain_plus_ema, tmp_path / "plain_plus_ema.pth")
    x = _images(32, 48)
    want = _feats(src, x)
    # no img_size: the 2x2 position grid in the file makes the loader build a 32 px model (not 224)
    encs = [load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / f), model_kwargs={"depth": 2})
            for f in ("timm.safetensors", "dino_full.pth", "dino_backbone.pth", "neco_model.ckpt",
                      "plain_plus_ema.pth")]
    # the registry name resamples position embeddings the DINO way by default, so compare with timm's here
    encs.insert(4, load_encoder("dino_vits16", weights=str(tmp_path / "dino_full.pth"), model_kwargs={"depth": 2},
                             pos_interp="timm"))
    for enc in encs:
        assert enc.native_size == 32
        torch.testing.assert_close(_feats(enc, x), want, rtol=0, atol=0)
    assert len({e.fingerprint for e in encs}) == 1
    d = encs[1].describe()
    assert d["weights_container"] == "teacher" and d["weights_prefix"] == "backbone."
    assert d["weights_dropped_keys"] == 0            # the DINOHead sits outside the backbone prefix
    assert encs[3].describe()["weights_prefix"] == "model."
    assert encs[3].describe()["weights_dropped_keys"] == 2    # NeCo's projection head inside model.
    assert encs[4].describe()["loader"] == "registry" and encs[4].describe()["method"] == "DINO"
    assert json.loads(json.dumps(d))["weights_path"] == str(tmp_path / "dino_full.pth")   # result-record ready
    default = load_encoder("dino_vits16", weights=str(tmp_path / "dino_full.pth"), model_kwargs={"depth": 2})
    assert default.describe()["pos_interp"] == "meta-offset"
    native = _images(32, 32)
    torch.testing.assert_close(_feats(default, native), _feats(src, native), rtol=0, atol=0)


def test_strict_load_lists_missing_unexpected_and_shape_mismatches(tmp_path):
    src = load_encoder("random:vit_small_patch16_224", model_kwargs={**S16, "depth": 3})
    path = tmp_path / "three_blocks.pth"
    torch.save(src.model.state_dict(), path)
    with pytest.raises(ModelError) as e:
        load_encoder("timm:vit_small_patch16_224", weights=str(path), model_kwargs={**S16, "depth": 4})
    msg = str(e.value)
    assert "three_blocks.pth" in msg and "vit_small_patch16_224" in msg
    assert "12 missing keys" in msg and "blocks.3.norm1.weight" in msg and "(+2 more)" in msg
    with pytest.raises(ModelError) as e:
        load_encoder("timm:vit_small_patch16_224", weights=str(path), model_kwargs={**S16, "depth": 2})
    assert "12 unexpected keys: blocks.2." in str(e.value)
    with pytest.raises(ModelError) as e:
        load_encoder("timm:vit_tiny_patch16_224", weights=str(path), model_kwargs={**S16, "depth": 3})
    msg = str(e.value)
    assert "vit_tiny_patch16_224" in msg and "shape mismatches" in msg
    assert "cls_token: file (1, 1, 384) vs model (1, 1, 192)" in msg
    # a DINOv2 register checkpoint into the no-register architecture (NeCo's silent XR pitfall) is refused
    reg = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs=S14)
    torch.save(timm_to_meta_dinov2(reg.model.state_dict(), reg=True), tmp_path / "reg4.pth")
    with pytest.raises(ModelError, match="unexpected keys: reg_token"):
        load_encoder("timm:vit_small_patch14_dinov2", weights=str(tmp_path / "reg4.pth"), model_kwargs=S14)


class Opaque:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_bad_weights_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "nope.pth"), model_kwargs=S16)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelError, match="unsupported suffix"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "w.txt"), model_kwargs=S16)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="weights_only=True"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "bad.pth"), model_kwargs=S16)
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match="no ViT patch embedding"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "resnet.pth"), model_kwargs=S16)
    torch.save({"state_dict": {}, "obj": Opaque()}, tmp_path / "pickle.pth")
    with pytest.raises(ModelError, match="cannot be read with torch.load"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "pickle.pth"), model_kwargs=S16)


def test_fingerprint_is_stable_and_content_addressed(tmp_path):
    src = load_encoder("random:vit_small_patch16_224", model_kwargs=S16)
    sd = src.model.state_dict()
    torch.save(sd, tmp_path / "a.pth")
    fa = load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "a.pth"), model_kwargs=S16).fingerprint
    fa2 = load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "a.pth"), model_kwargs=S16).fingerprint
    assert fa == fa2
    changed = {k: v.clone() for k, v in sd.items()}
    changed["blocks.1.mlp.fc2.bias"][0] += 1e-3
    torch.save(changed, tmp_path / "b.pth")
    fb = load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "b.pth"), model_kwargs=S16).fingerprint
    assert fb != fa
    # the same tensors under another architecture identity fingerprint differently
    assert fingerprint_state_dict(sd, arch="a") != fingerprint_state_dict(sd, arch="b")
    # independent check of what is hashed: keys, dtypes, shapes and bytes (a dtype change alone matters)
    f64 = fingerprint_state_dict({"w": torch.zeros(2, dtype=torch.float64)})
    assert fingerprint_state_dict({"w": torch.zeros(2)}) != f64
    assert fingerprint_state_dict({"w": torch.zeros(2)}) != fingerprint_state_dict({"v": torch.zeros(2)})
    assert fingerprint_state_dict({"w": torch.zeros(4)}) != fingerprint_state_dict({"w": torch.zeros(2, 2)})


# --- registry and offline behaviour -----------------------------------------------------------------------

def test_registry_covers_the_published_encoders():
    for name in ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"] + \
            [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")]:
        assert name in REGISTRY
    assert REGISTRY["dinov2_vitg14_reg"].arch == "vit_giant_patch14_reg4_dinov2"
    assert REGISTRY["dino_vitb8"].patch_size == 8 and REGISTRY["dino_vitb8"].native_size == 224
    assert REGISTRY["dinov2_vitl14"].native_size == 518
    # NeCo: registers only for dinov2r; XR and plain dinov2 use the no-register architecture
    assert REGISTRY["neco_dinov2r_vits14"].arch == "vit_small_patch14_reg4_dinov2"
    assert REGISTRY["neco_dinov2r_xr_vitb14"].arch == "vit_base_patch14_dinov2"
    assert REGISTRY["neco_dinov2_vitb14"].arch == "vit_base_patch14_dinov2"
    assert REGISTRY["neco_leopart_vits16"].arch == "vit_small_patch16_224"
    assert REGISTRY["neco_dinov2r_xr_vits14"].source.url == (
        "https://huggingface.co/FunAILab/NeCo/resolve/main/vit-small/dinov2-architectures/"
        "neco_on_dinov2r_xr_vit14_model.ckpt")
    assert len({e.source.filename for e in REGISTRY.values()}) == len(REGISTRY)   # no cache-file collisions
    rows = {r["name"]: r for r in list_models()}
    reg = rows["dinov2_vits14_reg"]
    assert reg["patch_size"] == 14 and "dinov2_vits14_reg4_pretrain.pth" in reg["source"]
    assert rows["pixels"]["offline"] is True
    for r in rows.values():
        assert {"name", "source", "arch", "patch_size", "native_size", "offline"} <= set(r)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_offline_registry_error_names_file_location_and_weights_flag(empty_caches):
    with pytest.raises(ModelError) as e:
        load_encoder("dinov2_vits14_reg")
    msg = str(e.value)
    assert "not available offline" in msg and "dinov2_vits14_reg4_pretrain.pth" in msg
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in msg
    assert "--weights" in msg and "huggingface-cli download timm/vit_small_patch14_reg4_dinov2.lvd142m" in msg
    with pytest.raises(ModelError, match="not available offline.*FunAILab-NeCo_vit-base_neco_on_dinov2r_vit14"):
        load_encoder("neco_dinov2r_vitb14")
    with pytest.raises(ModelError, match="not available offline"):
        load_encoder("timm:vit_small_patch14_dinov2.lvd142m")


def test_cached_weights_are_found_offline(empty_caches):
    src = load_encoder("random:vit_small_patch16_224", model_kwargs=S16, seed=9)
    hub = empty_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(src.model.state_dict(), hub / "dino_deitsmall16_pretrain.pth")
    enc = load_encoder("dino_vits16", model_kwargs={"depth": 2})
    x = _images(32, 32)
    torch.testing.assert_close(_feats(enc, x), _feats(src, x), rtol=0, atol=0)
    assert enc.describe()["weights_path"] == str(hub / "dino_deitsmall16_pretrain.pth")
    assert {r["name"]: r for r in list_models()}["dino_vits16"]["offline"] is True
    # the timm copy in a Hugging Face cache layout is found too
    snap = empty_caches / "hf" / "models--timm--vit_small_patch16_224.dino"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (hub / "dino_deitsmall16_pretrain.pth").unlink()
    save_file(src.model.state_dict(), str(snap / "snapshots" / "abc" / "model.safetensors"))
    enc2 = load_encoder("timm:vit_small_patch16_224.dino", model_kwargs={"depth": 2})
    assert enc2.fingerprint == enc.fingerprint


def test_download_when_online_goes_through_the_hub_cache(empty_caches, monkeypatch):
    from densebench.encoders.weights import WeightSource, fetch
    monkeypatch.delenv("DENSEBENCH_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    served = empty_caches / "served.pth"
    torch.save({"w": torch.arange(3)}, served)
    path = fetch(WeightSource("got.pth", served.as_uri()), what="test")
    assert path == empty_caches / "torch" / "hub" / "checkpoints" / "got.pth"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert not list(path.parent.glob("*.part"))
    with pytest.raises(ModelError, match="could not be downloaded.*missing.pth") as e:
        fetch(WeightSource("never.pth", (empty_caches / "missing.pth").as_uri()), what="test")
    assert "--weights" in str(e.value) and not (path.parent / "never.pth").exists()


def test_load_weights_into_a_caller_built_model(tmp_path):
    from densebench.encoders.convert import load_weights_into
    src = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs=S14, seed=2)
    _quantise_prefix(src.model)
    torch.save(timm_to_meta_dinov2(src.model.state_dict(), reg=True), tmp_path / "meta.pth")
    dst = load_encoder("random:vit_small_patch14_reg4_dinov2", model_kwargs=S14, seed=7).model
    info = load_weights_into(dst, tmp_path / "meta.pth")
    assert info.source_format == "meta-dinov2-reg"
    for k, v in src.model.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_unknown_model_names_close_matches():
    with pytest.raises(ModelError, match="unknown model 'dinov2_vitsl4'.*dinov2_vits14") as e:
        load_encoder("dinov2_vitsl4")
    assert "densebench list models" in str(e.value)
    with pytest.raises(ModelError, match="timm has no architecture 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        load_encoder("random:vit_smal_patch16_224")
    with pytest.raises(ModelError, match="(?s)'resnet18' cannot be built.*ViT"):
        load_encoder("random:resnet18")


# --- plugins ---------------------------------------------------------------------------------------------

PLUGIN_SOURCE = '''
import timm, torch
from torch import nn
from densebench.encoders.base import DenseEncoder

def fixed_size_timm():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=0)

class DinoV1Like(nn.Module):
    """DINO v1 API: get_intermediate_layers(x, n) returns the last n normed outputs incl. CLS."""
    patch_size = 16
    embed_dim = 8
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 8, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.LayerNorm(8)
    def get_intermediate_layers(self, x, n=1):
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        outs = []
        for i, b in enumerate(self.blocks):
            t = t + b(t)
            if len(self.blocks) - i <= n:
                outs.append(self.norm(t))
        return outs

def dino_v1_like():
    return DinoV1Like()

class Mean(DenseEncoder):
    patch_size, embed_dim, fingerprint, name = 8, 3, "mean-v1", "mean"
    def _features(self, images, layer, norm):
        b, c, h, w = images.shape
        return images.reshape(b, c, h // 8, 8, w // 8, 8).mean((3, 5)).permute(0, 2, 3, 1)

def ready():
    return Mean()

NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "my_plugin_mod.py"
    sys.modules.pop("my_plugin_mod", None)


def test_plugin_factories(plugin_module):
    import timm
    # a timm ViT built at a fixed size is switched to dynamic sizes and wrapped like timm: models
    enc = load_encoder("my_plugin_mod:fixed_size_timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=0).eval()
    x = _images(32, 32)
    with torch.inference_mode():
        want = ref.forward_features(x)[:, 1:].reshape(2, 2, 2, 384)
    torch.testing.assert_close(_feats(enc, x), want, rtol=0, atol=0)
    assert _feats(enc, _images(48, 64)).shape == (2, 3, 4, 384)
    assert enc.describe()["loader"] == "plugin" and enc.fingerprint.startswith("sha256:")

    # a DINO v1-style module: CLS stripped, layer selects the block, norm=False is refused
    dino = load_encoder(str(plugin_module) + ":dino_v1_like")
    mod = dino.module
    x = _images(32, 48)
    with torch.inference_mode():
        t = mod.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([mod.cls.expand(2, -1, -1), t], 1)
        t0 = t + mod.blocks[0](t)
        t1 = t0 + mod.blocks[1](t0)
        n0, n1 = mod.norm(t0), mod.norm(t1)
    torch.testing.assert_close(_feats(dino, x), n1[:, 1:].reshape(2, 2, 3, 8))
    torch.testing.assert_close(_feats(dino, x, layer=0), n0[:, 1:].reshape(2, 2, 3, 8))
    with pytest.raises(ConfigError, match="always applies the final norm"):
        dino(x, norm=False)

    # a ready DenseEncoder is returned as is
    mean = load_encoder("my_plugin_mod:ready")
    torch.testing.assert_close(_feats(mean, x)[0, 1, 2], x[0, :, 8:16, 16:24].mean((1, 2)))
    with pytest.raises(ModelError, match="no callable 'NOT_CALLABLE'"):
        load_encoder("my_plugin_mod:NOT_CALLABLE")
    with pytest.raises(ModelError, match="cannot be imported"):
        load_encoder("no_such_plugin_mod:factory")


# --- neco_train checkpoints ------------------------------------------------------------------------------

def test_neco_checkpoint_round_trip(tmp_path):
    kwargs = {"depth": 2, "img_size": 28, "reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5}
    src = load_encoder("random:vit_small_patch14_dinov2", model_kwargs=kwargs, seed=11)
    assert src.model.num_prefix_tokens == 5
    save_file(src.model.state_dict(), str(tmp_path / "student.safetensors"))
    sidecar = {"format": NECO_FORMAT, "arch": "vit_small_patch14_dinov2", "model_kwargs": kwargs,
               "base_model": "dinov2_vits14_reg", "step": 120, "epoch": 3, "config": {"lr": 1e-6}}
    (tmp_path / "student.json").write_text(json.dumps(sidecar))
    x = _images(28, 42)
    for spec in ("student", "student.safetensors", "student.json"):
        enc = load_encoder(f"neco:{tmp_path / spec}")
        torch.testing.assert_close(_feats(enc, x), _feats(src, x), rtol=0, atol=0)
    d = enc.describe()
    assert d["loader"] == "neco" and d["neco_base_model"] == "dinov2_vits14_reg" and d["neco_step"] == 120
    # same weights through --weights give the same fingerprint
    same = load_encoder("timm:vit_small_patch14_dinov2", weights=str(tmp_path / "student.safetensors"),
                        model_kwargs=kwargs)
    assert same.fingerprint == enc.fingerprint

    (tmp_path / "student.json").write_text(json.dumps({**sidecar, "format": "something-else"}))
    with pytest.raises(ModelError, match="expected 'densebench-neco-1'"):
        load_encoder(f"neco:{tmp_path / 'student'}")
    (tmp_path / "student.json").write_text(json.dumps({**sidecar, "model_kwargs": {"depth": 3, "img_size": 28}}))
    with pytest.raises(ModelError, match="missing keys"):
        load_encoder(f"neco:{tmp_path / 'student'}")
    save_file(src.model.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="other.json does not exist"):
        load_encoder(f"neco:{tmp_path / 'other.safetensors'}")


# --- hf: transformers DINOv2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_prefix_tokens(tmp_path, registers):
    transformers = pytest.importorskip("transformers", reason="transformers (extra `hf`) is not installed")
    cfg_kwargs = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                      "patch_size": 14, "image_size": 28}
    torch.manual_seed(0)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **cfg_kwargs))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**cfg_kwargs))
    model.eval().save_pretrained(tmp_path / "m")
    enc = load_encoder(f"hf:{tmp_path / 'm'}")
    x = _images(28, 42)
    with torch.inference_mode():
        out = model(pixel_values=x, output_hidden_states=True)
    n_prefix = 1 + registers
    assert out.last_hidden_state.shape[1] == n_prefix + 6
    torch.testing.assert_close(_feats(enc, x), out.last_hidden_state[:, n_prefix:].reshape(2, 2, 3, 32))
    expected = out.hidden_states[1][:, n_prefix:].reshape(2, 2, 3, 32)
    torch.testing.assert_close(_feats(enc, x, layer=0, norm=False), expected)
    assert enc.describe()["num_register_tokens"] == registers and enc.describe()["loader"] == "hf"
    with pytest.raises(ModelError, match="could not be loaded"):
        load_encoder(f"hf:{tmp_path / 'missing'}")


# --- pixels ----------------------------------------------------------------------------------------------

def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (rgb - mean) / std


def test_lab_conversion_reference_colours():
    rgb = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0, 1], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 4, 1)
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    want = torch.tensor([[53.24, 80.09, 67.20], [100.0, 0, 0], [32.30, 79.19, -107.86], [53.39, 0, 0]])
    torch.testing.assert_close(lab, want, atol=0.05, rtol=0)


def _stripes(colour, angle_deg, period, size=32, jitter=0.0, phase=0.0):
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    a = math.radians(angle_deg)
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period + phase)
    base = torch.tensor(colour).view(3, 1, 1) + jitter
    return (base * (0.6 + 0.4 * wave)).clamp(0, 1)


def test_pixels_deterministic_and_informative():
    enc = load_encoder("pixels")
    assert enc.patch_size == 16 and enc.fingerprint == load_encoder("pixels").fingerprint
    assert load_encoder("pixels:8").patch_size == 8
    red_h = _stripes((0.9, 0.1, 0.1), 0, 6)
    blue_h = _stripes((0.1, 0.2, 0.9), 0, 6)
    red_v = _stripes((0.9, 0.1, 0.1), 90, 6)
    red_fine = _stripes((0.9, 0.1, 0.1), 0, 3)
    red_h2 = _stripes((0.88, 0.12, 0.1), 0, 6, phase=1.0)
    x = _normalise(torch.stack([red_h, blue_h, red_v, red_fine, red_h2]))
    f1, f2 = _feats(enc, x), _feats(enc, x)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    v = F.normalize(f1.mean((1, 2)), dim=-1)                 # one descriptor per image
    dist = 1 - v @ v.T
    same = dist[0, 4]                                        # jittered colour, shifted phase: same class
    assert dist[0, 1] > 5 * same and dist[0, 2] > 5 * same and dist[0, 3] > 3 * same
    assert json.loads(json.dumps(enc.describe()))["fingerprint"] == "pixels-v1:p16"
    flat = _feats(enc, _normalise(torch.full((1, 3, 32, 32), 0.5)))
    assert flat[..., 6:14].abs().max() < 1e-3               # no orientation signal in a flat patch


def test_pixels_separates_colour_texture_families():
    """1-NN patch classification on jittered colour+texture classes: far above the 1/6 chance level."""
    g = torch.Generator().manual_seed(0)
    classes = [((0.8, 0.2, 0.2), 0, 8), ((0.8, 0.2, 0.2), 90, 8), ((0.2, 0.6, 0.2), 45, 8),
               ((0.2, 0.3, 0.8), 0, 4), ((0.2, 0.3, 0.8), 0, 12), ((0.7, 0.7, 0.2), 135, 6)]
    def sample(c):
        colour, angle, period = classes[c]
        j = (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.12
        return _stripes(colour, angle + float(torch.randn(1, generator=g)) * 5, period, jitter=j,
                        phase=float(torch.rand(1, generator=g)) * 6.28)
    labels = torch.arange(6).repeat(4)
    x = _normalise(torch.stack([sample(int(c)) for c in labels]))
    f = F.normalize(_feats(load_encoder("pixels"), x).reshape(len(labels), -1, 16), dim=-1)
    feats, lab = f.reshape(-1, 16), labels.repeat_interleave(4)
    mem, query = torch.arange(len(lab)) < len(lab) // 2, torch.arange(len(lab)) >= len(lab) // 2
    nn_idx = (feats[query] @ feats[mem].T).argmax(1)
    acc = (lab[mem][nn_idx] == lab[query]).float().mean().item()
    assert acc > 0.9


# --- SelfPatch (issue 16) -----------------------------------------------------------------------------------

SELFPATCH_KW = {"class_token": False, "global_pool": "avg", "final_norm": False, "depth": 2}


def _selfpatch_by_hand(sd, x, depth=2, heads=6, p=16):
    """SelfPatch's VisionTransformer.get_intermediate_layers(x, n=1)[0] (selfpatch_vision_transformer.py) spelled
    with plain ops: no class token, no final norm, DINO's offset-bicubic position resampling."""
    b, _, h, w = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    n_pos, dim = sd["pos_embed"].shape[1:]
    side = math.isqrt(n_pos)
    if t.shape[1] == n_pos and h == w:         # interpolate_pos_encoding returns the table unchanged
        t = t + sd["pos_embed"]
    else:
        grid = sd["pos_embed"].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, scale_factor=((h // p + 0.1) / side, (w // p + 0.1) / side), mode="bicubic")
        t = t + pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    length = t.shape[1]
    for i in range(depth):
        k = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), sd[k + "norm1.weight"], sd[k + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"])
        q, kk, v = qkv.reshape(b, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ kk.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        t = t + F.linear((att @ v).transpose(1, 2).reshape(b, length, dim), sd[k + "attn.proj.weight"],
                         sd[k + "attn.proj.bias"])
        y = F.layer_norm(t, (dim,), sd[k + "norm2.weight"], sd[k + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[k + "mlp.fc1.weight"], sd[k + "mlp.fc1.bias"])), sd[k + "mlp.fc2.weight"],
                     sd[k + "mlp.fc2.bias"])
        t = t + y
    return t.reshape(b, h // p, w // p, dim)


def _selfpatch_checkpoint(backbone, seed=1):
    """main_selfpatch.py's save_dict: DDP student ('module.' prefix), plain teacher; both MultiCropWrappers hold
    backbone, ca_head (SelfPatchHead: cls token, 2 class-attention blocks, norm), c_head and p_head (DINOHeads)."""
    g = torch.Generator().manual_seed(seed)

    def heads():
        return {"ca_head.cls_token": torch.randn(1, 1, 384, generator=g),
                "ca_head.cls_blocks.0.attn.q.weight": torch.randn(384, 384, generator=g),
                "ca_head.cls_blocks.1.mlp.fc2.bias": torch.randn(384, generator=g),
                "ca_head.norm.weight": torch.randn(384, generator=g),
                "c_head.mlp.0.weight": torch.randn(64, 384, generator=g),
                "c_head.last_layer.weight_g": torch.randn(1, 64, generator=g),
                "p_head.mlp.0.weight": torch.randn(64, 384, generator=g),
                "p_head.last_layer.weight_v": torch.randn(32, 64, generator=g)}

    teacher = {**{f"backbone.{k}": v.clone() for k, v in backbone.items()}, **heads()}
    student = {f"module.backbone.{k}": torch.randn(v.shape, generator=g) for k, v in backbone.items()}
    student.update({f"module.{k}": v for k, v in heads().items()})
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
            "args": argparse.Namespace(arch="vit_small", k_num=4), "dino_loss": {"center": torch.zeros(1, 64)}}


def test_selfpatch_checkpoint_loads_the_teacher_backbone_strictly(tmp_path):
    import timm

    from densebench.encoders.timm_encoder import TimmEncoder

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                            **SELFPATCH_KW).eval()
    for v in net.state_dict().values():            # random, non-default weights everywhere (norms included)
        v.copy_(torch.randn_like(v) * 0.2)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert "cls_token" not in sd and "norm.weight" not in sd and sd["pos_embed"].shape == (1, 196, 384)
    path = tmp_path / "checkpoint.pth"
    torch.save(_selfpatch_checkpoint(sd), path)
    enc = load_encoder("selfpatch_vits16", weights=str(path), model_kwargs={"depth": 2})
    direct = TimmEncoder(net, name="direct", fingerprint="x", pos_interp="meta-offset")
    for h, w in ((224, 224), (48, 80), (96, 64)):
        x = _images(h, w)
        got = _feats(enc, x)
        torch.testing.assert_close(got, _feats(direct, x), rtol=0, atol=0)
        torch.testing.assert_close(got, _selfpatch_by_hand(sd, x), rtol=1e-4, atol=1e-4)
    d = enc.describe()
    assert d["weights_container"] == "teacher" and d["weights_prefix"] == "backbone."
    assert d["weights_format"] == "selfpatch" and d["weights_dropped_keys"] == 8
    assert d["weights_dropped_modules"] == ["c_head", "ca_head", "p_head"]
    assert d["num_prefix_tokens"] == 0 and d["pos_interp"] == "meta-offset" and d["method"] == "SelfPatch"
    # a teacher state dict saved on its own, or the bare backbone, gives the same weights
    torch.save(_selfpatch_checkpoint(sd)["teacher"], tmp_path / "teacher.pth")
    torch.save(sd, tmp_path / "backbone.pth")
    for f in ("teacher.pth", "backbone.pth"):
        other = load_encoder("selfpatch_vits16", weights=str(tmp_path / f), model_kwargs={"depth": 2})
        assert other.fingerprint == enc.fingerprint


def test_selfpatch_refuses_a_student_only_or_foreign_checkpoint_and_says_where_the_file_comes_from(tmp_path):
    net_sd = load_encoder("random:vit_small_patch16_224", model_kwargs=SELFPATCH_KW).model.state_dict()
    full = _selfpatch_checkpoint(net_sd)
    torch.save({"student": full["student"], "epoch": 1}, tmp_path / "student.pth")
    with pytest.raises(ModelError, match="no 'teacher'"):
        load_encoder("selfpatch_vits16", weights=str(tmp_path / "student.pth"), model_kwargs={"depth": 2})
    dino = load_encoder("random:vit_small_patch16_224", model_kwargs={"depth": 2}).model.state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino.items()}}, tmp_path / "dino.pth")
    with pytest.raises(ModelError, match="unexpected keys: cls_token"):   # a DINO ViT has a class token and norm
        load_encoder("selfpatch_vits16", weights=str(tmp_path / "dino.pth"), model_kwargs={"depth": 2})
    with pytest.raises(ModelError, match="no download URL.*Google Drive.*alinlab/SelfPatch") as err:
        load_encoder("selfpatch_vits16")
    assert "--weights" in err.value.hint and "selfpatch_vits16.pth" in err.value.hint
    row = next(r for r in list_models() if r["name"] == "selfpatch_vits16")
    assert row["method"] == "SelfPatch" and row["offline"] is False and "alinlab/SelfPatch" in row["source"]


def test_without_network_the_hub_is_not_retried(tmp_path, monkeypatch):
    """An unreachable Hugging Face host is detected with one short connection attempt, not ~25 s of retries."""
    import huggingface_hub

    from densebench.encoders import weights as w

    monkeypatch.delenv("DENSEBENCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(w, "download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("no route to host")))
    monkeypatch.setattr(w, "reachable", lambda url, timeout=3.0: "huggingface.co is unreachable (test)")
    source = w.WeightSource("x.pth", url="https://example.invalid/x.pth", hf_repo="timm/x", hf_filename="m.bin")
    with pytest.raises(ModelError, match="huggingface.co is unreachable.*DENSEBENCH_OFFLINE=1"):
        w.fetch(source, what="x")
    assert calls == []
