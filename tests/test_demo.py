"""The offline demo (`--preset demo`), shortened: a few documents and steps instead of minutes of training."""

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from florence2 import Florence2
from florence2.processor import Florence2Processor
from training import demo, demo_detection, finetune, synthetic_detection
from training.docvqa import main, parse_args
from training.synthetic import LEARNABLE, READING

from .conftest import last_checkpoint, metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops are too small to share out


def test_demo_preset_is_offline_and_explicit_flags_win():
    args = parse_args(["--preset", "demo", "--output-dir", "runs/demo", "--epochs", "1"])
    assert args.model == "demo" and args.dataset == str(Path("runs/demo/demo-data")) and args.optimizer == "adamw"
    assert (args.lr, args.vision_lr, args.embedding_eps, args.num_beams) == (1e-3, None, 3e-4, 1)
    # fine-tuning keeps the tower the captions pretrained frozen, its features computed once per page
    assert not args.train_vision and args.feature_cache == "memory"
    assert args.eval_before_training and args.epochs == 1
    args = parse_args(["--preset", "demo", "--output-dir", "d", "--train-vision"])  # the tower trained: no cache
    assert args.train_vision and (args.vision_lr, args.feature_cache) == (demo.VISION_LR, "none")
    assert parse_args(["--preset", "demo", "--output-dir", "d", "--optimizer", "sgd"]).embedding_eps is None
    # a flag given explicitly wins even when it equals the parser's own default (the preset's defaults are replaced)
    args = parse_args(["--preset", "demo", "--output-dir", "d", "--lr", "1e-6", "--epochs", "7", "--num-beams", "3"])
    assert (args.lr, args.epochs, args.num_beams, args.batch_size) == (1e-6, 7, 3, 16)
    # so does a switch the preset turns on, turned off
    assert not parse_args(["--preset", "demo", "--output-dir", "d", "--no-eval-before-training"]).eval_before_training


def test_shortened_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TRAIN_DOCUMENTS", 6)
    monkeypatch.setattr(demo, "VALIDATION_DOCUMENTS", 2)
    monkeypatch.setattr(demo, "CAPTION_DOCUMENTS", 8)
    monkeypatch.setattr(demo, "CAPTION_VALIDATION_DOCUMENTS", 2)
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
    printed = capsys.readouterr()
    assert "validation ANLS, step 0 -> step 4:" in printed.out
    # the machine's speed first, the demo's time and steps (4 of pretraining, 4 of fine-tuning) beside it at the end
    assert printed.out.startswith(f"this machine: float32 matmul {summary['matmul_gflops']:.1f} GFLOP/s")
    minutes, seconds = divmod(round(summary["demo_seconds"]), 60)
    assert f"demo: {minutes} min {seconds:02d} s in all, 8 optimizer steps" in printed.out
    # a bar per epoch over all of its stage's steps (4; pretraining's epochs have 2 each), drawn from the start; stderr
    # is not a terminal here, so no step redraws it (at most one redraw a minute)
    drawn = re.findall(r"epoch \d+/\d+:[^|]*\|[^|]*\| (\d+)/(\d+) \[", printed.err)
    assert drawn == [("0", "4"), ("2", "4"), ("0", "4")]

    # stage 1 pretrained the model (its vision tower too) on captions of other pages; stage 2 fine-tuned that
    # checkpoint with the tower frozen and its features cached
    stages = [json.loads((last_checkpoint(folder) / "trainer.json").read_text()) for folder in (out / "pretrain", out)]
    assert [(t["train_vision"], t["feature_cache"]) for t in stages] == [(True, "none"), (False, "memory")]
    assert stages[0]["vision_lr"] == demo.VISION_LR
    captions = datasets.load_from_disk(str(out / "pretrain" / "demo-captions"))
    assert set(captions["train"]["question"]) == {"<CAPTION>"} and len(captions["train"]) == 8
    pretrained = out / "pretrain" / "checkpoints" / "step-00000004"
    assert [r["step"] for r in metrics(out / "pretrain") if "eval_anls" in r][-1] == 4
    assert json.loads((last_checkpoint(out) / "trainer.json").read_text())["model"] == str(pretrained)

    assert (out / "demo-data" / "dataset_dict.json").is_file() and (out / "metrics.png").stat().st_size > 0
    model = Florence2.from_pretrained(out / "best")
    processor = Florence2Processor.from_pretrained(out / "best")
    assert processor.image_size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert (model.config.vision, model.config.text) == (demo.demo_config().vision, demo.demo_config().text)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == evals[-1]["eval_examples"] > 0


def test_detection_demo_preset_is_offline_and_reads_its_coco_export():
    args = finetune.parse_args(["--preset", "demo", "--task", "<OD>", "--output-dir", "runs/od"])
    assert args.model == "demo" and args.dataset == str(Path("runs/od/demo-data")) and args.format == "auto"
    assert args.train_vision and args.eval_before_training and args.num_beams == 1
    assert args.epochs == 2 and not args.train_text_encoder  # the text encoder frozen at its random init
    assert args.eval_every == 0 and not args.group_by_length  # epochs-end evaluations; grouped batches plateaued
    assert finetune.parse_args(["--preset", "demo", "--task", "<OD>", "--output-dir", "d", "--lr", "1e-6"]).lr == 1e-6
    args = finetune.parse_args(["--preset", "demo", "--task", "<OD>", "--output-dir", "d", "--no-train-vision",
                                "--train-text-encoder"])
    assert not args.train_vision and args.vision_lr is None and args.train_text_encoder


def test_location_embeddings_vary_smoothly_with_their_bin():
    rows = demo_detection.location_embeddings(1000, 192, 0.06, torch.Generator().manual_seed(0))
    assert rows.shape == (1000, 192) and abs(rows.std().item() - 0.06) < 1e-3
    unit = torch.nn.functional.normalize(rows, dim=1)
    neighbours, far = (unit[:-1] * unit[1:]).sum(1).mean(), (unit[:-500] * unit[500:]).sum(1).mean()
    assert neighbours > 0.8 and abs(far) < 0.3


def test_shortened_detection_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from pycocotools.coco import COCO

    monkeypatch.setattr(demo_detection, "TRAIN_PAGES", 12)
    monkeypatch.setattr(demo_detection, "VALID_PAGES", 2)
    monkeypatch.setattr(demo_detection, "TEST_PAGES", 1)
    out = tmp_path / "od"
    summary = finetune.main(["--preset", "demo", "--task", "<OD>", "--output-dir", str(out), "--batch-size", "3",
                             "--epochs", "1", "--max-steps", "4", "--num-workers", "0", "--max-new-tokens", "8",
                             "--log-every", "1"])
    records = metrics(out)
    evals = [r for r in records if "eval_map50" in r]
    assert [r["step"] for r in evals] == [0, 4] and summary["steps"] == 4
    assert {"eval_map", "eval_map75"} <= set(evals[-1])
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert "validation mAP, step 0 -> step 4:" in capsys.readouterr().out

    # the export is Roboflow's COCO layout, which pycocotools reads as it is
    for split, pages in (("train", 12), ("valid", 2), ("test", 1)):
        coco = COCO(str(out / "demo-data" / split / "_annotations.coco.json"))
        assert len(coco.getImgIds()) == pages and [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(
            synthetic_detection.CATEGORIES)
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(out / "demo-data" / split / image["file_name"]) as page:  # written at half the drawing
                assert page.size == (image["width"], image["height"]) == (300, 400)
            for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
                x, y, w, h = annotation["bbox"]
                assert 0 <= x < x + w <= 300 and 0 <= y < y + h <= 400
            assert 2 <= len(coco.getAnnIds(imgIds=image["id"])) <= 5
    baseline = json.loads((out / "blind-baseline.json").read_text())
    assert set(baseline) >= {"eval_map", "eval_map50", "eval_map75"}
    model = Florence2.from_pretrained(out / "best")
    assert (model.config.vision, model.config.text) == (demo.demo_config().vision, demo.demo_config().text)
    assert Florence2Processor.from_pretrained(out / "best").image_size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)


def test_the_blind_baseline_is_each_categorys_mean_box_scored_by_pycocotools():
    from training.metrics import coco_eval

    def split(boxes):  # one image per box, 100x50 pixels, category 1
        return {"images": [{"id": i + 1, "width": 100, "height": 50, "file_name": f"{i}.png"}
                           for i in range(len(boxes))],
                "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "area": 1.0,
                                 "iscrowd": 0} for i, box in enumerate(boxes)],
                "categories": [{"id": 1, "name": "stamp"}]}

    train = split([[10, 10, 20, 10], [30, 10, 20, 10]])  # mean box [20, 10, 20, 10]
    (guess,) = synthetic_detection.blind_predictions(train, split([[0, 0, 1, 1]]))
    assert guess == {"image_id": 1, "category_id": 1, "score": 1.0, "bbox": pytest.approx([20, 10, 20, 10])}
    # pages whose stamp sits at the mean box: the guess finds it; pages where it sits elsewhere: it does not
    assert coco_eval(split([[20, 10, 20, 10]]), [guess], "bbox")["map50"] == pytest.approx(1.0)
    assert coco_eval(split([[60, 30, 20, 10]]), [guess], "bbox")["map50"] == 0.0


def test_written_pages_keep_the_drawn_boxes_at_half_scale(tmp_path):
    drawn, regions = synthetic_detection.make_page(0, "train", 7)
    name, size, written = synthetic_detection.draw_page_file(tmp_path, 0, "train", 7)
    assert size == (drawn.width // 2, drawn.height // 2) == Image.open(tmp_path / name).size
    assert written == [(category, tuple(v / 2 for v in box)) for category, box in regions]


def test_matmul_peak_is_two_n_cubed_flops_over_each_matmuls_time(monkeypatch):
    from florence2 import hardware

    ticks = iter(range(100))  # every clock reading one second after the last: each matmul takes a second
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: float(next(ticks)))
    found = hardware.matmul_peak("cpu", n=64, reps=3)
    assert found["n"] == 64 and found["gflops"] == [2 * 64**3 / 1e9] * 3 == [found["best"]] * 3
