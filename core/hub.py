"""The Hugging Face hub: whether it can be reached at all, and reading a hub dataset without long retries.

``hub_reachable`` is a quick probe (offline environment variables, then a TCP connect), kept for 60 s,
so that loaders can go offline at once instead of retrying an unreachable hub for about 25 s per file.
``read_hub_dataset`` reads a dataset id that ``core.sources.resolve_data`` accepted, switching
``datasets`` to offline mode for the call when the hub is unreachable; failures are ``HubUnavailable``.

Like ``core.sources``, this module imports the standard library only (``datasets`` is imported when a
dataset is read).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

from .sources import _exists, _shown, is_hub_id


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


_probe: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be asked at all (offline env vars, then a quick TCP connect).

    Without this check, transformers and datasets retry an unreachable hub for about 25 s per file.
    With a proxy configured the probe is skipped (the proxy decides). The answer is kept for 60 s.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    cached = _probe.get(endpoint)
    if cached and time.monotonic() - cached[0] < 60:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _probe[endpoint] = (time.monotonic(), ok)
    return ok


class HubUnavailable(Exception):
    """A hub dataset that could not be read; ``reason`` is a phrase for the caller's message."""

    def __init__(self, reason: str, offline: bool):
        super().__init__(reason)
        self.reason = reason
        self.offline = offline


_offline_lock = threading.Lock()


def read_hub_dataset(hub_id: str, splits: tuple[str, ...] = ("train",), limit: int = 0) -> tuple[str, list[dict]]:
    """(split, rows) of a hub dataset through ``datasets``: the first of ``splits`` it has, else its
    first split. At most ``limit`` rows (0 = all).

    Only for ids ``resolve_data`` accepted (checked again here: a hub id must never name a local
    folder, which ``datasets`` would read instead). When the hub cannot be reached, ``datasets`` is
    switched to offline mode for the call, so a cached copy still loads and an uncached one fails at
    once instead of after ~25 s of retries. Raises ``HubUnavailable``.
    """
    if not is_hub_id(hub_id) or _exists(hub_id):
        raise ValueError(f"{_shown(hub_id)} is not a hub dataset id")
    offline = not hub_reachable()
    try:
        import datasets
        import datasets.config
        import huggingface_hub.constants as hub_constants
    except ImportError:
        raise HubUnavailable("the `datasets` package needed to read hub datasets is not installed", offline) from None
    lock = _offline_lock if offline else _NoLock()
    with lock:
        saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
        try:
            if offline:
                datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
            if len(splits) == 1:
                loaded = {splits[0]: datasets.load_dataset(hub_id, split=splits[0])}
            else:
                loaded = datasets.load_dataset(hub_id)
            split = next((s for s in splits if s in loaded), next(iter(loaded), None))
            if split is None:
                raise HubUnavailable("it has no splits", offline)
            ds = loaded[split]
            if limit and len(ds) > limit:
                ds = ds.select(range(limit))
            rows = [dict(row) for row in ds]
        except HubUnavailable:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            reason = ("the hub could not be reached (offline) and it is not in the local datasets cache" if offline
                      else f"the hub could not provide it ({type(err).__name__}: {first})")
            raise HubUnavailable(reason, offline) from None
        finally:
            datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    return split, rows


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
