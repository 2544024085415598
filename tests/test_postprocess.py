"""Post-processing against the original's answers (tests/fixtures/tiny/postprocess.json), plus malformed text."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from florence2.postprocess import (
    PARSE_TYPES,
    TASKS,
    TASKS_WITH_INPUT,
    TASKS_WITHOUT_INPUT,
    dequantize,
    parse_type,
    post_process_generation,
    quantize,
)
from tests.conftest import TINY

CASES = json.loads((TINY / "postprocess.json").read_text())
# The original labels the box of this text "loc_5>" (the tail of the first token); we drop the fragment.
STRAY_TOKEN_TEXT = "<loc_5><loc_6><loc_7><loc_8><loc_9>"


def f32(x: float) -> float:
    return float(np.float32(x))


def bin_centre(k: int, side: int) -> float:
    """(k + 0.5) * side / 1000 as the original computes it: float32 (k + 0.5) times float32(side / 1000)."""
    return float(np.float32(k + 0.5) * np.float32(side / 1000))


def without_end_token_in_ocr_labels(case: dict) -> dict:
    """The original's result with our one fix for well-formed text: OCR labels without the leading </s>."""
    result = json.loads(json.dumps(case["result"]))
    if case["task"] == "<OCR_WITH_REGION>":
        labels = result["<OCR_WITH_REGION>"]["labels"]
        labels[:] = [label.replace("</s>", "") for label in labels]
    return result


@pytest.mark.parametrize("case", [c for c in CASES if c["text"] != STRAY_TOKEN_TEXT],
                         ids=lambda c: f"{c['task']}-{c['image_size'][0]}x{c['image_size'][1]}-{c['text'][:24]}")
def test_matches_original(case):
    result = post_process_generation(case["text"], case["task"], tuple(case["image_size"]))
    assert result == without_end_token_in_ocr_labels(case)  # floats too: the same float32 values, exactly


def test_stray_token_fragment_is_not_a_label():
    cases = [c for c in CASES if c["text"] == STRAY_TOKEN_TEXT]
    assert len(cases) == 2
    for case in cases:
        reference = case["result"]["<OD>"]
        assert reference["labels"] == ["loc_5>"]  # the original's answer
        ours = post_process_generation(case["text"], "<OD>", tuple(case["image_size"]))["<OD>"]
        assert ours == {"bboxes": reference["bboxes"], "labels": [""]}


def test_stray_fragment_before_a_phrase_is_dropped():
    # "<loc_3>" leaves "loc_3>" in front of "wheel"; the original would label the box "loc_3>wheel"
    text = "car<loc_1><loc_2><loc_3>wheel<loc_10><loc_20><loc_30><loc_40>"
    assert post_process_generation(text, "<OD>", (1000, 1000))["<OD>"] == {
        "bboxes": [[10.5, 20.5, 30.5, 40.5]], "labels": ["wheel"]}


def test_ocr_labels_lose_the_originals_end_token():
    ocr = [c for c in CASES if c["task"] == "<OCR_WITH_REGION>" and c["text"].startswith("</s>")]
    assert ocr and all(c["result"]["<OCR_WITH_REGION>"]["labels"][0].startswith("</s>") for c in ocr)  # original
    for case in ocr:
        ours = post_process_generation(case["text"], "<OCR_WITH_REGION>", tuple(case["image_size"]))
        expected = case["result"]["<OCR_WITH_REGION>"]
        assert ours["<OCR_WITH_REGION>"]["quad_boxes"] == expected["quad_boxes"]
        assert ours["<OCR_WITH_REGION>"]["labels"][0] == expected["labels"][0].removeprefix("</s>")
    assert post_process_generation("</s><s>CUDA" + "<loc_1>" * 8 + "</s><pad>", "<OCR_WITH_REGION>", (10, 10)) == {
        "<OCR_WITH_REGION>": {"quad_boxes": [[f32(1.5 * 0.01)] * 8], "labels": ["CUDA"]}}


def test_dequantize_by_hand():
    # the spec's check: a 640x480 image, car<loc_53><loc_333><loc_933><loc_774> -> [34.24, 160.08, 597.44, 371.76]
    box = post_process_generation("car<loc_53><loc_333><loc_933><loc_774>", "<OD>", (640, 480))["<OD>"]["bboxes"][0]
    assert box == [bin_centre(53, 640), bin_centre(333, 480), bin_centre(933, 640), bin_centre(774, 480)]
    assert box == pytest.approx([34.24, 160.08, 597.44, 371.76], abs=1e-4)
    assert dequantize([0, 999], (333, 777)) == [bin_centre(0, 333), bin_centre(999, 777)]


def test_quantize_is_the_originals_floor():
    assert quantize([34.24, 160.08, 597.44, 371.76], (640, 480)) == [53, 333, 933, 774]
    assert quantize([-5.0, 1e9], (640, 480)) == [0, 999]
    assert quantize([639.99, 0.0], (640, 480)) == [999, 0]


def test_loc_index_past_the_vocabulary_counts_as_the_last_bin():
    box = post_process_generation("car<loc_1500><loc_0><loc_99999999999999999999999><loc_0>", "<OD>",
                                  (640, 480))["<OD>"]["bboxes"][0]
    assert box == [bin_centre(999, 640), bin_centre(0, 480), bin_centre(999, 640), bin_centre(0, 480)]


def test_labels_drop_non_ascii_and_keep_case():
    answer = post_process_generation("Café Sign<loc_1><loc_2><loc_3><loc_4>", "<OD>", (1000, 1000))["<OD>"]
    assert answer["labels"] == ["Caf Sign"]


def test_polygon_odd_coordinate_dropped_and_sep_splits():
    text = "<loc_10><loc_20><loc_30><loc_40><loc_50><sep><loc_1><loc_2><loc_3><loc_4>"
    answer = post_process_generation(text, "<REFERRING_EXPRESSION_SEGMENTATION>", (1000, 1000))
    assert answer == {"<REFERRING_EXPRESSION_SEGMENTATION>": {
        "polygons": [[[10.5, 20.5, 30.5, 40.5], [1.5, 2.5, 3.5, 4.5]]], "labels": [""]}}


def test_scores_from_token_spans():
    # tokens: <s> | car | <loc_1> | <loc_2> | <loc_3> | <loc_4> | </s>, with their [start, end) in the text
    pieces = ["<s>", "car", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>", "</s>"]
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    scores = [-0.01, -0.2, -0.3, -0.4, -0.5, -0.6, -0.05]
    answer = post_process_generation("".join(pieces), "<OD>", (1000, 1000), token_spans=spans,
                                     token_scores=scores)["<OD>"]
    assert answer["bboxes"] == [[1.5, 2.5, 3.5, 4.5]]
    assert answer["scores"] == [pytest.approx(math.exp((-0.3 - 0.4 - 0.5 - 0.6) / 4), rel=1e-12)]


def test_scores_survive_repeated_start_tokens():
    # "<s><s><s>" (common with beam search) shifts the original's spans by 6 characters; ours stay on the locs
    pieces = ["<s>", "<s>", "<s>", "car", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>", "</s>"]
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    scores = [-9.0, -9.0, -9.0, -9.0, -0.1, -0.2, -0.3, -0.4, -9.0]
    answer = post_process_generation("".join(pieces), "<DENSE_REGION_CAPTION>", (1000, 1000), token_spans=spans,
                                     token_scores=scores)["<DENSE_REGION_CAPTION>"]
    assert answer["scores"] == [pytest.approx(math.exp(-0.25), rel=1e-12)]


def test_task_tables():
    assert set(TASKS) == set(TASKS_WITHOUT_INPUT) | set(TASKS_WITH_INPUT) == set(PARSE_TYPES)
    assert len(TASKS) == 15
    assert parse_type("<DocVQA>") == parse_type("anything") == "pure_text"
    assert parse_type("<REGION_PROPOSAL>") == "bboxes"


@pytest.mark.parametrize("size", [None, (0, 5), (-1, 5), (640,), (640, 480, 3), "640x480", (math.nan, 3),
                                  (True, 3), (640, None)])
def test_bad_image_size_raises(size):
    with pytest.raises(ValueError, match="image_size"):
        post_process_generation("car<loc_1><loc_2><loc_3><loc_4>", "<OD>", size)


def test_numpy_image_size_is_fine():
    answer = post_process_generation("car<loc_53><loc_1><loc_1><loc_1>", "<OD>", (np.int64(640), np.float64(480)))
    assert answer["<OD>"]["bboxes"][0][0] == bin_centre(53, 640)


# ----------------------------------------------------------------------------------------- malformed text
MALFORMED = [
    "", "</s>", "<s></s><pad>", "car", "car<loc_1><loc_2><loc_3>", "<loc_1><loc_2><loc_3>", "<loc_5>" * 5,
    "car<loc_1><loc_2><loc_3><loc_", "<poly><loc_1></poly>", "<poly></poly><sep><sep><sep><sep>",
    "<sep><loc_1><loc_2><loc_3><loc_4>", "a\ncar<loc_1><loc_2><loc_3><loc_4>", "<<loc_1><loc_2><loc_3><loc_4>",
    "text<loc_1>" * 9, "<loc_-1><loc_1.5><loc_x><loc_>", "東京<loc_1><loc_2><loc_3><loc_4>", ">>>>", "<<<<",
    "it<loc_1><loc_2><loc_3><loc_4>", "the image<poly><loc_1><loc_2></poly>", "<od>car</od><loc_1><loc_2>",
]


def assert_usual_shape(task: str, answer, size=(640, 480)):
    """The task's answer shape, every coordinate a finite number inside the image, no token markup in box labels."""
    width, height = size

    def check_coords(coords, n=None):
        assert isinstance(coords, list) and len(coords) % 2 == 0 and coords
        assert n is None or len(coords) == n
        for x, y in zip(coords[0::2], coords[1::2]):
            assert isinstance(x, float) and isinstance(y, float)
            assert 0 <= x <= width and 0 <= y <= height

    def check_labels(labels, n):
        assert isinstance(labels, list) and len(labels) == n and all(isinstance(label, str) for label in labels)

    kind = parse_type(task)
    if kind == "pure_text":
        assert isinstance(answer, str) and "<s>" not in answer and "</s>" not in answer
    elif kind == "ocr":
        assert set(answer) == {"quad_boxes", "labels"}
        for quad in answer["quad_boxes"]:
            check_coords(quad, 8)
        check_labels(answer["labels"], len(answer["quad_boxes"]))
    elif kind in ("description_with_bboxes", "bboxes", "phrase_grounding"):
        assert set(answer) in ({"bboxes", "labels"}, {"bboxes", "labels", "scores"})
        for box in answer["bboxes"]:
            check_coords(box, 4)
        check_labels(answer["labels"], len(answer["bboxes"]))
        assert not any("<" in label for label in answer["labels"])
    elif kind == "polygons":
        assert set(answer) == {"polygons", "labels"}
        for instance in answer["polygons"]:
            assert instance
            for polygon in instance:
                check_coords(polygon)
        check_labels(answer["labels"], len(answer["polygons"]))
        assert not any(t in label for label in answer["labels"] for t in ("<sep>", "<poly>", "</poly>"))
    else:
        assert set(answer) == {"bboxes", "bboxes_labels", "polygons", "polygons_labels"}
        for box in answer["bboxes"]:
            check_coords(box, 4)
        for instance in answer["polygons"]:
            for polygon in instance:
                check_coords(polygon)
        check_labels(answer["bboxes_labels"], len(answer["bboxes"]))
        check_labels(answer["polygons_labels"], len(answer["polygons"]))


@pytest.mark.parametrize("task", [*TASKS, "<DocVQA>"])
def test_malformed_text_keeps_the_usual_shape(task):
    for text in [*MALFORMED, None]:
        result = post_process_generation(text, task, (640, 480))
        assert list(result) == [task]
        assert_usual_shape(task, result[task])


def test_malformed_examples_by_hand():
    assert post_process_generation(None, "<OD>", (640, 480)) == {"<OD>": {"bboxes": [], "labels": []}}
    assert post_process_generation(None, "<CAPTION>", (640, 480)) == {"<CAPTION>": ""}
    # a polygon of a single coordinate has no point: dropped (the original keeps an empty list)
    assert post_process_generation("<poly><loc_1></poly><loc_2><loc_3><loc_4>", "<REGION_TO_SEGMENTATION>",
                                   (1000, 1000)) == {"<REGION_TO_SEGMENTATION>": {"polygons": [], "labels": []}}


FUZZ_PIECES = ["<poly>", "</poly>", "<sep>", "</s>", "<s>", "<pad>", "car", " a green car", "the image", "it",
               "東京", "Café", "<loc_", "loc_12>", "<lo", "<", ">", "\n", " ", "<loc_1234>", "<od>", "</od>",
               "<loc_0>", "<loc_999>"]


def test_fuzz_never_raises():
    rng = random.Random(0)
    tasks = [*TASKS, "<DocVQA>"]
    for _ in range(400):
        pieces = [f"<loc_{rng.randrange(1000)}>" if rng.random() < 0.5 else rng.choice(FUZZ_PIECES)
                  for _ in range(rng.randrange(0, 40))]
        text = "".join(pieces)
        cut = text[:rng.randrange(len(text) + 1)]  # generation stopped mid-token
        for candidate in (text, cut):
            for task in tasks:
                size = (rng.choice([1, 31, 640, 1000]), rng.choice([1, 17, 480, 777]))
                result = post_process_generation(candidate, task, size)
                assert_usual_shape(task, result[task], size)
