"""The metrics of every task, from the field's libraries where one exists.

- question answering: `anls` (the official DocVQA script's ANLS, written out below: no library ships it),
  `exact_match`, and `levenshtein_similarity` (the blog's, to compare);
- captions: `bleu4` and `cider`, COCO caption evaluation's BLEU-4 and CIDEr-D (pycocoevalcap);
- OCR: `cer` and `wer` (jiwer), over the whole split (edits over reference characters or words);
- region to category: `accuracy`;
- boxes and masks: `coco_map`, COCO's mAP@[.5:.95], mAP50 and mAP75 (pycocotools), from the ground truth and the
  predictions in COCO's own file formats, which evaluation also writes.

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

import contextlib
import copy
import io
import math
import re
from collections.abc import Callable, Sequence

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


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of questions whose prediction equals one of its answers, both normalized as ANLS does (lowercase,
    trimmed, inner whitespace collapsed). 0.0 for no questions."""
    _check(predictions, references)
    hits = [_normalize(p) in {_normalize(a) for a in answers} for p, answers in zip(predictions, references)]
    return sum(hits) / len(hits) if hits else 0.0


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming (region-to-category: the category name)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [p.strip() == r.strip() for p, r in zip(predictions, references)]
    return sum(hits) / len(hits) if hits else 0.0


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate over the whole split (jiwer): character edits / reference characters."""
    import jiwer

    return float(jiwer.cer(list(references), list(predictions))) if references else 0.0


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate over the whole split (jiwer): word edits / reference words."""
    import jiwer

    return float(jiwer.wer(list(references), list(predictions))) if references else 0.0


# COCO caption evaluation tokenizes with Stanford's PTBTokenizer (Java) and drops these punctuation tokens; here the
# text is lowercased and split into words and punctuation in Python, then the same tokens are dropped.
_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"})
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def caption_tokens(text: str) -> str:
    return " ".join(t for t in _TOKEN.findall(text.lower()) if t not in _PUNCTUATION)


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of COCO caption evaluation (pycocoevalcap: closest reference length, its smoothing)."""
    from pycocoevalcap.bleu.bleu import Bleu

    if not predictions:
        return 0.0
    score, _ = Bleu(4).compute_score(*_caption_inputs(predictions, references), verbose=0)
    return float(score[3])


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D of COCO caption evaluation (pycocoevalcap): n-gram TF-IDF similarity to the references, document
    frequencies from the split's own references (so it needs several images), times 10."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return 0.0
    score, _ = Cider().compute_score(*_caption_inputs(predictions, references))
    return float(score)


def _caption_inputs(predictions, references) -> tuple[dict, dict]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} images")
    truth = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    return truth, {i: [caption_tokens(p)] for i, p in enumerate(predictions)}


# ---------------------------------------------------------------------------------------------- COCO mAP
def coco_map(records: list[dict], truth_and_predictions: Callable, iou_type: str,
             categories: dict[int, str] | None) -> tuple[dict, dict]:
    """COCO mAP@[.5:.95], mAP50 and mAP75 with pycocotools, and the two files it is computed from.

    `records` are the evaluated queries ({"query": id, "width", "height", "file_name", ...}); for each,
    `truth_and_predictions(record)` gives its ground truth [{"label", "box" | "polygons", "crowd"}] and its
    predictions [{"label", "box" | "polygons", "score"}], boxes as [x1, y1, x2, y2] in pixels. Categories are
    `categories` (id -> name, the dataset's numbering) or, when None, the ground truth's labels numbered from 1.
    Predicted labels that are no category cannot match anything and are left out (counted as "unmatched_labels").
    Returns ({"map", "map50", "map75", "unmatched_labels"}, {"ground_truth.coco.json": ..., "predictions.coco.json":
    ...}). Without any prediction the mAPs are 0 (pycocotools cannot load an empty result list).
    """
    pairs = [(record, *truth_and_predictions(record)) for record in records]
    if categories is None:
        names = sorted({t["label"] for _, truth, _ in pairs for t in truth})
        categories = {i + 1: name for i, name in enumerate(names)}
    ids = {}
    for category_id, name in categories.items():
        ids.setdefault(name, category_id)
    images, annotations, results, unmatched = [], [], [], 0
    for record, truth, predicted in pairs:
        size = (record["height"], record["width"])
        images.append({"id": record["query"], "width": record["width"], "height": record["height"],
                       "file_name": record["file_name"]})
        for item in truth:
            if item["label"] not in ids:
                continue
            geometry = _geometry(item, size, iou_type, for_truth=True)
            if geometry is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": record["query"],
                                    "category_id": ids[item["label"]], "iscrowd": int(item["crowd"]), **geometry})
        for item in predicted:
            if item["label"] not in ids:
                unmatched += 1
                continue
            geometry = _geometry(item, size, iou_type, for_truth=False)
            if geometry is None:
                continue
            score = float(item["score"])
            results.append({"image_id": record["query"], "category_id": ids[item["label"]],
                            "score": score if math.isfinite(score) else 0.0, **geometry})
    truth_file = {"images": images, "annotations": annotations,
                  "categories": [{"id": i, "name": n} for i, n in categories.items()]}
    found = {"map": 0.0, "map50": 0.0, "map75": 0.0}
    if results:
        found = coco_eval(truth_file, results, iou_type)
    return {**found, "unmatched_labels": unmatched}, {"ground_truth.coco.json": truth_file,
                                                      "predictions.coco.json": results}


def coco_eval(truth: dict, results: list, iou_type: str) -> dict:
    """pycocotools' COCOeval of `results` against `truth` (dicts as in the files), without its printing. (Copies:
    pycocotools adds fields to the dicts it is given.)"""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = copy.deepcopy(truth)
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(copy.deepcopy(results)), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": float(evaluation.stats[0]), "map50": float(evaluation.stats[1]),
            "map75": float(evaluation.stats[2])}


def _geometry(item: dict, size: tuple[int, int], iou_type: str, for_truth: bool) -> dict | None:
    """COCO's bbox (x, y, width, height) and area; for masks also the segmentation (polygons for the ground truth,
    RLE for results, as COCO's formats have them)."""
    if iou_type == "bbox":
        x1, y1, x2, y2 = item["box"]
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)  # a box written x2 < x1 is the same box
        return {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
    from pycocotools import mask

    polygons = [list(map(float, p)) for p in item["polygons"] if len(p) >= 6]  # at least three points
    if not polygons:
        return None
    height, width = size
    rle = mask.merge(mask.frPyObjects(polygons, height, width))
    box = [float(v) for v in mask.toBbox(rle)]
    area = float(mask.area(rle))
    if for_truth:
        return {"segmentation": polygons, "bbox": box, "area": area}
    return {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, "bbox": box,
            "area": area}
