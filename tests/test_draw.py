"""Drawing answers: colours land on the parsed coordinates, and the input image is left alone."""

from __future__ import annotations

import numpy as np
from PIL import Image

from florence2.draw import FILL_ALPHA, PALETTE, draw_result

WHITE = (255, 255, 255)


def white(size=(100, 80), mode="RGB") -> Image.Image:
    return Image.new(mode, size, "white")


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def test_box_outline_at_the_coordinates_only():
    image = white()
    before = image.tobytes()
    result = {"<OD>": {"bboxes": [[10.2, 20.4, 60.3, 49.8]], "labels": ["car"]}}
    drawn = draw_result(image, result)
    assert image.tobytes() == before and drawn is not image and drawn.size == image.size
    colour = PALETTE[0]
    for x, y in [(35, 20), (35, 50), (10, 35), (60, 35)]:  # the four edges, coordinates rounded
        assert pixel(drawn, x, y) == colour, (x, y)
    for x, y in [(35, 35), (35, 25), (15, 45), (55, 35), (35, 70), (85, 35), (5, 35), (90, 10)]:
        assert pixel(drawn, x, y) == WHITE, (x, y)  # inside, and away from the box and its label tag
    assert any(pixel(drawn, x, y) == colour for x in range(10, 40) for y in range(0, 19))  # the "car" tag above


def test_inner_answer_and_reversed_corners_draw_the_same():
    wrapped = draw_result(white(), {"<OD>": {"bboxes": [[10, 20, 60, 50]], "labels": ["car"]}})
    inner = draw_result(white(), {"bboxes": [[60, 50, 10, 20]], "labels": ["car"]}, task="<OD>")
    assert wrapped.tobytes() == inner.tobytes()


def test_same_label_same_colour_and_proposals_get_one_each():
    drawn = draw_result(white((200, 100)), {"<OD>": {"bboxes": [[10, 30, 40, 60], [110, 30, 140, 60],
                                                                 [160, 30, 190, 60]],
                                                      "labels": ["wheel", "wheel", "door"]}})
    assert pixel(drawn, 25, 60) == pixel(drawn, 125, 60) == PALETTE[0]
    assert pixel(drawn, 175, 60) == PALETTE[1]
    proposals = draw_result(white((200, 100)), {"<REGION_PROPOSAL>": {"bboxes": [[10, 30, 40, 60],
                                                                                 [110, 30, 140, 60]],
                                                                      "labels": ["", ""]}})
    assert pixel(proposals, 25, 60) == PALETTE[0] and pixel(proposals, 125, 60) == PALETTE[1]


def test_polygon_outlined_and_filled_translucently():
    image = white(mode="L")
    before = image.tobytes()
    result = {"<REGION_TO_SEGMENTATION>": {"polygons": [[[20, 20, 80, 20, 80, 60, 20, 60]]], "labels": [""]}}
    drawn = draw_result(image, result)
    assert image.tobytes() == before and image.mode == "L" and drawn.mode == "RGB"
    colour = PALETTE[0]
    blended = tuple((c * FILL_ALPHA + 255 * (255 - FILL_ALPHA)) / 255 for c in colour)
    assert np.allclose(pixel(drawn, 50, 40), blended, atol=1)  # inside: white under the translucent colour
    assert pixel(drawn, 50, 20) == pixel(drawn, 80, 40) == colour  # the outline
    assert pixel(drawn, 10, 70) == pixel(drawn, 90, 10) == WHITE


def test_ocr_quads_and_open_vocabulary_polygons():
    ocr = draw_result(white(), {"<OCR_WITH_REGION>": {"quad_boxes": [[10, 40, 90, 40, 90, 70, 10, 70]],
                                                      "labels": ["</s>TOTAL 東京"]}})
    assert pixel(ocr, 50, 70) == pixel(ocr, 90, 55) == PALETTE[0]
    assert pixel(ocr, 50, 55) == WHITE
    ovd = draw_result(white(), {"<OPEN_VOCABULARY_DETECTION>": {
        "bboxes": [], "bboxes_labels": [], "polygons": [[[20, 30, 80, 30, 50, 70]]], "polygons_labels": ["a car"]}})
    assert pixel(ovd, 50, 30) == PALETTE[0] and pixel(ovd, 50, 45) != WHITE


def test_text_answers_leave_the_image_as_it_is():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    drawn = draw_result(image, {"<CAPTION>": "A green car."})
    assert drawn is not image and drawn.tobytes() == image.tobytes()


def test_malformed_answers_do_not_raise():
    for answer in ({"bboxes": [], "labels": []}, {"polygons": [[[1, 2]], [[1, 2, 3, 4]], []], "labels": []},
                   {"quad_boxes": [[0.0] * 8], "labels": []}, {"bboxes": [[5, 5, 5, 5]], "labels": ["dot"]}):
        assert draw_result(white(), answer).size == (100, 80)
