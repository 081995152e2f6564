"""Loading of the optional native extensions, with a reason when one is missing."""
from __future__ import annotations

import functools
import importlib
import json
import os

_STATUS_FILE = os.path.join(os.path.dirname(__file__), "_native_build.json")


class BackendUnavailable(RuntimeError):
    """Raised when a backend that was explicitly asked for cannot run here."""


def _build_status(key: str) -> str:
    try:
        with open(_STATUS_FILE) as f:
            return json.load(f).get(key, "unknown")
    except (OSError, ValueError):
        return "no build record (package not installed with setup.py?)"


@functools.lru_cache(maxsize=None)
def load(key: str):
    """Return the extension module for ``key`` ('cpu' or 'cuda'), or None if unavailable."""
    try:
        return importlib.import_module(f"persona_kernels._C_{key}")
    except ImportError:
        return None


def why_missing(key: str) -> str:
    try:
        importlib.import_module(f"persona_kernels._C_{key}")
        return "available"
    except ImportError as exc:
        return f"persona_kernels._C_{key} not importable ({exc}); build status: {_build_status(key)}"


def require(key: str):
    mod = load(key)
    if mod is None:
        raise BackendUnavailable(
            f"the {key!r} native backend is not available: {why_missing(key)}. "
            "Rebuild with `pip install --no-build-isolation -e .` (torch installed first), "
            "or pick another backend."
        )
    return mod
