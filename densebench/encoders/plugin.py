"""``pkg.module:factory`` (or ``/path/to/file.py:factory``): encoders from user code.

**This imports and runs the named Python code**, with the user's permissions, exactly as ``python -c
"import pkg.module"`` would. Only use plugins you trust; densebench never fetches plugin code itself.

The factory is called with no arguments (or with ``model_kwargs``) and returns either

* a :class:`~densebench.encoders.base.DenseEncoder`, used as is; or
* an ``nn.Module``: a timm ViT is wrapped like ``timm:`` models; any other module is wrapped by
  :class:`ModuleEncoder`, which understands the DINO/DINOv2 ``get_intermediate_layers`` API and a
  ``forward_features`` that returns the token sequence (prefix tokens first) or DINOv2's dict.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .base import DenseEncoder, resolve_layer
from .convert import fingerprint_state_dict, load_strict, load_weights_file, read_checkpoint, unwrap_container
from .timm_encoder import TimmEncoder, is_timm_vit

_MODULE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_plugin_spec(model: str) -> bool:
    """``a.b:f`` or ``path/to/file.py:f``."""
    left, sep, right = model.rpartition(":")
    return bool(sep) and right.isidentifier() and (bool(_MODULE.match(left)) or left.endswith(".py"))


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import the module named in ``spec`` and return its factory attribute (runs the module's code)."""
    left, _, attr = spec.rpartition(":")
    try:
        if left.endswith(".py"):
            path = Path(left).expanduser()
            if not path.is_file():
                raise ModelError(f"plugin file {path} does not exist")
            mod_name = "densebench_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(left)
    except ModuleNotFoundError as e:
        raise ModelError(f"plugin module {left!r} cannot be imported ({e})",
                         hint="make it importable (pip install it, or add its folder to PYTHONPATH), "
                              "or give a file: --model /path/to/file.py:factory") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"plugin module {left!r} has no callable {attr!r}",
                         hint=f"define `def {attr}(): ...` returning an nn.Module or a DenseEncoder")
    return factory


def _attr_int(obj: Any, *names: str) -> int | None:
    for n in names:
        cur = obj
        for part in n.split("."):
            cur = getattr(cur, part, None)
        if isinstance(cur, (tuple, list)):
            cur = cur[0] if len(set(cur)) == 1 else None
        if isinstance(cur, int):
            return cur
    return None


class ModuleEncoder(DenseEncoder):
    """Any ViT-like module: DINO/DINOv2 ``get_intermediate_layers`` or ``forward_features`` token output.

    Prefix tokens are removed by keeping the last ``(H/p)*(W/p)`` tokens, which is right for every ViT
    that puts class/register tokens first (DINO, DINOv2, timm, NeCo, probe3d all do).
    """

    def __init__(self, module: nn.Module, *, name: str, fingerprint: str, layer: int = -1, norm: bool = True,
                 weights: dict[str, Any] | None = None):
        super().__init__(layer=layer, norm=norm)
        self.weights_info = dict(weights or {})
        p = _attr_int(module, "patch_size", "patch_embed.patch_size")
        d = _attr_int(module, "embed_dim", "num_features")
        if p is None or d is None:
            raise ModelError(f"plugin {name} returned a {type(module).__name__} without integer `patch_size` and "
                             "`embed_dim` attributes", hint="set them on the module, or return a DenseEncoder")
        self.module = module.eval()
        self.patch_size, self.embed_dim, self.name, self.fingerprint = p, d, name, fingerprint
        blocks = getattr(module, "blocks", None)
        self.depth = len(blocks) if blocks is not None else None
        gil = getattr(module, "get_intermediate_layers", None)
        self.api = "forward_features"
        if gil is not None and self.depth:
            self.api = "get_intermediate_layers(norm)" if "norm" in inspect.signature(gil).parameters \
                else "get_intermediate_layers"
        elif not hasattr(module, "forward_features"):
            raise ModelError(f"plugin {name} returned a {type(module).__name__} with neither get_intermediate_layers "
                             "nor forward_features", hint="return a DenseEncoder subclass instead")
        self._check(layer, norm)

    def _check(self, layer: int, norm: bool) -> int | None:
        if self.api == "get_intermediate_layers(norm)":
            return resolve_layer(layer, self.depth, self.name)
        if self.api == "get_intermediate_layers":
            if not norm:
                raise ConfigError(f"{self.name} (DINO v1 API) always applies the final norm; norm=False is unavailable")
            return resolve_layer(layer, self.depth, self.name)
        if layer != -1 or not norm:
            raise ConfigError(f"{self.name} only exposes forward_features: layer=-1 with norm only",
                              hint="return a DenseEncoder from the plugin to support other layers")
        return None

    def _features(self, images: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        idx = self._check(layer, norm)
        b, _, h, w = images.shape
        n = (h // self.patch_size) * (w // self.patch_size)
        if self.api == "get_intermediate_layers(norm)":
            tokens = self.module.get_intermediate_layers(images, n=[idx], norm=norm)[0]
        elif self.api == "get_intermediate_layers":
            tokens = self.module.get_intermediate_layers(images, n=self.depth - idx)[0]
        else:
            out = self.module.forward_features(images)
            tokens = out["x_norm_patchtokens"] if isinstance(out, dict) else out
        if tokens.ndim != 3 or tokens.shape[1] < n:
            raise ModelError(f"plugin {self.name} returned tokens of shape {tuple(tokens.shape)}; "
                             f"expected (B, prefix + {n}, D)")
        return tokens[:, -n:].reshape(b, h // self.patch_size, w // self.patch_size, tokens.shape[-1])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"loader": "plugin", "arch": type(self.module).__name__, "plugin_api": self.api,
                  "pos_interp": "plugin-defined", **self.weights_info})
        return d


def load_plugin(spec: str, *, weights: str | Path | None, layer: int, norm: bool,
                model_kwargs: dict[str, Any] | None = None) -> DenseEncoder:
    """Call the plugin factory and wrap what it returns (see module docstring: this runs user code)."""
    factory = resolve_factory(spec)
    obj = factory(**(model_kwargs or {}))
    if isinstance(obj, DenseEncoder):
        if weights:
            raise ConfigError(f"plugin {spec} returned a ready DenseEncoder; --weights cannot be applied to it",
                              hint="let the factory load its own weights, or return an nn.Module")
        for attr in ("patch_size", "embed_dim", "fingerprint"):
            if not hasattr(obj, attr):
                raise ModelError(f"plugin {spec} returned a DenseEncoder without `{attr}`")
        if not getattr(obj, "name", None):
            obj.name = spec
        obj.layer, obj.norm = layer, norm
        return obj
    if not isinstance(obj, nn.Module):
        raise ModelError(f"plugin {spec} returned a {type(obj).__name__}, not an nn.Module or a DenseEncoder")
    info: dict[str, Any] = {}
    if weights:
        if is_timm_vit(obj):
            loaded = load_weights_file(weights, obj)
            sd, info = loaded.state_dict, loaded.provenance()
        else:
            sd, container = unwrap_container(read_checkpoint(weights), Path(weights))
            info = {"weights_path": str(weights), "weights_container": container or None}
        load_strict(obj, sd, source=str(weights), arch=spec)
    return wrap_module(obj, name=spec, layer=layer, norm=norm, loader="plugin", identity=f"plugin:{spec}",
                       config=model_kwargs, weights=info)


#: Caller-supplied encoders up to this many bytes of weights are hashed to check their fingerprint (about
#: 1 s per GB); larger ones keep their fingerprint as given (documented).
CHECK_WEIGHTS_UP_TO = 2 << 30


def adopt_encoder(model: Any, *, layer: int | None = None, norm: bool | None = None) -> DenseEncoder:
    """The encoder for an object a caller passes to ``densebench.evaluate``: a DenseEncoder as it is (its
    fingerprint checked against a hash of its weights when they are at most CHECK_WEIGHTS_UP_TO bytes), any
    other ``nn.Module`` wrapped by :func:`wrap_module`."""
    if isinstance(model, DenseEncoder):
        tensors = list(model.state_dict().values())
        if tensors and sum(t.numel() * t.element_size() for t in tensors) <= CHECK_WEIGHTS_UP_TO:
            digest = fingerprint_state_dict(model.state_dict(), arch=f"{type(model).__module__}.{type(model).__name__}")
            model.weights_hash = None if model.fingerprint == digest else digest
        return model
    if isinstance(model, nn.Module):
        kw = {k: v for k, v in (("layer", layer), ("norm", norm)) if v is not None}
        return wrap_module(model, **kw)
    raise ModelError(f"cannot evaluate a {type(model).__name__}: pass a model string (see `densebench list models`), "
                     "a DenseEncoder or an nn.Module (a timm ViT, or a module with get_intermediate_layers / "
                     "forward_features)")


def wrap_module(obj: nn.Module, *, name: str | None = None, layer: int = -1, norm: bool = True,
                loader: str = "module", identity: str | None = None, config: dict[str, Any] | None = None,
                weights: dict[str, Any] | None = None) -> DenseEncoder:
    """Any ``nn.Module`` as a DenseEncoder (a timm ViT, or a ViT-like module with ``get_intermediate_layers``
    or ``forward_features``), fingerprinted from its weights: a sha256 of the state dict plus its class."""
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    name = name or type(obj).__name__
    fingerprint = fingerprint_state_dict(obj.state_dict(), arch=identity or f"module:{cls}", config=config)
    if is_timm_vit(obj):
        return TimmEncoder(obj, name=name, fingerprint=fingerprint, layer=layer, norm=norm, loader=loader,
                           arch=identity or cls, weights=weights, extra={loader: identity or cls})
    return ModuleEncoder(obj, name=name, fingerprint=fingerprint, layer=layer, norm=norm, weights=weights)
