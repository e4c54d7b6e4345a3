"""Encoders: one entry point, :func:`load_encoder`, for every way a user can name a model.

Model strings:

* ``timm:<arch>`` - any timm ViT with timm's pretrained weights (or ``--weights``); e.g.
  ``timm:vit_small_patch14_dinov2.lvd142m``.
* a registry name (``dinov2_vits14_reg``, ``neco_dinov2r_vits14``, ... see ``densebench list models``).
* ``hf:<repo id or local dir>`` - transformers DINOv2 / DINOv2-with-registers (optional extra ``hf``).
* ``pkg.module:factory`` or ``/path/file.py:factory`` - a plugin; **runs that code** (see plugin.py).
* ``random:<timm arch>`` - seeded random initialisation: the floor a learned encoder must clear.
* ``pixels`` / ``pixels:<p>`` - the non-learned colour/texture descriptor (see pixels.py).
* ``neco:<checkpoint>`` - a ``neco_train`` checkpoint (``<name>.safetensors`` + ``<name>.json`` sidecar).

Every path ends in the same place: a timm architecture plus a converted state dict loaded strictly, or one
of the few wrappers (hf, plugin, pixels), all returning a :class:`DenseEncoder` with a fingerprint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from .base import DenseEncoder
from .convert import CHECKPOINT_READERS, convert_for, fingerprint_state_dict, load_strict, read_backbone
from .registry import REGISTRY, RegistryEntry, unknown_model_error
from .timm_encoder import (POS_INTERP, POS_INTERP_CHOICES, TimmEncoder, auto_pos_interp, check_arch, create_timm_vit,
                           grid_from_pos_embed)
from .weights import WeightSource, fetch

__all__ = ["BUILTIN_NAMES", "NECO_FORMAT", "POS_INTERP", "POS_INTERP_CHOICES", "REGISTRY", "DenseEncoder",
           "auto_pos_interp", "list_models", "load_encoder", "pos_interp_for"]

#: The ``format`` field a neco_train checkpoint sidecar must carry.
NECO_FORMAT = "densebench-neco-1"
#: Names and patterns besides the registry (used for "did you mean" and ``list models``).
BUILTIN_NAMES = ("pixels", "timm:", "random:", "hf:", "neco:")
#: Constructor settings that do not change what an eval-mode model computes (left out of fingerprints).
_NON_IDENTITY_KWARGS = {"img_size", "dynamic_img_size", "num_classes", "pretrained", "drop_rate", "drop_path_rate",
                        "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"}


def _identity_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (model_kwargs or {}).items() if k not in _NON_IDENTITY_KWARGS}


def load_encoder(model: str, *, weights: str | Path | None = None, layer: int = -1, norm: bool = True,
                 seed: int = 0, model_kwargs: dict[str, Any] | None = None,
                 pos_interp: str | None = None) -> DenseEncoder:
    """Build the encoder named by ``model`` (see module docstring), in eval mode on the CPU.

    Args:
        weights: a local state dict (``.safetensors/.pth/.pt/.ckpt/.bin``) in timm, Meta DINO/DINOv2 or
            NeCo format, loaded strictly into the model's architecture (timm:, registry names, plugins).
        layer: default block (-1 = last); ``norm``: apply the final norm (False = raw block output).
        seed: initialisation seed for ``random:`` encoders.
        model_kwargs: extra ``timm.create_model`` kwargs (timm:, random:) or plugin factory kwargs.
        pos_interp: position-embedding resampling, "timm" or "meta-offset"; default: the one the weights
            were trained/evaluated with (registry), else "timm".
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"--model must be a non-empty string, got {model!r}", hint="see `densebench list models`")
    if pos_interp is not None and pos_interp not in POS_INTERP:
        raise ConfigError(f"unknown pos-embed interpolation {pos_interp!r}; accepted: {', '.join(POS_INTERP)}",
                          hint="use one of the accepted modes, or leave it unset for the weights' own")
    model = model.strip()
    scheme, sep, rest = model.partition(":")
    common = {"layer": layer, "norm": norm}

    if model == "pixels" or (scheme == "pixels" and sep):
        _no_weights(model, weights)
        from .pixels import PixelsEncoder
        try:
            p = int(rest) if rest else 16
        except ValueError:
            raise ConfigError(f"pixels patch size {rest!r} is not an integer", hint="use e.g. pixels:14") from None
        return PixelsEncoder(p, **common)
    if sep and scheme == "random":
        _no_weights(model, weights)
        return _load_random(rest, seed=seed, model_kwargs=model_kwargs, pos_interp=pos_interp or "timm", **common)
    if sep and scheme == "timm":
        return _load_timm(rest, weights=weights, model_kwargs=model_kwargs, pos_interp=pos_interp or "timm", **common)
    if sep and scheme == "hf":
        if weights:
            raise ConfigError("hf: models load their own weights; --weights does not apply",
                              hint="point at a local directory instead: --model hf:/path/to/saved_model")
        from .hf import load_hf
        return load_hf(rest, name=model, **common)
    if sep and scheme == "neco":
        _no_weights(model, weights)
        return _load_neco(rest, name=model, pos_interp=pos_interp, **common)
    if model in REGISTRY:
        return _load_registry(REGISTRY[model], weights=weights, model_kwargs=model_kwargs,
                              pos_interp=pos_interp, **common)
    from .plugin import is_plugin_spec, load_plugin
    if is_plugin_spec(model):
        return load_plugin(model, weights=weights, model_kwargs=model_kwargs, **common)
    raise unknown_model_error(model)


@contextlib.contextmanager
def pos_interp_for(encoder: DenseEncoder, choice: str, protocol: str) -> Iterator[None]:
    """While active, ``encoder`` resamples position embeddings as ``--pos-interp`` ``choice`` says for a run of
    ``protocol`` (``auto``: the mode of the code behind that protocol's published rows). Encoders that are not
    timm ViTs resample their own way: only ``auto`` applies to them."""
    if isinstance(encoder, TimmEncoder):
        with encoder.using_pos_interp(choice, protocol):
            yield
        return
    if choice not in POS_INTERP_CHOICES:
        raise ConfigError(f"unknown pos-embed interpolation {choice!r}; accepted: {', '.join(POS_INTERP_CHOICES)}",
                          hint="leave --pos-interp at auto for the published choice")
    if choice != "auto":
        raise ConfigError(f"--pos-interp {choice} applies to timm ViTs; {encoder.name} ({type(encoder).__name__}) "
                          "resamples its position embeddings its own way", hint="leave --pos-interp at auto")
    yield


def _no_weights(model: str, weights: str | Path | None) -> None:
    if weights:
        raise ConfigError(f"--weights does not apply to {model}",
                          hint="use timm:<arch> --weights PATH (or a registry name) to load a weights file")


def _build_with_weights(arch: str, path: str | Path, *, name: str, loader: str, layer: int, norm: bool,
                        model_kwargs: dict[str, Any] | None, pos_interp: str,
                        extra: dict[str, Any] | None = None, reader=read_backbone) -> TimmEncoder:
    """timm architecture + weights file -> converted, strictly loaded, fingerprinted TimmEncoder."""
    kwargs = dict(model_kwargs or {})
    raw = reader(path)                 # read first: a bad file should not cost a (possibly huge) model build
    net = create_timm_vit(arch, kwargs)
    loaded = convert_for(raw, net)
    pos = loaded.state_dict.get("pos_embed")
    if pos is not None and "img_size" not in kwargs and getattr(net, "pos_embed", None) is not None:
        # A checkpoint trained at another resolution (e.g. a 448 px fine-tune of a 224 px arch): build the
        # model at the checkpoint's grid, so its native size is honest and nothing is resampled at load time.
        grid = grid_from_pos_embed(net, pos)
        if grid is not None and (grid, grid) != tuple(net.patch_embed.grid_size):
            kwargs["img_size"] = grid * net.patch_embed.patch_size[0]
            net = create_timm_vit(arch, kwargs)
    base = arch.split(".")[0]
    load_strict(net, loaded.state_dict, source=str(loaded.path), arch=base)
    fingerprint = fingerprint_state_dict(net.state_dict(), arch=base, config=_identity_kwargs(kwargs))
    return TimmEncoder(net, name=name, fingerprint=fingerprint, layer=layer, norm=norm, loader=loader, arch=base,
                       pos_interp=pos_interp, weights=loaded.provenance(), extra=extra)


def _load_random(arch: str, *, seed: int, model_kwargs: dict[str, Any] | None, pos_interp: str, layer: int,
                 norm: bool) -> TimmEncoder:
    import timm
    with torch.random.fork_rng(devices=[]):   # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        net = create_timm_vit(arch, model_kwargs)
    base = arch.split(".")[0]
    fingerprint = f"random:{base}:seed={seed}:timm={timm.__version__}"
    ident = _identity_kwargs(model_kwargs)
    if model_kwargs:  # img_size changes the pos_embed draw, so every kwarg counts here
        fingerprint += ":" + json.dumps(model_kwargs, sort_keys=True, default=str)
    return TimmEncoder(net, name=f"random:{arch}", fingerprint=fingerprint, layer=layer, norm=norm,
                       loader="random", arch=base, pos_interp=pos_interp,
                       extra={"seed": seed, "model_kwargs": ident or None})


def _timm_pretrained_source(arch: str) -> WeightSource:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelError(f"timm has no pretrained weights for {arch!r}",
                         hint=f"pass --weights PATH, or use random:{arch} for a random-init floor")
    url = cfg.url if cfg.url and not cfg.custom_load and not cfg.url.endswith(".npz") else None
    hub = cfg.hf_hub_id if cfg.hf_hub_id and not cfg.hf_hub_id.endswith("/") else None
    filename = url.rsplit("/", 1)[-1] if url else f"{(hub or arch).replace('/', '--')}.safetensors"
    hf_filename = (cfg.hf_hub_filename or "model.safetensors") if hub else None
    return WeightSource(filename, url, hf_repo=hub, hf_filename=hf_filename)


def _load_timm(arch: str, *, weights: str | Path | None, model_kwargs: dict[str, Any] | None, pos_interp: str,
               layer: int, norm: bool) -> TimmEncoder:
    if not arch:
        raise ConfigError("timm: needs an architecture name, e.g. timm:vit_small_patch14_dinov2.lvd142m",
                          hint="`python -c \"import timm; print(timm.list_models('vit_*'))\"` lists them")
    check_arch(arch)  # fail on a bad name before looking for weights
    path = weights or fetch(_timm_pretrained_source(arch), what=f"timm:{arch}")
    return _build_with_weights(arch, path, name=f"timm:{arch}", loader="timm", layer=layer, norm=norm,
                               model_kwargs=model_kwargs, pos_interp=pos_interp)


def _registry_weights(entry: RegistryEntry) -> Path:
    """The entry's weights file: found locally, else downloaded; an entry without any URL says where to get it."""
    if entry.source.url or entry.source.hf_repo:
        return fetch(entry.source, what=entry.name)
    found = entry.source.find_local()
    if found is None:
        raise ModelError(f"weights for {entry.name} are not on this machine and have no download URL: {entry.obtain}",
                         hint=entry.source.where_to_put())
    return found


def _load_registry(entry: RegistryEntry, *, weights: str | Path | None, model_kwargs: dict[str, Any] | None,
                   pos_interp: str | None, layer: int, norm: bool) -> TimmEncoder:
    path = weights or _registry_weights(entry)
    return _build_with_weights(entry.arch, path, name=entry.name, loader="registry", layer=layer, norm=norm,
                               model_kwargs={**entry.model_kwargs, **(model_kwargs or {})},
                               pos_interp=pos_interp or entry.pos_interp,
                               reader=CHECKPOINT_READERS[entry.checkpoint_format],
                               extra={"method": entry.method, "weights_source": entry.published_url or entry.source.url,
                                      "timm_name": entry.timm_name})


def _neco_paths(spec: str) -> tuple[Path, Path]:
    path = Path(spec).expanduser()
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    return Path(f"{path}.safetensors"), Path(f"{path}.json")


def _load_neco(spec: str, *, name: str, pos_interp: str | None, layer: int, norm: bool) -> TimmEncoder:
    """A neco_train checkpoint, loaded strictly: timm keys exactly, no conversion, no prefix stripping.

    The pos-embed resampling defaults to the one recorded in the sidecar (the training-time mode), so
    features at non-native sizes match what the student saw during training.
    """
    weights_path, sidecar = _neco_paths(spec)
    if Path(spec).expanduser().is_dir():
        names = sorted(p.stem for p in Path(spec).expanduser().glob("*.safetensors")) or ["last"]
        raise ModelError(f"neco:{spec} is a folder, not a checkpoint (a checkpoint is <name>.safetensors plus "
                         "<name>.json)", hint=f"name one inside it, e.g. neco:{Path(spec) / names[-1]}")
    for p in (weights_path, sidecar):
        if not p.is_file():
            raise ModelError(f"NeCo checkpoint file {p} does not exist",
                             hint="a neco_train checkpoint is <name>.safetensors plus its <name>.json sidecar")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"NeCo sidecar {sidecar} is not valid JSON ({e})",
                         hint="restore it from the run folder, or load the weights with timm:<arch> --weights") from e
    if not isinstance(meta, dict) or meta.get("format") != NECO_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelError(f"NeCo sidecar {sidecar} has format {found!r}; expected {NECO_FORMAT!r}",
                         hint="write it with neco_train, or load the weights with timm:<arch> --weights")
    arch, kwargs = meta.get("arch"), meta.get("model_kwargs", {})
    pos_interp = pos_interp or meta.get("pos_interp") or "timm"
    if not isinstance(arch, str) or not isinstance(kwargs, dict):
        raise ModelError(f"NeCo sidecar {sidecar} needs a string 'arch' and an object 'model_kwargs'",
                         hint="restore it from the run folder, or load the weights with timm:<arch> --weights")
    from .convert import read_checkpoint
    sd = read_checkpoint(weights_path)
    net = create_timm_vit(arch, kwargs)
    base = arch.split(".")[0]
    load_strict(net, sd, source=str(weights_path), arch=base)
    fingerprint = fingerprint_state_dict(net.state_dict(), arch=base, config=_identity_kwargs(kwargs))
    keep = ("base_model", "base_fingerprint", "step", "epoch")
    return TimmEncoder(net, name=name, fingerprint=fingerprint, layer=layer, norm=norm, loader="neco", arch=base,
                       pos_interp=pos_interp,
                       weights={"weights_path": str(weights_path), "weights_format": NECO_FORMAT},
                       extra={f"neco_{k}": meta[k] for k in keep if k in meta})


def list_models() -> list[dict[str, Any]]:
    """Rows for ``densebench list models``: registry entries (with offline availability) and built-ins."""
    rows = [entry.as_row() for entry in REGISTRY.values()]
    try:
        import transformers  # noqa: F401
        hf_ok = True
    except ImportError:
        hf_ok = False
    builtin = [
        ("pixels", "non-learned colour/texture descriptor (pixels:<p> for patch size p)", "pixels-v1", 16, True),
        ("random:<timm arch>", "seeded random initialisation (--seed): a floor", "any timm ViT", None, True),
        ("timm:<timm arch>", "timm's pretrained weights, or --weights PATH", "any timm ViT", None, None),
        ("hf:<repo id or dir>", "transformers DINOv2 / DINOv2-with-registers"
         + ("" if hf_ok else " (needs: pip install densebench[hf])"), "dinov2", 14, None),
        ("neco:<checkpoint>", "a neco_train checkpoint (<name>.safetensors + <name>.json)", "from sidecar", None, True),
        ("<pkg.module>:<factory>", "a plugin factory (runs that code)", "user code", None, True),
    ]
    for name, method, arch, p, off in builtin:
        rows.append({"name": name, "method": method, "source": "built-in", "timm_name": None, "arch": arch,
                     "patch_size": p, "native_size": None, "offline": off, "expected_file": None, "page": None,
                     "notes": ""})
    return rows
