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
# Mixture-of-experts models: routed experts held as fused 3-D parameters (transformers >= 5)
TINY_MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_COMMON, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 40, "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_COMMON, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 40, "head_dim": 16}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        **_COMMON, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 8, "n_group": 1, "topk_group": 1}),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 1,
                                                          "intermediate_size_mlp": 96, "head_dim": 16}),
}


def tiny_causal_lm(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM of the given architecture (eval mode)."""
    import transformers

    configs = {**TINY_CONFIGS, **TINY_MOE_CONFIGS}
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(configs)}")
    cfg_name, model_name, kwargs = configs[arch]
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
