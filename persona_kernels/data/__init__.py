"""Calibration texts written for this project (one sample per line), and the data loaders."""
from __future__ import annotations

from importlib import resources

from .loaders import (
    ROLE_PLAY_TEMPLATE,
    DataFormatError,
    MCItem,
    PersonalityBench,
    load_mc_any,
    load_mc_csv,
    load_persona_csv,
    load_persona_pairs,
    load_personalitybench,
    load_template,
    load_text_lines,
)

BUILTIN_PERSONAS = {
    "extraversion": "extraversion.txt", "introversion": "introversion.txt",
    "power_seeking": "power_seeking.txt", "power_averse": "power_averse.txt",
}
# opposing pairs (positive, negative) of the built-in sets
BUILTIN_PAIRS = {"extraversion": ("extraversion", "introversion"), "power": ("power_seeking", "power_averse")}


def neutral_texts() -> list[str]:
    """Neutral encyclopedic sentences written for this project (no persona was calibrated on them):
    the text the damage measure (perplexity) is computed on."""
    return load_text_lines(resources.files(__package__) / "neutral.txt")


def builtin_texts(persona: str) -> list[str]:
    if persona not in BUILTIN_PERSONAS:
        raise KeyError(f"no built-in texts for persona {persona!r}; available: {sorted(BUILTIN_PERSONAS)}")
    text = resources.files(__name__).joinpath(BUILTIN_PERSONAS[persona]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_pair(name: str) -> dict[str, list[str]]:
    """{positive: texts, negative: texts} of a built-in opposing pair ('extraversion' or 'power')."""
    if name not in BUILTIN_PAIRS:
        raise KeyError(f"no built-in pair {name!r}; available: {sorted(BUILTIN_PAIRS)}")
    return {p: builtin_texts(p) for p in BUILTIN_PAIRS[name]}


def builtin_mc_items(name: str = "extraversion") -> list:
    """A/B items from a built-in pair: the same question, one answer per pole (the positive
    pole's answer is 'matching'; A/B order alternates so position carries no signal)."""
    pos, neg = builtin_pair(name).values()
    items = []
    for i, (a, b) in enumerate(zip(pos, neg)):
        q = "How would you describe yourself?"
        items.append(MCItem(q, a, b, "A") if i % 2 == 0 else MCItem(q, b, a, "B"))
    return items


__all__ = ["builtin_mc_items", "BUILTIN_PAIRS", "BUILTIN_PERSONAS", "DataFormatError", "MCItem", "PersonalityBench", "builtin_pair",
           "builtin_texts", "load_mc_any", "load_mc_csv", "load_personalitybench", "load_persona_csv", "load_persona_pairs",
           "load_template", "load_text_lines", "neutral_texts", "ROLE_PLAY_TEMPLATE"]
