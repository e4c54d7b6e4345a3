"""Named published encoders: one table, one loader path (timm architecture + converted weights file).

Every entry names the timm architecture the weights load into *strictly*, its patch size and native
resolution, and where the official weights come from (the URL the authors publish, and timm's Hugging Face
copy when one exists). Sources were checked against the authors' READMEs:

* DINO: facebookresearch/dino README (``dl.fbaipublicfiles.com/dino/...``), timm ``.dino`` tags.
* DINOv2 (+ registers): facebookresearch/dinov2 hubconf (``dl.fbaipublicfiles.com/dinov2/...``), timm ``.lvd142m``.
* NeCo: ``huggingface.co/FunAILab/NeCo`` (vpariza/NeCo README; spec neco.md §4). ``dinov2r`` was trained with
  4 registers, ``dinov2r_xr`` and ``dinov2`` without; the DINO-family ones are ViT-S/16.
* Leopart: MkuuWaUjinga/leopart README (Dropbox "full ckpt" links; the projection head is dropped on load).
* TimeT: SMSD75/Timetuning README (Dropbox link, ViT-S/16).
* CrIBo: tileb1/CrIBo README (KU Leuven RDR data files; full DINO-style checkpoints, the teacher is used).
* SelfPatch: alinlab/SelfPatch README ("Pretrained weights on ImageNet": a Google Drive link, no direct URL),
  so the file is local only (``--weights`` or the torch hub checkpoint folder). Its ViT has no class token
  and no final norm; the teacher backbone of the DINO-style checkpoint is used (``convert.read_selfpatch``).

``pos_interp`` is the position-embedding resampling of the code each method was trained and evaluated with
(Meta's offset-bicubic for DINO v1 code and DINOv2 without registers, timm/antialiased for DINOv2 ``_reg``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError
from .weights import WeightSource


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    method: str
    arch: str                      # timm architecture (no pretrained tag)
    patch_size: int
    native_size: int
    source: WeightSource
    page: str                      # where the URL was published
    timm_name: str | None = None   # timm model name + tag with the same weights, if timm hosts them
    published_url: str | None = None   # the link as the authors print it, when the download URL differs
    pos_interp: str = "meta-offset"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    checkpoint_format: str = "auto"    # how a weights file is read: convert.CHECKPOINT_READERS
    obtain: str = ""                   # where the file comes from when there is no download URL

    def as_row(self) -> dict[str, Any]:
        """The row ``densebench list models`` prints."""
        return {"name": self.name, "method": self.method, "source": self.published_url or self.source.url,
                "timm_name": self.timm_name, "arch": self.arch, "patch_size": self.patch_size,
                "native_size": self.native_size, "offline": self.source.find_local() is not None,
                "expected_file": self.source.filename, "page": self.page, "notes": self.notes}


REGISTRY: dict[str, RegistryEntry] = {}


def _add(entry: RegistryEntry) -> None:
    if entry.name in REGISTRY:
        raise ValueError(f"duplicate registry name {entry.name}")
    REGISTRY[entry.name] = entry


# --- DINO v1 ------------------------------------------------------------------------------------------
_DINO = "https://github.com/facebookresearch/dino"
for _name, _arch, _file, _p in [
    ("dino_vits16", "vit_small_patch16_224", "dino_deitsmall16_pretrain", 16),
    ("dino_vits8", "vit_small_patch8_224", "dino_deitsmall8_pretrain", 8),
    ("dino_vitb16", "vit_base_patch16_224", "dino_vitbase16_pretrain", 16),
    ("dino_vitb8", "vit_base_patch8_224", "dino_vitbase8_pretrain", 8),
]:
    _add(RegistryEntry(
        _name, "DINO", _arch, _p, 224,
        WeightSource(f"{_file}.pth", f"https://dl.fbaipublicfiles.com/dino/{_file}/{_file}.pth",
                     hf_repo=f"timm/{_arch}.dino", hf_filename="model.safetensors"),
        page=_DINO, timm_name=f"{_arch}.dino"))

# --- DINOv2 (with and without registers) ---------------------------------------------------------------
_DINOV2 = "https://github.com/facebookresearch/dinov2"
for _s, _size in [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]:
    for _reg in (False, True):
        _arch = f"vit_{_size}_patch14_{'reg4_' if _reg else ''}dinov2"
        _file = f"dinov2_vit{_s}14{'_reg4' if _reg else ''}_pretrain.pth"
        _add(RegistryEntry(
            f"dinov2_vit{_s}14{'_reg' if _reg else ''}", "DINOv2" + (" (registers)" if _reg else ""), _arch, 14, 518,
            WeightSource(_file, f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{_s}14/{_file}",
                         hf_repo=f"timm/{_arch}.lvd142m", hf_filename="model.safetensors"),
            page=_DINOV2, timm_name=f"{_arch}.lvd142m", pos_interp="timm" if _reg else "meta-offset"))

# --- NeCo (FunAILab/NeCo on the HF hub; the `_model` file is the student that the paper evaluates) ------
_NECO = "https://github.com/vpariza/NeCo"
for _size, _s, _p in [("small", "s", 14), ("base", "b", 14)]:
    for _family, _arch, _note in [
        ("dinov2", f"vit_{_size}_patch14_dinov2", "post-trained from DINOv2"),
        ("dinov2r", f"vit_{_size}_patch14_reg4_dinov2", "post-trained from DINOv2 with 4 registers"),
        ("dinov2r_xr", f"vit_{_size}_patch14_dinov2",
         "DINOv2-reg weights post-trained without registers (register tokens dropped)"),
    ]:
        _hf_file = f"vit-{_size}/dinov2-architectures/neco_on_{_family}_vit14_model.ckpt"
        _add(RegistryEntry(
            f"neco_{_family}_vit{_s}14", "NeCo", _arch, 14, 518,
            WeightSource(f"FunAILab-NeCo_vit-{_size}_neco_on_{_family}_vit14_model.ckpt",
                         f"https://huggingface.co/FunAILab/NeCo/resolve/main/{_hf_file}",
                         hf_repo="FunAILab/NeCo", hf_filename=_hf_file),
            page=_NECO, pos_interp="meta-offset", notes=_note))
for _family, _label in [("dino", "DINO"), ("timetuning", "TimeT"), ("leopart", "Leopart")]:
    _hf_file = f"vit-small/dino-architectures/neco_on_{_family}_vit16_model.ckpt"
    _add(RegistryEntry(
        f"neco_{_family}_vits16", "NeCo", "vit_small_patch16_224", 16, 224,
        WeightSource(f"FunAILab-NeCo_vit-small_neco_on_{_family}_vit16_model.ckpt",
                     f"https://huggingface.co/FunAILab/NeCo/resolve/main/{_hf_file}",
                     hf_repo="FunAILab/NeCo", hf_filename=_hf_file),
        page=_NECO, notes=f"post-trained from {_label} ViT-S/16"))

# --- Leopart, TimeT, CrIBo (DINO-architecture ViTs; full checkpoints, backbone extracted on load) --------
_LEOPART = "https://github.com/MkuuWaUjinga/leopart"
for _name, _arch, _p, _link in [
    ("leopart_vits16", "vit_small_patch16_224", 16, "https://www.dropbox.com/s/0kjy61jh4i3vbnh/leopart_vits16.ckpt"),
    ("leopart_vitb8", "vit_base_patch8_224", 8, "https://www.dropbox.com/s/ieyuqfv8get50cy/leopart_vitb8.ckpt"),
]:
    _add(RegistryEntry(_name, "Leopart", _arch, _p, 224,
                       WeightSource(_link.rsplit("/", 1)[1], _link + "?dl=1"),
                       page=_LEOPART, published_url=_link + "?dl=0", notes="full checkpoint; projection head dropped"))

_TIMET_LINK = "https://www.dropbox.com/scl/fi/nnx2mm8ian9w49vstpgz0/TimeT.pth?rlkey=w9q3hvxd51nb63ammy33qhry0"
_add(RegistryEntry("timet_vits16", "TimeT", "vit_small_patch16_224", 16, 224,
                   WeightSource("TimeT.pth", _TIMET_LINK + "&dl=1"),
                   page="https://github.com/SMSD75/Timetuning", published_url=_TIMET_LINK + "&dl=0"))

_CRIBO = "https://github.com/tileb1/CrIBo"
for _name, _arch, _file, _id, _note in [
    ("cribo_vits16_coco", "vit_small_patch16_224", "vits16-coco.pth", 159667, "pretrained on COCO"),
    ("cribo_vits16_in", "vit_small_patch16_224", "vits16-in.pth", 159665, "pretrained on ImageNet-1k"),
    ("cribo_vitb16_in", "vit_base_patch16_224", "vitb16-in.pth", 159666, "pretrained on ImageNet-1k"),
]:
    _add(RegistryEntry(_name, "CrIBo", _arch, 16, 224,
                       WeightSource(f"cribo_{_file}", f"https://rdr.kuleuven.be/api/access/datafile/{_id}"),
                       page=_CRIBO, notes=f"{_note}; full checkpoint, teacher backbone used"))


# --- SelfPatch (DINO + SelfPatch, ViT-S/16; no download URL: a local file only) --------------------------
_SELFPATCH = "https://github.com/alinlab/SelfPatch"
_add(RegistryEntry(
    "selfpatch_vits16", "SelfPatch", "vit_small_patch16_224", 16, 224, WeightSource("selfpatch_vits16.pth"),
    page=_SELFPATCH, published_url=f"{_SELFPATCH}#pretrained-weights-on-imagenet",
    model_kwargs={"class_token": False, "global_pool": "avg", "final_norm": False}, checkpoint_format="selfpatch",
    obtain="the authors publish it only as a Google Drive link: download the 'DINO + SelfPatch ViT-S/16' "
           f"checkpoint from the 'Pretrained weights on ImageNet' table of the README at {_SELFPATCH} (or use "
           "a checkpoint.pth written by their main_selfpatch.py)",
    notes="DINO + SelfPatch; no class token, no final norm; teacher backbone used, the SelfPatch aggregation "
          "module and both heads dropped"))


def unknown_model_error(name: str) -> ModelError:
    """The "unknown model" error: close registry/built-in names and where to look."""
    from . import BUILTIN_NAMES
    close = difflib.get_close_matches(name, list(REGISTRY) + list(BUILTIN_NAMES), n=5, cutoff=0.5)
    return ModelError(f"unknown model {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else ""),
                      hint="run `densebench list models`, or use timm:<arch>, hf:<repo>, random:<arch>, pixels, "
                           "neco:<checkpoint> or pkg.module:factory")
