"""ANLS as the official DocVQA script computes it, and the blog's Levenshtein similarity; values worked out by hand."""

import pytest

from training.metrics import anls, anls_per_question, levenshtein_similarity


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
