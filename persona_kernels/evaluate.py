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

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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

        for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[s:s + batch_size]
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
    scores, _ = sequence_scores(model, tokenizer, seqs, batch_size, "sum" if scoring == "sum" else "mean", progress,
                                desc=f"A/B ({scoring})")
    la, lb = scores[:len(items)], scores[len(items):]
    choices = ["A" if a >= b else "B" for a, b in zip(la.tolist(), lb.tolist())]
    acc = sum(c == it.matching for c, it in zip(choices, items)) / len(items)
    return MCResult(acc, choices, la, lb, [it.matching for it in items], scoring, len_a, len_b)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> float:
    """exp(mean token negative log-likelihood) over ``texts`` (each with the tokenizer's specials)."""
    if not texts:
        raise ValueError("no texts for perplexity")
    seqs = [(tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"], 1) for t in texts]
    seqs = [s for s in seqs if len(s[0]) > 1]
    sums, counts = sequence_scores(model, tokenizer, seqs, batch_size, "sum")
    return math.exp(-float(sums.sum()) / max(1, sum(counts)))


__all__ = ["MCResult", "SCORINGS", "answer_logprobs", "binomial_se", "evaluate_mc", "mcnemar", "perplexity", "sequence_scores"]
