"""Checkpoints: what densebench evaluates, and what ``--resume`` continues from.

* ``<name>.safetensors`` + ``<name>.json``: the student backbone's state dict in timm key format and a
  sidecar ``{"format": "densebench-neco-1", "arch", "model_kwargs", "pos_interp", "base_model",
  "base_fingerprint", "step", "epoch", "config", ...}``. ``densebench run --model neco:<name>`` (or
  ``--model timm:<arch> --weights <name>.safetensors``) loads it.
* ``train_state.pt``: everything a resumed run needs (student with head, teacher, optimizer, queue,
  generator states, step), saved with ``torch.save`` and read with ``weights_only=True``.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written checkpoint behind the name a user or ``--resume`` will read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from densebench.errors import ConfigError, ModelError
from densebench.results import atomic_write, atomic_write_text

NECO_FORMAT = "densebench-neco-1"
STATE_FORMAT = "neco-train-state-1"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)``, fsync, rename, with a result's permission bits (:func:`densebench.results.atomic_write`)."""
    atomic_write(path, write)


def checkpoint_paths(stem: str | os.PathLike) -> tuple[Path, Path]:
    """``<stem>.safetensors`` and ``<stem>.json`` (a given suffix of either is ignored)."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def save_backbone(stem: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the backbone weights (timm keys) and the sidecar; returns the .safetensors path.

    The weights are written first and the sidecar last, so a sidecar on disk always describes
    complete weights.
    """
    from safetensors.torch import save_file

    weights, sidecar = checkpoint_paths(stem)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": NECO_FORMAT}))
    body = {"format": NECO_FORMAT, **meta}
    atomic_write_text(sidecar, json.dumps(body, indent=2, sort_keys=True, default=str))
    return weights


def read_sidecar(stem: str | os.PathLike) -> dict[str, Any]:
    _, sidecar = checkpoint_paths(stem)
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ModelError(f"checkpoint sidecar {sidecar} does not exist") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"checkpoint sidecar {sidecar} is not valid JSON ({e})") from None
    if meta.get("format") != NECO_FORMAT:
        raise ModelError(f"{sidecar} has format {meta.get('format')!r}; expected {NECO_FORMAT!r}")
    return meta


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write the full training state (tensors, numbers, strings and containers of them)."""
    path = Path(path)
    _atomic_write(path, lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))
    return path


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :func:`save_state` (``weights_only=True``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "train_state.pt"
    if not path.is_file():
        raise ConfigError(f"resume checkpoint {path} does not exist",
                          hint="pass the run folder or its train_state.pt to --resume")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ConfigError(f"resume checkpoint {path} cannot be read ({type(e).__name__}: {e})",
                          hint="it may be truncated; use an older checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a neco_train training state (format {STATE_FORMAT})")
    return state
