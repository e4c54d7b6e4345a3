"""Numerical precision of the backbone forward and the k-NN search: one setting, ``--precision``.

``auto`` (the default) is the fast choice: fp16 autocast and fp16 keys on CUDA, fp32 on the CPU. The
references run fp32; ``fp32`` (TF32 off), ``tf32`` (CUDA matmuls in TF32), ``bf16`` and ``fp16`` (autocast)
choose explicitly. The resolved mode is recorded in every result (``derived.precision``) and is part of the
feature-cache key, so features computed one way are never reused for another. How far each mode moves the
numbers is measured by ``densebench selfcheck`` and documented in docs/precision.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import ConfigError, choices_message

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_stack: list[str] = ["auto"]


def check_precision(mode: str) -> str:
    if mode not in PRECISIONS:
        raise ConfigError(choices_message("--precision", mode, PRECISIONS),
                          hint="leave it at auto (fp16 on CUDA, fp32 on the CPU), or fp32 to match the references")
    return mode


@contextlib.contextmanager
def precision(mode: str) -> Iterator[None]:
    """Run the enclosed evaluation at ``mode`` (TF32 switched on only for ``tf32``, restored afterwards)."""
    check_precision(mode)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    _stack.append(mode)
    try:
        yield
    finally:
        _stack.pop()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def resolved(device_type: str) -> str:
    """The mode actually used on ``device_type`` (``auto`` and CPU ``tf32`` resolved)."""
    mode = _stack[-1]
    if mode == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if mode == "tf32" and device_type != "cuda":
        return "fp32"
    return mode


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of the forward on ``device_type`` (None: no autocast)."""
    return _AUTOCAST.get(resolved(device_type))


def fp16_search(device_type: str) -> bool:
    """Whether the k-NN search keeps its keys in fp16 (only on CUDA, for the fp16 / bf16 / auto modes)."""
    return device_type == "cuda" and resolved(device_type) in ("fp16", "bf16")


def record(device_type: str) -> dict:
    return {"requested": _stack[-1], "extraction": resolved(device_type),
            "retrieval": "fp16" if fp16_search(device_type) else "fp32"}
