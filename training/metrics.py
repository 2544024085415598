"""Answer metrics for document question answering.

`anls` is the official DocVQA score (the Robust Reading Competition's evaluation script, as shipped for DocVQA and
InfographicsVQA): Average Normalized Levenshtein Similarity, ANLS in papers and leaderboards.
`levenshtein_similarity` is the metric of the Hugging Face blog "Fine-tuning Florence-2" (andimarafioti/
florence2-finetuning, metrics.py), kept only to compare with the blog's numbers; it is not ANLS.

Both score a question 1 - NL against its best reference answer, where NL is the Levenshtein distance divided by the
longer string's length, and give 0 when that similarity is too low. They differ in the details:

| | official ANLS | blog |
|---|---|---|
| normalisation | lowercase, trim, collapse inner whitespace | lowercase, drop one trailing "." |
| NL denominator | raw strings, `len(s.upper())` | normalised strings |
| threshold | kept when 1 - NL >= 0.5 | kept when NL < 0.5 (1 - NL > 0.5) |
| empty prediction | scored normally | 0 |

A list with no questions scores 0.0 under both, as in the official script (it reports 0 for an empty ground truth).
"""

from __future__ import annotations

from collections.abc import Sequence

import Levenshtein

ANLS_THRESHOLD = 0.5


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = ANLS_THRESHOLD) -> float:
    """The official DocVQA ANLS: the mean of `anls_per_question` (0.0 for no questions)."""
    scores = anls_per_question(predictions, references, threshold)
    return sum(scores) / len(scores) if scores else 0.0


def anls_per_question(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      threshold: float = ANLS_THRESHOLD) -> list[float]:
    """One official ANLS score in [0, 1] per question: predictions[i] against every answer of references[i]."""
    _check(predictions, references)
    return [_anls_question(prediction, answers, threshold) for prediction, answers in zip(predictions, references)]


def _anls_question(prediction: str, answers: Sequence[str], threshold: float) -> float:
    normalized_prediction = _normalize(prediction)
    distances = []
    for answer in answers:
        # The official script measures the distance between the normalised strings but divides by the length of the
        # raw ones (untrimmed, upper-cased), so stray whitespace in an answer makes a wrong prediction look closer.
        length = max(len(answer.upper()), len(prediction.upper()))
        distance = Levenshtein.distance(_normalize(answer), normalized_prediction)
        distances.append(0.0 if length == 0 else distance / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score  # a similarity of exactly the threshold is kept


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def levenshtein_similarity(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The blog's "Levenshtein similarity" (andimarafioti/florence2-finetuning metrics.py), for comparison only.

    Per question: both strings lowercased and stripped of one trailing ".", NL = distance / max(len), score 1 - NL if
    NL < 0.5 else 0, best over the answers; an empty prediction scores 0. Two strings that are both empty after the
    stripping count as equal (the original divides by zero there). Mean over questions, 0.0 for no questions.
    """
    _check(predictions, references)
    if not predictions:
        return 0.0
    scores = [0.0 if prediction == "" else max(_blog_similarity(answer, prediction) for answer in answers)
              for prediction, answers in zip(predictions, references)]
    return sum(scores) / len(scores)


def _blog_similarity(answer: str, prediction: str) -> float:
    answer, prediction = answer.lower().removesuffix("."), prediction.lower().removesuffix(".")
    length = max(len(answer), len(prediction))
    distance = Levenshtein.distance(answer, prediction) / length if length else 0.0
    return 1.0 - distance if distance < 0.5 else 0.0


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions: need one per question")
    for i, (prediction, answers) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] is a {type(prediction).__name__}, not a string")
        # A bare string would be iterated character by character and scored against single letters (the bug of the
        # blog's evaluate.py), so each question's answers must be a real list.
        if isinstance(answers, str) or not isinstance(answers, Sequence):
            raise ValueError(f"references[{i}] is a {type(answers).__name__}, not a list of answer strings")
        if len(answers) == 0:
            raise ValueError(f"references[{i}] has no answers: every question needs at least one")
        for answer in answers:
            if not isinstance(answer, str):
                raise ValueError(f"references[{i}] holds a {type(answer).__name__}, not a string: {answer!r}")
