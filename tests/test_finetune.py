"""python -m training.finetune and python -m training.evaluate end to end on a tiny model: every data format, the
evaluation's files and numbers, image sizes, and a user's mistakes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from florence2 import Florence2
from florence2.processor import Florence2Processor
from training import evaluate as evaluation
from training import setup
from training.data import TaskDataset
from training.finetune import main
from training.tasks import get_task

from .conftest import detection_args as run_args
from .conftest import last_checkpoint, metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model's ops are too small to share out
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exports(detection_exports):
    return detection_exports


@pytest.mark.parametrize("fmt", ["coco", "jsonl", "yolo", "hf"])
def test_finetune_then_evaluate_on_every_format(no_dropout_model_dir, exports, tmp_path, fmt):
    out = tmp_path / "run"
    summary = main(run_args(no_dropout_model_dir, exports[fmt], out, "--max-steps", "1"))
    (logged,) = [r for r in metrics(out) if "eval_map" in r]
    assert summary["steps"] == 1 and logged["eval_examples"] == 2
    checkpoint = last_checkpoint(out)
    evaluated = evaluation.main(["--model", str(checkpoint), "--task", "<OD>", "--dataset", str(exports[fmt]),
                                 "--output-dir", str(tmp_path / "eval"), "--batch-size", "2", "--num-beams", "1",
                                 "--max-new-tokens", "8", "--num-workers", "0"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == evaluated
    # the command evaluates as training does: the same loss, metrics and predictions
    assert evaluated["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert {k: v for k, v in evaluated.items() if k != "eval_loss"} == {
        k: v for k, v in logged.items() if k not in ("step", "epoch", "eval_loss")}
    assert (tmp_path / "eval" / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()


def test_every_format_gives_the_same_examples(exports):
    """The same images and boxes as COCO, JSONL, YOLO and HF: the same pixels, prompts and targets (the JSONL
    targets are the test's own quantization, the others the trainer's)."""
    processor = Florence2Processor(image_size=64)
    task = get_task("<OD>")
    built = {}
    for fmt, folder in exports.items():
        data, examples = setup.load_examples(task, str(folder), "train", training=True)
        dataset = TaskDataset(data, examples, processor)
        built[fmt] = [dataset[i] for i in range(len(dataset))]
    for fmt in ("jsonl", "yolo", "hf"):
        for a, b in zip(built["coco"], built[fmt]):
            assert (a["prompt_ids"], a["target_ids"]) == (b["prompt_ids"], b["target_ids"]), fmt
            assert torch.equal(a["pixel_values"], b["pixel_values"]), fmt


def perfect_generate(dataset_targets, processor, drop_last_box=False):
    """A generate that writes each example's target, in the order the evaluation asks (one process: in order),
    every token at log-prob -0.1."""
    queue = list(dataset_targets)

    def generate(input_ids, attention_mask, max_new_tokens, num_beams, return_scores=False, **inputs):
        rows = [[2, *processor.text_ids(queue.pop(0))] for _ in range(input_ids.shape[0])]
        if drop_last_box:
            rows = [row[:-6] + row[-1:] if len(row) > 8 else row for row in rows]
        width = max(len(r) for r in rows)
        sequences = torch.tensor([r + [1] * (width - len(r)) for r in rows])
        scores = torch.where(sequences[:, 1:] == 1, 0.0, -0.1)
        from florence2.generate import GenerateOutput

        return GenerateOutput(sequences, scores, scores.sum(1)) if return_scores else sequences

    return generate


@pytest.mark.parametrize("task", ["<OD>", "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
                                  "<REGION_TO_CATEGORY>"])
def test_a_model_that_writes_the_targets_scores_one(no_dropout_model_dir, exports, tmp_path, monkeypatch, task):
    args = evaluation.parse_args(["--model", str(no_dropout_model_dir), "--task", task, "--dataset",
                                  str(exports["coco"]), "--output-dir", str(tmp_path), "--num-workers", "0"])
    _, examples = setup.load_examples(get_task(task), args.dataset, args.split, training=False)
    processor = Florence2Processor.from_pretrained(no_dropout_model_dir)
    monkeypatch.setattr(Florence2, "generate", lambda self, **kw: perfect_generate(
        [e.target for e in examples], processor)(**kw))
    result = evaluation.run(args)
    primary = {"<REGION_TO_CATEGORY>": "eval_accuracy"}.get(task, "eval_map")
    assert result[primary] == pytest.approx(1.0)
    if primary == "eval_map":
        assert result["eval_map50"] == pytest.approx(1.0) and result["eval_unmatched_labels"] == 0


def test_logged_map_is_pycocotools_on_the_written_files(no_dropout_model_dir, exports, tmp_path, monkeypatch):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    args = evaluation.parse_args(["--model", str(no_dropout_model_dir), "--task", "<OD>", "--dataset",
                                  str(exports["coco"]), "--output-dir", str(tmp_path), "--num-workers", "0"])
    _, examples = setup.load_examples(get_task("<OD>"), args.dataset, "validation", training=False)
    processor = Florence2Processor.from_pretrained(no_dropout_model_dir)
    # the last box of every image is left out: an mAP between 0 and 1
    monkeypatch.setattr(Florence2, "generate", lambda self, **kw: perfect_generate(
        [e.target for e in examples], processor, drop_last_box=True)(**kw))
    result = evaluation.run(args)
    truth = COCO(str(tmp_path / "ground_truth.coco.json"))
    results = json.loads((tmp_path / "predictions.coco.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1}  # the export's own image and category ids
    assert {r["category_id"] for r in results} <= {1, 2} and all(r["score"] == pytest.approx(
        torch.tensor(-0.1).exp().item()) for r in results)  # exp of the mean log-prob of the box's locations
    check = COCOeval(truth, truth.loadRes(results), "bbox")
    check.evaluate()
    check.accumulate()
    check.summarize()
    assert 0 < result["eval_map"] < 1
    assert (result["eval_map"], result["eval_map50"], result["eval_map75"]) == tuple(check.stats[:3])


def test_image_size_hxw_grows_the_position_table_and_is_recorded(no_dropout_model_dir, exports, tmp_path):
    out = tmp_path / "run"
    # 512x544: (512/32)(544/32) + 1 = 273 image tokens, more than the tiny model's 256 positions: the table grows
    main(run_args(no_dropout_model_dir, exports["coco"], out, "--max-steps", "1", "--image-size", "512x544"))
    checkpoint = last_checkpoint(out)
    processor = Florence2Processor.from_pretrained(checkpoint)
    assert processor.image_size == (512, 544) and processor.image_seq_length == 273
    model = Florence2.from_pretrained(checkpoint)
    positions = model.config.text.max_position_embeddings
    assert positions == 273 + len(processor.prompt_ids("<OD>")) == processor.model_max_length
    before = Florence2.from_pretrained(no_dropout_model_dir).language_model.encoder.embed_positions.weight
    after = model.language_model.encoder.embed_positions.weight
    assert after.shape[0] == positions + 2
    # new position p starts as learned position p mod 256 (trained since, by one step: close, not equal)
    torch.testing.assert_close(after[2 + 256: 2 + positions], before[2: 2 + positions - 256], atol=2e-3, rtol=0)
    assert model.predict(Image.new("RGB", (90, 60)), "<OD>", max_new_tokens=4, num_beams=1)["<OD>"] is not None
    with pytest.raises(SystemExit, match=r"the height of 1664 px needs 52 position cells of 32 px, and DaViT's "
                                         r"2-D position table has 50 a side \(at most 1600 px\)"):
        main(run_args(no_dropout_model_dir, exports["coco"], tmp_path / "big", "--image-size", "1664x64"))


def test_a_users_mistakes_end_in_one_line(no_dropout_model_dir, exports, tmp_path, monkeypatch, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cases = [
        (["training.finetune", "--task", "<OD>", "--dataset", str(tmp_path / "nowhere"), "--output-dir",
          str(tmp_path / "a"), "--model", str(no_dropout_model_dir)], 1, "no such file or folder"),
        # the data is read before the model: its mistake is said before a model download is tried
        (["training.finetune", "--task", "<OD>", "--dataset", str(tmp_path / "nowhere"), "--output-dir",
          str(tmp_path / "a"), "--model", "someone/not-cached"], 1, "no such file or folder"),
        (["training.evaluate", "--model", "someone/not-cached", "--task", "<OD>", "--dataset",
          str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "b")], 1, "no such file or folder"),
        (["training.finetune", "--task", "<OD>", "--dataset", str(exports["coco"]), "--output-dir",
          str(tmp_path / "c"), "--model", str(no_dropout_model_dir), "--device", "tpu9"], 1,
         "--device 'tpu9': Invalid device string"),
        (["training.evaluate", "--model", str(no_dropout_model_dir), "--task", "<OD>", "--dataset",
          str(exports["coco"]), "--output-dir", str(tmp_path / "d"), "--device", "tpu9"], 1, "--device 'tpu9'"),
        (["training.evaluate", "--model", "someone/not-cached", "--task", "<OD>", "--dataset", str(exports["coco"]),
          "--output-dir", str(tmp_path / "b")], 1, "cannot download config.json of someone/not-cached"),
    ]
    for argv, status, message in cases:
        done = subprocess.run([sys.executable, "-m", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == status, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    with pytest.raises(SystemExit) as stopped:  # a bad flag: one line, exit status 2
        main(["--task", "<OD>", "--output-dir", "x", "--image-size", "100"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error == ("python -m training.finetune: error: argument --image-size: image "
                                                 "size '100': the height 100 is not a positive multiple of 32 (one "
                                                 "image token per 32x32 patch) (see --help)\n")
    # a missing extra is said before anything is loaded, with the install line
    real = setup.importlib.util.find_spec
    monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name: None if name in ("matplotlib", "peft")
                        else real(name))
    with pytest.raises(SystemExit) as stopped:
        main(run_args(tmp_path / "no-model", exports["coco"], tmp_path / "c", "--lora"))
    assert str(stopped.value) == ('python -m training.finetune: error: matplotlib, peft are not installed: '
                                  'pip install -e ".[lora]" and pip install -e ".[train]"')


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    """A COCO folder with one file per split: transcribed text lines (COCO-Text's utf8_string) and captions."""
    root = tmp_path_factory.mktemp("text")
    lines = {0: [("INVOICE 12", [4, 4, 40, 10]), ("Total: $5", [4, 30, 30, 8])], 1: [("PAID", [20, 20, 24, 12])]}
    captions = {0: "a white invoice page with two lines", 1: "a stamped page that says paid"}
    for split in ("train", "valid"):
        images, annotations = [], []
        for image_id in (0, 1):
            Image.new("RGB", (64, 64), "white").save(root / f"{split}{image_id}.png")
            images.append({"id": image_id, "file_name": f"{split}{image_id}.png", "width": 64, "height": 64})
            for text, box in lines[image_id]:
                annotations.append({"id": len(annotations), "image_id": image_id, "category_id": 1, "bbox": box,
                                    "utf8_string": text})
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": captions[image_id]})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                        "categories": [{"id": 1, "name": "text"}]}))
    return root


@pytest.mark.parametrize("task, expected", [
    ("<OCR_WITH_REGION>", {"eval_cer": 0.0, "eval_wer": 0.0, "eval_map": pytest.approx(1.0)}),
    ("<OCR>", {"eval_cer": 0.0, "eval_wer": 0.0}),
    ("<CAPTION>", {"eval_bleu4": pytest.approx(1.0, rel=1e-6)}),
])
def test_text_tasks_of_a_model_that_writes_the_targets(no_dropout_model_dir, text_export, tmp_path, monkeypatch,
                                                      task, expected):
    args = evaluation.parse_args(["--model", str(no_dropout_model_dir), "--task", task, "--dataset",
                                  str(text_export), "--output-dir", str(tmp_path), "--num-workers", "0"])
    _, examples = setup.load_examples(get_task(task), args.dataset, args.split, training=False)
    processor = Florence2Processor.from_pretrained(no_dropout_model_dir)
    monkeypatch.setattr(Florence2, "generate", lambda self, **kw: perfect_generate(
        [e.target for e in examples], processor)(**kw))
    result = evaluation.run(args)
    assert {k: result[k] for k in expected} == expected


def test_data_without_what_the_task_needs_is_refused(dataset_dir, exports, tmp_path):
    with pytest.raises(setup.DataError, match=r"no <OD> examples: the task needs annotated regions"):
        setup.load_examples(get_task("<OD>"), str(dataset_dir), "train", training=True)  # DocVQA questions
    with pytest.raises(setup.DataError, match=r"no <CAPTION> examples: the task needs captions, and none of the "
                                              r"split's 4 images has them"):
        setup.load_examples(get_task("<CAPTION>"), str(exports["coco"]), "train", training=True)
    # a JSONL may mix tasks: every line trains, the lines of the task are evaluated with its metric
    folder = tmp_path / "mixed" / "train"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "annotations.jsonl").write_text(
        json.dumps({"image": "a.png", "prefix": "<OD>", "suffix": "cat<loc_1><loc_2><loc_300><loc_400>"}) + "\n"
        + json.dumps({"image": "a.png", "prefix": "<CAPTION>", "suffix": "A black square."}) + "\n")
    od = get_task("<OD>")
    assert len(setup.load_examples(od, str(tmp_path / "mixed"), "train", training=True)[1]) == 2
    assert [e.prompt for e in setup.load_examples(od, str(tmp_path / "mixed"), "train", training=False)[1]] == \
        ["<OD>"]
