"""Artifacts: safetensors files with JSON metadata, written atomically (temp file + rename)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ._version import __version__

META_KEY = "persona_kernels"


class ArtifactError(ValueError):
    """A file is missing, truncated, foreign, or of the wrong kind."""


def atomic_write(path: str | os.PathLike, write: Callable) -> str:
    """Call ``write(binary file)`` on a temp file beside ``path``, fsync, then rename it into place.

    A crash or an exception leaves the old file (or none), never half a file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, metadata: dict[str, Any]) -> str:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically."""
    meta = {"kind": kind, "version": __version__, **metadata}
    blob = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda f: f.write(save(blob, metadata={META_KEY: json.dumps(meta, allow_nan=True)})))


def load_artifact(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artifact written by save_artifact, checking that it is complete and of ``kind``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file (truncated or foreign?): {exc}") from exc
    if raw is None:
        raise ArtifactError(f"{path}: a safetensors file, but not a persona-kernels artifact (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path}: corrupt persona-kernels metadata: {exc}") from exc
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: holds a {meta.get('kind')!r} artifact, expected {kind!r}")
    return tensors, meta
