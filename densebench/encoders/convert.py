"""Read a ``--weights`` file in any of the formats dense-SSL checkpoints ship in, convert it to timm keys and
load it **strictly**.

Why our own code instead of ``load_state_dict(strict=False)`` as the method READMEs suggest: a silently
missing key (registers dropped, a head loaded instead of the backbone) changes the numbers without an error.
Why not timm's ``checkpoint_filter_fn`` alone: it resamples position embeddings whose shape differs, which
hides a checkpoint/architecture mismatch instead of reporting it. The key renames follow the published
formats:

* timm: the target format, nothing to do.
* Meta DINO v1 (``dino_deitsmall16_pretrain.pth`` and full training checkpoints ``{"teacher": {"backbone.*",
  "head.*"}, "student": ...}``): timm key names under a container and a prefix.
* Meta DINOv2 (hub files, NeCo's ``vit_v2`` copies): ``mask_token`` (dropped), ``register_tokens`` ->
  ``reg_token`` with the class position embedding folded into ``cls_token`` (timm's reg models do not embed
  the prefix tokens), SwiGLU ``w12/w3`` -> ``fc1/fc2``, chunked ``blocks.<chunk>.<i>`` -> ``blocks.<i>``.
* NeCo (spec neco.md §4) and Leopart/TimeT/CrIBo: plain state dicts in those key names, possibly under a
  ``model.``/``module.``/``backbone.`` prefix and with projection-head (``head.*``) keys, which are dropped.

The fingerprint is computed from the model's state dict *after* loading, so a Meta-format and a timm-format
copy of the same weights fingerprint identically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

#: File suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
#: Containers a checkpoint may wrap its state dict in, in the order we look for them. ``teacher`` comes
#: before ``student``: DINO, CrIBo and NeCo evaluate the EMA teacher of a full training checkpoint.
CONTAINER_KEYS = ("teacher", "state_dict", "model", "module", "student", "state_dict_ema", "model_ema")
#: A key that only a ViT backbone has; its prefix is the backbone's prefix.
ANCHOR = "patch_embed.proj.weight"


@dataclass
class LoadedWeights:
    """A state dict read from a file, plus what was done to find it (recorded in ``describe()``)."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    container: str = ""            # e.g. "teacher" or "state_dict/model"
    prefix: str = ""               # the stripped backbone prefix, e.g. "backbone."
    source_format: str = "timm"    # timm (also DINO v1 names) | meta-dinov2 | meta-dinov2-reg
    dropped: list[str] = field(default_factory=list)   # keys dropped on purpose (heads, mask_token)

    def provenance(self) -> dict[str, Any]:
        out = {"weights_path": str(self.path), "weights_container": self.container or None,
               "weights_prefix": self.prefix or None, "weights_format": self.source_format,
               "weights_dropped_keys": len(self.dropped)}
        if self.dropped:   # which modules, so a reader sees that it was a head that was left out
            out["weights_dropped_modules"] = sorted({k.split(".")[0] for k in self.dropped})
        return out


def read_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file safely: safetensors, or ``torch.load(weights_only=True)``.

    ``argparse.Namespace`` is allowed as the only non-tensor class because DINO/CrIBo full checkpoints store
    their training ``args`` in one; it is a plain attribute bag and executes no code.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelError(f"weights path {path} is a folder, not a weights file",
                         hint="pass the .safetensors/.pth/.ckpt file inside it with --weights")
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist", hint="check the --weights path")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"weights file {path} is not a readable safetensors file ({e})",
                             hint="re-download or re-export it") from e
    if suffix not in TORCH_SUFFIXES:
        raise ModelError(f"weights file {path} has an unsupported suffix {suffix!r}",
                         hint=f"use one of .safetensors, {', '.join(TORCH_SUFFIXES)}")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise ModelError(f"weights file {path} is not a PyTorch checkpoint, so torch.load(weights_only=True) "
                         f"cannot read it: {not_torch}",
                         hint="pass the .pth/.ckpt file torch.save wrote (or a .safetensors file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        text = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ModelError(
            f"weights file {path} cannot be read with torch.load(weights_only=True): {text}",
            hint="if it stores Python objects besides tensors (e.g. a Lightning checkpoint's hyper-parameters), "
                 "extract its state dict once, in a Python session you trust (unpickling runs code), and save "
                 "that dict alone with torch.save (or safetensors)") from e


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file (a zip archive, or a pickle for the legacy format), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "it is empty"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8]!r}, neither a zip archive nor a pickle"
    return f"it is a text file (starting {text.splitlines()[0][:40]!r})"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_container(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Descend through ``teacher``/``state_dict``/``model``/... wrappers to the tensor dict."""
    trail: list[str] = []
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ModelError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            # a dict mixing tensors and metadata (e.g. {"pos_embed": ..., "epoch": 3}) keeps only the tensors
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                obj = tensors
                break
            raise ModelError(f"weights file {path} has no state dict; top-level keys: {sorted(map(str, obj))[:10]}",
                             hint=f"expected tensors or one of the containers {', '.join(CONTAINER_KEYS)}")
        trail.append(key)
        obj = obj[key]
    return dict(obj), "/".join(trail)


def _prefix_rank(prefix: str) -> tuple[int, int, str]:
    # Between several backbones in one file prefer the student/online one (NeCo evaluates `model.`),
    # then the shortest prefix; EMA/teacher copies last. Containers (above) already chose `teacher`
    # for DINO-style files, where the choice is explicit.
    return (int("teacher" in prefix or "ema" in prefix), len(prefix), prefix)


def strip_backbone_prefix(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Keep the keys of one ViT backbone and strip its prefix (``module.backbone.`` etc.)."""
    prefixes = sorted({k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)}, key=_prefix_rank)
    if not prefixes:
        sample = sorted(sd)[:8]
        raise ModelError(f"weights file {path} contains no ViT patch embedding (no key ending in {ANCHOR!r}); "
                         f"first keys: {sample}", hint="pass the backbone weights of a ViT")
    prefix, others = prefixes[0], [p for p in prefixes[1:] if p.startswith(prefixes[0])]
    # keys of the other backbones nested under the chosen prefix (e.g. "teacher." under "") are not ours
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not any(k.startswith(o) for o in others)}, prefix


_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.")


def to_timm_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Convert a prefix-free backbone state dict to ``model``'s timm key names.

    Returns ``(state_dict, source_format, dropped_keys)``.
    """
    sd = dict(sd)
    dropped: list[str] = []
    # DINO v1, Leopart, TimeT and CrIBo backbones use timm's names already, so they count as "timm"
    fmt = "timm"
    if "mask_token" in sd or "register_tokens" in sd or any(_SWIGLU.match(k) for k in sd):
        fmt = "meta-dinov2"
    # heads (DINO/NeCo projection heads, classifiers) never belong to the dense backbone: NeCo's own
    # loader drops every key containing "head" the same way
    own = set(model.state_dict())
    for k in list(sd):
        if (k == "mask_token" or "head" in k.split(".")[0]) and k not in own:
            dropped.append(k)
            del sd[k]
    # chunked blocks (dinov2 block_chunks > 0): blocks.<chunk>.<i>.x -> blocks.<i>.x
    if any(_CHUNK.match(k) for k in sd) and not any(_CHUNK.match(k) for k in own):
        sd = {_CHUNK.sub(r"blocks.\2.", k): v for k, v in sd.items()}
    sd = {_SWIGLU.sub(lambda m: m.group(1) + ("fc1." if m.group(2) == "w12" else "fc2."), k): v
          for k, v in sd.items()}
    if "register_tokens" in sd:
        fmt = "meta-dinov2-reg"
        sd["reg_token"] = sd.pop("register_tokens")
        if getattr(model, "no_embed_class", False) and "pos_embed" in sd and "cls_token" in sd:
            # Meta adds pos_embed[:, 0] to the class token and no position to registers; timm reg models
            # embed no prefix token, so the class position is folded into the token itself (exact).
            pos = sd["pos_embed"]
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
            sd["pos_embed"] = pos[:, 1:]
    return sd, fmt, dropped


def read_backbone(path: str | Path) -> LoadedWeights:
    """Read a weights file and isolate the ViT backbone's tensors (keys not yet converted)."""
    path = Path(path).expanduser()
    sd, container = unwrap_container(read_checkpoint(path), path)
    sd, prefix = strip_backbone_prefix(sd, path)
    return LoadedWeights(sd, path, container, prefix)


#: Top-level modules of SelfPatch's ``MultiCropWrapper`` besides the backbone (main_selfpatch.py): the
#: aggregation module (``SelfPatchHead``, class-attention blocks) and the DINO and SelfPatch projection heads.
SELFPATCH_HEADS = ("ca_head.", "c_head.", "p_head.")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def read_selfpatch(path: str | Path) -> LoadedWeights:
    """A SelfPatch checkpoint: the ``teacher`` of a full training checkpoint (as SelfPatch's and DINO's evaluation
    scripts load it; a teacher or backbone state dict on its own works too), ``module.`` then ``backbone.``
    stripped, the aggregation module and both heads dropped and listed. Every other key must be the backbone's:
    the strict load reports anything else."""
    path = Path(path).expanduser()
    obj = read_checkpoint(path)
    container = ""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        if isinstance(obj.get("teacher"), Mapping):
            obj, container = obj["teacher"], "teacher"
        elif isinstance(obj.get("student"), Mapping):
            raise ModelError(f"SelfPatch checkpoint {path} has a 'student' but no 'teacher' state dict",
                             hint="evaluation uses the teacher; pass the full checkpoint.pth that main_selfpatch.py "
                                  "writes")
    sd, inner = unwrap_container(obj, path)
    container = "/".join(c for c in (container, inner) if c)
    keys = {k: _strip(_strip(k, "module."), "backbone.") for k in sd}
    prefix = next((k[: -len(ANCHOR)] for k in sd if k.endswith(ANCHOR)), "")
    dropped = sorted(k for k, new in keys.items() if new.startswith(SELFPATCH_HEADS))
    kept = {new: sd[k] for k, new in keys.items() if not new.startswith(SELFPATCH_HEADS)}
    return LoadedWeights(kept, path, container, prefix, "selfpatch", dropped)


#: How a registry entry's weights file is read (``RegistryEntry.checkpoint_format``).
CHECKPOINT_READERS = {"auto": read_backbone, "selfpatch": read_selfpatch}


def convert_for(loaded: LoadedWeights, model: nn.Module) -> LoadedWeights:
    """``loaded`` with its keys converted to ``model``'s timm names (see :func:`to_timm_keys`); a format and
    dropped keys the reader already determined are kept."""
    sd, fmt, dropped = to_timm_keys(loaded.state_dict, model)
    fmt = loaded.source_format if loaded.source_format != "timm" else fmt
    return LoadedWeights(sd, loaded.path, loaded.container, loaded.prefix, fmt, loaded.dropped + dropped)


def load_weights_file(path: str | Path, model: nn.Module) -> LoadedWeights:
    """Read, unwrap, strip and convert a weights file for ``model`` (does not load it yet)."""
    return convert_for(read_backbone(path), model)


def load_weights_into(model: nn.Module, path: str | Path, *, arch: str | None = None) -> LoadedWeights:
    """Convert ``path`` for ``model`` and load it strictly (for callers that build their own timm model,
    e.g. neco_train). Returns what was loaded and how it was found."""
    loaded = load_weights_file(path, model)
    load_strict(model, loaded.state_dict, source=str(loaded.path), arch=arch or type(model).__name__)
    return loaded


def _describe_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{shown}{more}"


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a readable ModelError on any mismatch.

    The message lists the first ten missing, unexpected and shape-mismatched keys with their counts, and
    names the file and the architecture, because that is what a user needs to pick the right ``--model``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"weights {source} do not match architecture {arch}:"]
        if missing:
            parts.append(f"  {len(missing)} missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected keys: {_describe_keys(unexpected)}")
        if shapes:
            parts.append(f"  {len(shapes)} shape mismatches: {_describe_keys(shapes)}")
        raise ModelError("\n".join(parts),
                         hint="choose the --model whose architecture the checkpoint was trained with "
                              "(see `densebench list models`), or check that the file is a ViT backbone")
    model.load_state_dict(dict(sd), strict=True)


def fingerprint_state_dict(sd: Mapping[str, torch.Tensor], *, arch: str | None = None,
                           config: Mapping[str, Any] | None = None) -> str:
    """sha256 over sorted keys, dtypes, shapes and raw bytes (plus the architecture identity if given).

    The architecture name and non-weight constructor settings are hashed too because two architectures can
    share every tensor shape (e.g. a different head count) and still compute different features.
    """
    h = hashlib.sha256()
    if arch is not None:
        h.update(f"arch={arch};config={json.dumps(dict(config or {}), sort_keys=True, default=str)}\n".encode())
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
