"""Every task's metric on cases worked out by hand: ANLS as the official DocVQA script computes it (and the blog's
similarity), exact match, accuracy, CER/WER, BLEU-4 and CIDEr-D, COCO box and mask mAP."""

import json
import math

import pytest

from training.metrics import (
    accuracy,
    anls,
    anls_per_question,
    bleu4,
    cer,
    cider,
    coco_map,
    exact_match,
    levenshtein_similarity,
    wer,
)


def test_exact_match_scores_one():
    assert anls(["1998"], [["1998"]]) == 1.0


def test_case_and_whitespace_are_normalized():
    # "  Acme   Corp " -> "acme corp"; only the raw denominator sees the spaces, and the distance is 0 anyway
    assert anls(["ACME CORP"], [["  Acme   Corp "]]) == 1.0
    assert anls(["acme\tcorp\n"], [["Acme Corp"]]) == 1.0


def test_denominator_uses_raw_lengths():
    # normalised "ab" vs "xy": distance 2. The raw answer "ab      " has 8 characters, so NL = 2/8 and the score is
    # 0.75; with the normalised length (2) it would be NL = 1 and the score 0.
    assert anls(["xy"], [["ab      "]]) == pytest.approx(0.75)
    # "hello world" vs "hello word": distance 1, raw answer length 15 -> 1 - 1/15 (not 1 - 1/11)
    assert anls(["hello word"], [["  hello  world "]]) == pytest.approx(1 - 1 / 15)


def test_denominator_counts_upper_cased_length():
    # "ß".upper() == "SS": distance("ß", "s") = 1 over length 2 -> exactly 0.5, which is kept
    assert anls(["s"], [["ß"]]) == pytest.approx(0.5)


def test_threshold_boundary_is_kept_and_below_is_zero():
    assert anls(["abxy"], [["abcd"]]) == 0.5  # distance 2 / 4: similarity exactly 0.5 is kept
    assert anls(["axyz"], [["abcd"]]) == 0.0  # distance 3 / 4: 0.25 < 0.5
    assert anls(["abcdxyz"], [["abcdefg"]]) == pytest.approx(4 / 7)  # distance 3 / 7
    assert anls(["abcwxyz"], [["abcdefg"]]) == 0.0  # distance 4 / 7: 3/7 < 0.5
    assert anls(["abcwxyz"], [["abcdefg"]], threshold=0.4) == pytest.approx(3 / 7)


def test_empty_prediction_and_empty_answers():
    assert anls([""], [["abc"]]) == 0.0  # distance 3 / 3
    assert anls(["abc"], [[""]]) == 0.0
    assert anls([""], [[""]]) == 1.0  # both lengths 0: NL is defined as 0
    assert anls([""], [["   "]]) == 1.0  # normalised both are "", distance 0 over raw length 3


def test_best_answer_wins():
    assert anls(["four"], [["4", "four"]]) == 1.0
    # "grey" vs "gray" (1/4 -> 0.75) and vs "silver" (5/6 -> 0): the best is kept
    assert anls(["grey"], [["silver", "gray"]]) == pytest.approx(0.75)


def test_mean_over_questions_and_per_question_scores():
    predictions = ["invoice", "abxy", "no"]
    references = [["Invoice"], ["abcd"], ["yes"]]
    assert anls_per_question(predictions, references) == [1.0, 0.5, 0.0]
    assert anls(predictions, references) == pytest.approx(0.5)


def test_no_questions_scores_zero():
    assert anls([], []) == 0.0
    assert anls_per_question([], []) == []
    assert levenshtein_similarity([], []) == 0.0


@pytest.mark.parametrize("predictions, references, message", [
    (["a", "b"], [["a"]], "2 predictions for 1 questions"),
    (["a"], [[]], "no answers"),
    (["a"], ["a"], "not a list"),  # a bare string would be scored letter by letter
    ([None], [["a"]], "predictions\\[0\\] is a NoneType"),
    (["a"], [["a", 3]], "holds a int"),
])
def test_bad_inputs_raise(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        anls(predictions, references)
    with pytest.raises(ValueError, match=message):
        levenshtein_similarity(predictions, references)


def test_blog_levenshtein_similarity():
    assert levenshtein_similarity(["Invoice."], [["invoice"]]) == 1.0  # lowercase, one trailing "." dropped
    assert levenshtein_similarity(["acme  corp"], [["acme corp"]]) == pytest.approx(1 - 1 / 10)  # no whitespace fix
    assert levenshtein_similarity(["abxy"], [["abcd"]]) == 0.0  # NL = 0.5 is not < 0.5: dropped, unlike ANLS
    assert levenshtein_similarity([""], [[""]]) == 0.0  # an empty prediction always scores 0
    assert levenshtein_similarity(["."], [["."]]) == 1.0  # empty after stripping on both sides: equal
    assert levenshtein_similarity(["grey", "x"], [["silver", "gray"], ["y"]]) == pytest.approx(0.75 / 2)


# ------------------------------------------------------------------------------- the other tasks' metrics
def test_exact_match_and_accuracy():
    # normalized as ANLS is (case, surrounding and repeated spaces); the best answer counts
    assert exact_match(["ACME  corp ", "x", "four"], [["acme corp"], ["y"], ["4", "four"]]) == pytest.approx(2 / 3)
    assert accuracy([" car", "dog", "Car"], ["car", "cat", "car"]) == pytest.approx(1 / 3)  # case matters
    assert exact_match([], []) == accuracy([], []) == 0.0


def test_character_and_word_error_rates_over_the_split():
    # "abd" vs "abc": 1 substitution; "de" vs "de": none -> 1 edit over 5 reference characters
    assert cer(["abd", "de"], ["abc", "de"]) == pytest.approx(1 / 5)
    # one word deleted of five reference words
    assert wer(["a b", "d e"], ["a b c", "d e"]) == pytest.approx(1 / 5)
    assert cer(["Total: $5"], ["Total: $5"]) == 0.0


def test_bleu4_as_coco_caption_evaluation_computes_it():
    # modified n-gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty): their geometric mean
    assert bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-6)
    # every n-gram right but 4 words for a 6-word reference: brevity penalty exp(1 - 6/4)
    assert bleu4(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(-0.5), rel=1e-6)
    # lowercase, punctuation dropped as COCO's PTB tokenization drops it; the closest reference length is used
    assert bleu4(["A B, C. D E!"], [["a b c d e", "x y"]]) == pytest.approx(1.0, rel=1e-6)


def test_cider_d_as_coco_caption_evaluation_computes_it():
    # two images with disjoint words: every n-gram's document frequency is 1, so the TF-IDF vectors of a caption
    # equal to its reference have cosine 1 for n = 1..4, and CIDEr-D = 10 * mean over n
    assert cider(["a cat sits down", "the dog runs off"], [["a cat sits down"], ["the dog runs off"]]) == \
        pytest.approx(10.0)
    # three words have no 4-gram: 10 * 3/4; a caption sharing nothing with its references scores 0
    assert cider(["a cat sits", "blue green red"], [["a cat sits"], ["the dog runs"]]) == pytest.approx(7.5 / 2)


def _box_records(truth, predictions):
    """One query per (ground truth, predictions) pair of [(label, box)] and [(label, box, score)]."""
    return [{"query": i + 1, "width": 200, "height": 200, "file_name": f"{i}.png", "truth": t, "predicted": p}
            for i, (t, p) in enumerate(zip(truth, predictions))]


def _pairs(record):
    return ([{"label": label, "box": box, "crowd": False} for label, box in record["truth"]],
            [{"label": label, "box": box, "score": score} for label, box, score in record["predicted"]])


def box_map(truth, predictions, categories=None):
    found, _ = coco_map(_box_records(truth, predictions), _pairs, "bbox", categories)
    return found


def test_coco_box_map_hand_computed():
    square = [0, 0, 100, 100]
    assert box_map([[("cat", square)]], [[("cat", square, 0.9)]]) == {  # COCO's 101-point AP: 1 - 2e-16
        "map": pytest.approx(1.0), "map50": pytest.approx(1.0), "map75": pytest.approx(1.0), "unmatched_labels": 0}
    # IoU 0.62 (62 of 100 rows): a match at the thresholds .50, .55, .60 of the ten -> mAP 0.3, mAP50 1, mAP75 0
    found = box_map([[("cat", square)]], [[("cat", [0, 0, 100, 62], 0.9)]])
    assert (found["map"], found["map50"], found["map75"]) == (pytest.approx(0.3), pytest.approx(1.0), 0.0)
    # class-aware: the right box with the wrong category matches nothing
    assert box_map([[("cat", square)]], [[("dog", square, 0.9)]], {1: "cat", 2: "dog"})["map"] == 0.0
    # two categories, one found, one missed: the mean over the categories of the ground truth
    assert box_map([[("cat", square), ("dog", [150, 150, 190, 190])]], [[("cat", square, 0.9)]])["map"] == \
        pytest.approx(0.5)
    # a label that is no category cannot match and is counted
    assert box_map([[("cat", square)]], [[("cat", square, 0.9), ("cow", square, 0.8)]])["unmatched_labels"] == 1


def test_coco_box_map_ranks_by_the_scores():
    square, elsewhere = [0, 0, 100, 100], [150, 150, 190, 190]
    # the wrong box first: at recall 1 the precision is 1/2, so AP = 0.5; with the right box first AP = 1
    assert box_map([[("cat", square)]], [[("cat", elsewhere, 0.9), ("cat", square, 0.5)]])["map"] == \
        pytest.approx(0.5)
    assert box_map([[("cat", square)]], [[("cat", elsewhere, 0.5), ("cat", square, 0.9)]])["map"] == \
        pytest.approx(1.0)


def test_coco_box_map_files_reproduce_the_numbers_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    records = _box_records([[("cat", [0, 0, 100, 100]), ("dog", [10, 120, 60, 190])], [("cat", [50, 50, 90, 90])]],
                           [[("cat", [0, 0, 100, 80], 0.8), ("dog", [12, 118, 60, 180], 0.6)],
                            [("cat", [50, 55, 90, 92], 0.7), ("dog", [0, 0, 10, 10], 0.9)]])
    found, files = coco_map(records, _pairs, "bbox", None)
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    truth = COCO(str(tmp_path / "ground_truth.coco.json"))
    evaluation = COCOeval(truth, truth.loadRes(str(tmp_path / "predictions.coco.json")), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert (found["map"], found["map50"], found["map75"]) == tuple(evaluation.stats[:3])
    assert 0 < found["map"] < 1
    assert files["predictions.coco.json"][0] == {"image_id": 1, "category_id": 1, "score": 0.8,
                                                 "bbox": [0, 0, 100, 80], "area": 8000}


def test_coco_mask_map_from_polygons():
    def records(predicted):
        return [{"query": 1, "width": 100, "height": 100, "file_name": "a.png", "truth": [("cat", square)],
                 "predicted": predicted}]

    def pairs(record):
        return ([{"label": label, "polygons": [polygon], "crowd": False} for label, polygon in record["truth"]],
                [{"label": label, "polygons": [polygon], "score": score}
                 for label, polygon, score in record["predicted"]])

    square = [10, 10, 50, 10, 50, 50, 10, 50]
    found, files = coco_map(records([("cat", square, 0.9)]), pairs, "segm", None)
    assert found["map"] == pytest.approx(1.0) and files["predictions.coco.json"][0]["segmentation"]["counts"]
    # the left half of the square: IoU 1/2, a match at the .50 threshold only
    found, _ = coco_map(records([("cat", [10, 10, 30, 10, 30, 50, 10, 50], 0.9)]), pairs, "segm", None)
    assert (found["map"], found["map50"], found["map75"]) == (pytest.approx(0.1), pytest.approx(1.0), 0.0)
