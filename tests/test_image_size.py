"""Image sizes (florence2/image_size.py, the processor at height x width) and the confidence scores that
post-processing gives every task with coordinates."""

import math

import pytest
import torch

from florence2 import Florence2
from florence2.config import PRESETS, with_changes
from florence2.image_size import check_image_size, fit_image_size, grow_positions, image_tokens, parse_image_size
from florence2.postprocess import post_process_generation
from florence2.processor import Florence2Processor


def test_parse_image_size():
    assert parse_image_size("768") == (768, 768)
    assert parse_image_size("1024x768") == (1024, 768)  # height x width
    assert parse_image_size(" 64 X 96 ") == (64, 96)
    for bad, message in (("100", "height 100 is not a positive multiple of 32"),
                         ("64x50", "width 50 is not a positive multiple of 32"), ("big", "give one side"),
                         ("0", "not a positive multiple")):
        with pytest.raises(ValueError, match=message):
            parse_image_size(bad)


def test_the_arithmetic_of_both_tables():
    assert image_tokens((768, 768)) == 577 and image_tokens((768, 1024)) == 769 and image_tokens((1024, 1024)) == 1025
    processor = Florence2Processor(image_size=(1024, 768))
    assert processor.image_size == (1024, 768) and processor.max_prompt_length == 1024 - 769 == 255
    assert tuple(processor.image_tensor(torch.zeros(3, 10, 20)).shape) == (3, 1024, 768)
    model = Florence2.from_config("tiny")
    check_image_size(model, (1600, 32))
    with pytest.raises(ValueError, match=r"image size 32x1632: the width of 1632 px needs 51 position cells of 32 "
                                         r"px, and DaViT's 2-D position table has 50 a side \(at most 1600 px\)"):
        check_image_size(model, (32, 1632))


def test_the_position_tables_grow_from_the_learned_rows():
    model = Florence2.from_config(with_changes(PRESETS["tiny"], text={"max_position_embeddings": 8}), seed=0)
    before = {part: getattr(model.language_model, part).embed_positions.weight.detach().clone()
              for part in ("encoder", "decoder")}
    grow_positions(model, 20)
    assert model.config.text.max_position_embeddings == model.language_model.config.max_position_embeddings == 20
    for part, old in before.items():
        new = getattr(model.language_model, part).embed_positions.weight
        assert new.shape == (22, old.shape[1]) and new.requires_grad
        assert torch.equal(new[:10], old)  # BART's 2 offset rows and the 8 learned positions, unchanged
        for position in range(8, 20):  # position p starts as learned position p mod 8
            assert torch.equal(new[2 + position], old[2 + position % 8])
    with pytest.raises(ValueError, match="already have 20 positions"):
        grow_positions(model, 12)


def test_fit_image_size_grows_only_past_the_table_and_the_checkpoint_keeps_it(tmp_path):
    model = Florence2.from_config("tiny", seed=0)  # 256 positions
    processor = fit_image_size(model, Florence2Processor(image_size=64), (256, 448), prompt_tokens=20)
    assert model.config.text.max_position_embeddings == 256  # 8 * 14 + 1 = 113 image tokens + 20 fit
    assert processor.image_size == (256, 448) and processor.max_prompt_length == 256 - 113
    processor = fit_image_size(model, processor, (512, 512), prompt_tokens=20)
    assert model.config.text.max_position_embeddings == 257 + 20 == processor.model_max_length
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = Florence2.from_pretrained(tmp_path)
    assert loaded.config.text.max_position_embeddings == 277
    assert Florence2Processor.from_pretrained(tmp_path).image_size == (512, 512)
    torch.testing.assert_close(loaded.language_model.encoder.embed_positions.weight,
                               model.language_model.encoder.embed_positions.weight, rtol=0, atol=0)


def spans_of(pieces):
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


@pytest.mark.parametrize("task, pieces, key", [
    ("<CAPTION_TO_PHRASE_GROUNDING>", ["<s>", "a car", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>", "</s>"], "scores"),
    ("<OPEN_VOCABULARY_DETECTION>", ["<s>", "a car", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>", "</s>"],
     "bboxes_scores"),
    ("<REGION_PROPOSAL>", ["<s>", "<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>", "</s>"], "scores"),
])
def test_box_scores_of_every_box_task_are_the_mean_of_their_location_tokens(task, pieces, key):
    scores = [-9.0 if not p.startswith("<loc") else -0.1 * (i + 1) for i, p in enumerate(pieces)]
    locs = [s for p, s in zip(pieces, scores) if p.startswith("<loc")]
    answer = post_process_generation("".join(pieces), task, (1000, 1000), token_spans=spans_of(pieces),
                                     token_scores=scores)[task]
    assert answer[key] == [pytest.approx(math.exp(sum(locs) / 4), rel=1e-12)]
    assert key not in post_process_generation("".join(pieces), task, (1000, 1000))[task]  # the original's answer


def test_polygon_and_quad_scores():
    # two polygons of one instance, separated by <sep>: the score is over all of their loc tokens, not the <sep>
    pieces = ["<s>", *[f"<loc_{k}>" for k in (1, 2, 3, 4, 5, 6)], "<sep>", *[f"<loc_{k}>" for k in (7, 8, 9, 10, 11,
                                                                                                  12)], "</s>"]
    scores = [-9.0] + [-0.1] * 6 + [-9.0] + [-0.3] * 6 + [-9.0]
    answer = post_process_generation("".join(pieces), "<REFERRING_EXPRESSION_SEGMENTATION>", (1000, 1000),
                                     token_spans=spans_of(pieces), token_scores=scores)
    assert answer["<REFERRING_EXPRESSION_SEGMENTATION>"]["scores"] == [pytest.approx(math.exp(-0.2), rel=1e-12)]
    # OCR lines: the first one's label loses the leading </s> (as without scores), each quad its own 8 tokens
    pieces = ["</s>", "<s>", "AB", *[f"<loc_{k}>" for k in range(8)], "C", *[f"<loc_{k}>" for k in range(8)], "</s>"]
    scores = [0.0, -9.0, -9.0] + [-0.5] * 8 + [-9.0] + [-0.25] * 8 + [-9.0]
    answer = post_process_generation("".join(pieces), "<OCR_WITH_REGION>", (1000, 1000), token_spans=spans_of(pieces),
                                     token_scores=scores)["<OCR_WITH_REGION>"]
    assert answer["labels"] == ["AB", "C"]
    assert answer["scores"] == [pytest.approx(math.exp(-0.5)), pytest.approx(math.exp(-0.25))]
    plain = post_process_generation("".join(pieces), "<OCR_WITH_REGION>", (1000, 1000))["<OCR_WITH_REGION>"]
    assert plain == {"quad_boxes": answer["quad_boxes"], "labels": ["AB", "C"]}
