"""Florence-2 in SAHI: get_sliced_prediction's slices are what Florence2.predict gives on each slice, shifted by its
offset, with real scores and in one generate call; get_prediction is predict; categories stay put; OCR lines read in
overlapping slices are merged once each; the --slice flags of both command lines."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from florence2 import Florence2
from florence2.__main__ import main
from florence2.slicing import Line, merge_lines, reading_order

from .serving import answering_model, stopping_model

sahi_predict = pytest.importorskip("sahi.predict")
sahi_slicing = pytest.importorskip("sahi.slicing")
from florence2.sahi import Florence2DetectionModel, answer_of, regions  # noqa: E402  (needs sahi)

PAGE = (600, 800)  # (width, height) of a detection demo page
LOC_BIAS = 3.0  # added to the loc tokens' logit bias: the random tiny model then writes boxes that follow the image
NO_MERGE = {"perform_standard_pred": False, "postprocess_type": "NMS", "postprocess_match_metric": "IOU",
            "postprocess_match_threshold": 1.01, "force_postprocess_type": True}  # no IoU exceeds 1: nothing merged
CAR = "car<loc_100><loc_200><loc_500><loc_700>"
TWO = CAR + "person<loc_600><loc_110><loc_900><loc_300>"  # loc tokens all different (one embedding row each)


@pytest.fixture(scope="module")
def boxes_model(tmp_path_factory):
    """The tiny model that writes boxes (unlabelled, low scores) wherever the image leads it."""
    folder = stopping_model(tmp_path_factory.mktemp("sahi") / "boxes")
    state = load_file(folder / "model.safetensors")
    first = 50269  # <loc_0>
    state["language_model.final_logits_bias"][..., first:first + 1000] += LOC_BIAS
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return Florence2.from_pretrained(folder)


@pytest.fixture(scope="module")
def four_pages():
    """A page made of four detection demo pages (2 x 2), and the regions drawn on it, in page pixels."""
    from training.synthetic_detection import make_page

    page = Image.new("RGB", (2 * PAGE[0], 2 * PAGE[1]), "white")
    regions_drawn = []
    for i in range(4):
        image, found = make_page(0, "test", i)
        dx, dy = (i % 2) * PAGE[0], (i // 2) * PAGE[1]
        page.paste(image, (dx, dy))
        regions_drawn += [(name, (x1 + dx, y1 + dy, x2 + dx, y2 + dy)) for name, (x1, y1, x2, y2) in found]
    return page, regions_drawn


def as_tuples(predictions) -> list[tuple]:
    return sorted((p.category.name, tuple(p.bbox.to_xyxy()), p.score.value) for p in predictions)


def expected_regions(answer: dict, shift=(0, 0)) -> list[tuple]:
    """A Florence2.predict answer of <OD> as (category, box, score), moved by `shift`."""
    assert all(0 < s < 1 for s in answer["scores"])  # real scores, not placeholders
    return [(label or "region", (b[0] + shift[0], b[1] + shift[1], b[2] + shift[0], b[3] + shift[1]), score)
            for label, b, _, score in regions(answer, "description_with_bboxes")]


def test_each_slice_is_predict_on_that_slice_shifted_in_one_generate_call(boxes_model, four_pages, monkeypatch,
                                                                          one_thread):
    page, drawn = four_pages
    assert len(drawn) >= 8  # the four pages' known regions, 2-5 each
    detector = Florence2DetectionModel(model=boxes_model, task="<OD>", device="cpu", confidence_threshold=0.0,
                                       max_new_tokens=20)
    slices = sahi_slicing.get_slice_bboxes(page.height, page.width, PAGE[1], PAGE[0], False, 0.2, 0.2)
    assert len(slices) == 9  # 3 x 3: the demo pages' size with SAHI's overlap
    calls = []
    generate = boxes_model.generate
    monkeypatch.setattr(boxes_model, "generate", lambda **kw: calls.append(len(kw["pixel_values"])) or generate(**kw))
    result = sahi_predict.get_sliced_prediction(page, detector, slice_height=PAGE[1], slice_width=PAGE[0],
                                                batch_size=len(slices), verbose=0, **NO_MERGE)
    assert calls == [9]  # all slices in one batch
    monkeypatch.undo()
    # predict on the same slices, as one batch too: a batch's float sums differ from one image's in the last bits,
    # which flips this random model's near-tied choices between 1000 loc tokens now and then
    answers = boxes_model.predict([page.crop(tuple(s)) for s in slices], "<OD>", max_new_tokens=20)
    expected = sorted(r for s, answer in zip(slices, answers) for r in expected_regions(answer["<OD>"], s[:2]))
    got = as_tuples(result.object_prediction_list)
    assert len(got) > 9 and got == expected
    on_the_page = [box for _, box, _ in got if box[2] - box[0] > 20 and box[3] - box[1] > 20]
    assert {slice_index(box, slices) for box in on_the_page} != {0}  # not all from one slice: shifted


def slice_index(box, slices) -> int:
    """The first slice that holds `box`."""
    return next(k for k, (x1, y1, x2, y2) in enumerate(slices)
                if x1 <= box[0] and box[2] <= x2 and y1 <= box[1] and box[3] <= y2)


def test_get_prediction_on_a_whole_image_is_predict(boxes_model, four_pages, one_thread):
    page, _ = four_pages
    detector = Florence2DetectionModel(model=boxes_model, task="<OD>", device="cpu", confidence_threshold=0.0,
                                       max_new_tokens=20)
    got = as_tuples(sahi_predict.get_prediction(page, detector).object_prediction_list)
    answer = boxes_model.predict(page, "<OD>", max_new_tokens=20)["<OD>"]
    assert len(got) > 1 and got == sorted(expected_regions(answer))
    # the threshold leaves out what scores below it
    cut = sorted(score for *_, score in got)[len(got) // 2]
    detector.confidence_threshold = cut
    kept = as_tuples(sahi_predict.get_prediction(page, detector).object_prediction_list)
    assert kept == [g for g in got if g[2] >= cut] and 0 < len(kept) < len(got)


def test_a_checkpoint_folder_and_an_image_size(boxes_model, four_pages, tmp_path, one_thread):
    from florence2.image_size import processor_at
    from florence2.predict import default_processor

    page, _ = four_pages
    folder = tmp_path / "saved"
    boxes_model.save_pretrained(folder)
    default_processor(boxes_model).save_pretrained(folder)
    detector = Florence2DetectionModel(model_path=str(folder), device="cpu", dtype="float32",
                                       confidence_threshold=0.0, image_size=64, max_new_tokens=20)
    got = as_tuples(sahi_predict.get_prediction(page, detector).object_prediction_list)
    at_64 = processor_at(boxes_model, default_processor(boxes_model), (64, 64))
    answer = boxes_model.predict(page, "<OD>", processor=at_64, max_new_tokens=20)["<OD>"]
    assert len(got) > 1 and got == sorted(expected_regions(answer))
    assert got != as_tuples(sahi_predict.get_prediction(  # the checkpoint's own 128 px reads otherwise
        page, Florence2DetectionModel(model=boxes_model, device="cpu", confidence_threshold=0.0,
                                      max_new_tokens=20)).object_prediction_list)


def test_categories_are_stable_or_the_users(tmp_path, one_thread):
    model = Florence2.from_pretrained(answering_model(tmp_path / "two", TWO))
    image = Image.new("RGB", (400, 300), "white")
    assert model.predict(image, "<OD>")["<OD>"]["labels"] == ["car", "person"]
    detector = Florence2DetectionModel(model=model, task="<OD>", device="cpu")
    first = sahi_predict.get_prediction(image, detector).object_prediction_list
    assert {p.category.name: p.category.id for p in first} == {"car": 0, "person": 1}
    assert detector.category_mapping == {"0": "car", "1": "person"} and detector.num_categories == 2
    again = sahi_predict.get_sliced_prediction(image, detector, 200, 200, verbose=0, batch_size=4)
    assert {(p.category.name, p.category.id) for p in again.object_prediction_list} <= {("car", 0), ("person", 1)}
    # a user's mapping gives the ids; a label outside it takes the next free id
    mapped = Florence2DetectionModel(model=model, task="<OD>", device="cpu", category_mapping={"3": "person"})
    found = sahi_predict.get_prediction(image, mapped).object_prediction_list
    assert {p.category.name: p.category.id for p in found} == {"car": 4, "person": 3}
    assert mapped.category_mapping == {"3": "person", "4": "car"}
    # SAHI's remapping of ids after inference
    remapped = Florence2DetectionModel(model=model, task="<OD>", device="cpu",
                                       category_mapping={"0": "car", "1": "person"},
                                       category_remapping={"0": 7, "1": 8})
    found = sahi_predict.get_prediction(image, remapped).object_prediction_list
    assert {p.category.name: p.category.id for p in found} == {"car": 7, "person": 8}


def test_car_boxes_and_scores_are_predicts(tmp_path, one_thread):
    model = Florence2.from_pretrained(answering_model(tmp_path / "car", CAR))
    image = Image.new("RGB", (640, 480), "white")
    (p,) = sahi_predict.get_prediction(image, Florence2DetectionModel(model=model, device="cpu")).object_prediction_list
    answer = model.predict(image, "<OD>")["<OD>"]
    assert p.bbox.to_xyxy() == answer["bboxes"][0] and p.score.value == answer["scores"][0] > 0.99
    assert p.category.name == "car"


@pytest.mark.parametrize("task, text", [("<OPEN_VOCABULARY_DETECTION>", "car"),
                                        ("<CAPTION_TO_PHRASE_GROUNDING>", "a car in the street")])
def test_tasks_with_text_get_scores_that_predict_leaves_out(task, text, tmp_path, one_thread):
    model = Florence2.from_pretrained(answering_model(tmp_path / "car", CAR))
    image = Image.new("RGB", (640, 480), "white")
    answer = model.predict(image, task, text=text)[task]
    assert "scores" not in answer and "bboxes_scores" not in answer  # the original scores <OD> and dense captions
    detector = Florence2DetectionModel(model=model, task=task, text=text, device="cpu")
    (p,) = sahi_predict.get_prediction(image, detector).object_prediction_list
    assert (p.category.name, p.bbox.to_xyxy()) == ("car", answer["bboxes"][0]) and p.score.value > 0.99
    sliced = answer_of([p], task)
    assert sliced["bboxes"] == answer["bboxes"] and set(answer) <= set(sliced)  # the task's keys, and scores


def test_polygons_are_masks(tmp_path, one_thread):
    polygon = "<loc_100><loc_110><loc_600><loc_120><loc_500><loc_700>"
    model = Florence2.from_pretrained(answering_model(tmp_path / "poly", polygon))
    image = Image.new("RGB", (200, 100), "white")
    detector = Florence2DetectionModel(model=model, task="<REFERRING_EXPRESSION_SEGMENTATION>", text="a sign",
                                       device="cpu", confidence_threshold=0.0)
    assert detector.has_mask
    (p,) = sahi_predict.get_prediction(image, detector).object_prediction_list
    answer = model.predict(image, "<REFERRING_EXPRESSION_SEGMENTATION>", text="a sign")
    assert p.mask.segmentation == answer["<REFERRING_EXPRESSION_SEGMENTATION>"]["polygons"][0]
    assert p.category.name == "region" and 0 < p.score.value <= 1
    xs, ys = p.mask.segmentation[0][0::2], p.mask.segmentation[0][1::2]
    assert p.bbox.to_xyxy() == pytest.approx([min(xs), min(ys), max(xs), max(ys)], abs=1)  # SAHI's extent
    assert answer_of([p], "<REFERRING_EXPRESSION_SEGMENTATION>")["polygons"] == [p.mask.segmentation]


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "<CAPTION>"}, "finds regions, not <CAPTION>"),
    ({"task": "<OCR_WITH_REGION>"}, "finds regions, not <OCR_WITH_REGION>"),
    ({"task": "<REGION_TO_CATEGORY>", "text": "<loc_1><loc_2><loc_3><loc_4>"}, "finds regions"),
    ({"task": "<OPEN_VOCABULARY_DETECTION>"}, "needs its text"),
    ({"task": "<OD>", "text": "cars"}, "takes no text"),
    ({"task": "<OD>"}, "give model_path"),
])
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Florence2DetectionModel(**kwargs)


# ------------------------------------------------------------------------------------------------- OCR lines
def quad(x1, y1, x2, y2) -> tuple:
    return (x1, y1, x2, y1, x2, y2, x1, y2)


def test_a_line_cut_by_a_border_is_kept_from_the_slice_holding_more_of_it():
    slices = [(0, 0, 600, 400), (400, 0, 1000, 400)]  # sharing x 400..600
    lines = [
        Line("Total due", quad(380, 100, 560, 120), 0),  # whole in slice 0 ...
        Line("l due", quad(400, 101, 560, 121), 1),  # ... and its right part in slice 1
        Line("Invoice 2041 of 3 De", quad(300, 200, 600, 220), 0),  # cut by slice 0's right border,
        Line("41 of 3 December", quad(420, 200, 760, 220), 1),  # more of it in slice 1 (extent 300..760)
        Line("Paid", quad(100, 300, 160, 320), 0),  # in one slice only
        Line("Thank you", quad(700, 300, 820, 320), 1),
        Line("Page 1", quad(450, 360, 550, 380), 0),  # inside the shared area: both copies whole
        Line("Page 1", quad(451, 361, 551, 381), 1),
    ]
    assert [line.text for line in merge_lines(lines, slices)] == [
        "Total due", "41 of 3 December", "Paid", "Thank you", "Page 1"]


def test_lines_of_different_rows_in_the_shared_area_are_not_copies():
    slices = [(0, 0, 600, 400), (400, 0, 1000, 400)]
    lines = [Line("first row", quad(410, 100, 590, 120), 0), Line("second row", quad(410, 116, 590, 136), 1)]
    assert merge_lines(lines, slices) == lines  # IoU 0.11 inside the shared area


def test_a_line_across_three_slices_is_kept_once_from_the_middle_one():
    slices = [(0, 0, 500, 100), (400, 0, 900, 100), (800, 0, 1300, 100)]
    lines = [Line("a long heading t", quad(300, 10, 500, 30), 0),
             Line("long heading that spans", quad(400, 10, 900, 30), 1),
             Line("that spans", quad(800, 10, 1000, 30), 2)]
    assert [line.text for line in merge_lines(lines, slices)] == ["long heading that spans"]


def test_reading_order_is_rows_from_the_top_each_from_the_left():
    lines = [Line("right", quad(500, 100, 600, 120), 1), Line("below", quad(0, 200, 100, 220), 0),
             Line("left", quad(0, 102, 100, 122), 0), Line("title", quad(200, 20, 400, 60), 0)]
    assert [line.text for line in reading_order(lines)] == ["title", "left", "right", "below"]


LINE = "hello<loc_50><loc_400><loc_950><loc_401><loc_951><loc_600><loc_51><loc_601>"  # x 5%-95%, y 40%-60%


def test_sliced_ocr_keeps_the_line_once_with_its_quad_on_the_page(tmp_path, capsys, one_thread):
    model_dir = answering_model(tmp_path / "ocr", LINE)
    Image.new("RGB", (1000, 400), "white").save(tmp_path / "wide.png")
    argv = [str(tmp_path / "wide.png"), "--model", str(model_dir), "--device", "cpu", "--json", "--slice", "400x600"]
    assert main([*argv, "--task", "<OCR_WITH_REGION>"]) == 0
    answer = json.loads(capsys.readouterr().out)["<OCR_WITH_REGION>"]
    # slices x 0..600 and 400..1000 read the line at 30.3..570.9 and 430.3..970.9: copies (IoU 0.70 in x 400..600);
    # of their extent 30.3..970.9 the second slice holds 570.9 px, the first 569.7: the second's is kept
    assert answer["labels"] == ["hello"]
    assert answer["quad_boxes"][0] == pytest.approx([430.3, 160.2, 970.3, 160.6, 970.9, 240.2, 430.9, 240.6],
                                                    abs=1e-3)
    assert main([*argv, "--task", "<OCR>"]) == 0
    assert json.loads(capsys.readouterr().out) == {"<OCR>": "hello"}


# --------------------------------------------------------------------------------------------- command lines
def slice_box(k: list[int], left: int, top: int, size=(600, 800)) -> list[float]:
    """A box of loc bins in a slice of `size` (width, height) at (left, top), in page pixels."""
    return [(k[0] + 0.5) * size[0] / 1000 + left, (k[1] + 0.5) * size[1] / 1000 + top,
            (k[2] + 0.5) * size[0] / 1000 + left, (k[3] + 0.5) * size[1] / 1000 + top]


def test_the_command_line_slices_merges_and_draws(tmp_path, capsys, one_thread):
    model_dir = answering_model(tmp_path / "car", CAR)
    Image.new("RGB", (1200, 1600), "white").save(tmp_path / "page.png")
    assert main([str(tmp_path / "page.png"), "--task", "<OD>", "--model", str(model_dir), "--device", "cpu",
                 "--json", "--slice", "800x600", "--slice-overlap", "0", "--draw", str(tmp_path / "drawn.png")]) == 0
    answer = json.loads(capsys.readouterr().out)["<OD>"]
    # four slices each answer the car at 10-50% x 20-70% of the slice, and the whole page at 10-50% x 20-70% of it:
    # no two overlap by half the smaller one, so SAHI's merge keeps all five
    bins = [100, 200, 500, 700]
    want = sorted([slice_box(bins, x, y) for x in (0, 600) for y in (0, 800)] + [slice_box(bins, 0, 0, (1200, 1600))])
    for box, want_box in zip(sorted(answer["bboxes"]), want, strict=True):
        assert box == pytest.approx(want_box, abs=1e-3)
    assert answer["labels"] == ["car"] * 5 and all(s > 0.99 for s in answer["scores"])
    assert Image.open(tmp_path / "drawn.png").size == (1200, 1600)
    # the slices' boxes only
    assert main([str(tmp_path / "page.png"), "--task", "<OD>", "--model", str(model_dir), "--device", "cpu",
                 "--json", "--slice", "800x600", "--slice-overlap", "0", "--slice-only"]) == 0
    only = json.loads(capsys.readouterr().out)["<OD>"]["bboxes"]
    for box, want_box in zip(sorted(only), sorted(slice_box(bins, x, y) for x in (0, 600) for y in (0, 800)),
                             strict=True):
        assert box == pytest.approx(want_box, abs=1e-3)


def test_batch_prediction_slices_too_and_writes_coco(tmp_path, one_thread):
    model_dir = answering_model(tmp_path / "car", CAR)
    folder = tmp_path / "pages"
    folder.mkdir()
    Image.new("RGB", (1200, 1600), "white").save(folder / "big.png")
    Image.new("RGB", (300, 200), "white").save(folder / "small.png")  # no larger than a slice: read whole
    out = tmp_path / "labels.json"
    assert main(["predict", str(folder), "--task", "<OD>", "--output", str(out), "--format", "coco", "--model",
                 str(model_dir), "--device", "cpu", "--num-workers", "0", "--slice", "800x600",
                 "--slice-overlap", "0", "--batch-size", "4", "--slice-only"]) == 0
    records = {r["image"]: r for r in map(json.loads, (tmp_path / "labels.jsonl").read_text().splitlines())}
    big, small = records[str(folder / "big.png")], records[str(folder / "small.png")]
    assert len(big["result"]["<OD>"]["bboxes"]) == 4  # --slice-only: the four slices' boxes
    model = Florence2.from_pretrained(model_dir)
    assert small["result"] == json.loads(json.dumps(model.predict(Image.open(folder / "small.png"), "<OD>")))
    coco = json.loads(out.read_text())
    assert len(coco["annotations"]) == 5 and coco["categories"][0]["name"] == "car"


@pytest.mark.parametrize("flags, message", [
    (["--task", "<OD>", "--slice", "16"], "a slice side must be at least 64 pixels"),
    (["--task", "<OD>", "--slice", "big"], "give one side in pixels (768) or height x width"),
    (["--task", "<OD>", "--slice", "768", "--slice-overlap", "1"], "at least 0 and below 1"),
    (["--task", "<OD>", "--slice", "768", "--slice-overlap", "-0.1"], "at least 0 and below 1"),
    (["--task", "<OD>", "--slice-overlap", "0.3"], "--slice-overlap needs --slice"),
    (["--task", "<OD>", "--slice-only"], "--slice-only needs --slice"),
    (["--task", "<CAPTION>", "--slice", "768"], "<CAPTION> answers about the whole image"),
    (["--task", "<DocVQA>", "--text", "Total?", "--slice", "768"], "<DocVQA> answers about the whole image"),
    (["--task", "<REGION_TO_CATEGORY>", "--text", "<loc_1><loc_2><loc_3><loc_4>", "--slice", "768"],
     "reads a region of the whole image"),
])
@pytest.mark.parametrize("command", ["single", "batch"])
def test_bad_slice_flags_are_one_line(command, flags, message, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    argv = [str(image), *flags] if command == "single" else \
        ["predict", str(image), *flags, "--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as error:
        main(argv)
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_missing_sahi_is_said_at_start(tmp_path, monkeypatch, capsys):
    import sys

    import florence2

    for name in [n for n in sys.modules if n == "sahi" or n.startswith("sahi.")] or ["sahi"]:
        monkeypatch.setitem(sys.modules, name, None)  # import sahi (and sahi.anything) raises ImportError
    monkeypatch.delitem(sys.modules, "florence2.sahi")
    monkeypatch.delattr(florence2, "sahi")
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    for argv in ([str(image), "--task", "<OD>", "--slice", "768", "--model", str(tmp_path / "no-model")],
                 ["predict", str(image), "--task", "<OD>", "--slice", "768", "--output", str(tmp_path / "o.jsonl"),
                  "--model", str(tmp_path / "no-model")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and 'needs the sahi package: pip install -e ".[sahi]"' in err, err


def test_scores_are_exp_mean_log_prob_of_the_box_tokens(tmp_path, one_thread):
    """The score SAHI gets is the original's: exp of the mean log-probability of the box's four loc tokens."""
    model = Florence2.from_pretrained(answering_model(tmp_path / "car", CAR))
    from florence2.predict import default_processor

    processor = default_processor(model)
    image = Image.new("RGB", (64, 64), "white")
    inputs = processor(text="<OD>", images=image)
    out = model.generate(**inputs, return_scores=True)
    ids = out.sequences[0].tolist()
    locs = [i for i, t in enumerate(ids[1:]) if 50269 <= t < 51269]
    want = math.exp(float(torch.tensor([out.scores[0, i] for i in locs]).mean()))
    (p,) = sahi_predict.get_prediction(image, Florence2DetectionModel(model=model, device="cpu")).object_prediction_list
    assert p.score.value == pytest.approx(want, rel=1e-6)
