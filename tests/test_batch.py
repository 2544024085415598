"""python -m florence2 predict: batched answers equal Florence2.predict one image at a time; folders, manifests and
datasets give one line per input; a run killed with SIGKILL resumes with every input once; two ranks give what one
gives; --format coco loads in pycocotools."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from florence2 import Florence2
from florence2.__main__ import main
from florence2.batch import to_coco
from florence2.processor import Florence2Processor

from .conftest import ROOT
from .serving import answering_model, pictures, stopping_model

QUESTIONS = ["What is the total?", "Who signed the letter at the bottom of the second page, next to the stamp?",
             "Date?", "What is written in the top left corner of the invoice?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return stopping_model(tmp_path_factory.mktemp("batch") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return Florence2.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    pictures(folder, 8)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (folder / "notes.txt").write_text("not an image file: skipped in folders")
    return folder


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def alone(model, record: dict, **options) -> dict:
    """What Florence2.predict gives for the line's input on its own."""
    return json.loads(json.dumps(model.predict(Image.open(record["image"]), record["task"], text=record.get("text"),
                                               **options)))


def test_batched_prompts_of_different_lengths_give_what_each_gives_alone(model, model_dir, folder, tmp_path,
                                                                          one_thread):
    images = sorted(folder.glob("picture-*.png"))
    manifest = tmp_path / "questions.jsonl"
    rows = [{"image": f"{folder.name}/{p.name}", "text": QUESTIONS[i % len(QUESTIONS)]} for i, p in enumerate(images)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(folder, tmp_path / folder.name)
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(manifest), "--task", "<DocVQA>", "--output", str(out), "--model", str(model_dir),
                 "--batch-size", "4", "--num-workers", "1", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    found = lines(out)
    assert [r["image"] for r in found] == [str(tmp_path / r["image"]) for r in rows]
    for record in found:
        assert record["result"] == alone(model, record, max_new_tokens=12)
    # the batches had answers of different lengths, so rows were padded after their end (and prompts before)
    processor = Florence2Processor.from_pretrained(model_dir)
    for start in (0, 4):
        inputs = processor(text=[f"<DocVQA>{r['text']}" for r in rows[start:start + 4]],
                           images=[Image.open(p) for p in images[start:start + 4]])
        ends = {int((row[1:] == 2).nonzero()[0]) for row in model.generate(**inputs, max_new_tokens=12)}
        assert len(ends) > 1 and not inputs["attention_mask"].all(), ends
    # Florence2.predict on a list is the same batch
    together = model.predict([Image.open(p) for p in images[:4]], "<DocVQA>", text=[r["text"] for r in rows[:4]],
                             max_new_tokens=12)
    assert json.loads(json.dumps(together)) == [r["result"] for r in found[:4]]


def test_a_folder_and_a_csv_manifest_give_one_line_per_input(model, model_dir, folder, tmp_path, one_thread):
    manifest = tmp_path / "more.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerow([str(folder / "picture-00.png"), "a square"])
        writer.writerow([str(folder / "picture-01.png"), ""])  # no text of its own: --text
        writer.writerow([str(folder / "picture-00.png"), "a square"])  # listed twice: predicted twice
        writer.writerow(["missing.png", "a square"])
    out = tmp_path / "out" / "grounding.jsonl"
    assert main(["predict", str(folder), str(manifest), "--task", "<CAPTION_TO_PHRASE_GROUNDING>", "--text",
                 "a circle", "--image-column", "file_name", "--output", str(out), "--model", str(model_dir),
                 "--batch-size", "3", "--num-workers", "0", "--max-new-tokens", "8", "--min-new-tokens", "3",
                 "--device", "cpu"]) == 0
    found = lines(out)
    inputs = [str(p) for p in sorted(folder.iterdir()) if p.suffix == ".png"]
    assert [r["image"] for r in found] == inputs + [str(folder / "picture-00.png"), str(folder / "picture-01.png"),
                                                    str(folder / "picture-00.png"), str(tmp_path / "missing.png")]
    assert [r.get("text") for r in found[-4:]] == ["a square", "a circle", "a square", "a square"]
    errors = {r["image"]: r["error"] for r in found if "error" in r}
    assert set(errors) == {str(folder / "broken.png"), str(tmp_path / "missing.png")}
    assert "cannot read" in errors[str(folder / "broken.png")]
    assert "No such file" in errors[str(tmp_path / "missing.png")]
    for record in found:
        if "result" in record:
            image = Image.open(record["image"])
            assert (record["width"], record["height"]) == image.size
            assert record["result"] == alone(model, record, max_new_tokens=8, min_new_tokens=3)


def test_manifests_from_spreadsheets_and_what_needs_text(model, model_dir, tmp_path, one_thread):
    """A CSV as Excel saves it (UTF-8 with a byte order mark, a quoted comma) and a JSONL with a BOM, paths relative
    to the manifest or under ~; a row without the text its task needs gets an error line, not an empty prompt."""
    pictures(tmp_path / "pics", 2)
    (tmp_path / "lists").mkdir()
    csv_manifest, jsonl_manifest = tmp_path / "lists" / "questions.csv", tmp_path / "lists" / "more.jsonl"
    with open(csv_manifest, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([["image", "text"], ["../pics/picture-00.png", "Total, with tax?"],
                                 ["../pics/picture-01.png", ""]])
    jsonl_manifest.write_text('{"image": "../pics/picture-01.png", "text": "Date?"}\n'
                              '{"image": "~/florence2-no-such-picture.png", "text": "Date?"}\n', encoding="utf-8-sig")
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(csv_manifest), str(jsonl_manifest), "--task", "<DocVQA>", "--output", str(out),
                 "--model", str(model_dir), "--num-workers", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    found = lines(out)
    lists = tmp_path / "lists"
    home = str(Path("~/florence2-no-such-picture.png").expanduser())
    assert [(r["image"], r.get("text")) for r in found] == [
        (str(lists / "../pics/picture-00.png"), "Total, with tax?"), (str(lists / "../pics/picture-01.png"), None),
        (str(lists / "../pics/picture-01.png"), "Date?"), (home, "Date?")]
    assert "no text: task <DocVQA> needs a question" in found[1]["error"]
    assert "No such file" in found[3]["error"]
    for record in (found[0], found[2]):
        assert record["result"] == alone(model, record, max_new_tokens=8)


def test_folders_skip_hidden_ones_and_broken_dataset_cells_are_named(model, model_dir, tmp_path, one_thread):
    datasets = pytest.importorskip("datasets")
    pics = tmp_path / "pics"
    pictures(pics, 2)
    pictures(pics / ".thumbnails", 1)  # as image viewers and notebooks leave them: not inputs, as a glob's * says
    (pics / "sub").mkdir()
    shutil.copy(pics / "picture-00.png", pics / "sub" / "UPPER.PNG")  # below the folder, its suffix in capitals
    good = Image.open(pics / "picture-01.png")
    datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}, good]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "cells"))
    out = tmp_path / "captions.jsonl"
    assert main(["predict", str(pics), str(tmp_path / "cells"), "--task", "<CAPTION>", "--output", str(out),
                 "--model", str(model_dir), "--num-workers", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    found = lines(out)
    cells = tmp_path / "cells"
    assert [r["image"] for r in found] == [str(pics / "picture-00.png"), str(pics / "picture-01.png"),
                                           str(pics / "sub" / "UPPER.PNG"), f"{cells}[0]", f"{cells}[1]"]
    assert found[3]["error"] == f"cannot read {cells}[0] as an image: cannot identify image file"
    assert found[4]["result"] == json.loads(json.dumps(model.predict(good, "<CAPTION>", max_new_tokens=8)))
    assert found[2]["result"] == alone(model, found[2], max_new_tokens=8)


def _arguments(model_dir, out, *inputs):
    return ["predict", *map(str, inputs), "--task", "<OD>", "--output", str(out), "--model", str(model_dir),
            "--batch-size", "2", "--num-workers", "1", "--max-new-tokens", "12", "--device", "cpu"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_a_run_killed_halfway_resumes_with_every_input_once(model_dir, tmp_path, capsys, one_thread):
    images = pictures(tmp_path / "many", 48)
    out = tmp_path / "od.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "florence2", *_arguments(model_dir, out, tmp_path / "many")],
                           env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the command and its DataLoader worker, mid-run
    run.wait()
    written = out.read_text().count("\n")
    assert 6 <= written < len(images), f"killed after {written} of {len(images)} lines"
    with open(out, "a") as f:  # as if the kill had cut a line short
        f.write('{"image": "' + str(images[-1]) + '", "task": "<O')
    assert main(_arguments(model_dir, out, tmp_path / "many")) == 0  # the same command again
    assert f"{written} already done" in capsys.readouterr().err
    found = lines(out)
    assert sorted(r["image"] for r in found) == sorted(map(str, images))  # each exactly once
    straight = tmp_path / "straight.jsonl"
    assert main(_arguments(model_dir, straight, tmp_path / "many")) == 0
    assert found == lines(straight)  # nothing lost, nothing changed


HOLD_THE_OUTPUT = """
import os, sys, time
from pathlib import Path
from florence2.batch import exclusive
with exclusive(Path(sys.argv[1])):
    if os.fork() == 0:  # as a DataLoader worker does; it outlives its parent killed with SIGKILL for a while
        time.sleep(60)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
"""


def test_an_output_being_written_is_refused_until_its_run_dies(model_dir, folder, tmp_path, capsys):
    out = tmp_path / "od.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_OUTPUT, str(out)], env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as refused:
            main(_arguments(model_dir, out, folder))
        assert refused.value.code == 2
        assert "is being written by another run" in capsys.readouterr().err
        os.kill(holder.pid, signal.SIGKILL)  # the run, not its forked child
        holder.wait()
        assert main(_arguments(model_dir, out, folder)) == 0
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_two_ranks_give_what_one_gives(model_dir, folder, tmp_path):
    single = tmp_path / "single.jsonl"
    assert main(["predict", str(folder), "--task", "<OD>", "--output", str(single), "--model", str(model_dir),
                 "--batch-size", "3", "--num-workers", "0", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    out = tmp_path / "ranks.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "florence2", *_arguments(model_dir, out, folder)]
    done = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text() == single.read_text()  # merged in the order of the inputs
    assert not list(tmp_path.glob("ranks.jsonl.*"))  # the parts are gone


def test_coco_output_loads_in_pycocotools(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    model_dir = answering_model(tmp_path / "model", "car<loc_100><loc_200><loc_500><loc_700>")
    folder = tmp_path / "images"
    pictures(folder, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "labels.json"
    assert main(["predict", str(folder), "--task", "<OD>", "--output", str(out), "--format", "coco",
                 "--model", str(model_dir), "--num-workers", "0", "--device", "cpu"]) == 0
    records = lines(tmp_path / "labels.jsonl")  # the resumable log beside it
    coco = coco_api.COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["car"]
    good = [r for r in records if "result" in r]
    assert len(coco.getImgIds()) == len(good) == 3
    for image_id, record in zip(sorted(coco.getImgIds()), good):
        image = coco.loadImgs(image_id)[0]
        assert (image["file_name"], image["width"], image["height"]) == (record["image"], record["width"],
                                                                          record["height"])
        (annotation,) = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        x1, y1, x2, y2 = record["result"]["<OD>"]["bboxes"][0]
        assert annotation["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert annotation["score"] == record["result"]["<OD>"]["scores"][0]
    # the file is also a results file: evaluated against itself, every detection matches
    results = coco.loadRes(coco.dataset["annotations"])
    evaluation = cocoeval.COCOeval(coco, results, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_polygons_and_ocr_regions():
    mask = pytest.importorskip("pycocotools.mask")
    square = [10.0, 10.0, 50.0, 10.0, 50.0, 30.0, 10.0, 30.0]  # 40 x 20
    records = [
        {"image": "a.png", "task": "<REFERRING_EXPRESSION_SEGMENTATION>", "width": 100, "height": 80,
         "result": {"<REFERRING_EXPRESSION_SEGMENTATION>": {"polygons": [[square, [1.0, 2.0, 3.0, 4.0]]],
                                                            "labels": [""]}}},
        {"image": "b.png", "task": "<REFERRING_EXPRESSION_SEGMENTATION>", "error": "cannot read b.png"},
    ]
    coco = to_coco(records, "<REFERRING_EXPRESSION_SEGMENTATION>")
    (annotation,) = coco["annotations"]
    assert coco["categories"] == [{"id": 1, "name": "region", "supercategory": ""}]
    assert annotation["segmentation"] == [square] and annotation["bbox"] == [10.0, 10.0, 40.0, 20.0]
    assert annotation["area"] == 800.0
    rle = mask.merge(mask.frPyObjects(annotation["segmentation"], 80, 100))
    assert abs(float(mask.area(rle)) - annotation["area"]) < 0.1 * annotation["area"]
    ocr = to_coco([{"image": "c.png", "task": "<OCR_WITH_REGION>", "width": 100, "height": 80,
                    "result": {"<OCR_WITH_REGION>": {"quad_boxes": [square], "labels": ["TOTAL"]}}}],
                  "<OCR_WITH_REGION>")
    assert ocr["categories"][0]["name"] == "text" and ocr["annotations"][0]["attributes"] == {"text": "TOTAL"}


def test_image_size_reads_every_image_at_that_size(model, model_dir, folder, tmp_path, one_thread):
    out = tmp_path / "captions.jsonl"
    assert main(["predict", str(folder / "picture-0*.png"), "--task", "<CAPTION>", "--output", str(out), "--model",
                 str(model_dir), "--image-size", "64x96", "--batch-size", "3", "--num-workers", "0",
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    at_size = Florence2Processor(image_size=(64, 96))
    found = lines(out)
    assert len(found) == 8
    for record in found:
        assert record["result"] == alone(model, record, processor=at_size, max_new_tokens=12)
    assert any(record["result"] != alone(model, record, max_new_tokens=12) for record in found)


def test_a_saved_dataset_with_a_question_column(model, model_dir, tmp_path, capsys, one_thread):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(p) for p in pictures(tmp_path / "pictures", 3)]
    data = datasets.DatasetDict(
        validation=datasets.Dataset.from_dict({"image": images, "question": QUESTIONS[:3]}),
        test=datasets.Dataset.from_dict({"image": images[:1], "question": QUESTIONS[:1]}))
    data.save_to_disk(str(tmp_path / "docs"))
    out = tmp_path / "docs.jsonl"
    argv = ["predict", str(tmp_path / "docs"), "--task", "<DocVQA>", "--text-column", "question", "--output",
            str(out), "--model", str(model_dir), "--num-workers", "1", "--max-new-tokens", "8", "--device", "cpu"]
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    without = [a for a in argv if a not in ("--text-column", "question")] + ["--split", "validation"]
    with pytest.raises(SystemExit) as error:  # the questions left out: refused, not answers to empty prompts
        main(without)
    assert error.value.code == 2 and "has no column 'text' (columns: image, question)" in capsys.readouterr().err
    assert main(argv + ["--split", "validation"]) == 0
    found = lines(out)
    assert [(r["image"], r["index"], r["text"]) for r in found] == [
        (f"{tmp_path / 'docs'}[validation][{i}]", i, QUESTIONS[i]) for i in range(3)]
    for record, image in zip(found, images):
        assert record["result"] == json.loads(json.dumps(model.predict(image, "<DocVQA>", text=record["text"],
                                                                       max_new_tokens=8)))


@pytest.mark.parametrize("argv, message", [
    (["nowhere/*.png", "--task", "<OD>"], "no file matches nowhere/*.png"),
    (["./missing-folder", "--task", "<OD>"], "no such file or folder"),
    (["{folder}", "--task", "<OD>", "--text", "cars"], "takes no input"),
    (["{folder}", "--task", "<CAPTION>", "--format", "coco"], "answers with text"),
    (["{folder}", "--task", "<OD>", "--batch-size", "0"], "--batch-size"),
    (["{folder}", "--task", "<OD>", "--image-size", "64x90"], "the width 90 is not a positive multiple of 32"),
    (["{manifest}", "--task", "<OD>"], "line 2: not JSON"),
    (["{folder}", "--task", "<CAPTION>", "--output", "{taken}"], "holds results of task <OD>"),
    (["{folder}", "--task", "<od>"], "unknown task <od>: did you mean <OD>?"),
    (["{folder}", "--task", "OD"], "unknown task OD: did you mean <OD>?"),
    (["{folder}", "--task", ""], "--task is empty"),
    (["{folder}", "--task", "<OD>", "--output", "{folder}"], "is a folder"),
    (["{folder}", "--task", "<OD>", "--num-beams", "0"], "--num-beams must be at least 1"),
    (["{utf16}", "--task", "<OD>"], "utf16.csv is not UTF-8 text"),
    (["{folder}", "--task", "<DocVQA>"], "task <DocVQA> needs text (a question) and"),
    (["{prompts}", "--task", "<DocVQA>", "--image-column", "image_path"], "has no column 'text' (columns: image_path,"
                                                                          " prompt)"),
])
def test_command_line_mistakes_are_one_line(argv, message, folder, tmp_path, capsys):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"image": "a.png"}\n{oops\n')
    taken = tmp_path / "taken.jsonl"
    taken.write_text('{"image": "a.png", "task": "<OD>", "error": "x"}\n')
    utf16, prompts = tmp_path / "utf16.csv", tmp_path / "prompts.csv"
    utf16.write_text("image\npicture-00.png\n", encoding="utf-16")  # Excel's "Unicode text"
    prompts.write_text("image_path,prompt\npicture-00.png,Date?\n")
    values = {"folder": folder, "manifest": manifest, "taken": taken, "utf16": utf16, "prompts": prompts}
    argv = [a.format(**values) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as error:
        main(["predict", *argv])
    err = capsys.readouterr().err
    assert error.value.code == 2 and message in err and err.count("\n") == 1, err
    assert taken.read_text() == '{"image": "a.png", "task": "<OD>", "error": "x"}\n'  # never overwritten


def test_an_unreachable_hub_is_one_line(folder, tmp_path, monkeypatch, capfd):
    """An input that is no file is tried as a hub dataset id; offline, huggingface_hub logs each retry on stderr
    (its own handler, on the process' stderr) before the error: the command says it once."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub.utils import logging as hub_logging

    def unreachable(source, split=None):
        hub_logging.get_logger("huggingface_hub.utils._http").warning(
            f"'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/{source}")
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(SystemExit) as error:
        main(["predict", "someone/pictures", "--task", "<OD>", "--output", str(tmp_path / "out.jsonl")])
    err = capfd.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1, err
    assert "someone/pictures is not a file, a folder or a Hugging Face dataset: Couldn't reach" in err


def test_the_single_image_form_still_works(model_dir, folder, capsys):
    assert main([str(folder / "picture-00.png"), "--task", "<CAPTION>", "--model", str(model_dir), "--json",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "<CAPTION>" in json.loads(capsys.readouterr().out)

