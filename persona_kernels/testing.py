"""Small transformers models and a character tokenizer built offline (tests, demo, benchmarks).

Nothing here downloads anything: models come from configs with random (seeded) weights.
"""
from __future__ import annotations

import string

import torch

# Tiny configs per architecture; keys are transformers config classes' kwargs.
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", _COMMON),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_COMMON, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _COMMON),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _COMMON),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


def tiny_causal_lm(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM of the given architecture (eval mode)."""
    import transformers

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(TINY_CONFIGS)}")
    cfg_name, model_name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, cfg_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.to(dtype).eval()


def char_tokenizer(model_max_length: int = 256):
    """A character-level PreTrainedTokenizerFast over printable ASCII (ids < 128), padding on the right."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length, padding_side="right")
