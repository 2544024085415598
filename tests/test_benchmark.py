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
    samples = report["samples"]
    for impl in ("ours", "transformers"):
        assert set(samples[impl]) >= {"forward", "train", "frozen", "greedy", "beam"}
        assert all(len(entry["times"]) == len(entry["others_cpu"]) == 1 for entry in samples[impl].values())  # --quick
    # ours ran the kernels the package runs there: inference ones for the forward pass and a frozen tower,
    # training ones for a training step
    inference = {"vision_tower": ["folded_channel_attention", "inplace_vision"], "language_model": ["few_rows_linear"]}
    assert samples["ours"]["forward"]["kernels"] == inference
    training = {"vision_tower": ["channels_first_conv", "recompute_conv_residual", "recompute_gelu", "recompute_norm"],
                "language_model": ["few_rows_linear", "fused_cross_entropy"]}
    assert samples["ours"]["train"]["kernels"] == training
    frozen = {**inference, "language_model": training["language_model"]}  # the training kernels but a frozen tower's
    assert samples["ours"]["frozen"]["kernels"] == samples["ours"]["cached"]["kernels"] == frozen
    # each row of the table is the ratio of the two medians
    train = next(row for row in report["summary"] if row["what"].startswith("training step"))
    assert train["ours"] == samples["ours"]["train"]["times"][0]
    assert train["ratio"] == pytest.approx(train["ours"] / samples["transformers"]["train"]["times"][0])
    # the same weights and inputs give the same generated tokens on both sides
    for task in ("greedy", "beam"):
        assert report["sequences"][task]["ours"] == report["sequences"][task]["transformers"]
