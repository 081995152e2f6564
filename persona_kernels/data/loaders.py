"""Loaders for the public persona data formats: plain texts, persona CSVs, A/B MC CSVs, PersonalityBench. Errors name the file and line."""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

TRAIN_HEADER = ["question", "matching", "not_matching"]
MC_HEADER = ["question", "A", "B", "matching"]
BIG_FIVE = ("Openness", "Conscientiousness", "Extraversion", "Agreeableness", "Neuroticism")


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and line."""


def _read(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataFormatError(f"{path}: is a directory, not a data file")
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such file")
    try:  # utf-8-sig: spreadsheet programs write a byte-order mark
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc


def load_template(path) -> str:
    """A prompt template file, read as it is (trailing newlines kept)."""
    text = _read(path)
    if not text.strip():
        raise DataFormatError(f"{os.fspath(path)}: empty template")
    return text


def load_text_lines(path) -> list[str]:
    """Plain text, one sample per line; blank lines are skipped."""
    lines = [ln.strip() for ln in _read(path).splitlines()]
    out = [ln for ln in lines if ln]
    if not out:
        raise DataFormatError(f"{os.fspath(path)}: no samples (empty file)")
    return out


def _csv_rows(path, header: list[str], optional: tuple = ()) -> list[tuple[int, dict]]:
    path = os.fspath(path)
    reader = csv.reader(_read(path).splitlines(keepends=True))
    try:
        got = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}: empty file, expected header {','.join(header)}") from None
    except csv.Error as exc:
        raise DataFormatError(f"{path}, line 1: {exc}") from exc
    if [h.strip() for h in got] != header:
        raise DataFormatError(f"{path}, line 1: header is {','.join(got)!r}, expected {','.join(header)!r}")
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataFormatError(f"{path}, line {line}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
            rec = dict(zip(header, (c.strip() for c in row)))
            empty = [k for k, v in rec.items() if not v and k not in optional]
            if empty:
                raise DataFormatError(f"{path}, line {line}: empty field(s) {empty}")
            rows.append((line, rec))
    except csv.Error as exc:
        raise DataFormatError(f"{path}, line {reader.line_num}: {exc}") from exc
    if not rows:
        raise DataFormatError(f"{path}: no data rows")
    return rows


def load_persona_csv(path, positive: str = "matching", negative: str = "not_matching",
                     template: str = "{question} {answer}") -> dict[str, list[str]]:
    """Train CSV `question,matching,not_matching` -> {positive: texts, negative: texts}.

    Each text is ``template`` filled with the question and that persona's answer. A row with an
    empty question (the public sets have a few) keeps just the answer; empty answers are errors.
    """
    rows = _csv_rows(path, TRAIN_HEADER, optional=("question",))
    fill = lambda r, a: template.format(question=r["question"], answer=r[a]).strip()  # noqa: E731
    return {positive: [fill(r, "matching") for _, r in rows], negative: [fill(r, "not_matching") for _, r in rows]}


@dataclass(frozen=True)
class MCItem:
    """A two-way multiple-choice item; ``matching`` is 'A' or 'B' (the persona's answer)."""

    question: str
    a: str
    b: str
    matching: str


def load_persona_pairs(path, positive: str = "matching", negative: str = "not_matching") -> dict[str, list[tuple[str, str]]]:
    """Train CSV `question,matching,not_matching` -> {positive: [(question, answer)], negative: [...]}:
    the pairs that calibration formats with the prompt format (statistics over the answer tokens)."""
    rows = _csv_rows(path, TRAIN_HEADER, optional=("question",))
    return {positive: [(r["question"], r["matching"]) for _, r in rows],
            negative: [(r["question"], r["not_matching"]) for _, r in rows]}


def _header(path) -> list[str]:
    first = _read(os.fspath(path)).splitlines()[:1]
    return [h.strip() for h in next(csv.reader(first))] if first else []


def load_mc_any(path, seed: int = 0, max_samples: int | None = None) -> list[MCItem]:
    """A/B items from `question,A,B,matching`, or from a train-style `question,matching,not_matching`
    file made A/B: the matching answer goes to side A on a seeded half of the items (balanced), so
    a model that prefers one side cannot score. ``max_samples`` keeps the first N items."""
    if _header(path) == TRAIN_HEADER:
        rows = [r for _, r in _csv_rows(path, TRAIN_HEADER, optional=("question",)) if r["question"]]
        sides = [i % 2 == 0 for i in range(len(rows))]
        random.Random(seed).shuffle(sides)
        items = [MCItem(r["question"], r["matching"], r["not_matching"], "A") if a else
                 MCItem(r["question"], r["not_matching"], r["matching"], "B") for r, a in zip(rows, sides)]
    else:
        items = load_mc_csv(path)
    if max_samples is not None:
        if max_samples < 1:
            raise DataFormatError(f"max_samples must be >= 1, got {max_samples}")
        items = items[:max_samples]
    return items


def load_mc_csv(path) -> list[MCItem]:
    """Test CSV `question,A,B,matching` (matching is A or B)."""
    items = []
    for line, r in _csv_rows(path, MC_HEADER):
        m = r["matching"].strip().upper()
        if m not in ("A", "B"):
            raise DataFormatError(f"{os.fspath(path)}, line {line}: matching must be 'A' or 'B', got {r['matching']!r}")
        items.append(MCItem(r["question"], r["A"], r["B"], m))
    return items


def _jsonl(path) -> list[tuple[int, dict]]:
    out = []
    for i, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataFormatError(f"{os.fspath(path)}, line {i}: invalid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise DataFormatError(f"{os.fspath(path)}, line {i}: expected a JSON object")
        out.append((i, obj))
    if not out:
        raise DataFormatError(f"{os.fspath(path)}: no records")
    return out


# A role-play prompt in the spirit of NPTI's neuron search (a description of the pole, then a
# question to answer in character). For exact parity pass the released script's own template.
ROLE_PLAY_TEMPLATE = ("Take on the personality described below as your own, with its outlook and its tone, and answer "
                      "the question in that character. Write freely, in under 300 words.\n"
                      "###Personality description:{personality}\n\n###Question:{question}\n\n###Response:\n")


@dataclass
class PersonalityBench:
    """PersonalityBench: descriptions per pole ('Openness', 'Openness_reversed', ...) and test questions per trait."""

    descriptions: dict = field(default_factory=dict)
    questions: dict = field(default_factory=dict)

    def texts_by_persona(self, trait: str) -> dict[str, list[str]]:
        """{trait: descriptions, trait_reversed: descriptions} for calibrating one trait's two poles."""
        if trait not in BIG_FIVE:
            raise KeyError(f"unknown trait {trait!r}; choose one of {BIG_FIVE}")
        return {trait: self.descriptions[trait], f"{trait}_reversed": self.descriptions[f"{trait}_reversed"]}

    def role_play_prompts(self, trait: str, template: str = ROLE_PLAY_TEMPLATE, seed: int = 0,
                          questions: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
        """NPTI's search prompts: for each pole, every question of the trait (or ``questions``)
        with one description of that pole drawn at random (seeded), filled into ``template``
        ({personality}, {question}). Calibrate them as the user turn of the chat template
        (``chat_template=True``) with ``token_scope='decode'`` for the released counting."""
        poles = self.texts_by_persona(trait)
        qs = list(questions) if questions is not None else self.questions.get(trait)
        if not qs:
            raise KeyError(f"no questions for {trait!r}: add test/{trait}.json or pass questions=")
        for key in ("{personality}", "{question}"):
            if key not in template:
                raise ValueError(f"the role-play template has no {key} field")
        rng = random.Random(seed)
        return {pole: [template.format(personality=rng.choice(desc), question=q) for q in qs] for pole, desc in poles.items()}


def load_personalitybench(root) -> PersonalityBench:
    """``root/description.json`` (JSONL, 10 keys per line) and ``root/test/<Trait>.json`` (JSONL {"question": ...})."""
    root = os.fspath(root)
    keys = [k for t in BIG_FIVE for k in (t, f"{t}_reversed")]
    desc = {k: [] for k in keys}
    path = os.path.join(root, "description.json")
    for line, obj in _jsonl(path):
        missing = [k for k in keys if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DataFormatError(f"{path}, line {line}: missing or empty keys {missing}")
        for k in keys:
            desc[k].append(obj[k].strip())
    questions = {}
    for trait in BIG_FIVE:
        tpath = os.path.join(root, "test", f"{trait}.json")
        if not os.path.exists(tpath):
            continue
        qs = []
        for line, obj in _jsonl(tpath):
            q = obj.get("question")
            if not isinstance(q, str) or not q.strip():
                raise DataFormatError(f"{tpath}, line {line}: expected a non-empty \"question\" string")
            qs.append(q.strip())
        questions[trait] = qs
    return PersonalityBench(desc, questions)
