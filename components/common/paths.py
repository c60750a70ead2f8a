"""Where tunepipe keeps its local state: model cache, model registry, endpoints."""
from __future__ import annotations

import os
from pathlib import Path


def tunepipe_home() -> Path:
    """The root of tunepipe's local state: ``$TUNEPIPE_HOME``, else ``~/.tunepipe``."""
    return Path(os.environ.get("TUNEPIPE_HOME") or Path.home() / ".tunepipe").expanduser()


def cache_dir() -> Path:
    """What tunepipe can recompute: ``$TUNEPIPE_CACHE`` when set (so several homes can share
    one cache), else ``cache/`` under the home."""
    cache = os.environ.get("TUNEPIPE_CACHE")
    return Path(cache).expanduser() if cache else tunepipe_home() / "cache"


def model_cache_dir() -> Path:
    """Converted checkpoints (GGUF dequantized into safetensors folders)."""
    return cache_dir() / "models"


def registry_dir() -> Path:
    """The local model registry that upload_model writes and deploy_endpoint reads."""
    return tunepipe_home() / "registry"


def endpoints_dir() -> Path:
    """One JSON record per running local endpoint."""
    return tunepipe_home() / "endpoints"
