"""The GPU suite's CPU dry run (GPU_SUITE_DRY=1): the script that a GPU session spends its few
minutes on runs end to end here, on tiny shapes, so it cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "GPU_SUITE_DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = set(os.listdir(tmp_path))
    assert {"env.txt", "build.log", "tests.log", "bench.log", "gpu_results.json", "gpu_table.md", "crossover_gpu.json"} <= files
    assert len(files) <= 8  # what comes back from the device machine
    res = json.load(open(tmp_path / "gpu_results.json"))
    assert not res["errors"] and not res["skipped"]
    for section in ("ceilings", "accumulate_stats", "masked_linear", "induce_neurons", "e2e"):
        assert res[section], section
    assert {r["backend"] for r in res["masked_linear"]} >= {"auto", "cpp"}
    cross = json.load(open(tmp_path / "crossover_gpu.json"))
    for entries in cross.values():  # the format of crossover.json: 'kind:dtype' -> {max_batch, backend}
        for key, entry in entries.items():
            assert ":" in key and set(entry) == {"max_batch", "backend"}
    assert proc.stdout.rstrip().splitlines()[-1].startswith("files in")
    assert "| kernel | setting | result |" in proc.stdout
