"""A/B multiple-choice evaluation, and the measures that tell a persona from damage.

Scoring modes (``scoring=``):

- 'mean' (default): mean log-probability of the answer's tokens given the prompt. The summed
  form favours the shorter answer (on SmolLM2 it picks the shorter one on 80-97% of items).
- 'sum': the summed answer log-probability (the persona-subnetwork paper's protocol).
- 'persona-code': the Persona code's own rule (``mask.py``, ``phase3_multiple_choice``): the
  Llama-2 chat string with its system prompt, mean token loss over the whole sequence; the
  answer with the lower loss is chosen.

Beside the accuracy: its binomial standard error, McNemar's exact test against another run on
the same items (the unmasked model), the share of items where the shorter answer was picked,
perplexity on neutral text, and the mean log-probability of the persona's own answers.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hf
from .data.loaders import MCItem
from .prompts import PERSONA_CODE_SYSTEM, PromptFormat, persona_code_text

SCORINGS = ("mean", "sum", "persona-code")
_PLAIN = PromptFormat(chat_template=False)


@dataclass
class MCResult:
    accuracy: float          # fraction of items where the chosen answer is the persona's
    choices: list            # 'A' or 'B' per item
    logprob_a: torch.Tensor  # [N] score of answer A (higher is preferred)
    logprob_b: torch.Tensor
    matching: list           # 'A' or 'B' per item: the persona's answer
    scoring: str = "sum"
    len_a: Optional[list] = None  # answer lengths in tokens (for the shorter-picked share)
    len_b: Optional[list] = None

    @property
    def n(self) -> int:
        return len(self.choices)

    @property
    def correct(self) -> list:
        return [c == m for c, m in zip(self.choices, self.matching)]

    @property
    def se(self) -> float:
        """Binomial standard error of the accuracy."""
        return binomial_se(self.accuracy, self.n)

    @property
    def margin(self) -> torch.Tensor:
        """Per item: score(persona's answer) - score(other answer); > 0 means the persona's side is preferred."""
        sign = torch.tensor([1.0 if m == "A" else -1.0 for m in self.matching], dtype=torch.float64)
        return sign * (self.logprob_a - self.logprob_b)

    def shorter_picked(self) -> float:
        """Share of the items with answers of different token lengths where the shorter one was chosen."""
        if self.len_a is None:
            return float("nan")
        pairs = [(c, a, b) for c, a, b in zip(self.choices, self.len_a, self.len_b) if a != b]
        if not pairs:
            return float("nan")
        return sum((c == "A") == (a < b) for c, a, b in pairs) / len(pairs)

    def own_logprob(self, matching: bool = True) -> float:
        """Mean score of the matching answers (``matching=False``: of the other answers, i.e. the
        opposite pole's own answers)."""
        own = [float(a if (m == "A") == matching else b)
               for a, b, m in zip(self.logprob_a.tolist(), self.logprob_b.tolist(), self.matching)]
        return sum(own) / max(1, len(own))

    def rows(self, items: Sequence[MCItem]) -> list[dict]:
        """Per-item records (for JSON/CSV output)."""
        return [dict(index=i, question=it.question, matching=it.matching, choice=c, correct=c == it.matching,
                     score_a=float(a), score_b=float(b))
                for i, (it, c, a, b) in enumerate(zip(items, self.choices, self.logprob_a.tolist(), self.logprob_b.tolist()))]


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test on paired outcomes: (b, c, two-sided p), b = items right only in a,
    c = right only in b. p = P(Binomial(b + c, 1/2) at least as far from the middle)."""
    if len(correct_a) != len(correct_b):
        raise ValueError("McNemar needs the same items in both runs")
    b = sum(x and not y for x, y in zip(correct_a, correct_b))
    c = sum(y and not x for x, y in zip(correct_a, correct_b))
    n = b + c
    if n == 0:
        return b, c, 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


# A forward call's fixed cost in tokens of work: what an extra call must save in padding to be
# worth making. SmolLM2 on two CPU cores: one token costs 36 ms a call (the weights streamed
# once), each further token about 1.5 ms.
CALL_COST_TOKENS = 24


def length_chunks(lengths: Sequence[int], max_rows: int, call_cost: int = CALL_COST_TOKENS) -> list[slice]:
    """Contiguous chunks of at most ``max_rows`` of a length-sorted list that minimise the tokens
    computed (rows x the chunk's longest, padding included) plus ``call_cost`` per chunk: fixed
    chunks of ``max_rows`` pad short rows up to long ones (on SmolLM2's 200 A/B items: 49% extra
    answer tokens and 15% extra prompt tokens; with these chunks 15% and 2%, for 45 more calls)."""
    n = len(lengths)
    best, start = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = 0
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):  # the chunk i .. j-1
            longest = max(longest, lengths[i])
            cost = best[i] + (j - i) * longest + call_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(slice(start[j], j))
        j = start[j]
    return out[::-1]


@torch.inference_mode()
def sequence_scores(model: nn.Module, tokenizer, seqs: Sequence[tuple[list[int], int]], batch_size: int = 8,
                    reduce: str = "sum", progress: bool = False, desc: str = "scoring") -> tuple[torch.Tensor, list[int]]:
    """Per (ids, start): the log-probabilities of tokens ids[start:], summed or averaged, and
    their count. Sequences are batched by length (right padding), so padding stays small."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out = torch.empty(len(seqs), dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for sl in tqdm(length_chunks([len(seqs[i][0]) for i in order], batch_size), desc=desc, unit="batch",
                       disable=not progress, leave=False):
            idx = order[sl]
            L = len(seqs[idx[0]][0])
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            attn = torch.zeros(len(idx), L, dtype=torch.long)
            for r, i in enumerate(idx):
                t = seqs[i][0]
                ids[r, :len(t)] = torch.tensor(t)
                attn[r, :len(t)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logp = F.log_softmax(logits.float(), -1)[:, :-1]  # position t predicts token t + 1
            tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
            for r, i in enumerate(idx):
                t, start = seqs[i]
                vals = tok_lp[r, max(start, 1) - 1:len(t) - 1]
                out[i] = vals.sum() if reduce == "sum" else vals.mean()
    finally:
        model.train(was_training)
    return out, [len(t) - max(start, 1) for t, start in seqs]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: logit - logsumexp (no [.., V] log-softmax tensor kept)."""
    logits = logits.float()
    return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)).double()


def _prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix that every sequence shares."""
    n = 0
    for t in zip(*seqs):
        if any(v != t[0] for v in t):
            break
        n += 1
    return n


def _fill(lp: torch.Tensor, logits: torch.Tensor, seq: Sequence[int], first: int, last: int, col0: int) -> None:
    """lp[t] = log p(seq[t]) for t in [first, last], where logits row ``col0`` predicts token
    ``first`` (and row col0 + j token first + j)."""
    if last < first:
        return
    tgt = torch.tensor(seq[first:last + 1], device=logits.device)
    lp[first:last + 1] = _token_logprobs(logits[col0:col0 + last - first + 1], tgt).cpu()


def _score_continuations(model, rows: list, attn_p: torch.Tensor, g: int, cut: list, starts: list, lps: list, cache,
                         pad: int, device) -> None:
    """Run each (item, side, sequence) row's tokens after its item's prompt from ``cache`` (one
    cache row per row), right-padded, and fill its token log-probabilities."""
    conts = [seq[cut[i]:] for i, _, seq in rows]
    n, Lc = len(rows), max(len(t) for t in conts)  # >= 2: one-token answers need no forward
    ids = torch.full((n, Lc), pad, dtype=torch.long)
    attn_c = torch.zeros(n, Lc, dtype=torch.long)
    for r, t in enumerate(conts):
        ids[r, :len(t)] = torch.tensor(t)
        attn_c[r, :len(t)] = 1
    pos = torch.tensor([cut[i] for i, _, _ in rows]).unsqueeze(1) + torch.arange(Lc)
    attn = torch.cat([torch.ones(n, g, dtype=torch.long), attn_p, attn_c], 1)
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device), use_cache=True,
                   **hf.cache_kwargs(model, cache)).logits
    for r, (i, side, seq) in enumerate(rows):  # column j predicts token cut + j + 1
        first = max(starts[i], cut[i] + 1)
        _fill(lps[i][side], logits[r], seq, first, len(seq) - 1, first - cut[i] - 1)


@torch.inference_mode()
def pair_scores(model: nn.Module, tokenizer, pairs: Sequence[tuple[list[int], list[int], int]], batch_size: int = 8,
                reduce: str = "mean", progress: bool = False, desc: str = "scoring") -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of two sequences per item that share a prefix (the question's prompt): for each
    (ids_a, ids_b, start) the log-probabilities of tokens ids[start:], summed or averaged.

    Nothing is computed twice: the prefix that every sequence shares (a chat template's header
    and system prompt) runs once; each item's own prompt runs once per item, left-padded so that
    rows end at the same column, after the shared prefix's KV cache, with logits only at the
    positions that are scored; both answers then run from that cache, right-padded. Exact up to
    float rounding (the same tokens, positions and attention as one forward per sequence)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if not pairs:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    seqs = [(list(a), list(b)) for a, b, _ in pairs]
    starts = [max(st, 1) for _, _, st in pairs]
    # each item's prompt stops one token short of either side's end: both sides keep a continuation
    cut = [min(_common_prefix(a, b), len(a) - 1, len(b) - 1) for a, b in seqs]
    if min(cut) < 1:
        raise ValueError("pair_scores needs two sequences per item that share at least their first token")
    # every item keeps a token of its own; a one-token forward would look like a decode step to
    # NPTI's 'npti-code' induction, so the shared prefix is 0 or >= 2 tokens and prompts are padded to 2
    g = min(_prefix_len([s for pair in seqs for s in pair]), min(cut) - 1)
    g = g if g >= 2 else 0
    lps = [[torch.full((len(s),), float("nan"), dtype=torch.float64) for s in pair] for pair in seqs]
    keep = {"logits_to_keep": 0} if "logits_to_keep" in hf.forward_params(model) else {}
    was_training = model.training
    model.eval()
    try:
        shared = None
        if g:
            out = model(input_ids=torch.tensor([seqs[0][0][:g]], device=device), use_cache=True, **keep)
            shared = hf.output_cache(out)
            for pair, lp in zip(seqs, lps):
                for seq, l in zip(pair, lp):  # token t <= g is predicted by shared position t - 1
                    _fill(l, out.logits[0], seq, 1, g, 0)
        order = sorted(range(len(seqs)), key=lambda i: -cut[i])
        from tqdm.auto import tqdm

        for sl in tqdm(length_chunks([max(2, cut[i] - g) for i in order], batch_size), desc=desc, unit="batch",
                       disable=not progress, leave=False):
            idx = order[sl]
            B, Lp = len(idx), max(2, max(cut[i] - g for i in idx))
            ids_p = torch.full((B, Lp), pad, dtype=torch.long)
            attn_p = torch.zeros(B, Lp, dtype=torch.long)
            for r, i in enumerate(idx):
                ids_p[r, Lp - cut[i] + g:] = torch.tensor(seqs[i][0][g:cut[i]])
                attn_p[r, Lp - cut[i] + g:] = 1
            # scored tokens g+1 .. cut are predicted by this item's positions: keep that many last columns
            k = max(1, max(cut[i] - max(starts[i] - 1, g) for i in idx))
            cache = None
            if shared is not None:
                cache = copy.deepcopy(shared)
                cache.batch_repeat_interleave(B)
            head = torch.ones(B, g, dtype=torch.long)
            out = model(input_ids=ids_p.to(device), attention_mask=torch.cat([head, attn_p], 1).to(device),
                        position_ids=(g + attn_p.cumsum(1) - 1).clamp(min=0).to(device), use_cache=True,
                        **hf.cache_kwargs(model, cache), **({"logits_to_keep": k} if keep else {}))
            logits_p, cache = out.logits[:, -k:], hf.output_cache(out)
            for r, i in enumerate(idx):  # position p sits in column p - cut + k
                for seq, l in zip(seqs[i], lps[i]):
                    first = max(starts[i], g + 1)
                    _fill(l, logits_p[r], seq, first, cut[i], first - 1 - cut[i] + k)
            cache.batch_repeat_interleave(2)
            rows = [(i, side, seqs[i][side]) for i in idx for side in (0, 1)]  # row 2r + side of the cache
            # answers vary in length: run them in length-sorted chunks, each from its rows of the cache;
            # a one-token answer needs no forward (its token is predicted by the prompt's last position)
            live = sorted((r for r in range(2 * B) if len(rows[r][2]) - cut[rows[r][0]] > 1),
                          key=lambda r: len(rows[r][2]) - cut[rows[r][0]])
            for part in length_chunks([len(rows[r][2]) - cut[rows[r][0]] for r in live], batch_size):
                chunk = live[part]
                sub = cache
                if chunk != list(range(2 * B)):
                    sub = copy.deepcopy(cache)
                    sub.batch_select_indices(torch.tensor(chunk, device=device))
                _score_continuations(model, [rows[r] for r in chunk], attn_p[[r // 2 for r in chunk]], g, cut, starts, lps,
                                     sub, pad, device)
    finally:
        model.train(was_training)
    scores = torch.empty(2, len(seqs), dtype=torch.float64)
    for i, (lp, st) in enumerate(zip(lps, starts)):
        for side in (0, 1):
            v = lp[side][st:]
            if torch.isnan(v).any():  # a token no forward scored: a bug here, never a silent number
                raise RuntimeError(f"pair_scores: item {i} side {side}: unscored tokens")
            scores[side, i] = v.sum() if reduce == "sum" else v.mean()
    return scores[0], scores[1]


def answer_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = 8) -> torch.Tensor:
    """Summed log p(answer tokens | prompt) for each (prompt, answer) pair (answer tokenised on its own)."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers must have the same length")
    seqs = []
    for p, a in zip(prompts, answers):
        pi = tokenizer(p, add_special_tokens=True)["input_ids"]
        ai = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not ai:
            raise ValueError(f"answer {a!r} tokenises to nothing")
        seqs.append((pi + ai, len(pi)))
    return sequence_scores(model, tokenizer, seqs, batch_size)[0]


def _item_sequences(tokenizer, items: Sequence[MCItem], scoring: str, prompt: PromptFormat,
                    persona_system: str) -> tuple[list, list, list]:
    seqs, len_a, len_b = [], [], []
    for side in ("a", "b"):
        for it in items:
            ans = getattr(it, side)
            if scoring == "persona-code":
                ids = tokenizer(persona_code_text(it.question, ans, persona_system), add_special_tokens=True)["input_ids"]
                seqs.append((ids, 1))  # the whole sequence (labels = input ids)
            else:
                seqs.append(prompt.encode(tokenizer, it.question, ans))
            (len_a if side == "a" else len_b).append(len(tokenizer(ans, add_special_tokens=False)["input_ids"]))
    return seqs, len_a, len_b


def _fit_positions(pairs: list, limit: Optional[int]) -> list:
    """Items longer than the model's positions lose the start of their prompt (both sides alike,
    so they still share it), with a warning; an answer that alone does not fit is an error."""
    if limit is None:
        return pairs
    out, cut = [], 0
    for i, (a, b, start) in enumerate(pairs):
        over = max(len(a), len(b)) - limit
        if over > 0:
            if start - over < 1:
                raise ValueError(f"item {i}: its answers alone are longer than the {limit} positions the model admits")
            a, b, start, cut = a[over:], b[over:], start - over, cut + 1
        out.append((a, b, start))
    if cut:
        warnings.warn(f"evaluate_mc: {cut} items were longer than the {limit} positions the model admits; "
                      "the start of their prompt was cut", stacklevel=3)
    return out


def evaluate_mc(model: nn.Module, tokenizer, items: Sequence[MCItem], batch_size: int = 8, scoring: str = "mean",
                prompt: Optional[PromptFormat] = None, persona_system: str = PERSONA_CODE_SYSTEM,
                progress: bool = False) -> MCResult:
    """Pick A or B by the scoring rule; accuracy against ``matching``. Ties choose A.

    ``prompt``: how the question is formatted (default: plain ``Question: ...\\nAnswer:``; pass
    ``PromptFormat()`` for the tokenizer's chat template). ``persona_system``: the system prompt
    of the 'persona-code' rule. Works with any causal LM whose forward returns ``.logits``.
    """
    if not items:
        raise ValueError("no evaluation items")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
    seqs, len_a, len_b = _item_sequences(tokenizer, items, scoring, prompt or _PLAIN, persona_system)
    n = len(items)
    # both answers of an item share its prompt: one prefix forward, two continuations from its KV cache
    pairs = _fit_positions([(a, b, start) for (a, start), (b, _) in zip(seqs[:n], seqs[n:])], hf.max_positions(model))
    la, lb = pair_scores(model, tokenizer, pairs, batch_size, "sum" if scoring == "sum" else "mean", progress,
                         desc=f"A/B ({scoring})")
    choices = ["A" if a >= b else "B" for a, b in zip(la.tolist(), lb.tolist())]
    acc = sum(c == it.matching for c, it in zip(choices, items)) / len(items)
    return MCResult(acc, choices, la, lb, [it.matching for it in items], scoring, len_a, len_b)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> float:
    """exp(mean token negative log-likelihood) over ``texts`` (each with the tokenizer's specials)."""
    if not texts:
        raise ValueError("no texts for perplexity")
    max_length = min(max_length, hf.max_positions(model) or max_length)
    seqs = [(tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"], 1) for t in texts]
    seqs = [s for s in seqs if len(s[0]) > 1]
    sums, counts = sequence_scores(model, tokenizer, seqs, batch_size, "sum")
    return math.exp(-float(sums.sum()) / max(1, sum(counts)))


__all__ = ["MCResult", "SCORINGS", "answer_logprobs", "binomial_se", "evaluate_mc", "length_chunks", "mcnemar", "pair_scores",
           "perplexity", "sequence_scores"]
