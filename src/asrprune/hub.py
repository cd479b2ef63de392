"""The Hugging Face hub, probed so that offline users get an answer in seconds, not minutes.

Models (hub ids) and datasets (``datasets`` ids) are loaded from the hub where it is reachable
and from the local Hugging Face cache otherwise; these helpers decide which.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from contextlib import contextmanager

__all__ = ["hub_offline", "hub_reachable", "offline_mode"]


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that offline users get an answer in seconds.

    Behind a proxy the probe would say nothing useful, so it reports reachable there.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def offline_mode():
    """Make datasets/huggingface_hub use only their local cache (fails fast instead of retrying).

    Both libraries read ``HF_HUB_OFFLINE`` once at import time, so the env var alone is not enough.
    """
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
