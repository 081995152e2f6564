"""Every benchmark script runs (in --quick mode), so the benchmarks do not rot. No timing is asserted."""
import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script", ["bench_accumulate_stats", "bench_masked_linear", "bench_masks",
                                    "bench_induce_neurons", "bench_e2e_decode", "bench_calibration",
                                    "bench_eval", "bench_dense_linear"])
def test_benchmark_script_quick(script, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = importlib.import_module(script)
    argv = ["--quick"]
    if script == "bench_masked_linear":
        argv += ["--json", str(tmp_path / "rows.json"), "--backends", "cpp"]  # not the slow interpreter
    rows = mod.main(argv)
    assert rows
    sys.modules.pop(script, None)
