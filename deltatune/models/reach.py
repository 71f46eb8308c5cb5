"""Is the model hub reachable? Asked once, in about a second, before anything downloads.

Without this, `from_pretrained("owner/name")` on a machine with no network retries for a minute
and prints a dozen lines before failing. `hub_source` decides up front: the hub is reachable ->
the hub id; not reachable -> the registry's offline copy of the same model, or the copy in the
Hugging Face cache, or one ModelError line saying what to do.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def is_offline_mode() -> bool:
    """HF_HUB_OFFLINE / DELTATUNE_OFFLINE set to a true value."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "DELTATUNE_OFFLINE"))


@functools.lru_cache(maxsize=8)
def unreachable_reason(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why `endpoint` cannot be reached (a TCP connect within `timeout` s), or None if it can.

    Behind a proxy the answer is None (the proxy decides; a direct connect proves nothing)."""
    if any(os.environ.get(v) for v in _PROXIES):
        return None
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err.strerror or type(err).__name__})"


def hub_cache_folder(repo_id: str) -> str | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, if it has a config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def offline_reason() -> str | None:
    """Why the hub cannot be used now (offline mode, or unreachable), or None."""
    if is_offline_mode():
        return "offline mode (HF_HUB_OFFLINE / DELTATUNE_OFFLINE)"
    return unreachable_reason(hub_endpoint())
