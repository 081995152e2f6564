"""Padding and sequence length: statistics do not depend on the batch size or the padding side
(positions count real tokens only, on every architecture), and texts longer than the model's
positions are cut with a warning instead of failing inside the model (GPT-2's learned positions)."""
import pytest
import torch

from persona_kernels.calibrate import calibrate
from persona_kernels.data.loaders import MCItem
from persona_kernels.evaluate import evaluate_mc, perplexity
from persona_kernels.localize import LocalizeConfig, localize
from persona_kernels.steering import steering_vectors, text_projections
from persona_kernels.testing import TINY_CONFIGS, char_tokenizer, tiny_causal_lm

TEXTS = {"a": ["hello there, how are you doing today?", "hi", "a much longer text about parties and friends", "yo!"],
         "b": ["quiet", "a book by the fire on a cold night", "tea", "alone at home, reading slowly"]}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_statistics_do_not_depend_on_batch_size_or_padding_side(arch, side):
    model = tiny_causal_lm(arch, seed=2)
    tok = char_tokenizer()
    tok.padding_side = side
    one = calibrate(model, tok, TEXTS, batch_size=1, progress=False)
    many = calibrate(model, tok, TEXTS, batch_size=8, progress=False)
    for site, st in one.stats.items():
        other = many.stats[site]
        assert torch.equal(st.count, other.count), site
        torch.testing.assert_close(st.mean, other.mean, rtol=1e-4, atol=1e-5, msg=lambda m: f"{arch} {site}: {m}")
        torch.testing.assert_close(st.norm_mean, other.norm_mean, rtol=1e-4, atol=1e-5)


def test_over_long_inputs_on_gpt2_are_cut_with_a_warning():
    model, tok = tiny_causal_lm("gpt2", seed=1, n_positions=64), char_tokenizer(model_max_length=10_000)
    long = "word " * 40  # 200 characters: 200 tokens for 64 positions
    texts = {"a": [long, "short"], "b": ["tiny", long]}
    with pytest.warns(UserWarning, match="2 of 4 texts were longer than 64 tokens"):
        res = calibrate(model, tok, texts, progress=False)
    assert int(next(iter(res.stats.values())).count.sum()) == 64 + 5 + 4 + 64
    with pytest.warns(UserWarning, match="longer than 56 tokens"):  # 64 positions minus the 8 new tokens
        calibrate(model, tok, texts, token_scope="generated", max_new_tokens=8, progress=False)
    pairs = {"a": [(long, "yes indeed")], "b": [(long, "no")]}
    with pytest.warns(UserWarning, match="cut to their last 64"):
        calibrate(model, tok, pairs, progress=False)
    with pytest.raises(ValueError, match="no room for a prompt"):
        calibrate(model, tok, texts, token_scope="generated", max_new_tokens=64, progress=False)
    items = [MCItem(long, "yes", "no", "A"), MCItem("short?", "yes", "no", "B")]
    with pytest.warns(UserWarning, match="1 items were longer than the 64 positions"):
        r = evaluate_mc(model, tok, items, scoring="sum")
    assert torch.isfinite(r.logprob_a).all()
    with pytest.raises(ValueError, match="answers alone are longer"):
        evaluate_mc(model, tok, [MCItem("q", long, "no", "A")])
    assert perplexity(model, tok, [long]) > 0
    res = localize(model, tok, {"a": [long, "x y", "p q r"], "b": ["z w", long, "u"]}, LocalizeConfig(cv_folds=2))
    assert len(res.layers) == 3  # embeddings + 2 layers
    calib = calibrate(model, tok, {"a": ["hello there", "party"], "b": ["quiet", "home"]}, progress=False)
    layers, proj = text_projections(model, tok, [long, "short text"], steering_vectors(calib, "a", "b"), persona="a")
    assert proj.shape == (2, len(layers)) and torch.isfinite(proj).all()
