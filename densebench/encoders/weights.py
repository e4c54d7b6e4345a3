"""Finding published weights: the local caches first, a download only when online, never a hang.

Files live where the upstream tools put them, so weights a user already has are found: the torch hub
checkpoint directory (``$TORCH_HOME/hub/checkpoints``, where ``torch.hub.load_state_dict_from_url`` and
Meta's hubconf store ``dino_*``/``dinov2_*`` files) and the Hugging Face cache (timm's ``timm/<model>`` repos,
``FunAILab/NeCo``). Offline (``DENSEBENCH_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, as in the tests) nothing
touches the network and a missing file is one ModelError naming the file, where to put it, and ``--weights``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

_TRUE = ("1", "true", "yes", "on")
#: Seconds a connect or a read may stall before the download is abandoned.
DOWNLOAD_TIMEOUT = float(os.environ.get("DENSEBENCH_DOWNLOAD_TIMEOUT", "20"))


def offline() -> bool:
    """Whether downloads are forbidden (``DENSEBENCH_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("DENSEBENCH_OFFLINE", "HF_HUB_OFFLINE"))


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints``: where torch.hub keeps downloaded state dicts."""
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class WeightSource:
    """Where one set of published weights can be found.

    ``url`` is downloaded into the torch hub checkpoint dir as ``filename``; ``hf_repo``/``hf_filename``
    name a copy on the Hugging Face hub (looked up in the HF cache offline).
    """

    filename: str
    url: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None

    def local_path(self) -> Path:
        return torch_hub_checkpoints() / self.filename

    def hf_cached(self) -> Path | None:
        if not (self.hf_repo and self.hf_filename):
            return None
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(self.hf_repo, self.hf_filename)
        return Path(found) if isinstance(found, str) and Path(found).is_file() else None

    def find_local(self) -> Path | None:
        """The cached file if it is on disk already (never touches the network)."""
        path = self.local_path()
        return path if path.is_file() else self.hf_cached()

    def where_to_put(self) -> str:
        lines = [f"put {self.filename} into {self.local_path().parent}/"]
        if self.url:
            lines[0] += f" (download: {self.url})"
        if self.hf_repo and self.hf_filename:
            lines.append(f"or fetch it into the Hugging Face cache ({hf_cache_dir()}) with "
                         f"`huggingface-cli download {self.hf_repo} {self.hf_filename}`")
        lines.append("or pass the file you have with --weights PATH")
        return "; ".join(lines)


def download_url(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Stream ``url`` to ``dest`` through a ``.part`` file (nothing half-written on failure)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"densebench: downloading {url} -> {dest}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": "densebench"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url``'s host answers a TCP connection within ``timeout`` seconds, else why not.

    Checked before a download so that a machine without network fails in seconds instead of sitting
    through a client's retries (huggingface_hub retries for about 25 s)."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return f"no host in {url}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} is unreachable ({e.strerror or e})"


def fetch(source: WeightSource, *, what: str) -> Path:
    """The local path of ``source``'s file: cached, else downloaded (online only), else a ModelError."""
    found = source.find_local()
    if found is not None:
        return found
    if offline():
        raise ModelError(f"weights for {what} are not available offline: expected {source.local_path()}",
                         hint=source.where_to_put())
    errors: list[str] = []
    if source.url:
        try:
            return download_url(source.url, source.local_path())
        except (urllib.error.URLError, OSError, ValueError) as e:  # URLError, timeouts, HTTP errors, disk
            errors.append(f"{source.url}: {e}")
    hub_down = reachable("https://huggingface.co") if source.hf_repo and source.hf_filename else None
    if hub_down:
        errors.append(f"hf://{source.hf_repo}/{source.hf_filename}: {hub_down} (no network? set "
                      "DENSEBENCH_OFFLINE=1 to skip downloads)")
    elif source.hf_repo and source.hf_filename:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
        try:
            return Path(hf_hub_download(source.hf_repo, source.hf_filename))
        except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as e:
            errors.append(f"hf://{source.hf_repo}/{source.hf_filename}: {type(e).__name__}: {e}")
    raise ModelError(f"weights for {what} could not be downloaded ({'; '.join(errors) or 'no source known'})",
                     hint=source.where_to_put())
