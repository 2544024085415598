"""tools/benchmark.py's serving and batch tasks run end to end (tiny preset, small images, few requests); no timing
is checked."""

import json

import pytest

from .test_benchmark import load_benchmark

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.mark.slow
def test_throughput_tasks_run_on_tiny(tmp_path, capsys, monkeypatch, one_thread):  # --threads 1, restored after
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "THROUGHPUT_IMAGES", {"serve1": 1, "serve8": 8, "batch": 3, "loop": 1})
    out = tmp_path / "report.json"
    benchmark.main(["--size", "tiny", "--image-size", "64", "--throughput-tokens", "4", "--quick", "--in-process",
                    "--max-idle-wait", "0", "--silent", "--json", str(out), "--tasks", "serve1,serve8,batch",
                    "--threads", "1"])
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "server, 8 clients (s/image) [2]" in table and "images/s:" in table
    assert set(report["samples"]["ours"]) == {"serve1", "serve8", "batch"}
    assert set(report["samples"]["transformers"]) == {"loop"}
    for entry in [*report["samples"]["ours"].values(), report["samples"]["transformers"]["loop"]]:
        assert entry["times"] and all(t > 0 for t in entry["times"]) and entry["peak_mb"][0] > 0
