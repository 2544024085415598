"""The one-call API (Florence2.predict) and the command line, on the small reference model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from florence2 import Florence2
from florence2.__main__ import main
from florence2.postprocess import PARSE_TYPES, TASKS_WITH_INPUT
from florence2.processor import Florence2Processor

from .conftest import ROOT, TINY

IMAGE = TINY / "images" / "rgb_640x480.png"
TASK_INPUTS = {"<CAPTION_TO_PHRASE_GROUNDING>": "a green car", "<REFERRING_EXPRESSION_SEGMENTATION>": "a car",
               "<OPEN_VOCABULARY_DETECTION>": "car", "<REGION_TO_SEGMENTATION>": "<loc_1><loc_2><loc_500><loc_600>",
               "<REGION_TO_CATEGORY>": "<loc_1><loc_2><loc_500><loc_600>",
               "<REGION_TO_DESCRIPTION>": "<loc_1><loc_2><loc_500><loc_600>",
               "<REGION_TO_OCR>": "<loc_1><loc_2><loc_500><loc_600>"}
SHAPES = {"pure_text": str, "ocr": {"quad_boxes", "labels"}, "description_with_bboxes": {"bboxes", "labels"},
          "bboxes": {"bboxes", "labels"}, "phrase_grounding": {"bboxes", "labels"}, "polygons": {"polygons", "labels"},
          "description_with_bboxes_or_polygons": {"bboxes", "bboxes_labels", "polygons", "polygons_labels"}}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    """The reference model with its processor at the 128 px it was made for."""
    folder = tmp_path_factory.mktemp("tiny_with_processor")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    Florence2Processor(image_size=128).save_pretrained(folder)
    return folder


def test_every_task_assignment_is_covered():
    assert set(TASKS_WITH_INPUT) == set(TASK_INPUTS)


@pytest.mark.parametrize("task", list(PARSE_TYPES))
def test_cli_runs_every_task(model_dir, task, capsys):
    argv = [str(IMAGE), "--task", task, "--model", str(model_dir), "--json", "--max-new-tokens", "8",
            "--device", "cpu"]
    if task in TASK_INPUTS:
        argv += ["--text", TASK_INPUTS[task]]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    answer = result[task]
    expected = SHAPES[PARSE_TYPES[task]]
    assert isinstance(answer, str) if expected is str else expected <= set(answer)


def test_predict_one_image_and_a_batch(model_dir):
    model = Florence2.from_pretrained(model_dir, attn_implementation="eager")
    image = Image.open(IMAGE)
    one = model.predict(image, "<CAPTION>", max_new_tokens=6)
    several = model.predict([image, image.convert("L")], "<DocVQA>", text=["What?", "Who?"], max_new_tokens=6)
    assert isinstance(one["<CAPTION>"], str) and len(several) == 2
    # the caption is exactly what generate + decode give for the same inputs
    processor = Florence2Processor.from_pretrained(model_dir)
    inputs = processor(text="<CAPTION>", images=image)
    ids = model.generate(**inputs, max_new_tokens=6)
    text = processor.decode(ids[0], skip_special_tokens=False)
    assert one == processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)


def test_predict_errors(model_dir):
    model = Florence2.from_pretrained(model_dir)
    image = Image.open(IMAGE)
    with pytest.raises(ValueError, match="no images given"):
        model.predict([], "<OD>")
    with pytest.raises(ValueError, match="2 texts for 1 images"):
        model.predict([image], "<DocVQA>", text=["a", "b"])
    with pytest.raises(ValueError, match="task token <OD> takes no input"):
        model.predict(image, "<OD>", text="extra")
    with pytest.raises(TypeError, match="image 0: expected a PIL image"):
        model.predict(42, "<OD>")


def _answer_as_generated(processor, answer: str) -> torch.Tensor:
    ids = processor.tokenizer.encode(answer, add_special_tokens=False).ids
    return torch.tensor([[2, 0, *ids, 2]])


def test_draw_puts_the_boxes_where_the_parsed_coordinates_say(model_dir, tmp_path, monkeypatch, capsys):
    processor = Florence2Processor.from_pretrained(model_dir)
    answer = "car<loc_100><loc_200><loc_500><loc_700>"

    def generate(self, *args, return_scores=False, **kwargs):  # the model "answers" this detection
        from florence2.generate import GenerateOutput

        ids = _answer_as_generated(processor, answer)
        return GenerateOutput(ids, torch.full((1, ids.shape[1] - 1), -0.1), torch.zeros(1)) if return_scores else ids

    monkeypatch.setattr(Florence2, "generate", generate)
    white = tmp_path / "white.png"
    Image.new("RGB", (640, 480), "white").save(white)
    out = tmp_path / "drawn.png"
    assert main([str(white), "--task", "<OD>", "--model", str(model_dir), "--json", "--draw", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)["<OD>"]
    x1, y1, x2, y2 = result["bboxes"][0]
    assert result["labels"] == ["car"] and result["scores"][0] == pytest.approx(0.9048, abs=1e-4)
    assert (x1, y1) == pytest.approx((64.32, 96.24), abs=1e-3)  # (100 + 0.5) * 640 / 1000, (200 + 0.5) * 480 / 1000
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (640, 480)
    white_pixel = (255, 255, 255)
    mid_y, mid_x = int((y1 + y2) / 2), int((x1 + x2) / 2)
    for x, y in ((int(x1), mid_y), (int(x2), mid_y), (mid_x, int(y2))):  # on the box outline
        assert drawn.getpixel((x, y)) != white_pixel, (x, y)
    for x, y in ((int(x1) - 15, mid_y + 20), (int(x2) + 15, mid_y), (mid_x, int(y2) + 15)):  # just outside
        assert drawn.getpixel((x, y)) == white_pixel, (x, y)


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    return status, capsys.readouterr().err


def test_image_size_reads_the_image_at_that_size(model_dir, capsys):
    argv = [str(IMAGE), "--task", "<CAPTION>", "--model", str(model_dir), "--json", "--max-new-tokens", "12",
            "--device", "cpu"]
    assert main([*argv, "--image-size", "96x160"]) == 0
    at_size = json.loads(capsys.readouterr().out)
    model = Florence2.from_pretrained(model_dir)
    expected = model.predict(Image.open(IMAGE), "<CAPTION>", processor=Florence2Processor(image_size=(96, 160)),
                             max_new_tokens=12)
    assert at_size == json.loads(json.dumps(expected))
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) != at_size  # the checkpoint's 128x128 is another picture


def test_mistakes_end_in_one_line(model_dir, tmp_path, capsys):
    page = tmp_path / "page.png"
    Image.new("RGB", (40, 30), "white").save(page)
    (tmp_path / "notes.txt").write_text("not an image")
    model = ["--model", str(model_dir)]
    cases = [
        ([str(tmp_path / "missing.png"), "--task", "<OD>", *model], 1, "no image file at"),
        ([str(tmp_path / "notes.txt"), "--task", "<OD>", *model], 1, "as an image"),
        ([str(page), "--task", "<OD>", *model, "--dtype", "float13"], 1, "unknown dtype 'float13'"),
        ([str(page), "--task", "<OD>", *model, "--device", "tpu9"], 1, "unknown device 'tpu9'"),
        ([str(page), "--task", "<OD>", *model, "--text", "extra"], 1, "task token <OD> takes no input"),
        ([str(page), "--task", "<OD>", *model, "--num-beams", "0"], 1, "num_beams must be a positive integer"),
        ([str(page), "--task", "<OD>", "--model", str(tmp_path / "no" / "such")], 1,
         "neither a local folder nor a hub repo id"),
        ([str(page), "--task", "<OD>", *model, "--image-size", "1632"], 1,
         "the height of 1632 px needs 51 position cells of 32 px, and DaViT's 2-D position table has 50 a side"),
        ([str(page), "--task", "<OD>", *model, "--image-size", "512"], 1,
         "its 257 image tokens ((512/32)(512/32) + 1) and a prompt of at least <s></s> need more than the text "
         "encoder's 256 positions"),
        ([str(page), "--task", "<OD>", *model, "--image-size", "100"], 2, "the height 100 is not a positive multiple"),
        ([str(page), "--task", "<OD>", *model, "--num-beams", "three"], 2, "invalid int value: 'three'"),
        ([str(page)], 2, "the following arguments are required: --task"),
    ]
    for argv, expected_status, message in cases:
        status, err = run_main(argv, capsys)
        assert status == expected_status, (argv, err)
        assert err.startswith("python -m florence2: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_offline_without_the_checkpoint(tmp_path):
    # as a new user would meet it: no network, an empty Hugging Face cache, the default model
    page = tmp_path / "page.png"
    Image.new("RGB", (40, 30), "white").save(page)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "florence2", str(page), "--task", "<OD>"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == ("python -m florence2: error: cannot download config.json of microsoft/Florence-2-base-ft "
                           "(revision main) and it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)\n")
    assert proc.stdout == ""
