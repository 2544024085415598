"""Generated text -> the task's answer: plain text, boxes, OCR quads or polygons, as Microsoft's Florence-2 gives them.

Reproduces `Florence2Processor.post_process_generation` and `Florence2PostProcesser` of the original
processing_florence2.py, value for value:

    "</s><s>car<loc_331><loc_970><loc_154><loc_404></s>", "<OD>", (640, 480)
      -> {"<OD>": {"bboxes": [[212.1599884033203, 465.8399963378906, 98.87999725341797, 194.1599884033203]],
                   "labels": ["car"]}}

Notable details, all the original's:
- A location token <loc_k> (k in 0..999) is the centre of bin k of the image side: (k + 0.5) * side / 1000, computed
  in float32 by torch (hence 212.1599884033203, not 212.16). Boxes are [x1, y1, x2, y2] in pixels, never reordered:
  the model may emit x2 < x1 and the answer keeps it.
- `image_size` is (width, height), although the original's docstring says otherwise.
- Pure-text answers lose `<s>` and `</s>` only: `<pad>` and loc tokens stay (<REGION_TO_CATEGORY> -> "car<loc_..>").
- Labels of boxes drop non-ASCII characters ("Café" -> "Caf"); phrase grounding skips pronouns and "the image".

Where the original answers malformed text with a malformed result, this module answers differently, always in the
task's usual shape:
- OCR labels lose `<s>` and `</s>`. The original removes only `<s>`, so its first label keeps the `</s>` every
  generation starts with ("</s>CUDA"), a known bug of the original (its own JavaScript port notes it).
- A phrase that starts inside a token (text "<loc_5><loc_6><loc_7><loc_8><loc_9>" leaves the fragment "loc_5>" in
  front of four loc tokens) loses the fragment: label "" instead of the original's "loc_5>"; the box is the same.
  Box labels lose a leading "loc_N>" as the original's polygon labels do.
- A polygon that has no complete point is dropped (the original keeps an empty list); polygon labels lose stray
  <sep>/<poly>/</poly> tokens.
- A loc index past 999 (not a token of the vocabulary, so only in hand-written text) counts as 999, so every
  coordinate lies inside the image; the original would extrapolate, or overflow int64 for absurd indices.
Nothing here raises on odd text; only a bad `image_size` (a caller's bug) raises ValueError, or a missing one for a
task with coordinates (pure-text tasks need none, as in the original).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import torch

# Task token -> the prompt the model was trained with. Order and wording are the original's.
TASKS_WITHOUT_INPUT = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
# `{input}` is the text after the task token, not stripped: "<OPEN_VOCABULARY_DETECTION>a car" -> "Locate a car ...".
TASKS_WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}
# Task token -> how its answer is parsed. Any other task (<DocVQA>, <VQA>, free text) is "pure_text".
PARSE_TYPES = {
    "<OCR>": "pure_text",
    "<OCR_WITH_REGION>": "ocr",
    "<CAPTION>": "pure_text",
    "<DETAILED_CAPTION>": "pure_text",
    "<MORE_DETAILED_CAPTION>": "pure_text",
    "<OD>": "description_with_bboxes",
    "<DENSE_REGION_CAPTION>": "description_with_bboxes",
    "<CAPTION_TO_PHRASE_GROUNDING>": "phrase_grounding",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "polygons",
    "<REGION_TO_SEGMENTATION>": "polygons",
    "<OPEN_VOCABULARY_DETECTION>": "description_with_bboxes_or_polygons",
    "<REGION_TO_CATEGORY>": "pure_text",
    "<REGION_TO_DESCRIPTION>": "pure_text",
    "<REGION_TO_OCR>": "pure_text",
    "<REGION_PROPOSAL>": "bboxes",
}
TASKS = tuple(PARSE_TYPES)  # every task token the model was trained on
# The category of regions without a label (<REGION_PROPOSAL>, segmentations) where one is needed: COCO files, SAHI.
UNLABELLED = "region"

NUM_BINS = 1000  # <loc_0> .. <loc_999> along each side

# Phrases the grounding answer never reports (the original's list, duplicates removed).
PHRASE_GROUNDING_BLACKLIST = frozenset({
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers",
    "they", "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its",
    "myself", "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves",
    "this", "that", "these", "those", "who", "whom", "whose", "which", "what",
    "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody", "everyone", "everything",
    "few", "many", "nobody", "none", "several", "some", "somebody", "someone", "something",
    "each other", "one another", "the image", "image", "images", "the", "a", "an", "a group",
    "other objects", "lots", "a set",
})

_LOC = re.compile(r"<loc_(\d+)>")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_PHRASE_WITH_BOXES = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_BARE_BOXES = re.compile(r"(?:(?:<loc_\d+>){4,})")
_POLY_TOKEN = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
_PHRASE_WITH_POLYGONS = re.compile(rf"([^<]+{_POLY_TOKEN}{{4,}})")
_BARE_POLYGONS = re.compile(rf"(?:{_POLY_TOKEN}{{4,}})")
_POLYGON_INSTANCE = re.compile(r"<poly>(.*?)</poly>")
_POLYGON = re.compile(r"((?:<loc_\d+>)+)(?:<sep>|$)")
OCR_LINE_PATTERN = r"(.+?)" + r"<loc_(\d+)>" * 8  # a text line and the 8 loc tokens of its quad
_OCR_LINE = re.compile(OCR_LINE_PATTERN)
# A label is what precedes the first location token (the other tokens are from older Florence vocabularies).
_BOX_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_POLYGON_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_TOKEN_TAIL = re.compile(r"^[\w/]+>")
_LOC_TAILS = re.compile(r"^\s*(?:loc_\d+>)+")
_POLYGON_MARKUP = re.compile(r"<sep>|</?poly>")


def parse_type(task: str) -> str:
    """How the answer of `task` is parsed: "pure_text", "ocr", "description_with_bboxes", "bboxes",
    "phrase_grounding", "polygons" or "description_with_bboxes_or_polygons"."""
    return PARSE_TYPES.get(task, "pure_text")


def post_process_generation(text: str | None, task: str, image_size: Sequence[float] | None = None, *,
                            token_spans: Sequence[tuple[int, int]] | None = None,
                            token_scores: Sequence[float] | None = None) -> dict:
    """{task: answer} for the generated `text` (decoded with special tokens) of an image of `image_size`
    (width, height) in pixels, which tasks with coordinates need and pure-text tasks do without.

    Answers by parse type:
        pure_text: str
        ocr: {"quad_boxes": [[x1, y1, x2, y2, x3, y3, x4, y4], ...], "labels": [str, ...]}
        description_with_bboxes, bboxes, phrase_grounding: {"bboxes": [[x1, y1, x2, y2], ...], "labels": [...]}
        polygons: {"polygons": [[[x1, y1, x2, y2, ...], ...] per instance], "labels": [...]}
        description_with_bboxes_or_polygons: {"bboxes", "bboxes_labels", "polygons", "polygons_labels"}
    With `token_spans` ([start, end) of each generated token in `text`) and `token_scores` (its log-probability),
    every answer with coordinates also gets the original's confidence of each item: exp(mean log-prob of its loc
    tokens), as "scores" (one per box, OCR quad or polygon instance; "bboxes_scores" and "polygons_scores" for
    description_with_bboxes_or_polygons). The original computes it for <OD> and <DENSE_REGION_CAPTION> only; the
    other tasks get the same rule over their own loc tokens (their box mAP needs it).
    `text` None counts as "" (an empty answer).
    """
    if not isinstance(task, str):
        raise ValueError(f"task must be a task token such as '<OD>', got {task!r}")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise TypeError(f"text must be the decoded generation (str), got {type(text).__name__}")
    kind = parse_type(task)
    if kind == "pure_text":
        if image_size is not None:
            _check_image_size(image_size)
        return {task: text.replace("<s>", "").replace("</s>", "")}
    _check_image_size(image_size)
    scored = token_spans is not None and token_scores is not None
    if kind == "ocr":
        # the original removes only <s>, which leaves the generation's leading </s> in the first label: both go here
        clean, where = _strip_sequence_markers(text, ("<s>", "</s>"))
        found = _parse_ocr(clean, image_size, _Scorer(where, token_spans, token_scores) if scored else None)
        answer = {"quad_boxes": [quad for _, quad, _ in found], "labels": [label for label, _, _ in found]}
        return {task: _with_scores(answer, "scores", found, scored)}

    clean, where = _strip_sequence_markers(text, ("<s>", "</s>", "<pad>"))
    score = _Scorer(where, token_spans, token_scores) if scored else None
    if kind in ("description_with_bboxes", "bboxes", "phrase_grounding"):
        found = _parse_boxes(clean, image_size, phrase_required=kind != "bboxes",
                             blacklist=PHRASE_GROUNDING_BLACKLIST if kind == "phrase_grounding" else frozenset(),
                             score=score)
        answer = {"bboxes": [box for _, box, _ in found], "labels": [label for label, _, _ in found]}
        return {task: _with_scores(answer, "scores", found, scored)}
    if kind == "polygons":
        found = _parse_polygons(clean, image_size, phrase_required=False, score=score)
        answer = {"polygons": [polygons for _, polygons, _ in found], "labels": [label for label, _, _ in found]}
        return {task: _with_scores(answer, "scores", found, scored)}
    # description_with_bboxes_or_polygons: one or the other, decided by whether the answer has a polygon at all
    answer = {"bboxes": [], "bboxes_labels": [], "polygons": [], "polygons_labels": []}
    if "<poly>" in text:
        found = _parse_polygons(clean, image_size, phrase_required=True, score=score)
        answer.update(polygons=[polygons for _, polygons, _ in found], polygons_labels=[label for label, _, _ in found])
        return {task: _with_scores(answer, "polygons_scores", found, scored)}
    found = _parse_boxes(clean, image_size, phrase_required=True, score=score)
    answer.update(bboxes=[box for _, box, _ in found], bboxes_labels=[label for label, _, _ in found])
    return {task: _with_scores(answer, "bboxes_scores", found, scored)}


def _with_scores(answer: dict, key: str, found: list, scored: bool) -> dict:
    if scored:
        answer[key] = [item_score for _, _, item_score in found]
    return answer


# ----------------------------------------------------------------------------------------- quantization
def dequantize(bins: Sequence[int], image_size: Sequence[float]) -> list[float]:
    """Pixel coordinates of flat (x, y, x, y, ...) bin indices: (k + 0.5) * side / 1000, in float32 as the original.

    Works for boxes [x1, y1, x2, y2], OCR quads and polygons alike (x bins scale with the width, y with the height).
    """
    _check_image_size(image_size)
    width, height = (float(v) for v in image_size)  # a numpy scalar would make torch compute in float64
    k = torch.tensor([min(max(int(b), 0), NUM_BINS - 1) for b in bins], dtype=torch.float32).reshape(-1, 2)
    # the original's operations: (k + 0.5) in float32 (exact), times the Python float side / bins in float32
    x = (k[:, 0] + 0.5) * (width / NUM_BINS)
    y = (k[:, 1] + 0.5) * (height / NUM_BINS)
    return torch.stack((x, y), dim=1).reshape(-1).tolist()


def quantize(coordinates: Sequence[float], image_size: Sequence[float]) -> list[int]:
    """Bin indices of flat (x, y, x, y, ...) pixel coordinates: floor(v / (side / 1000)) clamped to 0..999, the
    original's BoxQuantizer; `"".join(f"<loc_{k}>" for k in quantize(box, size))` is the region of a prompt."""
    _check_image_size(image_size)
    width, height = (float(v) for v in image_size)
    v = torch.tensor([float(c) for c in coordinates], dtype=torch.float32).reshape(-1, 2)
    x = (v[:, 0] / (width / NUM_BINS)).floor().clamp(0, NUM_BINS - 1)
    y = (v[:, 1] / (height / NUM_BINS)).floor().clamp(0, NUM_BINS - 1)
    return torch.stack((x, y), dim=1).reshape(-1).int().tolist()


# ----------------------------------------------------------------------------------------- parsers
def _parse_ocr(text: str, image_size, score=None) -> list[tuple[str, list[float], float | None]]:
    """(label, quad, score) of every text line followed by eight loc tokens."""
    lines = list(_OCR_LINE.finditer(text))
    coords = dequantize([int(k) for line in lines for k in line.groups()[1:]], image_size)
    return [(line.group(1), coords[8 * i:8 * i + 8], score((line.end(1), line.end())) if score else None)
            for i, line in enumerate(lines)]


def _parse_boxes(text: str, image_size, *, phrase_required: bool, blacklist: frozenset = frozenset(),
                 score=None) -> list[tuple[str, list[float], float | None]]:
    """(label, box, score) of every group of four loc tokens; a phrase followed by several groups labels each."""
    found = []
    for phrase in (_PHRASE_WITH_BOXES if phrase_required else _BARE_BOXES).finditer(text):
        label = _BOX_LABEL.search(_phrase_text(text, phrase))
        boxes = list(_BOX.finditer(phrase.group()))
        if label is None or not boxes:  # no label: the phrase spans a line break
            continue
        label = label.group().strip()
        if label in blacklist:
            continue
        label = label.encode("ascii", errors="ignore").decode("ascii")
        coords = dequantize([int(k) for box in boxes for k in box.groups()], image_size)
        for i, box in enumerate(boxes):
            box_score = score((phrase.start() + box.start(), phrase.start() + box.end())) if score else None
            found.append((label, coords[4 * i:4 * i + 4], box_score))
    return found


def _parse_polygons(text: str, image_size, *, phrase_required: bool,
                    score=None) -> list[tuple[str, list[list[float]], float | None]]:
    """(label, polygons, score) per instance. Instances are <poly>...</poly> when the answer has them, polygons
    within one are separated by <sep>, and an unpaired last coordinate is dropped. The score is over the loc tokens
    of the instance's polygons."""
    found = []
    for phrase in (_PHRASE_WITH_POLYGONS if phrase_required else _BARE_POLYGONS).finditer(text):
        phrase_text = phrase.group()
        label = _POLYGON_LABEL.search(_phrase_text(text, phrase))
        if label is None:
            continue
        label = _POLYGON_MARKUP.sub("", label.group()).strip()
        if "<poly>" in phrase_text and "</poly>" in phrase_text:
            instances = [(m.group(1), phrase.start() + m.start(1)) for m in _POLYGON_INSTANCE.finditer(phrase_text)]
        else:
            instances = [(phrase_text, phrase.start())]
        for instance, offset in instances:
            polygons, spans = [], []
            for polygon in _POLYGON.finditer(instance):
                bins = [int(k) for k in _LOC.findall(polygon.group(1))]
                bins = bins[:len(bins) - len(bins) % 2]
                if bins:
                    polygons.append(dequantize(bins, image_size))
                    spans.append((offset + polygon.start(1), offset + polygon.end(1)))
            if polygons:
                found.append((label, polygons, score(*spans) if score else None))
    return found


def _phrase_text(text: str, phrase: re.Match) -> str:
    """The phrase without the tail of a token it starts in: the phrase pattern skips a '<' it cannot use, so after
    "<loc_5>" or "<sep>" a phrase may start with "loc_5>" or "sep>". (The original strips "loc_N>" in its polygon
    parser only.)"""
    phrase_text = phrase.group()
    if phrase.start() > 0 and text[phrase.start() - 1] == "<":
        phrase_text = _TOKEN_TAIL.sub("", phrase_text, count=1)
    return _LOC_TAILS.sub("", phrase_text, count=1)


# ----------------------------------------------------------------------------------------- scores
def _strip_sequence_markers(text: str, markers: tuple[str, ...]) -> tuple[str, list[int]]:
    """`text` without the markers (removed one kind after the other, as the original's str.replace calls), and for
    each remaining character its position in `text`, so spans of generated tokens stay usable."""
    where = list(range(len(text)))
    for marker in markers:
        parts = text.split(marker)
        kept, start = [], 0
        for part in parts:
            kept.extend(where[start:start + len(part)])
            start += len(part) + len(marker)
        text, where = "".join(parts), kept
    return text, where


class _Scorer:
    """Score of the item whose loc tokens span the [start, end) ranges of the cleaned text: exp of the mean log-prob
    of the generated tokens overlapping them (the original's "avg_loc_scores" of a box)."""

    def __init__(self, where: list[int], spans: Sequence[tuple[int, int]], scores: Sequence[float]):
        self.where, self.spans, self.scores = where, list(spans), [float(s) for s in scores]

    def __call__(self, *ranges: tuple[int, int]) -> float:
        bounds = [(self.where[start], self.where[end - 1] + 1) for start, end in ranges]
        picked = [s for (a, b), s in zip(self.spans, self.scores)
                  if any(not (b <= first or a >= last) for first, last in bounds)]
        return math.exp(sum(picked) / len(picked)) if picked else math.nan


def _check_image_size(image_size) -> None:
    ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in image_size)
    if not ok:
        raise ValueError(f"image_size must be (width, height) in pixels, two positive numbers; got {image_size!r}")
