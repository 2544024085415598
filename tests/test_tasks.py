"""Every task: its examples from annotations, targets that post-processing reads back within one bin, and the inputs
made from data that does not hold them."""

import re

import pytest

from florence2.postprocess import post_process_generation
from training.formats import Question, Region, Sample
from training.tasks import TASKS, QuestionAnswering, get_task

SIZE = (640, 480)  # (width, height): bins of 0.64 and 0.48 px
BIN = (SIZE[0] / 1000, SIZE[1] / 1000)
CAR = Region((12.3, 40.9, 300.0, 200.5), "car", 3, ((12.3, 40.9, 300.0, 41.0, 299.0, 200.5, 13.0, 190.0),),
             "a red car")
DOG = Region((400.0, 300.0, 639.9, 479.9), "dog", 4, ((400.0, 300.0, 639.9, 300.0, 500.0, 479.9),
                                                      (410.0, 310.0, 420.0, 310.0, 415.0, 320.0)))
CAR2 = Region((320.0, 10.0, 360.5, 50.0), "car", 3, (), "a blue car")
CROWD = Region((0.0, 0.0, 50.0, 50.0), "car", 3, (), None, crowd=True)
SAMPLE = Sample("x.png", 7, "test", SIZE, regions=[CAR, DOG, CAR2, CROWD])


def within_a_bin(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= BIN[i % 2], (i, g, w)


def test_every_task_token_has_its_task():
    assert set(TASKS) == {
        "<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>",
        "<OPEN_VOCABULARY_DETECTION>", "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>",
        "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<OCR>", "<OCR_WITH_REGION>", "<CAPTION>",
        "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"}
    for token in ("<DocVQA>", "<VQA>", "Is there a stamp?"):
        assert isinstance(get_task(token), QuestionAnswering)
    with pytest.raises(ValueError, match="<REGION_TO_OCR> is a Florence-2 task this trainer does not fine-tune"):
        get_task("<REGION_TO_OCR>")


@pytest.mark.parametrize("token, labels", [("<OD>", ["car", "dog", "car"]),
                                           ("<DENSE_REGION_CAPTION>", ["a red car", "dog", "a blue car"]),
                                           ("<REGION_PROPOSAL>", ["", "", ""])])
def test_detection_targets_round_trip(token, labels):
    (example,) = TASKS[token].examples(SAMPLE, 0, training=True)
    assert example.prompt == token
    # one label per box, crowds never a target; the original's quantization: floor(v / (side / 1000)), at most 999
    first = "" if token == "<REGION_PROPOSAL>" else labels[0]
    assert example.target.startswith(f"{first}<loc_19><loc_85><loc_468><loc_417>")
    assert example.target.count("<loc_999>") == 2  # the dog's x2 = 639.9 and y2 = 479.9 clamp to bin 999
    parsed = post_process_generation(example.target, token, SIZE)[token]
    assert parsed["labels"] == labels
    for got, region in zip(parsed["bboxes"], (CAR, DOG, CAR2)):
        within_a_bin(got, region.box)
    assert example.reference["crowd"] == [False, False, False, True]  # kept in the ground truth, as COCO does


def test_grounding_caption_lists_the_phrases_and_grounds_each():
    (example,) = TASKS["<CAPTION_TO_PHRASE_GROUNDING>"].examples(SAMPLE, 0, training=True)
    assert example.prompt == "<CAPTION_TO_PHRASE_GROUNDING>a red car, dog, a blue car"
    assert re.fullmatch(r"a red car(<loc_\d+>){4}dog(<loc_\d+>){4}a blue car(<loc_\d+>){4}", example.target)
    parsed = post_process_generation(example.target, "<CAPTION_TO_PHRASE_GROUNDING>", SIZE)
    assert parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["labels"] == ["a red car", "dog", "a blue car"]
    # without region texts the phrases are the categories, each once, with all of its boxes
    plain = Sample("x.png", 7, "test", SIZE, regions=[Region(CAR.box, "car"), DOG, Region(CAR2.box, "car")])
    (example,) = TASKS["<CAPTION_TO_PHRASE_GROUNDING>"].examples(plain, 0, training=True)
    assert example.prompt == "<CAPTION_TO_PHRASE_GROUNDING>car, dog"
    parsed = post_process_generation(example.target, "<CAPTION_TO_PHRASE_GROUNDING>", SIZE)
    assert parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["labels"] == ["car", "car", "dog"]
    for got, want in zip(parsed["<CAPTION_TO_PHRASE_GROUNDING>"]["bboxes"], (CAR.box, CAR2.box, DOG.box)):
        within_a_bin(got, want)


def test_open_vocabulary_detection_asks_each_category_present():
    examples = TASKS["<OPEN_VOCABULARY_DETECTION>"].examples(SAMPLE, 0, training=True)
    assert [e.prompt for e in examples] == ["<OPEN_VOCABULARY_DETECTION>car", "<OPEN_VOCABULARY_DETECTION>dog"]
    parsed = post_process_generation(examples[0].target, "<OPEN_VOCABULARY_DETECTION>", SIZE)
    answer = parsed["<OPEN_VOCABULARY_DETECTION>"]
    assert answer["bboxes_labels"] == ["car", "car"] and answer["polygons"] == []
    within_a_bin(answer["bboxes"][0], CAR.box)
    within_a_bin(answer["bboxes"][1], CAR2.box)
    assert examples[0].reference["crowd"] == [False, False, True]


@pytest.mark.parametrize("token", ["<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"])
def test_segmentation_targets_round_trip(token):
    examples = TASKS[token].examples(SAMPLE, 0, training=True)
    assert len(examples) == 2  # the regions with polygons: the red car and the dog
    if token == "<REGION_TO_SEGMENTATION>":
        assert examples[0].prompt == token + "<loc_19><loc_85><loc_468><loc_417>"
    else:
        assert [e.prompt for e in examples] == [token + "a red car", token + "dog"]
    for example, region in zip(examples, (CAR, DOG)):
        assert example.target.count("<sep>") == len(region.polygons) - 1
        (instance,) = post_process_generation(example.target, token, SIZE)[token]["polygons"]
        assert len(instance) == len(region.polygons)
        for got, want in zip(instance, region.polygons):
            within_a_bin(got, want)
        assert example.reference["query"] == region.category


@pytest.mark.parametrize("token, answers", [("<REGION_TO_CATEGORY>", ["car", "dog", "car"]),
                                            ("<REGION_TO_DESCRIPTION>", ["a red car", "dog", "a blue car"])])
def test_region_to_text_repeats_the_region_as_the_original_answers(token, answers):
    examples = TASKS[token].examples(SAMPLE, 0, training=True)
    assert [e.reference["answers"] for e in examples] == [[a] for a in answers]
    for example, region, answer in zip(examples, (CAR, DOG, CAR2), answers):
        region_tokens = example.prompt.removeprefix(token)
        assert example.target == answer + region_tokens  # "car<loc_..>x4", as the original generates
        within_a_bin([(int(k) + 0.5) * BIN[i % 2] for i, k in enumerate(re.findall(r"\d+", region_tokens))],
                     region.box)


def test_ocr_with_region_quads_round_trip_and_ocr_joins_lines():
    line1 = Region((10.0, 20.0, 200.0, 60.0), "text", None, ((10.0, 20.0, 200.0, 22.0, 199.0, 60.0, 11.0, 58.0),),
                   "INVOICE 12")
    line2 = Region((10.0, 100.0, 300.0, 130.0), "text", None, (), "Total: $5")
    sample = Sample("x.png", 1, "test", SIZE, regions=[line1, line2, Region((0, 0, 5, 5), "text")])
    (example,) = TASKS["<OCR_WITH_REGION>"].examples(sample, 0, training=True)
    parsed = post_process_generation("</s><s>" + example.target + "</s>", "<OCR_WITH_REGION>", SIZE)
    answer = parsed["<OCR_WITH_REGION>"]
    assert answer["labels"] == ["INVOICE 12", "Total: $5"]
    within_a_bin(answer["quad_boxes"][0], line1.polygons[0])  # a 4-point polygon is the quad as given
    within_a_bin(answer["quad_boxes"][1], [10, 100, 300, 100, 300, 130, 10, 130])  # else the box's corners
    (ocr,) = TASKS["<OCR>"].examples(sample, 0, training=True)
    assert (ocr.prompt, ocr.target) == ("<OCR>", "INVOICE 12\nTotal: $5")
    sample.text = "the whole page"
    assert TASKS["<OCR>"].examples(sample, 0, training=True)[0].target == "the whole page"


def test_captions_train_on_each_and_evaluate_against_all():
    sample = Sample("x.png", 1, "test", SIZE, captions=["A car.", "A red car on a road."])
    training = TASKS["<CAPTION>"].examples(sample, 3, training=True)
    assert [(e.sample, e.prompt, e.target) for e in training] == [(3, "<CAPTION>", "A car."),
                                                                  (3, "<CAPTION>", "A red car on a road.")]
    (evaluation,) = TASKS["<DETAILED_CAPTION>"].examples(sample, 3, training=False)
    assert evaluation.reference == {"answers": ["A car.", "A red car on a road."]}


def test_questions_use_the_prompt_template():
    sample = Sample("x.png", 1, "test", questions=[Question("What is the total?", ("$5", "5"), "amount")])
    (example,) = get_task("<DocVQA>").examples(sample, 0, training=True)
    assert (example.prompt, example.target, example.reference) == (
        "<DocVQA>What is the total?", "$5", {"answers": ["$5", "5"], "type": "amount"})
    (example,) = get_task("<VQA>", "Question: {question} Answer:").examples(sample, 0, training=True)
    assert example.prompt == "Question: What is the total? Answer:"


@pytest.mark.parametrize("token, suffix, reference", [
    ("<OD>", "car<loc_0><loc_0><loc_499><loc_999>dog<loc_500><loc_500><loc_999><loc_999>",
     {"labels": ["car", "dog"], "first": [0.32, 0.24, 319.68, 479.76]}),
    ("<OPEN_VOCABULARY_DETECTION>", "a car<loc_0><loc_0><loc_499><loc_999>",
     {"labels": ["a car"], "first": [0.32, 0.24, 319.68, 479.76]}),
    ("<REGION_TO_CATEGORY>", "car<loc_0><loc_0><loc_499><loc_999>", {"answers": ["car"]}),
    ("<CAPTION>", "A car.", {"answers": ["A car."]}),
])
def test_jsonl_lines_are_used_as_they_are_and_scored_against_their_parsed_target(token, suffix, reference):
    prefix = token + ("a car" if token == "<OPEN_VOCABULARY_DETECTION>" else "")
    sample = Sample("x.png", 1, "x.jsonl:1", SIZE, prefix=prefix, suffix=suffix)
    (example,) = TASKS[token].examples(sample, 0, training=True)
    assert (example.prompt, example.target) == (prefix, suffix)
    if "first" in reference:
        assert example.reference["labels"] == reference["labels"]
        assert example.reference["boxes"][0] == pytest.approx(reference["first"], abs=1e-4)
    else:
        assert example.reference == reference
