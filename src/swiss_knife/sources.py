"""Where models and text come from, decided without importing torch.

A model source is a local directory, a .gguf file, or a Hugging Face hub id; a text source is a
local file or folder, or a hub dataset name. Light commands (`validate`) check recipes with these
rules, and `load_model` uses the hub helpers to fail in a second on an offline machine instead of
after half a minute of retries.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Weight files that are Python pickles: `torch.load` reads them (with weights_only=True here).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw")
DATA_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet", ".csv")

_TRUE = {"1", "on", "yes", "true"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def looks_like_local_path(source: str) -> bool:
    """Whether a model source that is not on disk was meant as a path (not a hub id).

    Hub ids are `name` or `org/name`; anything else that is not on disk was meant as a path.
    """
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or source.endswith(WEIGHT_SUFFIXES)
        or "\\" in source
    )


def is_local_data_source(source: str) -> bool:
    """Whether a text source names a local file or folder (else a hub dataset name)."""
    path = Path(source).expanduser()
    return (
        path.exists() or source.startswith(("/", ".", "~")) or path.suffix.lower() in DATA_SUFFIXES
    )


def hub_offline() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    # huggingface_hub reads the variable once, at import; its live flag counts too.
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_cached(repo_id: str, *, filename: str = "config.json", revision: str | None = None) -> bool:
    """Whether `filename` of hub repo `repo_id` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # an id the hub would refuse, an unreadable cache, ...
        return False
    return isinstance(found, str)


def hub_host() -> tuple[str, int]:
    """The (host, port) of the Hugging Face endpoint in use (HF_ENDPOINT, else huggingface.co)."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or (
        80 if parsed.scheme == "http" else 443
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds.

    huggingface_hub retries a failed request five times with back-off (about 28 s) before giving
    up; this probe answers in at most `timeout`. Behind a proxy the direct connection says
    nothing, so it answers True and leaves the decision to the real request.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    host, port = hub_host()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the name lookup too, which `create_connection`'s timeout does not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])
