"""A/B multiple-choice evaluation by summed answer log-probability (the paper's protocol)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.loaders import MCItem


@dataclass
class MCResult:
    accuracy: float          # fraction of items where the chosen answer is the persona's
    choices: list            # 'A' or 'B' per item
    logprob_a: torch.Tensor  # [N] summed log-probability of answer A's tokens
    logprob_b: torch.Tensor
    matching: list           # 'A' or 'B' per item: the persona's answer

    @property
    def margin(self) -> torch.Tensor:
        """Per item: log p(persona's answer) - log p(other answer); > 0 means the persona's side is preferred."""
        sign = torch.tensor([1.0 if m == "A" else -1.0 for m in self.matching], dtype=torch.float64)
        return sign * (self.logprob_a - self.logprob_b)


def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the number of prompt tokens (answer tokenised on its own)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not a:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    return p + a, len(p)


@torch.inference_mode()
def answer_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = 8) -> torch.Tensor:
    """Summed log p(answer tokens | prompt) for each (prompt, answer) pair, batched with right padding."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers must have the same length")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    enc = [_encode(tokenizer, p, a) for p, a in zip(prompts, answers)]
    out = torch.empty(len(enc), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(enc), batch_size):
            chunk = enc[s:s + batch_size]
            L = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            attn = torch.zeros(len(chunk), L, dtype=torch.long)
            for i, (t, _) in enumerate(chunk):
                ids[i, :len(t)] = torch.tensor(t)
                attn[i, :len(t)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logp = F.log_softmax(logits.float(), -1)[:, :-1]                     # predicts token t+1
            tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
            for i, (t, n_prompt) in enumerate(chunk):
                out[s + i] = tok_lp[i, n_prompt - 1:len(t) - 1].sum()
    finally:
        model.train(was_training)
    return out


def evaluate_mc(model: nn.Module, tokenizer, items: Sequence[MCItem], batch_size: int = 8,
                prompt_template: str = "Question: {question}\nAnswer:", answer_template: str = " {answer}") -> MCResult:
    """Pick A or B by the summed log-probability of the answer tokens; accuracy against ``matching``.

    Ties choose A. Works with any causal LM whose forward returns ``.logits``.
    """
    if not items:
        raise ValueError("no evaluation items")
    prompts = [prompt_template.format(question=it.question) for it in items]
    lp = answer_logprobs(model, tokenizer, prompts + prompts,
                         [answer_template.format(answer=it.a) for it in items] + [answer_template.format(answer=it.b) for it in items],
                         batch_size)
    la, lb = lp[:len(items)], lp[len(items):]
    choices = ["A" if a >= b else "B" for a, b in zip(la.tolist(), lb.tolist())]
    acc = sum(c == it.matching for c, it in zip(choices, items)) / len(items)
    return MCResult(acc, choices, la, lb, [it.matching for it in items])
