"""tools/benchmark.py runs end to end (tiny preset, small image, in one process); no timing is checked."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_tiny(tmp_path, capsys):
    benchmark = load_benchmark()
    out = tmp_path / "report.json"
    benchmark.main(["--size", "tiny", "--image-size", "64", "--new-tokens", "4", "--quick", "--in-process",
                    "--max-idle-wait", "0", "--silent", "--json", str(out),
                    "--tasks", "forward,train,frozen,cached,greedy,beam"])  # serving: test_benchmark_throughput.py
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "training step" in table and "beam 3" in table and "matmul peak" in table
    for impl in ("ours", "transformers"):
        assert set(report["samples"][impl]) >= {"forward", "train", "frozen", "greedy", "beam"}
        assert all(t > 0 for t in report["samples"][impl]["train"]["times"])
    assert "cached" in report["samples"]["ours"]
    # the same weights and inputs give the same generated tokens on both sides
    for task in ("greedy", "beam"):
        assert report["sequences"][task]["ours"] == report["sequences"][task]["transformers"]
