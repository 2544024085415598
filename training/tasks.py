"""Tasks: how a sample becomes training examples (a prompt and a target), and how predictions are scored.

`TASKS` maps each Florence-2 task token to a small object; any other token (<DocVQA>, <VQA>, a prompt of your own)
is question answering (`get_task`). A new task is an instance of one of the families below, or a subclass with its
own `from_annotations`, `predict` and `score`.

Targets write coordinates as the original's processor quantizes them: floor(v / (side / 1000)) clamped to 0..999
(florence2.postprocess.quantize). A box is `label<loc_x1><loc_y1><loc_x2><loc_y2>` (one label per box), a polygon
`<loc_x><loc_y>...` (the polygons of one query separated by `<sep>`), an OCR line `text` and the 8 locations of its
quad clockwise from the top left; a region input is the task token and the box's 4 locations. So
`post_process_generation` of a target gives its coordinates back within one bin. Targets follow the original's own
generations where they show a convention: <REGION_TO_CATEGORY> and <REGION_TO_DESCRIPTION> answers repeat the
region's locations ("car<loc_52><loc_332><loc_932><loc_774>"), and lines of text are joined with "\\n" (as
Microsoft's later checkpoints write <OCR>).

Inputs that annotation formats do not hold are made from what they do hold (the README lists them):
- <CAPTION_TO_PHRASE_GROUNDING>: the caption is the image's phrases (each region's text, else its category), each
  once in order of appearance, joined by ", "; the target grounds each phrase with all of its boxes.
- <OPEN_VOCABULARY_DETECTION>: one query per category present in the image, the category name as the phrase.
- <REFERRING_EXPRESSION_SEGMENTATION>: one query per phrase (region text, else category) with polygons; its target
  holds the polygons of every region with that phrase.
- <REGION_TO_SEGMENTATION>, <REGION_TO_CATEGORY>, <REGION_TO_DESCRIPTION>: one query per region (its box as input).
- <OCR>: the image's text, else its regions' texts joined by "\\n".
A JSONL line brings its own prompt and target: they are used as they are, and the reference is the target parsed by
the task's post-processing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from florence2.postprocess import PARSE_TYPES, post_process_generation, quantize

from . import metrics
from .formats import Sample

_LOC_TOKENS = re.compile(r"<loc_\d+>")


@dataclass(frozen=True)
class Example:
    sample: int  # index of the sample (its image) in the split
    prompt: str  # what the processor reads: the task token and its input
    target: str  # what the model learns to write
    reference: dict  # what a prediction is scored against


def locations(coordinates, size) -> str:
    """`<loc_..>` tokens of flat x, y, ... pixel coordinates of an image of `size` (width, height)."""
    return "".join(f"<loc_{k}>" for k in quantize(coordinates, size))


def quad(region) -> list[float]:
    """An OCR line's 8 coordinates: its 4-point polygon as given, else its box's corners clockwise from top left."""
    if len(region.polygons) == 1 and len(region.polygons[0]) == 8:
        return list(region.polygons[0])
    x1, y1, x2, y2 = region.box
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def phrase(region) -> str:
    return region.text or region.category


class Task:
    token: str
    metrics: tuple[str, ...]  # logged as eval_<name>
    primary: str  # the metric that picks best/
    higher_is_better: bool = True
    extras: tuple[str, ...] = ()  # packages the metrics import (checked when a run starts)
    scored: bool = False  # generate with token scores: the confidence of each box
    per_image: bool = True  # one query per image (COCO results then keep the dataset's image ids)
    requires = "annotated regions"  # what a sample needs to give examples (for the message when none does)
    needs_regions = False  # a split without any annotated region cannot be this task's (every image gives one)
    max_new_tokens = 1024  # defaults of --max-new-tokens and --max-target-tokens (at most the decoder's table)
    max_target_tokens = 1024

    def examples(self, sample: Sample, index: int, training: bool) -> list[Example]:
        """The sample's examples. A JSONL line is one, as it is; a line for another Florence-2 task (a file may mix
        them) trains, but is not evaluated with this task's metric."""
        if sample.prefix is not None:
            if not training and self.token in TASKS and not sample.prefix.startswith(self.token):
                return []
            return [Example(index, sample.prefix, sample.suffix, self.parse_reference(sample))]
        return self.from_annotations(sample, index, training)

    def from_annotations(self, sample: Sample, index: int, training: bool) -> list[Example]:
        raise NotImplementedError

    def parse_reference(self, sample: Sample) -> dict:
        """The reference of a JSONL line, from its target."""
        raise NotImplementedError

    def predict(self, processor, sequence, scores, size) -> object:
        """The parsed prediction of one generated sequence (scores: its token log-probs, when `scored`)."""
        return processor.decode(sequence, skip_special_tokens=True).strip()

    def score(self, records: list[dict], categories: dict[int, str]) -> tuple[dict, dict]:
        """(metrics, files to write) for the evaluation records ({"reference", "prediction", ...} each)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ text answers
class QuestionAnswering(Task):
    """<DocVQA>, <VQA> or any prompt: one example per question, target its first answer, scored with ANLS against
    all answers (overall and per question type), exact match, and the blog's similarity (to compare)."""

    metrics = ("anls", "exact_match", "blog_similarity")
    primary = "anls"
    per_image = False
    requires = "questions with answers"
    max_new_tokens, max_target_tokens = 64, 256  # the blog's recipe

    def __init__(self, token: str, prompt_template: str | None = None):
        self.token = token
        self.prompt_template = prompt_template or token + "{question}"

    def from_annotations(self, sample, index, training):
        return [Example(index, self.prompt_template.format(question=q.question), q.answers[0],
                        {"answers": list(q.answers), "type": q.type}) for q in sample.questions]

    def parse_reference(self, sample):
        return {"answers": [sample.suffix], "type": "all"}

    def score(self, records, categories):
        predictions = [r["prediction"] for r in records]
        answers = [r["reference"]["answers"] for r in records]
        scores = metrics.anls_per_question(predictions, answers)
        for record, score in zip(records, scores):
            record["anls"] = score
        by_type: dict[str, list[float]] = {}
        for record, score in zip(records, scores):
            by_type.setdefault(record["reference"]["type"], []).append(score)
        return {"anls": sum(scores) / len(scores), "exact_match": metrics.exact_match(predictions, answers),
                "blog_similarity": metrics.levenshtein_similarity(predictions, answers),
                "anls_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())}}, {}


class Captioning(Task):
    """<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>: trains on every caption of an image, evaluates once
    per image against all of them with COCO's BLEU-4 and CIDEr (pycocoevalcap)."""

    metrics = ("bleu4", "cider")
    primary = "cider"
    extras = ("pycocoevalcap",)
    requires = "captions"

    def __init__(self, token: str):
        self.token = token

    def from_annotations(self, sample, index, training):
        if not sample.captions:
            return []
        reference = {"answers": list(sample.captions)}
        if training:
            return [Example(index, self.token, caption, reference) for caption in sample.captions]
        return [Example(index, self.token, sample.captions[0], reference)]

    def parse_reference(self, sample):
        return {"answers": [sample.suffix]}

    def score(self, records, categories):
        predictions = [r["prediction"] for r in records]
        references = [r["reference"]["answers"] for r in records]
        return {"bleu4": metrics.bleu4(predictions, references), "cider": metrics.cider(predictions, references)}, {}


class Reading(Task):
    """<OCR>: the image's text; character and word error rates (jiwer)."""

    metrics = ("cer", "wer")
    primary = "cer"
    higher_is_better = False
    extras = ("jiwer",)
    requires = "the image's text, or regions with text"

    def __init__(self, token: str):
        self.token = token

    def from_annotations(self, sample, index, training):
        text = sample.text or "\n".join(r.text for r in sample.regions if r.text)
        return [Example(index, self.token, text, {"answers": [text]})] if text else []

    def parse_reference(self, sample):
        return {"answers": [sample.suffix]}

    def score(self, records, categories):
        truth = [r["reference"]["answers"][0] for r in records]
        predictions = [r["prediction"] for r in records]
        return {"cer": metrics.cer(predictions, truth), "wer": metrics.wer(predictions, truth)}, {}


class RegionToText(Task):
    """<REGION_TO_CATEGORY> (accuracy of the category) and <REGION_TO_DESCRIPTION> (BLEU-4, CIDEr): one query per
    region, the box as input; the target repeats the box as the original's answers do."""

    per_image = False

    def __init__(self, token: str, describe: bool):
        self.token, self.describes = token, describe
        self.metrics, self.primary = (("bleu4", "cider"), "cider") if describe else (("accuracy",), "accuracy")
        self.extras = ("pycocoevalcap",) if describe else ()

    def from_annotations(self, sample, index, training):
        examples = []
        for region in sample.regions:
            if region.crowd:
                continue
            answer, box = phrase(region) if self.describes else region.category, locations(region.box, sample.size)
            examples.append(Example(index, self.token + box, answer + box, {"answers": [answer]}))
        return examples

    def parse_reference(self, sample):
        return {"answers": [_LOC_TOKENS.sub("", sample.suffix).strip()]}

    def score(self, records, categories):
        predictions = [r["prediction"] for r in records]
        references = [r["reference"]["answers"] for r in records]
        if self.describes:
            return {"bleu4": metrics.bleu4(predictions, references),
                    "cider": metrics.cider(predictions, references)}, {}
        return {"accuracy": metrics.accuracy(predictions, [r[0] for r in references])}, {}


# ------------------------------------------------------------------------------------------------ boxes
class BoxTask(Task):
    """Tasks answered with boxes, scored with COCO box mAP (pycocotools), class-aware, each predicted box with the
    original's confidence (exp of the mean log-prob of its location tokens)."""

    metrics = ("map", "map50", "map75")
    primary = "map"
    extras = ("pycocotools",)
    scored = True
    answer_keys = ("bboxes", "labels", "scores")  # where post-processing puts boxes, labels and scores
    query_category = False  # every box predicted for a query is of the query's category (open vocabulary)

    def __init__(self, token: str):
        self.token = token

    def parse_reference(self, sample):
        boxes, labels = self.answer(post_process_generation(sample.suffix, self.token, sample.size)[self.token])[:2]
        return {"boxes": boxes, "labels": labels, "crowd": [False] * len(boxes)}

    def answer(self, parsed: dict) -> tuple[list, list, list]:
        boxes, labels, scores = (parsed.get(k, []) for k in self.answer_keys)
        return boxes, labels, scores or [1.0] * len(boxes)

    def predict(self, processor, sequence, scores, size):
        parsed = processor.post_process_generation(task=self.token, image_size=size, sequence=sequence,
                                                   transition_scores=scores)[self.token]
        boxes, labels, confidences = self.answer(parsed)
        return {"boxes": boxes, "labels": labels, "scores": confidences}

    def truth_and_predictions(self, record) -> tuple[list[dict], list[dict]]:
        reference, prediction = record["reference"], record["prediction"]
        truth = [{"label": label, "box": box, "crowd": crowd}
                 for box, label, crowd in zip(reference["boxes"], reference["labels"], reference["crowd"])]
        query = reference.get("query")
        predicted = [{"label": query if self.query_category else label, "box": box, "score": score}
                     for box, label, score in zip(prediction["boxes"], prediction["labels"], prediction["scores"])]
        return truth, predicted

    def score(self, records, categories):
        return metrics.coco_map(records, self.truth_and_predictions, "bbox", self.category_names(categories))

    def category_names(self, categories: dict[int, str]) -> dict[int, str] | None:
        """The categories of the scoring (the dataset's ids), or None to number the reference labels."""
        return categories or None


class Detection(BoxTask):
    """<OD> (labels are categories), <DENSE_REGION_CAPTION> (a region's text, else its category) and
    <REGION_PROPOSAL> (no labels: scored as one category). One query per image, images without objects included."""

    needs_regions = True

    def __init__(self, token: str, label: str):
        super().__init__(token)
        self.label = label  # "category", "text" or "none"

    def label_of(self, region) -> str:
        return {"category": region.category, "text": phrase(region), "none": ""}[self.label]

    def from_annotations(self, sample, index, training):
        target = "".join(self.label_of(r) + locations(r.box, sample.size) for r in sample.regions if not r.crowd)
        return [Example(index, self.token, target, {
            "boxes": [list(r.box) for r in sample.regions], "labels": [self.label_of(r) for r in sample.regions],
            "crowd": [r.crowd for r in sample.regions]})]

    def category_names(self, categories):
        return categories if self.label == "category" and categories else None


class Grounding(BoxTask):
    """<CAPTION_TO_PHRASE_GROUNDING>: the caption lists the image's phrases; each phrase is grounded by its boxes."""

    def from_annotations(self, sample, index, training):
        regions = [r for r in sample.regions if not r.crowd]
        phrases = list(dict.fromkeys(phrase(r) for r in regions))
        if not phrases:
            return []
        target = "".join(p + "".join(locations(r.box, sample.size) for r in regions if phrase(r) == p)
                         for p in phrases)
        return [Example(index, self.token + ", ".join(phrases), target, {
            "boxes": [list(r.box) for r in regions], "labels": [phrase(r) for r in regions],
            "crowd": [False] * len(regions)})]

    def category_names(self, categories):
        return None


class OpenVocabularyDetection(BoxTask):
    """<OPEN_VOCABULARY_DETECTION>: one query per category in the image; its boxes are the answer."""

    answer_keys = ("bboxes", "bboxes_labels", "bboxes_scores")
    query_category = True
    per_image = False

    def from_annotations(self, sample, index, training):
        examples = []
        for name in dict.fromkeys(r.category for r in sample.regions if not r.crowd):
            regions = [r for r in sample.regions if r.category == name]
            target = name + "".join(locations(r.box, sample.size) for r in regions if not r.crowd)
            examples.append(Example(index, self.token + name, target, {
                "boxes": [list(r.box) for r in regions], "labels": [name] * len(regions),
                "crowd": [r.crowd for r in regions], "query": name}))
        return examples

    def parse_reference(self, sample):
        reference = super().parse_reference(sample)
        query = sample.prefix.replace(self.token, "", 1).strip()
        return {**reference, "labels": [query] * len(reference["boxes"]), "query": query}


# ------------------------------------------------------------------------------------------------ polygons
class Segmentation(Task):
    """<REFERRING_EXPRESSION_SEGMENTATION> (a phrase in) and <REGION_TO_SEGMENTATION> (a box in): polygons out,
    scored with COCO mask mAP (pycocotools), the query's category for every predicted instance."""

    metrics = ("map", "map50", "map75")
    primary = "map"
    extras = ("pycocotools",)
    scored = True
    per_image = False
    requires = "regions with segmentation polygons"

    def __init__(self, token: str, by_region: bool):
        self.token, self.by_region = token, by_region

    def from_annotations(self, sample, index, training):
        regions = [r for r in sample.regions if r.polygons and not r.crowd]
        if self.by_region:
            queries = [(self.token + locations(r.box, sample.size), [r], r.category) for r in regions]
        else:
            queries = [(self.token + p, [r for r in regions if phrase(r) == p],
                        next(r.category for r in regions if phrase(r) == p))
                       for p in dict.fromkeys(phrase(r) for r in regions)]
        examples = []
        for prompt, chosen, category in queries:
            polygons = [list(polygon) for r in chosen for polygon in r.polygons]
            target = "<sep>".join(locations(polygon, sample.size) for polygon in polygons)
            examples.append(Example(index, prompt, target, {"polygons": polygons, "query": category}))
        return examples

    def parse_reference(self, sample):
        parsed = post_process_generation(sample.suffix, self.token, sample.size)[self.token]
        query = sample.prefix.replace(self.token, "", 1).strip() or "object"
        return {"polygons": [p for instance in parsed["polygons"] for p in instance],
                "query": _LOC_TOKENS.sub("", query) or "object"}

    def predict(self, processor, sequence, scores, size):
        parsed = processor.post_process_generation(task=self.token, image_size=size, sequence=sequence,
                                                   transition_scores=scores)[self.token]
        return {"polygons": parsed["polygons"], "scores": parsed.get("scores") or [1.0] * len(parsed["polygons"])}

    def truth_and_predictions(self, record):
        reference, prediction = record["reference"], record["prediction"]
        truth = [{"label": reference["query"], "polygons": reference["polygons"], "crowd": False}]
        predicted = [{"label": reference["query"], "polygons": polygons, "score": score}
                     for polygons, score in zip(prediction["polygons"], prediction["scores"])]
        return truth, predicted

    def score(self, records, categories):
        return metrics.coco_map(records, self.truth_and_predictions, "segm", categories or None)


# ------------------------------------------------------------------------------------------------ OCR with regions
class ReadingWithRegions(BoxTask):
    """<OCR_WITH_REGION>: every text line and its quad. Scored as text (CER, WER of the lines joined by newlines)
    and as boxes (mAP of the quads' extents, one category "text")."""

    metrics = ("cer", "wer", "map", "map50", "map75")
    extras = ("jiwer", "pycocotools")
    answer_keys = ("quad_boxes", "labels", "scores")
    requires = "regions with text (their transcription)"

    def from_annotations(self, sample, index, training):
        lines = [r for r in sample.regions if r.text and not r.crowd]
        if not lines:
            return []
        target = "".join(r.text + locations(quad(r), sample.size) for r in lines)
        return [Example(index, self.token, target, {"quads": [quad(r) for r in lines],
                                                    "texts": [r.text for r in lines]})]

    def parse_reference(self, sample):
        parsed = post_process_generation(sample.suffix, self.token, sample.size)[self.token]
        return {"quads": parsed["quad_boxes"], "texts": parsed["labels"]}

    def truth_and_predictions(self, record):
        reference, prediction = record["reference"], record["prediction"]
        truth = [{"label": "text", "box": _extent(q), "crowd": False} for q in reference["quads"]]
        predicted = [{"label": "text", "box": _extent(q), "score": s}
                     for q, s in zip(prediction["boxes"], prediction["scores"])]
        return truth, predicted

    def score(self, records, categories):
        found, files = metrics.coco_map(records, self.truth_and_predictions, "bbox", {1: "text"})
        truth = ["\n".join(r["reference"]["texts"]) for r in records]
        predicted = ["\n".join(r["prediction"]["labels"]) for r in records]
        return {"cer": metrics.cer(predicted, truth), "wer": metrics.wer(predicted, truth), **found}, files


def _extent(points) -> list[float]:
    return [min(points[0::2]), min(points[1::2]), max(points[0::2]), max(points[1::2])]


TASKS: dict[str, Task] = {task.token: task for task in (
    Detection("<OD>", label="category"),
    Detection("<DENSE_REGION_CAPTION>", label="text"),
    Detection("<REGION_PROPOSAL>", label="none"),
    Grounding("<CAPTION_TO_PHRASE_GROUNDING>"),
    OpenVocabularyDetection("<OPEN_VOCABULARY_DETECTION>"),
    Segmentation("<REFERRING_EXPRESSION_SEGMENTATION>", by_region=False),
    Segmentation("<REGION_TO_SEGMENTATION>", by_region=True),
    RegionToText("<REGION_TO_CATEGORY>", describe=False),
    RegionToText("<REGION_TO_DESCRIPTION>", describe=True),
    Reading("<OCR>"),
    ReadingWithRegions("<OCR_WITH_REGION>"),
    Captioning("<CAPTION>"),
    Captioning("<DETAILED_CAPTION>"),
    Captioning("<MORE_DETAILED_CAPTION>"),
)}


def get_task(token: str, prompt_template: str | None = None) -> Task:
    """The task of `token`; any token that is not one of Florence-2's own tasks is question answering."""
    if token in TASKS:
        return TASKS[token]
    if token in PARSE_TYPES:
        raise ValueError(f"{token} is a Florence-2 task this trainer does not fine-tune (yet); it fine-tunes "
                         f"{', '.join(TASKS)} and question answering (<DocVQA>, <VQA>, any prompt)")
    return QuestionAnswering(token, prompt_template)
