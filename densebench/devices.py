"""Which torch device a run uses: one resolver for ``--device`` everywhere (evaluation, retrieval, neco_train)."""

from __future__ import annotations

import torch

from .errors import ConfigError, choices_message

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda``/``cuda:N`` must be available."""
    device = str(device).strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} requested but CUDA is not available", hint="use --device cpu")
        return device
    raise ConfigError(choices_message("device", device, DEVICE_CHOICES))


def host_available() -> int | None:
    """The host memory available to new work (``MemAvailable``: free plus reclaimable page cache; else the free
    pages), or None when neither can be read."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None
