"""The demo pipeline on reduced settings: it runs end to end and leaves a complete report."""
import os

from persona_kernels.app.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for section in ("prefers", "Generations", "Layer localization", "Decode speed", "Environment"):
        assert section in report
    arts = set(os.listdir(out / "artifacts"))
    assert {"statistics.safetensors", "masks-wanda.safetensors", "masks-contrastive_wanda.safetensors",
            "masks-contrastive_sparse.safetensors", "localize.json"} <= arts
    assert any(a.startswith("neurons-") for a in arts)
