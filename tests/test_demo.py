"""The offline demo (`--preset demo`), shortened: a few documents and steps instead of minutes of training."""

import json

from florence2 import Florence2
from florence2.processor import Florence2Processor
from training import demo
from training.docvqa import main, parse_args
from training.synthetic import LEARNABLE, READING

from .conftest import metrics


def test_demo_preset_is_offline_and_explicit_flags_win():
    args = parse_args(["--preset", "demo", "--output-dir", "runs/demo", "--epochs", "1"])
    assert args.model == "demo" and args.dataset.endswith("demo-data") and args.optimizer == "sgd"
    assert args.train_vision and args.eval_before_training and args.epochs == 1


def test_shortened_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TRAIN_DOCUMENTS", 6)
    monkeypatch.setattr(demo, "VALIDATION_DOCUMENTS", 2)
    out = tmp_path / "demo"
    summary = main(["--preset", "demo", "--output-dir", str(out), "--batch-size", "4", "--max-steps", "4",
                    "--num-workers", "0", "--max-new-tokens", "4", "--log-every", "1"])
    records = metrics(out)
    evals = [r for r in records if "eval_anls" in r]
    assert [r["step"] for r in evals] == [0, 4] and summary["steps"] == 4
    # the held-out documents are asked both kinds of questions, and ANLS is reported per type
    assert set(evals[-1]["eval_anls_by_type"]) & set(LEARNABLE)
    assert set(evals[-1]["eval_anls_by_type"]) & set(READING)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert "validation ANLS, step 0 -> step 4:" in capsys.readouterr().out

    assert (out / "demo-data" / "dataset_dict.json").is_file() and (out / "metrics.png").stat().st_size > 0
    model = Florence2.from_pretrained(out / "best")
    processor = Florence2Processor.from_pretrained(out / "best")
    assert processor.image_size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert (model.config.vision, model.config.text) == (demo.demo_config().vision, demo.demo_config().text)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == evals[-1]["eval_examples"] > 0
