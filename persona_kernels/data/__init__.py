"""Calibration texts written for this project (one sample per line)."""
from __future__ import annotations

from importlib import resources

BUILTIN_PERSONAS = {"extraversion": "extraversion.txt", "introversion": "introversion.txt"}


def builtin_texts(persona: str) -> list[str]:
    if persona not in BUILTIN_PERSONAS:
        raise KeyError(f"no built-in texts for persona {persona!r}; available: {sorted(BUILTIN_PERSONAS)}")
    text = resources.files(__name__).joinpath(BUILTIN_PERSONAS[persona]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
