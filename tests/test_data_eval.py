"""Data loaders on good and broken files; A/B evaluation against a direct computation."""
import json

import pytest
import torch
import torch.nn.functional as F

from persona_kernels.data import (
    BUILTIN_PAIRS,
    DataFormatError,
    MCItem,
    builtin_pair,
    builtin_texts,
    load_mc_csv,
    load_persona_csv,
    load_personalitybench,
    load_text_lines,
)
from persona_kernels.evaluate import answer_logprobs, evaluate_mc
from persona_kernels.testing import char_tokenizer, tiny_causal_lm


def test_text_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\n\n  two  \nthree\n")
    assert load_text_lines(p) == ["one", "two", "three"]
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(DataFormatError, match="e.txt: no samples"):
        load_text_lines(tmp_path / "e.txt")
    with pytest.raises(DataFormatError, match="no such file"):
        load_text_lines(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_text_lines(tmp_path / "bin.txt")


def test_persona_csv(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('question,matching,not_matching\n"Q1, with comma",yes,no\n,only answer,other\n')
    d = load_persona_csv(p, "power", "humble")
    assert d == {"power": ["Q1, with comma yes", "only answer"], "humble": ["Q1, with comma no", "other"]}
    p.write_text("question,matching,not_matching\nq,yes,no\nq2,yes\n")
    with pytest.raises(DataFormatError, match=r"train.csv, line 3: 2 fields, expected 3"):
        load_persona_csv(p)
    p.write_text("question,answer\nq,a\n")
    with pytest.raises(DataFormatError, match="line 1: header"):
        load_persona_csv(p)
    p.write_text("question,matching,not_matching\nq,,no\n")
    with pytest.raises(DataFormatError, match=r"line 2: empty field\(s\) \['matching'\]"):
        load_persona_csv(p)
    p.write_text("")
    with pytest.raises(DataFormatError, match="empty file"):
        load_persona_csv(p)


def test_mc_csv(tmp_path):
    p = tmp_path / "mc.csv"
    p.write_text("question,A,B,matching\nWant power?,Yes.,No.,A\nShare?,Never.,Gladly.,b\n")
    assert load_mc_csv(p) == [MCItem("Want power?", "Yes.", "No.", "A"), MCItem("Share?", "Never.", "Gladly.", "B")]
    p.write_text("question,A,B,matching\nq,a,b,C\n")
    with pytest.raises(DataFormatError, match="line 2: matching must be 'A' or 'B'"):
        load_mc_csv(p)


def test_personalitybench(tmp_path):
    traits = ["Openness", "Conscientiousness", "Extraversion", "Agreeableness", "Neuroticism"]
    rec = {k: f"You are {k}." for t in traits for k in (t, f"{t}_reversed")}
    (tmp_path / "description.json").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "Extraversion.json").write_text('{"question": "Party?"}\n{"question": "Crowds?"}\n')
    pb = load_personalitybench(tmp_path)
    assert pb.questions == {"Extraversion": ["Party?", "Crowds?"]}
    assert pb.texts_by_persona("Extraversion") == {"Extraversion": ["You are Extraversion."] * 2,
                                                   "Extraversion_reversed": ["You are Extraversion_reversed."] * 2}
    with pytest.raises(KeyError):
        pb.texts_by_persona("Humour")
    bad = dict(rec)
    del bad["Neuroticism_reversed"]
    (tmp_path / "description.json").write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"description.json, line 2: missing or empty keys \['Neuroticism_reversed'\]"):
        load_personalitybench(tmp_path)
    (tmp_path / "description.json").write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(DataFormatError, match="line 2: invalid JSON"):
        load_personalitybench(tmp_path)
    (tmp_path / "description.json").write_text(json.dumps(rec) + "\n")
    (tmp_path / "test" / "Extraversion.json").write_text('{"q": "Party?"}\n')
    with pytest.raises(DataFormatError, match="Extraversion.json, line 1"):
        load_personalitybench(tmp_path)


def test_builtin_sets():
    for pos, neg in BUILTIN_PAIRS.values():
        assert len(builtin_texts(pos)) >= 30 and len(builtin_texts(neg)) >= 30
    assert list(builtin_pair("power")) == ["power_seeking", "power_averse"]
    with pytest.raises(KeyError):
        builtin_texts("ambivert")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_logprobs_match_direct_computation(arch):
    model, tok = tiny_causal_lm(arch, seed=5), char_tokenizer()
    prompts, answers = ["Question: hi?\nAnswer:", "Q: longer question here?\nA:", "x"], [" yes", " no way", " maybe so"]
    got = answer_logprobs(model, tok, prompts, answers, batch_size=2)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        pi = tok(p)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pi + ai])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = sum(logp[len(pi) - 1 + t, ai[t]].item() for t in range(len(ai)))
        assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_evaluate_mc_choices_and_accuracy():
    model, tok = tiny_causal_lm("llama", seed=6), char_tokenizer()
    items = [MCItem("Do you like parties?", "Yes, a lot.", "No.", "A"), MCItem("Quiet night?", "Sure.", "Never!", "B")]
    r = evaluate_mc(model, tok, items)
    want = ["A" if a >= b else "B" for a, b in zip(r.logprob_a.tolist(), r.logprob_b.tolist())]
    assert r.choices == want
    assert r.accuracy == sum(c == it.matching for c, it in zip(want, items)) / 2
    assert ((r.margin > 0) == torch.tensor([c == it.matching for c, it in zip(want, items)])).all()
    with pytest.raises(ValueError, match="no evaluation items"):
        evaluate_mc(model, tok, [])


def _bench_dir(tmp_path):
    traits = ["Openness", "Conscientiousness", "Extraversion", "Agreeableness", "Neuroticism"]
    recs = [{k: f"You are {k} #{i}." for t in traits for k in (t, f"{t}_reversed")} for i in range(3)]
    (tmp_path / "description.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "Extraversion.json").write_text('{"question": "Party?"}\n{"question": "Crowds?"}\n')
    return tmp_path


def test_role_play_prompts_draw_one_description_per_question(tmp_path):
    pb = load_personalitybench(_bench_dir(tmp_path))
    got = pb.role_play_prompts("Extraversion", seed=3)
    assert set(got) == {"Extraversion", "Extraversion_reversed"}
    for pole, prompts in got.items():
        assert len(prompts) == 2
        for q, p in zip(["Party?", "Crowds?"], prompts):
            assert q in p and sum(d in p for d in pb.descriptions[pole]) == 1
    assert pb.role_play_prompts("Extraversion", seed=3) == got  # seeded
    assert pb.role_play_prompts("Extraversion", "{personality}|{question}", questions=["Q"])["Extraversion"][0].endswith("|Q")
    with pytest.raises(KeyError, match="no questions"):
        pb.role_play_prompts("Openness")
    with pytest.raises(ValueError, match="no {question} field"):
        pb.role_play_prompts("Extraversion", "{personality}")


def test_plain_texts_as_the_chat_user_turn():
    """calibrate(chat_template=True) counts the tokens of each text rendered as the chat's user
    turn (with the generation prompt); without it the texts are tokenized as they are."""
    from persona_kernels.calibrate import calibrate
    from persona_kernels.prompts import PromptFormat

    model, tok = tiny_causal_lm("llama", seed=1), char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    texts = {"a": ["hi there", "party!"], "b": ["quiet", "a book"]}
    chat = calibrate(model, tok, texts, chat_template=True, progress=False)
    plain = calibrate(model, tok, texts, progress=False)
    fmt = PromptFormat(chat_template=True)
    for i, p in enumerate(texts):
        want = sum(len(tok(fmt.prompt(tok, t), add_special_tokens=False)["input_ids"]) for t in texts[p])
        assert int(next(iter(chat.stats.values())).count[i]) == want
        assert int(next(iter(plain.stats.values())).count[i]) == sum(len(tok(t)["input_ids"]) for t in texts[p])
    with pytest.raises(ValueError, match="no chat template"):
        calibrate(model, char_tokenizer(), texts, chat_template=True, progress=False)


def test_cli_calibrates_role_play_prompts(tmp_path):
    from persona_kernels.app.cli import main
    from persona_kernels.calibrate import CalibrationResult

    model_dir = tmp_path / "m"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    tok.save_pretrained(model_dir)
    (tmp_path / "pb").mkdir()
    bench = _bench_dir(tmp_path / "pb")
    (tmp_path / "t.txt").write_text("{personality} -- {question}\n")
    out = tmp_path / "o"
    assert main(["calibrate", "--model", str(model_dir), "--personalitybench", str(bench), "--trait", "Extraversion",
                 "--role-play-template", str(tmp_path / "t.txt"), "--token-scope", "decode", "--max-new-tokens", "3",
                 "--out", str(out), "--quiet"]) == 0
    res = CalibrationResult.load(out / "statistics.safetensors")
    assert res.personas == ["Extraversion", "Extraversion_reversed"] and res.config["chat_template"] is True
    assert res.config["token_scope"] == "decode"
