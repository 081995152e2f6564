"""The command line on a tiny local model directory: each sub-command, and clean errors."""
import json

import pytest

from persona_kernels.app.cli import main
from persona_kernels.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama", seed=0).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "e.txt").write_text("I love parties!\nCall everyone tonight.\nTalking is fun.\n")
    (d / "i.txt").write_text("A quiet night in.\nI read alone.\nSilence helps me think.\n")
    (d / "mc.csv").write_text("question,A,B,matching\nParty tonight?,Yes!,No thanks.,A\nRead alone?,Never.,Gladly.,A\n")
    return d


def test_pipeline_commands(model_dir, texts, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--out", out, "--quiet"]
    data = ["--texts", f"extravert={texts / 'e.txt'}", "--texts", f"introvert={texts / 'i.txt'}"]
    assert main(["calibrate", *common, *data, "--batch-size", "2"]) == 0
    assert "statistics written" in capsys.readouterr().out
    assert main(["masks", *common, "--method", "contrastive_wanda", "--sparsity", "0.6"]) == 0
    assert "difference" in capsys.readouterr().out
    assert main(["masks", *common, "--method", "wanda", "--mode", "difference", "--layers", "last_half",
                 "--layer-sparsity", "1=0.7"]) == 0
    assert "masks written" in capsys.readouterr().out
    assert main(["neurons", *common, "--min-neurons", "10", "--mode", "npti-code", "--percentile-method", "npti-code"]) == 0
    capsys.readouterr()
    assert main(["neurons", *common, "--min-neurons", "10"]) == 0
    assert "extravert: " in capsys.readouterr().out
    masks = f"{out}/masks-contrastive_wanda.safetensors"
    assert main(["generate", *common, "--masks", masks, "--persona", "introvert", "--prompt", "Hi", "--max-new-tokens", "4",
                 "--neurons", f"{out}/neurons-introvert.safetensors",
                 "--opposite-neurons", f"{out}/neurons-extravert.safetensors", "--npti-mode", "npti-code"]) == 0
    assert "--- 'Hi'" in capsys.readouterr().out
    assert main(["eval", *common, "--masks", masks, "--persona", "extravert", "--mc", str(texts / "mc.csv")]) == 0
    assert "2 items: accuracy" in capsys.readouterr().out
    assert main(["localize", *common, *data]) == 0
    assert "silhouette" in capsys.readouterr().out
    # steering vectors from the same statistics, applied, and projected
    assert main(["vectors", *common]) == 0
    assert "steering vectors written" in capsys.readouterr().out
    vec = f"{out}/steering-extravert.safetensors"
    assert main(["generate", *common, "--vectors", vec, "--persona", "introvert", "--steer-layers", "1",
                 "--steer-strength", "2", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert "--- 'Hi'" in capsys.readouterr().out
    assert main(["eval", *common, "--vectors", vec, "--persona", "extravert", "--mc", str(texts / "mc.csv")]) == 0
    assert "unmasked: matching" in capsys.readouterr().out
    assert main(["project", *common, "--vectors", vec, "--file", str(texts / "e.txt"), "--layers", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert "| I love parties! |" in printed and "L0 | L1" in printed


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--texts", "a=/no/such/file.txt", "--texts", "b=/no/such.txt"], "no such file"),
    (["calibrate", "--texts", "just-a-path"], "NAME=PATH"),
    (["masks", "--stats", "/no/such/stats.safetensors"], "no such file"),
    (["generate", "--persona", "x"], "--persona needs --masks"),
    (["project", "--file", "x.txt"], "project needs --vectors"),
    (["masks", "--layers", "a-b"], "--layers expects"),
    (["calibrate", "--personalitybench", "/tmp"], "--trait"),
])
def test_errors_are_one_line_without_traceback(model_dir, tmp_path, capsys, argv, message):
    code = main([argv[0], "--model", model_dir, "--out", str(tmp_path), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_wrong_model_for_artifact(model_dir, texts, tmp_path, capsys):
    out = str(tmp_path)
    main(["calibrate", "--model", model_dir, "--out", out, "--quiet", "--texts", f"a={texts / 'e.txt'}",
          "--texts", f"b={texts / 'i.txt'}"])
    other = tmp_path / "other"
    tiny_causal_lm("qwen2").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    assert main(["masks", "--model", str(other), "--out", out]) == 2
    assert "different model" in capsys.readouterr().err


def test_device_auto_loads_with_a_device_map(model_dir, texts, tmp_path, capsys):
    """--device auto: the model is loaded by accelerate with device_map='auto' (here all on the
    CPU) and the persona layer runs on it."""
    pytest.importorskip("accelerate")
    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--out", out, "--quiet", "--device", "auto"]
    data = ["--texts", f"extravert={texts / 'e.txt'}", "--texts", f"introvert={texts / 'i.txt'}"]
    assert main(["calibrate", *common, *data, "--batch-size", "2"]) == 0
    assert main(["masks", *common, "--sparsity", "0.5"]) == 0
    capsys.readouterr()
    assert main(["generate", *common, "--masks", f"{out}/masks-wanda.safetensors", "--persona", "introvert",
                 "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "--- 'Hi'" in capsys.readouterr().out


def test_missing_model_dir(capsys, tmp_path):
    assert main(["calibrate", "--model", "/no/such/model-dir"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    code, err = _run_cli("calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "without config.json" in err and "Traceback" not in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("calibrate", "masks", "neurons", "vectors", "project", "localize", "generate", "eval", "bench", "env", "demo"):
        assert cmd in out


def _run_cli(*argv):
    """The CLI as a user runs it: a subprocess, no stdin; returns (exit code, stderr)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "persona_kernels", *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "--device", "bogus"], "is not a device"),
    (["calibrate", "--device", "cuda:0"], "no CUDA device"),
    (["calibrate", "--personas", "a", "--csv", "x.csv"], "two different names"),
    (["calibrate", "--personas", "a,b,c", "--csv", "x.csv"], "two different names"),
    (["calibrate", "--personas", "a,a", "--csv", "x.csv"], "two different names"),
])
def test_cli_bad_arguments_exit_2_without_a_traceback(argv, message, tmp_path):
    if "--csv" in argv:
        csv = tmp_path / "x.csv"
        csv.write_text("question,matching,not_matching\nq?,yes,no\n")
        argv = [str(csv) if a == "x.csv" else a for a in argv]
    code, err = _run_cli(*argv, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_out_is_checked_before_work_and_files_with_bom_or_dirs(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = _run_cli("calibrate", "--out", str(f))
    assert code == 2 and "is a file" in err and "Traceback" not in err
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffquestion,matching,not_matching\nq?,yes,no\n".encode("utf-8"))
    from persona_kernels.data import load_persona_pairs

    assert load_persona_pairs(bom) == {"matching": [("q?", "yes")], "not_matching": [("q?", "no")]}
    code, err = _run_cli("calibrate", "--csv", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "is a directory" in err
    a = tmp_path / "a.txt"
    a.write_text("hello\n")
    code, err = _run_cli("calibrate", "--texts", f"x={a}", "--texts", f"x={a}", "--out", str(tmp_path / "o"))
    assert code == 2 and "twice" in err


def test_cli_masks_the_head_on_request(model_dir, texts, tmp_path, capsys):
    from persona_kernels.masks import MaskStore

    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--out", out, "--quiet"]
    data = ["--texts", f"a={texts / 'e.txt'}", "--texts", f"b={texts / 'i.txt'}"]
    assert main(["calibrate", *common, *data, "--include-head"]) == 0
    assert main(["masks", *common, "--include-head"]) == 0
    assert "lm_head" in MaskStore.load(f"{out}/masks-wanda.safetensors").layers
    assert main(["generate", *common, "--masks", f"{out}/masks-wanda.safetensors", "--persona", "a",
                 "--tied-embedding", "mask", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert main(["export", *common, "--masks", f"{out}/masks-wanda.safetensors", "--persona", "a",
                 "--path", str(tmp_path / "exported"), "--tied-embedding", "mask"]) == 0


def test_bench_takes_dtype_masks_and_reports_median_and_range(model_dir, texts, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--out", out, "--quiet"]
    assert main(["calibrate", *common, "--texts", f"a={texts / 'e.txt'}", "--texts", f"b={texts / 'i.txt'}"]) == 0
    assert main(["masks", *common, "--sparsity", "0.6"]) == 0
    capsys.readouterr()
    assert main(["bench", *common, "--masks", f"{out}/masks-wanda.safetensors", "--persona", "b", "--runs", "3",
                 "--tokens", "2", "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "dense:" in printed and "(min " in printed and "3 runs" in printed and "b (6" in printed and "% sparse" in printed
    assert "persona switch" in printed and " ns" in printed
    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["format"] for r in written["rows"]] == ["dense", "dense, every linear on dense_linear", "bitmap"]
    assert written["dtype"] == "bfloat16" and "the dense model on dense_linear" in printed
    assert main(["bench", *common, "--masks", f"{out}/masks-wanda.safetensors", "--runs", "1", "--tokens", "1",
                 "--fuse", "both", "--dense-head", "both"]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r.get("fused"), r.get("dense_head")) for r in rows] == [(None, None)] * 2 + [
        (False, False), (False, True), (True, False), (True, True)]
    assert main(["bench", *common, "--persona", "b"]) == 2
    assert main(["bench", *common, "--masks", f"{out}/masks-wanda.safetensors", "--persona", "zz"]) == 2


def test_eval_reuses_the_unmasked_lower_layers_exactly(model_dir, texts, tmp_path, monkeypatch, capsys):
    """eval runs the unmasked model first and the persona model from its first modified layer on
    (steering at layer 1, masks on the last half): the same per-item scores and report as whole runs."""
    import contextlib

    from persona_kernels import reuse

    out = str(tmp_path / "out")
    common = ["--model", model_dir, "--out", out, "--quiet"]
    data = ["--texts", f"extravert={texts / 'e.txt'}", "--texts", f"introvert={texts / 'i.txt'}"]
    assert main(["calibrate", *common, *data]) == 0
    assert main(["vectors", *common]) == 0
    assert main(["masks", *common, "--layers", "last_half", "--sparsity", "0.6"]) == 0
    runs = {"--vectors": ["--vectors", f"{out}/steering-extravert.safetensors", "--steer-layers", "1"],
            "--masks": ["--masks", f"{out}/masks-wanda.safetensors"]}
    got, modes, session = {}, [], reuse.LowerLayers.session

    @contextlib.contextmanager
    def spy(self, key, first):
        with session(self, key, first) as mode:
            modes.append(mode)
            yield mode

    monkeypatch.setattr(reuse.LowerLayers, "session", spy)
    for whole in (False, True):
        if whole:
            assert modes == ["recording", "replaying"] * 2  # not a vacuous comparison
            modes.clear()
        for name, extra in runs.items():
            capsys.readouterr()
            assert main(["eval", *common, *extra, "--persona", "extravert", "--mc", str(texts / "mc.csv"),
                         *(["--no-reuse"] if whole else [])]) == 0
            got[(name, whole)] = (capsys.readouterr().out, (tmp_path / "out" / "eval-items.json").read_text())
    assert modes == ["whole"] * 4  # --no-reuse
    for name in runs:
        assert got[(name, False)] == got[(name, True)]
        assert "unmasked: matching" in got[(name, False)][0]
