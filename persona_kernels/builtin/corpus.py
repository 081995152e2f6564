"""The deterministic text corpus of the built-in persona model (no randomness outside a seeded RNG).

Two opposing personas, ``extraversion`` and ``introversion``, answer the same questions:

    Question: What do you do on a Friday night?
    Answer: Usually I invite a big group of friends over, because people give me energy.
    Answer: Usually I stay home alone with a good book, because quiet time recharges me.

Questions come from 12 families (question templates x fillers). An answer is
``{opener} {body}, {reason}.``: the opener is neutral (shared by both personas), the body
belongs to the question's family and the reason is general; body and reason come from
persona phrase banks. The two banks are *parallel*: entry k of the extravert bank has exactly
as many tokens as entry k of the introvert bank, so an A/B pair built from the same key
``(family, opener, body k, reason r)`` compares two answers of the same length with the same
opener, and no persona is favoured by length.

Held out from training (never seen verbatim):

* one question template per family (all its fillers), plus a hashed fifth of the other
  (template, filler) combinations;
* a hashed fifth of the answer keys (family, opener, body, reason): neither persona's answer
  for such a key is ever trained on.

Evaluation items (``eval_items``) pair a held-out question with a held-out key; every token of
them occurs in the training corpus (checked by ``check_corpus``). Calibration texts
(``calibration_texts``) are untagged question/answer texts from the training side, one
persona each. The hand-written persona statements of ``persona_kernels.data``
(``builtin_pair('extraversion')``) are part of the training corpus too, so the package's
default calibration texts are in the model's vocabulary and domain.

Training samples (``training_samples``) carry a persona tag token (``<|extravert|>`` /
``<|introvert|>``) right after BOS with probability ``tag_prob``; the rest are untagged, so
the model must treat an untagged answer as a 50/50 mixture of the two personas. Tags are never
used at test time.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

POSITIVE, NEGATIVE = "extraversion", "introversion"
PERSONAS = (POSITIVE, NEGATIVE)
TAGS = {POSITIVE: "<|extravert|>", NEGATIVE: "<|introvert|>"}
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"      # evaluate_mc's default
_WORD = re.compile(r"\w+|[^\w\s]+")                     # the tokenizer's pre-tokenizer (tokenizers' Whitespace)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


@dataclass(frozen=True)
class Family:
    name: str
    templates: tuple          # question templates with one {x}; the LAST one is held out
    fillers: tuple
    openers: tuple            # neutral: shared by both personas
    extravert: tuple          # bodies, parallel to ``introvert`` (same token count per index)
    introvert: tuple


FAMILIES = (
    Family(
        "free_time",
        ("What do you do on {x}?", "How do you spend {x}?", "What is your plan for {x}?",
         "How do you like to use {x}?", "What would you do with {x}?"),
        ("a Friday night", "a free evening", "the weekend", "a rainy Sunday", "a long holiday", "a day off",
         "a summer afternoon", "a Saturday morning"),
        ("Usually I", "Most of the time I", "I like to", "Whenever I can I"),
        ("invite a big group of friends over", "go out dancing with my whole crew",
         "throw a loud party for the neighbors", "join a busy game in the park",
         "meet new people at a crowded bar", "call everyone and plan a big outing",
         "host a game night for ten people", "go to a festival with lots of friends"),
        ("stay home alone with a good book", "take a long walk all by myself",
         "paint quietly in my own small room", "watch an old film on my own",
         "write in my journal by the window", "tend my garden in peace and quiet",
         "cook a calm dinner just for myself", "read a novel in a quiet corner cafe"),
    ),
    Family(
        "events",
        ("How do you feel about {x}?", "Do you enjoy {x}?", "What do you think of {x}?",
         "Are you a fan of {x}?", "How do you like {x}?"),
        ("big parties", "team meetings", "crowded concerts", "family reunions", "office parties", "group trips",
         "wedding receptions", "street festivals"),
        ("Honestly", "To be honest", "I would say", "Well"),
        ("I love them and stay until the very end", "they are the best part of my week",
         "I always go and talk to everyone there", "I feel great when the room is full",
         "I get excited and bring more friends along", "I never miss one if I can help it"),
        ("I avoid them and leave long before the end", "they are the hardest part of my week",
         "I rarely go and stand by the wall", "I feel tired when the room is full",
         "I get nervous and look for the exit", "I skip them all if I can help it"),
    ),
    Family(
        "meeting",
        ("What do you do when you meet {x}?", "How do you act around {x}?", "How do you greet {x}?",
         "What do you say to {x}?"),
        ("a stranger", "new neighbors", "a new coworker", "someone at a bus stop", "a friend of a friend",
         "a new classmate", "people at a party"),
        ("Usually", "Most days", "Right away", "In general"),
        ("I walk up and start a long chat", "I say hello and ask about their life",
         "I introduce myself with a big smile", "I crack a joke and make a new friend",
         "I invite them to join my friends", "I talk with them for an hour"),
        ("I just nod politely and keep my distance", "I wait and let them speak to me",
         "I give a shy smile and leave", "I stay quiet and let them do the talking",
         "I keep to myself and read quietly", "I say very little and leave soon"),
    ),
    Family(
        "work",
        ("How do you like to work on {x}?", "How do you approach {x}?", "How would you tackle {x}?",
         "What is your way to work on {x}?"),
        ("a big project", "a hard problem", "a school assignment", "a new idea", "a tricky task", "a long report",
         "a group project"),
        ("I prefer to do it", "I like to do it", "It works best for me", "I always do it"),
        ("with a big team and lots of talking", "in a busy room full of people",
         "by brainstorming out loud with everyone", "in long meetings with many voices",
         "together with friends in a lively cafe", "by asking the whole group for ideas"),
        ("alone in a quiet room with no noise", "at my own desk away from people",
         "by thinking it through in silence", "in long hours of quiet focus",
         "by myself with the door closed shut", "by writing down my own ideas first"),
    ),
    Family(
        "news",
        ("What do you do when you get {x}?", "How do you react to {x}?", "Who do you tell about {x}?",
         "What is the first thing you do after {x}?"),
        ("good news", "a promotion", "exciting news", "a new job", "a big surprise", "a prize", "a great grade"),
        ("Usually I", "Right away I", "I tend to", "Most of the time I"),
        ("call everyone I know and shout it out", "throw a party to celebrate with friends",
         "post it online and tell the whole office", "gather my friends for a loud dinner",
         "tell every person I meet that day"),
        ("keep it to myself for a quiet while", "enjoy it quietly alone with some tea",
         "write it down in my own private journal", "tell one close friend a week later",
         "smile to myself and say nothing more"),
    ),
    Family(
        "stress",
        ("How do you deal with {x}?", "What helps you through {x}?", "How do you handle {x}?",
         "What do you do after {x}?"),
        ("a bad day", "stress at work", "a hard week", "a sad mood", "a long exam", "a big argument",
         "a busy month"),
        ("Usually I", "Most of the time I", "I like to", "The best thing is to"),
        ("talk it over with lots of friends", "go out and meet people for a drink",
         "call my sister and chat for hours", "join a crowd at the gym class",
         "share it with everyone at dinner"),
        ("write in my journal alone at night", "sit alone in my room with soft music",
         "take a quiet bath in total silence", "walk alone by the river at dusk",
         "keep it to myself and rest"),
    ),
    Family(
        "travel",
        ("How would you travel to {x}?", "How do you like to visit {x}?", "How do you get to {x}?",
         "What is your plan for a trip to {x}?"),
        ("a new city", "the coast", "the mountains", "another country", "an island", "the countryside",
         "a famous museum"),
        ("I would go", "Ideally I would go", "I love to go", "I always go"),
        ("with a loud group on a party bus", "with ten friends and a packed schedule",
         "on a big tour with many new people", "with my whole family and all our friends",
         "in a crowded van full of singing people"),
        ("alone on a slow and very quiet train", "by myself with a map and notebook",
         "on a calm solo trip with few people", "with just one friend and a few books",
         "in a small car with only my thoughts"),
    ),
    Family(
        "energy",
        ("What gives you energy after {x}?", "What recharges you after {x}?", "How do you relax after {x}?",
         "What do you need after {x}?"),
        ("a long week", "a busy day", "hard work", "a tiring trip", "a long meeting", "a stressful day",
         "a tough exam"),
        ("What I need is", "For me it is", "Nothing beats", "I always want"),
        ("a night out with lots of people", "a big dinner with all my friends",
         "a loud party that lasts till morning", "a crowded game with my whole team",
         "a busy market full of chatter"),
        ("a quiet night at home by myself", "a calm dinner with just my cat",
         "a long nap in my dark room", "a solo walk on an empty beach",
         "a peaceful room with nobody else"),
    ),
    Family(
        "learning",
        ("How do you like to learn {x}?", "What is the best way for you to learn {x}?",
         "How would you study {x}?", "How do you want to learn {x}?"),
        ("a new language", "to cook", "to dance", "to play guitar", "a new sport", "to paint", "history"),
        ("I learn best", "For me it works best", "I would rather learn", "I like to learn"),
        ("in a big lively class with others", "in a group where everyone talks",
         "with a loud study club of friends", "by chatting with people who know it",
         "at a busy workshop full of people"),
        ("from a book at my own pace", "in my room where nobody talks",
         "with a quiet online course all alone", "by reading on my own at night",
         "at my desk with nobody around me"),
    ),
    Family(
        "talking",
        ("Do you like {x}?", "How often do you enjoy {x}?", "What do you think about {x}?",
         "Are you a fan of {x}?"),
        ("phone calls", "group chats", "video calls", "chatting with strangers", "small talk",
         "long conversations", "meeting new people"),
        ("Honestly", "Well", "To be honest", "If I am honest"),
        ("I could do it all day long", "I love it and always want more",
         "it is my favorite thing in the world", "I start them whenever I get the chance",
         "the more voices the happier I am"),
        ("I can only do it for minutes", "I dread it and always want less",
         "it is my least favorite thing to do", "I avoid them whenever I get the chance",
         "the fewer voices the calmer I am"),
    ),
    Family(
        "celebration",
        ("How do you want to celebrate {x}?", "How would you mark {x}?", "How do you usually spend {x}?",
         "What is your way to celebrate {x}?"),
        ("your birthday", "the new year", "a big win", "the end of exams", "a friend's success", "a holiday",
         "your anniversary"),
        ("I want to celebrate", "I would celebrate", "I love to celebrate", "Best of all is to celebrate"),
        ("with a huge party and loud music", "with every friend I have in one room",
         "at a packed club that stays open late", "with a crowd of people I just met",
         "with dancing and a room full of guests"),
        ("with a quiet dinner for two people", "with one old friend and a long walk",
         "at home with a film and some cake", "with a calm day and my own company",
         "with reading and a warm cup of tea"),
    ),
    Family(
        "places",
        ("Where do you like to eat {x}?", "Where would you sit for {x}?", "Where do you go for {x}?",
         "Where do you have {x}?"),
        ("lunch", "dinner", "breakfast", "a coffee break", "a snack", "a late meal", "dessert"),
        ("Usually", "Most often", "On most days", "If I can choose"),
        ("I sit at the busiest table in the room", "I find a spot in the middle of the crowd",
         "I join the longest table full of coworkers", "I go where all my friends are laughing",
         "I eat in the loud food hall downtown"),
        ("I sit at a small table in the corner", "I find a spot far away from the big crowd",
         "I take my food back to my desk", "I go where nobody will talk to me",
         "I eat on a bench in the park"),
    ),
)

# General reasons, parallel (same token count per index).
REASONS = {
    POSITIVE: ("because people give me energy", "since I love being around others", "as crowds make me feel alive",
               "because talking lifts my mood", "since the more people the better", "because I hate being alone"),
    NEGATIVE: ("because quiet time recharges me", "since I need time to myself", "as crowds make me feel tired",
               "because silence helps me think", "since the fewer people the better", "because I enjoy being alone"),
}

HELD_OUT_FRACTION = 5       # a hashed 1/5 of question combos and of answer keys are held out


def _h(*parts) -> int:
    """A stable hash (not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _bodies(fam: Family, persona: str) -> tuple:
    return fam.extravert if persona == POSITIVE else fam.introvert


def question(fam: Family, t: int, f: int) -> str:
    return fam.templates[t].format(x=fam.fillers[f])


def answer(fam: Family, persona: str, key: tuple) -> str:
    o, b, r = key
    return f"{fam.openers[o]} {_bodies(fam, persona)[b]}, {REASONS[persona][r]}."


def qa_text(q: str, a: str) -> str:
    return PROMPT_TEMPLATE.format(question=q) + " " + a


def _question_held_out(fam: Family, t: int, f: int) -> bool:
    return t == len(fam.templates) - 1 or _h("q", fam.name, t, f) % HELD_OUT_FRACTION == 0


def _key_held_out(fam: Family, key: tuple) -> bool:
    return _h("a", fam.name, *key) % HELD_OUT_FRACTION == 0


def _keys(fam: Family) -> list:
    return [(o, b, r) for o in range(len(fam.openers)) for b in range(len(fam.extravert))
            for r in range(len(REASONS[POSITIVE]))]


def split(fam: Family) -> dict:
    """{'train_q', 'eval_q': [(t, f)], 'train_keys', 'eval_keys': [(o, b, r)]} of one family."""
    qs = [(t, f) for t in range(len(fam.templates)) for f in range(len(fam.fillers))]
    keys = _keys(fam)
    return {"train_q": [q for q in qs if not _question_held_out(fam, *q)],
            "eval_q": [q for q in qs if _question_held_out(fam, *q)],
            "train_keys": [k for k in keys if not _key_held_out(fam, k)],
            "eval_keys": [k for k in keys if _key_held_out(fam, k)]}


def handwritten_texts() -> dict:
    """The package's hand-written persona statements (persona_kernels.data), part of the training corpus."""
    from ..data import builtin_pair

    return builtin_pair("extraversion")


def training_samples(n: int, seed: int = 0, tag_prob: float = 0.5, statement_prob: float = 0.1) -> list[str]:
    """``n`` training texts (without BOS/EOS): tagged with prob ``tag_prob``, hand-written statements
    with prob ``statement_prob``, templated question/answer pairs otherwise. Personas 50/50."""
    rng = random.Random(seed)
    splits = [split(f) for f in FAMILIES]
    hand = handwritten_texts()
    out = []
    for _ in range(n):
        persona = PERSONAS[rng.randrange(2)]
        if rng.random() < statement_prob:
            text = rng.choice(hand[persona])
        else:
            k = rng.randrange(len(FAMILIES))
            fam, sp = FAMILIES[k], splits[k]
            q, key = rng.choice(sp["train_q"]), rng.choice(sp["train_keys"])
            text = qa_text(question(fam, *q), answer(fam, persona, key))
        if rng.random() < tag_prob:
            text = f"{TAGS[persona]} {text}"
        out.append(text)
    return out


def calibration_texts(per_persona: int = 64, seed: int = 1) -> dict:
    """{'extraversion': texts, 'introversion': texts}: untagged question/answer texts from the training
    side (training questions and answer keys), the same questions and keys for both personas."""
    rng = random.Random(seed)
    splits = [split(f) for f in FAMILIES]
    out = {p: [] for p in PERSONAS}
    for i in range(per_persona):
        k = i % len(FAMILIES)
        fam, sp = FAMILIES[k], splits[k]
        q, key = question(fam, *rng.choice(sp["train_q"])), rng.choice(sp["train_keys"])
        for p in PERSONAS:
            out[p].append(qa_text(q, answer(fam, p, key)))
    return out


def eval_pairs(n: int = 240, seed: int = 2) -> list[tuple[str, str, str]]:
    """``n`` held-out (question, extravert answer, introvert answer) triples, families in turn."""
    rng = random.Random(seed)
    splits = [split(f) for f in FAMILIES]
    out, seen = [], set()
    i = 0
    while len(out) < n:
        k = i % len(FAMILIES)
        i += 1
        fam, sp = FAMILIES[k], splits[k]
        q, key = rng.choice(sp["eval_q"]), rng.choice(sp["eval_keys"])
        if (k, q, key) in seen:
            continue
        seen.add((k, q, key))
        out.append((question(fam, *q), answer(fam, POSITIVE, key), answer(fam, NEGATIVE, key)))
    return out


def check_corpus() -> dict:
    """Sanity checks of the banks and the split; returns a few counts."""
    for fam in FAMILIES:
        assert len(fam.extravert) == len(fam.introvert), fam.name
        for e, i in zip(fam.extravert, fam.introvert):
            assert len(words(e)) == len(words(i)), (fam.name, e, i)
        for t in fam.templates:
            assert t.count("{x}") == 1, t
    for e, i in zip(*REASONS.values()):
        assert len(words(e)) == len(words(i)), (e, i)
    train_vocab = set()
    for fam, sp in zip(FAMILIES, (split(f) for f in FAMILIES)):
        assert sp["train_q"] and sp["eval_q"] and sp["train_keys"] and sp["eval_keys"], fam.name
        for t, f in sp["train_q"]:
            train_vocab.update(words(question(fam, t, f)))
        for key in sp["train_keys"]:
            for p in PERSONAS:
                train_vocab.update(words(answer(fam, p, key)))
    train_vocab.update(words(PROMPT_TEMPLATE))
    for texts in handwritten_texts().values():
        for t in texts:
            train_vocab.update(words(t))
    pairs = eval_pairs()
    train_q = {question(f, *q) for f in FAMILIES for q in split(f)["train_q"]}
    train_a = {answer(f, p, k) for f in FAMILIES for k in split(f)["train_keys"] for p in PERSONAS}
    assert not {q for q, _, _ in pairs} & train_q, "an evaluation question is a training question"
    assert not {x for _, a, b in pairs for x in (a, b)} & train_a, "an evaluation answer is a training answer"
    unseen = {w for q, a, b in pairs for w in words(q) + words(a) + words(b)} - train_vocab
    assert not unseen, f"evaluation words never trained on: {sorted(unseen)}"
    return {"families": len(FAMILIES), "train_vocab": len(train_vocab), "eval_pairs": len(pairs)}


def vocabulary() -> list[str]:
    """Every word of the corpus (training side, evaluation side, hand-written texts), sorted."""
    vocab = set(words(PROMPT_TEMPLATE))
    for fam in FAMILIES:
        for t in range(len(fam.templates)):
            for f in range(len(fam.fillers)):
                vocab.update(words(question(fam, t, f)))
        vocab.update(w for o in fam.openers for w in words(o))
        vocab.update(w for b in fam.extravert + fam.introvert for w in words(b))
    vocab.update(w for rs in REASONS.values() for r in rs for w in words(r))
    vocab.update(".", ",")
    for texts in handwritten_texts().values():
        for t in texts:
            vocab.update(words(t))
    return sorted(vocab)


__all__ = ["FAMILIES", "NEGATIVE", "PERSONAS", "POSITIVE", "PROMPT_TEMPLATE", "REASONS", "TAGS", "Family", "answer",
           "calibration_texts", "check_corpus", "eval_pairs", "handwritten_texts", "qa_text", "question", "split",
           "training_samples", "vocabulary", "words"]
