"""Florence-2 in SAHI (Slicing Aided Hyper Inference): a `DetectionModel`, and the sliced answers of the command lines.

    from sahi.predict import get_sliced_prediction
    from florence2.sahi import Florence2DetectionModel

    detector = Florence2DetectionModel(model_path="microsoft/Florence-2-base-ft", task="<OD>")
    result = get_sliced_prediction("scan.png", detector, slice_height=768, slice_width=768, batch_size=8)
    for p in result.object_prediction_list:
        print(p.category.name, p.score.value, p.bbox.to_xyxy())

`Florence2DetectionModel` runs one of Florence-2's region tasks (<OD>, <DENSE_REGION_CAPTION>, <REGION_PROPOSAL>,
<OPEN_VOCABULARY_DETECTION> and <CAPTION_TO_PHRASE_GROUNDING> with their `text`, <REFERRING_EXPRESSION_SEGMENTATION>)
as SAHI's own integrations run their detectors:
- each box is what `Florence2.predict` gives for the image (or slice), with the package's score: exp of the mean
  log-probability of the box's location tokens (the original's <OD> score, here for every task); boxes scoring
  below `confidence_threshold` are left out (0 keeps every box; SAHI's default is 0.3);
- its label is its category: ids from `category_mapping` ({"0": "car", ...}, SAHI's form) when given, a new label
  taking the next free id, and otherwise numbered from 0 in the order the labels are first seen; the ids of one
  model instance never change. Boxes without a label (<REGION_PROPOSAL>) are the category "region";
- polygons (<REFERRING_EXPRESSION_SEGMENTATION>, <OPEN_VOCABULARY_DETECTION> when it answers with them) are masks
  (`has_mask`), their box the polygons' extent;
- the slices SAHI hands over in one call (`batch_size` of `get_sliced_prediction`) are one batched generate.
Boxes the model writes right to left (x2 < x1) are the same box; boxes of zero width or height are dropped, as SAHI's
own models drop them.

`sliced_answer` is the command lines' path (`python -m florence2 IMAGE --slice 768`, `python -m florence2 predict
--slice 768`): the task's usual answer for a page read in slices, boxes merged by SAHI (GREEDYNMM over the
intersection over the smaller box, as SAHI does by default, with the whole page also read unless --slice-only), and
OCR lines merged by florence2.slicing.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

try:
    from sahi.models.base import DetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.prediction import ObjectPrediction
    from sahi.slicing import get_slice_bboxes
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list
except ImportError:
    raise ImportError('sliced prediction needs the sahi package: pip install -e ".[sahi]"') from None

from . import slicing
from .postprocess import TASKS_WITH_INPUT, UNLABELLED, parse_type
from .predict import default_processor, generate_answers, predict

MASK_PARSE_TYPES = ("polygons", "description_with_bboxes_or_polygons")  # answers that may be polygons
UNLABELLED_PARSE_TYPES = ("bboxes", "polygons")  # answers whose regions have no label in the original
SLICE_BATCH_SIZE = 8  # slices per generate call of the single-image command line
# The merge of the command lines: SAHI's defaults (get_sliced_prediction's), kept whatever the threshold (SAHI
# switches to NMS below a confidence of 0.1, and the command lines keep every box, as unsliced prediction does).
MERGE = {"postprocess_type": "GREEDYNMM", "postprocess_match_metric": "IOS", "postprocess_match_threshold": 0.5,
         "force_postprocess_type": True}


class Florence2DetectionModel(DetectionModel):
    """A Florence-2 checkpoint running a region task, for `sahi.predict.get_prediction` and
    `get_sliced_prediction` (see the module's docstring).

    Arguments:
        model_path: hub id or local checkpoint folder (`Florence2.from_pretrained`); or give `model`.
        task, text: the task token and its input (the phrase of <CAPTION_TO_PHRASE_GROUNDING>, the category of
            <OPEN_VOCABULARY_DETECTION>, ...).
        model, processor: an already loaded `Florence2` (and its processor; default: the checkpoint's).
        device: "cpu", "cuda", ... (SAHI's choice when None: cuda, mps, cpu).
        confidence_threshold: boxes scoring below it are left out.
        category_mapping: {"id": "name"} of the categories the labels are counted in.
        category_remapping: SAHI's remapping of ids after inference.
        image_size: read images at this size, an int or (height, width) (default: the checkpoint's).
        revision, dtype: of the checkpoint, as in `Florence2.from_pretrained`.
        **generate_options: num_beams, max_new_tokens, ... as in `Florence2.predict`.
    """

    def __init__(self, model_path: str | None = None, task: str = "<OD>", text: str | None = None, *,
                 model=None, processor=None, device: str | None = None, confidence_threshold: float = 0.3,
                 category_mapping: dict | None = None, category_remapping: dict | None = None,
                 load_at_init: bool = True, image_size: int | tuple[int, int] | None = None,
                 revision: str | None = None, dtype: str | torch.dtype | None = None, **generate_options):
        refusal = slicing.slice_refusal(task)
        if refusal is not None or task in slicing.OCR_TASKS:
            raise ValueError(f"Florence2DetectionModel runs a task that finds regions, not {task}")
        if task in TASKS_WITH_INPUT and not text:
            raise ValueError(f"task {task} needs its text (text=...)")
        if task not in TASKS_WITH_INPUT and text is not None:
            raise ValueError(f"task {task} takes no text")
        if model is None and model_path is None:
            raise ValueError("give model_path (a checkpoint) or model (a loaded Florence2)")
        self.task, self.text, self.generate_options = task, text, generate_options
        self.revision, self.dtype, self._processor = revision, dtype, processor
        self._category_ids: dict[str, int] = {}
        if category_mapping:
            self._category_ids = {str(name): int(i) for i, name in category_mapping.items()}
            category_mapping = {str(i): name for name, i in self._category_ids.items()}
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        super().__init__(model_path=model_path, model=model, device=device, confidence_threshold=confidence_threshold,
                         category_mapping=category_mapping or {}, category_remapping=category_remapping,
                         load_at_init=load_at_init, image_size=image_size)

    # ------------------------------------------------------------------------------------- SAHI's contract
    def load_model(self) -> None:
        from .model import Florence2

        self.set_model(Florence2.from_pretrained(self.model_path, revision=self.revision, dtype=self.dtype,
                                                 device=self.device))

    def set_model(self, model, processor=None, **kwargs) -> None:
        from .image_size import processor_at

        self.model = model.to(self.device).eval()
        processor = processor or self._processor or default_processor(model)
        self.processor = processor if self.image_size is None else processor_at(model, processor, self.image_size)

    @property
    def num_categories(self) -> int:
        return len(self.category_mapping)

    @property
    def has_mask(self) -> bool:
        return parse_type(self.task) in MASK_PARSE_TYPES

    def perform_inference(self, image: np.ndarray | list[np.ndarray]) -> None:
        """Answer the task on one image (H, W, C RGB) or a list of them, in one generate call; the answers are
        `original_predictions`."""
        if self.model is None:
            raise RuntimeError("the model is not loaded: call load_model()")
        images = image if isinstance(image, list) else [image]
        pictures = [Image.fromarray(np.ascontiguousarray(im)).convert("RGB") for im in images]
        prompt = self.task + (self.text or "")
        inputs = self.processor(text=[prompt] * len(pictures), images=pictures)
        self._original_predictions = generate_answers(
            self.model, self.processor, inputs, [self.task] * len(pictures), [p.size for p in pictures],
            all_scores=True, **self.generate_options)
        self._original_shapes = [im.shape for im in images]

    def perform_batch_inference(self, images: list[np.ndarray]) -> None:
        self.perform_inference(list(images))

    def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],  # noqa: B006
                                                                 full_shape_list=None) -> None:
        """Each answer's regions as ObjectPredictions, placed by its shift (x, y) in an image of its full shape
        (height, width), the image's own when not given."""
        shifts = fix_shift_amount_list(shift_amount_list)
        full_shapes = fix_full_shape_list(full_shape_list)
        per_image = []
        for k, answer in enumerate(self._original_predictions):
            shift = [int(v) for v in shifts[k]]
            full_shape = [int(v) for v in full_shapes[k]] if full_shapes else list(self._original_shapes[k][:2])
            per_image.append([self._prediction(label, box, polygons, score, shift, full_shape)
                              for label, box, polygons, score in regions(answer[self.task], parse_type(self.task))
                              if score >= self.confidence_threshold])  # a nan score (no token) is never kept
        self._object_prediction_list_per_image = per_image

    # ------------------------------------------------------------------------------------------- categories
    def category_id(self, label: str) -> int:
        """The id of a label's category: from `category_mapping`, else the next free id (kept from then on)."""
        if label not in self._category_ids:
            self._category_ids[label] = max(self._category_ids.values(), default=-1) + 1
            self.category_mapping[str(self._category_ids[label])] = label
        return self._category_ids[label]

    def _prediction(self, label, box, polygons, score, shift, full_shape) -> ObjectPrediction:
        name = label or UNLABELLED
        return ObjectPrediction(bbox=box, segmentation=polygons, category_id=self.category_id(name),
                                category_name=name, score=score, shift_amount=shift, full_shape=full_shape)


def regions(answer: dict, kind: str) -> list[tuple[str, list[float] | None, list[list[float]] | None, float]]:
    """(label, box [x1, y1, x2, y2] with x1 < x2 and y1 < y2, polygons, score) of each region of a scored answer;
    boxes of no area and polygons of fewer than three points are left out."""
    found = []
    prefix = "bboxes_" if kind == "description_with_bboxes_or_polygons" else ""
    for box, label, score in zip(answer.get("bboxes", []), answer.get(prefix + "labels", answer.get("labels", [])),
                                 answer.get(prefix + "scores", answer.get("scores", []))):
        x1, x2, y1, y2 = min(box[0], box[2]), max(box[0], box[2]), min(box[1], box[3]), max(box[1], box[3])
        if x1 < x2 and y1 < y2:
            found.append((label, [x1, y1, x2, y2], None, score))
    prefix = "polygons_" if kind == "description_with_bboxes_or_polygons" else ""
    for instance, label, score in zip(answer.get("polygons", []),
                                      answer.get(prefix + "labels", answer.get("labels", [])),
                                      answer.get(prefix + "scores", answer.get("scores", []))):
        polygons = [p for p in instance if len(p) >= 6 and slicing.polygon_area(p) > 0]
        if polygons:
            found.append((label, None, polygons, score))
    return found


# ------------------------------------------------------------------------------------- the command lines' path
def sliced_answer(model, image: Image.Image, task: str, text: str | None, slice_size: tuple[int, int],
                  overlap: float, *, whole_page: bool = True, processor=None, batch_size: int = SLICE_BATCH_SIZE,
                  **generate_options) -> dict:
    """{task: answer} for `image` read in slices of `slice_size` (height, width) overlapping by `overlap`, in the
    task's usual shape (boxes with their scores, OCR quads, text). A page no larger than a slice is read whole, as
    without slicing. Boxes of the whole page read once more are merged with the slices' unless not `whole_page`
    (OCR reads the slices only)."""
    refusal = slicing.slice_refusal(task)
    if refusal is not None:
        raise ValueError(refusal)
    processor = processor or default_processor(model)
    image = image.convert("RGB")
    width, height = image.size
    slices = get_slice_bboxes(height, width, slice_size[0], slice_size[1], auto_slice_resolution=False,
                              overlap_height_ratio=overlap, overlap_width_ratio=overlap)
    if len(slices) == 1:
        return predict(model, image, task, text=text, processor=processor, **generate_options)
    if task in slicing.OCR_TASKS:
        return _sliced_ocr(model, processor, image, task, [tuple(s) for s in slices], batch_size, generate_options)
    detector = Florence2DetectionModel(task=task, text=text, model=model, processor=processor,
                                       device=str(model.image_projection.weight.device), confidence_threshold=0.0,
                                       **generate_options)
    result = get_sliced_prediction(image, detector, slice_height=slice_size[0], slice_width=slice_size[1],
                                   overlap_height_ratio=overlap, overlap_width_ratio=overlap, verbose=0,
                                   batch_size=batch_size, **{**MERGE, "perform_standard_pred": whole_page})
    return {task: answer_of(result.object_prediction_list, task)}


def answer_of(predictions: list[ObjectPrediction], task: str) -> dict:
    """The task's answer (florence2.postprocess's shape, with scores) holding SAHI's predictions."""
    kind = parse_type(task)
    boxes = [p for p in predictions if p.mask is None]
    masks = [p for p in predictions if p.mask is not None]

    def label(p: ObjectPrediction) -> str:
        return "" if kind in UNLABELLED_PARSE_TYPES and p.category.name == UNLABELLED else p.category.name

    box_answer = {"bboxes": [p.bbox.to_xyxy() for p in boxes], "labels": [label(p) for p in boxes],
                  "scores": [p.score.value for p in boxes]}
    mask_answer = {"polygons": [p.mask.segmentation for p in masks], "labels": [label(p) for p in masks],
                   "scores": [p.score.value for p in masks]}
    if kind == "polygons":
        return mask_answer
    if kind == "description_with_bboxes_or_polygons":
        return {"bboxes": box_answer["bboxes"], "bboxes_labels": box_answer["labels"],
                "polygons": mask_answer["polygons"], "polygons_labels": mask_answer["labels"],
                "bboxes_scores": box_answer["scores"], "polygons_scores": mask_answer["scores"]}
    return box_answer


def _sliced_ocr(model, processor, image: Image.Image, task: str, slices: list[tuple[int, int, int, int]],
                batch_size: int, generate_options: dict) -> dict:
    """<OCR_WITH_REGION> on each slice, the lines merged (florence2.slicing) in reading order, quads on the page;
    <OCR> is their text, a line each."""
    lines = []
    for start in range(0, len(slices), batch_size):
        batch = slices[start:start + batch_size]
        answers = predict(model, [image.crop(s) for s in batch], slicing.OCR_LINES_TASK, processor=processor,
                          **generate_options)
        for k, (s, answer) in enumerate(zip(batch, answers), start):
            found = answer[slicing.OCR_LINES_TASK]
            for quad, line in zip(found["quad_boxes"], found["labels"]):
                page_quad = tuple(v + s[i % 2] for i, v in enumerate(quad))  # x + left, y + top
                lines.append(slicing.Line(line, page_quad, k))
    merged = slicing.reading_order(slicing.merge_lines(lines, slices))
    if task == slicing.OCR_LINES_TASK:
        return {task: {"quad_boxes": [list(line.quad) for line in merged], "labels": [line.text for line in merged]}}
    return {task: "\n".join(line.text for line in merged)}
