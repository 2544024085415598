"""Batch prediction over files, folders, manifests and datasets, resumable, on one process or many (torchrun).

    python -m florence2 predict photos/ --task "<OD>" --output labels.jsonl
    python -m florence2 predict pages.csv --task "<DocVQA>" --output answers.jsonl --batch-size 16
    torchrun --nproc_per_node=8 -m florence2 predict HuggingFaceM4/DocumentVQA --split validation \\
        --task "<DocVQA>" --text-column question --output docvqa.jsonl
    python -m florence2 predict photos/ --task "<OD>" --output labels.json --format coco

Inputs, in the order given: image files, folders (every image below them by its suffix, in any case, sorted; hidden
files and folders skipped), globs, JSONL or CSV manifests (UTF-8, a byte order mark allowed; one row per input: an
image path, relative to the manifest, and optionally the task's text) and Hugging Face datasets (a hub id or a
`save_to_disk` folder; needs `datasets`). A task that reads a text (a phrase, a region, the question of <DocVQA>)
takes it from --text or from the manifest's or dataset's --text-column: inputs that can give none are refused
before the run (answers to an empty prompt are not what was asked), and a row whose text is empty gets an error
line. Images are decoded and preprocessed in DataLoader workers and batched with their prompts padded and masked,
so every row gives what `Florence2.predict` gives for it alone (`predict.generate_answers` is the one path from
inputs to answers).

The output is JSONL, one line per input, each written whole with one write and flushed:
    {"image": "photos/a.jpg", "task": "<OD>", "width": 640, "height": 480, "result": {"<OD>": {...}}}
    {"image": "photos/b.jpg", "task": "<OD>", "error": "cannot read photos/b.jpg as an image: ..."}
with "text" when the input has one and "index" for dataset rows. A run started again with the same output skips
the inputs it holds (an input is its image and its text; an input listed twice is predicted twice), so a run
stopped anywhere, even by SIGKILL, loses at most the batch in flight. Under torchrun each rank predicts its share of
what is left into OUT.part-RANK and rank 0 merges the parts into OUT at the end, in the order of the inputs.
With --slice S (and --slice-overlap R, --slice-only) each image is read in overlapping slices through SAHI and the
answers merged back (florence2.sahi: boxes and polygons by SAHI's merge, OCR lines each once), --batch-size slices
per generate call; the lines and the COCO file are as without it.
With --format coco the JSONL goes beside OUT (OUT with the suffix .jsonl) and OUT becomes a COCO file (images,
categories from the labels, annotations with their scores), which pycocotools, FiftyOne and CVAT read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import functools
import glob
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import cli, slicing
from .postprocess import TASKS, TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT, UNLABELLED, parse_type
from .predict import check_prompt, collate, generate_answers

FORMATS = ("jsonl", "coco")
# Parse types whose answers have regions (COCO annotations); the others are text.
REGION_PARSE_TYPES = ("ocr", "description_with_bboxes", "bboxes", "phrase_grounding", "polygons",
                      "description_with_bboxes_or_polygons")
OCR_CATEGORY = "text"  # <OCR_WITH_REGION>: one category, the words go in each annotation's attributes
QUESTION_TASKS = ("<DocVQA>", "<VQA>")  # answered as text, like fine-tunes on DocVQA (the blog's prompt)
KNOWN_TASKS = TASKS + QUESTION_TASKS
# The tasks that read a text (a phrase, a region, a question): without one they answer, but not what was asked.
TASKS_NEEDING_TEXT = (*TASKS_WITH_INPUT, *QUESTION_TASKS)


class InputError(ValueError):
    """A problem with the command's inputs or output, said in one line."""


def same_task(task: str, known) -> list[str]:
    """The known tasks that `task` is in other letters or without its brackets ("<od>", "OD" for <OD>)."""
    bare = task.strip().strip("<>").lower()
    return [t for t in known if t.strip("<>").lower() == bare]


def task_hint(task, known) -> str:
    """"did you mean <OD>? " for a task that is a known one in other letters or without its brackets, or close to
    one ("<od>", "OD", "<ODD>"); else ""."""
    if not isinstance(task, str):
        return ""
    close = same_task(task, known) or difflib.get_close_matches(task.strip(), known, n=1, cutoff=0.8)
    return f"did you mean {close[0]}? " if close else ""


def check_task(task: str) -> None:
    """InputError for a --task that is surely a mistake: empty, or a known task in other letters or without its
    brackets ("<od>", "OD"). Anything else is read as it is, as the original's processor reads it: a prompt in
    words ("What is the total?") or a task token of a fine-tune ("<MY_TASK>")."""
    if not task.strip():
        raise InputError("--task is empty: give a task such as <OD>, or a prompt")
    same = same_task(task, KNOWN_TASKS)
    if same and task not in KNOWN_TASKS:
        raise InputError(f"unknown task {task}: did you mean {same[0]}?")


def wanted_text(task: str) -> str:
    """What the text of a task that needs one is, for the messages that ask for it."""
    return "a region as <loc_x1><loc_y1><loc_x2><loc_y2>" if task.startswith("<REGION_TO") else \
        "a question" if task in QUESTION_TASKS else "a phrase"


# ------------------------------------------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class Item:
    """One input: an image (a file, or row `index` of a dataset) and the task's text for it."""

    image: str  # the path, or "DATASET[SPLIT][INDEX]": how the output names it
    text: str | None = None
    index: int | None = None  # dataset row ...
    dataset: str | None = None  # ... of this source

    @property
    def key(self) -> tuple[str, str | None]:
        return self.image, self.text


class Inputs:
    """Every input of a run, in order, and what reads their images (files, or the rows of datasets).

    With `needs_text` (a task of TASKS_NEEDING_TEXT) and no `text` for all, a source that can give no text at all
    (files; a manifest or dataset without the text column, as when --text-column is forgotten) is an InputError
    rather than a run of answers to an empty prompt; a row whose text is empty is reported in its output line."""

    def __init__(self, sources: list[str], *, reads_text: bool, text: str | None, image_column: str,
                 text_column: str, split: str | None, needs_text: str | None = None):
        self.reads_text, self.text = reads_text, text
        self.needs_text = needs_text if text is None else None  # the task, when its text must come from the rows
        self.image_column, self.text_column, self.split = image_column, text_column, split
        self.items: list[Item] = []
        self.datasets: dict[str, object] = {}  # the source string -> its (column-selected) dataset
        for source in sources:
            self._add(source)
        if not self.items:
            raise InputError(f"no images in {' '.join(sources)}")

    def load_image(self, item: Item) -> Image.Image:
        """The decoded image of an input: its file, or its dataset cell (decoded by datasets' Image feature,
        {"bytes", "path"}, or a path)."""
        try:  # datasets' Image feature decodes here: a broken cell raises PIL's error, which names no input
            value = item.image if item.index is None else self.datasets[item.dataset][item.index][self.image_column]
        except Exception as e:
            raise ValueError(f"cannot read {item.image} as an image: {_without_object_address(e)}") from None
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        if not isinstance(value, (str, io.BytesIO)):
            raise ValueError(f"{item.image}: expected an image, got {type(value).__name__}")
        try:
            with Image.open(value) as opened:
                opened.load()
                return opened.copy()
        except Exception as e:  # PIL raises many kinds on broken files
            raise ValueError(f"cannot read {item.image} as an image: {_without_object_address(e)}") from None

    def missing_text(self, where: str) -> InputError:
        return InputError(f"task {self.needs_text} needs text ({wanted_text(self.needs_text)}) and {where}: give "
                          "--text for every input, or a manifest or dataset whose text column --text-column names "
                          f"(now {self.text_column!r})")

    # --------------------------------------------------------------------------------- one source each
    def _add(self, source: str) -> None:
        path = Path(source)
        if path.is_dir():
            if any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
                return self._add_dataset(source, local=True)
            return self._add_files(sorted(p for p in path.rglob("*") if _is_image_file(p, path)), source)
        if path.is_file():
            if path.suffix.lower() == ".jsonl":
                return self._add_manifest(path, _jsonl_rows(path))
            if path.suffix.lower() == ".csv":
                return self._add_manifest(path, _csv_rows(path))
            return self._add_files([path], source)  # anything else is an image (or reported as unreadable)
        if glob.has_magic(source):
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise InputError(f"no file matches {source}")
            return self._add_files(files, source)
        if _looks_like_hub_id(source):
            return self._add_dataset(source, local=False)
        raise InputError(f"no such file or folder: {source}")

    def _add_files(self, paths: list[Path], source: str) -> None:
        if not paths:
            raise InputError(f"no images in {source}")
        if self.needs_text:
            raise self.missing_text(f"{source} gives images only")
        self.items += [Item(str(p), self.text if self.reads_text else None) for p in paths]

    def _add_manifest(self, path: Path, rows) -> None:
        """The rows of a manifest; an image path is relative to the manifest's folder (~ is the home folder)."""
        count, columns = len(self.items), set()
        for where, row in rows:
            image = row.get(self.image_column)
            if not isinstance(image, str) or not image.strip():
                raise InputError(f"{path} {where}: no image path in column {self.image_column!r} (columns: "
                                 f"{', '.join(map(str, row)) or 'none'}; --image-column names it)")
            columns |= set(row)
            self.items.append(Item(str(path.parent / Path(image.strip()).expanduser()),
                                   self._row_text(row, f"{path} {where}")))
        if len(self.items) == count:
            raise InputError(f"{path} lists no inputs")
        if self.needs_text and self.text_column not in columns:
            raise self.missing_text(f"{path} has no column {self.text_column!r} (columns: "
                                    f"{', '.join(sorted(map(str, columns)))})")

    def _row_text(self, row: dict, where: str) -> str | None:
        if not self.reads_text:
            return None
        text = row.get(self.text_column)
        if text is None or text == "":
            return self.text
        if not isinstance(text, str):
            raise InputError(f"{where}: {self.text_column!r} must be text, got {text!r}")
        return text

    def _add_dataset(self, source: str, local: bool) -> None:
        try:
            import datasets
        except ImportError:
            what = "a saved dataset" if local else "no such file or folder; as a Hugging Face dataset id, it"
            raise InputError(f"{source}: {what} needs the datasets package: pip install -e \".[train]\"") from None
        try:
            with quiet_hub():
                data = datasets.load_from_disk(source) if local else datasets.load_dataset(source, split=self.split)
        except Exception as e:  # not on the hub, no network, a broken folder: one line says which
            kind = "a saved dataset" if local else "a file, a folder or a Hugging Face dataset"
            raise InputError(f"{source} is not {kind}: {e}") from None
        name = source
        if isinstance(data, datasets.DatasetDict):
            splits = list(data)
            split = self.split or (splits[0] if len(splits) == 1 else None)
            if split not in data:
                raise InputError(f"{source} has the splits {', '.join(splits)}: choose one with --split")
            data, name = data[split], f"{source}[{split}]"
        elif self.split is not None and local:
            raise InputError(f"{source} is a single dataset without splits: drop --split {self.split}")
        if self.image_column not in data.column_names:
            raise InputError(f"{source} has no column {self.image_column!r} (columns: "
                             f"{', '.join(data.column_names)}; --image-column names it)")
        if self.needs_text and self.text_column not in data.column_names:
            raise self.missing_text(f"{source} has no column {self.text_column!r} (columns: "
                                    f"{', '.join(data.column_names)})")
        has_text = self.reads_text and self.text_column in data.column_names
        columns = [self.image_column] + ([self.text_column] if has_text else [])
        texts = data[self.text_column] if has_text else [None] * len(data)
        self.datasets[source] = data.select_columns(columns)
        self.items += [Item(f"{name}[{i}]", self._row_text({self.text_column: t}, f"{name}[{i}]"), i, source)
                       for i, t in enumerate(texts)]


# Manifests are UTF-8, with or without the byte order mark that Excel ("CSV UTF-8") and Windows tools write
# first: utf-8-sig drops it, where utf-8 would make the first column "\ufeffimage" and the first JSON line invalid.
MANIFEST_ENCODING = "utf-8-sig"


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub and datasets log every retry against a hub they cannot reach ("'[Errno -2] Name or service
    not known' thrown while requesting HEAD ...", "Retrying in 8s") on stderr; the error that follows says it in one
    line. (Download progress bars are tqdm's, not logging: they still show.)"""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _jsonl_rows(path: Path):
    with _manifest_errors(path), open(path, encoding=MANIFEST_ENCODING) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {number}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            yield f"line {number}", row


def _csv_rows(path: Path):
    """The rows of a CSV manifest by its header (quoted fields may hold commas and line breaks)."""
    with _manifest_errors(path), open(path, encoding=MANIFEST_ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"line {reader.line_num}", row


@contextlib.contextmanager
def _manifest_errors(path: Path):
    """A manifest that is not UTF-8 text or not CSV, said with its name (the bare errors name no file)."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except csv.Error as e:
        raise InputError(f"{path} is not a valid CSV file: {e}") from None


def _without_object_address(error: Exception) -> str:
    """An error's message without the " <_io.BytesIO object at 0x7f...>" that PIL puts in it for bytes."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))


def _is_image_file(path: Path, folder: Path) -> bool:
    """A file below `folder` that PIL opens by its suffix (in any case), neither hidden nor in a hidden folder
    (.cache/, .ipynb_checkpoints/, macOS's ._ files: as a glob's * skips them)."""
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return not hidden and path.suffix.lower() in _image_suffixes() and path.is_file()


@functools.cache
def _image_suffixes() -> frozenset[str]:
    """The file suffixes PIL opens."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and \
        Path(source).suffix.lower() not in _image_suffixes() | {".jsonl", ".csv"}


class _Prepared(torch.utils.data.Dataset):
    """DataLoader side: decode and preprocess one input; a failure is returned as its message, not raised."""

    def __init__(self, inputs: Inputs, positions: list[int], config, processor, task: str, sliced: bool = False):
        self.inputs, self.positions, self.config, self.processor, self.task = inputs, positions, config, processor, task
        self.sliced = sliced  # the decoded image, for the main process to slice, instead of the model's inputs

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        item = self.inputs.items[self.positions[i]]
        try:
            if self.inputs.needs_text and not item.text:
                raise ValueError(f"no text: task {self.task} needs {wanted_text(self.task)}, and this row's "
                                 f"{self.inputs.text_column!r} is empty (--text gives one for such rows)")
            prompt = self.task + (item.text or "")
            check_prompt(self.config, self.processor, prompt)
            image = self.inputs.load_image(item)
            return item, image.size, image if self.sliced else self.processor(text=prompt, images=image), None
        except Exception as e:  # one bad input must not stop a run over a million
            return item, None, None, str(e)


# ------------------------------------------------------------------------------------------------- the output
def dumps(record) -> str:
    """JSON text of a result; a non-finite number (the score of a box that no token covers) becomes null, so that
    strict readers (browsers, jq, other languages) read every line."""
    return json.dumps(_finite(record), ensure_ascii=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class ResultLog:
    """The JSONL results: read back on restart, appended one whole line at a time, merged from ranks' parts."""

    def __init__(self, path: Path, task: str):
        self.path, self.task = path, task
        self._merging = path.with_name(path.name + ".merging")
        self._fd: int | None = None

    def part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}")

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(glob.escape(self.path.name) + ".part-*"))

    def recover(self) -> None:
        """Finish a merge that a kill interrupted: a complete OUT.merging holds OUT and every part."""
        self._merging.with_name(self._merging.name + ".tmp").unlink(missing_ok=True)
        if self._merging.exists():
            for part in self.parts():
                part.unlink()
            os.replace(self._merging, self.path)

    def done(self) -> Counter:
        """How many times each input (image, text) is in OUT and the parts."""
        return Counter(_key(record) for path in [self.path, *self.parts()] for record in self.records(path))

    def records(self, path: Path | None = None) -> list[dict]:
        path = path or self.path
        if not path.exists():
            return []
        records = []
        data = path.read_bytes()
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):  # after the last newline: an unfinished line, if any
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path} line {number} is not a result line; use another --output") from None
            if not isinstance(record, dict) or "image" not in record:
                raise InputError(f"{path} line {number} is not a result line; use another --output")
            if record.get("task") != self.task:
                raise InputError(f"{path} holds results of task {record.get('task')}, not {self.task}; "
                                 "use another --output")
            records.append(record)
        return records

    def open(self, path: Path) -> None:
        """Append to `path` from now on; a last line cut by a kill is dropped (its input is predicted again)."""
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)

    def write(self, record: dict) -> None:
        data = (dumps(record) + "\n").encode()
        while data:  # one write() for a line in practice; a partial write is finished, never interleaved
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def merge(self, order: list[Item]) -> None:
        """Fold the parts into OUT, everything in the order of the inputs (lines of other inputs last)."""
        parts = self.parts()
        if not parts:
            return
        records = [r for path in [self.path, *parts] for r in self.records(path)]
        ranked = sorted(in_input_order(records, order), key=lambda pair: pair[0])  # stable: file order for ties
        tmp = self._merging.with_name(self._merging.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for _, record in ranked:
                f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._merging)  # from here on the merge is complete: recover() finishes it
        self.recover()


def _key(record: dict) -> tuple[str, str | None]:
    """The input a result line is about: its image and its text (as Item.key)."""
    return record["image"], record.get("text")


def in_input_order(records: list[dict], order: list[Item]) -> list[tuple[int, dict]]:
    """(position among the inputs, record) of each result line; an input listed twice takes its lines in turn, and
    a line of no current input gets len(order)."""
    places: dict[tuple, list[int]] = {}
    for k, item in enumerate(order):
        places.setdefault(item.key, []).append(k)
    placed = []
    for record in records:
        free = places.get(_key(record))
        placed.append((free.pop(0) if free else len(order), record))
    return placed


# ------------------------------------------------------------------------------------------------------ COCO
def to_coco(records: list[dict], task: str) -> dict:
    """A COCO detection file from result lines: images (id in input order, file_name, width, height), categories
    (the labels, sorted; ids from 1), annotations (bbox [x, y, w, h], area, segmentation polygons where the task
    gives them, score where it gives one)."""
    images, annotations, found = [], [], []
    for record in records:
        if "result" not in record:
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": record["image"], "width": record["width"],
                       "height": record["height"]})
        for region in _regions(record["result"][task], parse_type(task)):
            region["image_id"] = image_id
            found.append(region)
    names = sorted({r["category"] for r in found})
    ids = {name: i + 1 for i, name in enumerate(names)}
    for number, region in enumerate(found, 1):
        annotation = {"id": number, "image_id": region["image_id"], "category_id": ids[region["category"]],
                      "bbox": region["bbox"], "area": region["area"], "segmentation": region["segmentation"],
                      "iscrowd": 0}
        for extra in ("score", "attributes"):
            if extra in region:
                annotation[extra] = region[extra]
        annotations.append(annotation)
    return {"info": {"description": f"Florence-2 {task} predictions"}, "licenses": [], "images": images,
            "categories": [{"id": ids[n], "name": n, "supercategory": ""} for n in names],
            "annotations": annotations}


def _regions(answer: dict, kind: str) -> list[dict]:
    """(category, bbox, area, segmentation[, score, attributes]) of each region of one answer."""
    regions = []
    if kind == "ocr":
        for quad, text in zip(answer["quad_boxes"], answer["labels"]):
            regions.append(_polygon_region([quad], OCR_CATEGORY) | {"attributes": {"text": text}})
        return regions
    boxes = answer.get("bboxes", [])
    box_labels = answer.get("bboxes_labels", answer.get("labels", []))
    scores = answer.get("scores")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        x, y, w, h = min(x1, x2), min(y1, y2), abs(x2 - x1), abs(y2 - y1)
        region = {"category": box_labels[i] or UNLABELLED, "bbox": [x, y, w, h], "area": w * h, "segmentation": []}
        if scores is not None:
            region["score"] = scores[i]
        regions.append(region)
    polygon_labels = answer.get("polygons_labels", answer.get("labels", []))
    for instance, label in zip(answer.get("polygons", []), polygon_labels):
        polygons = [p for p in instance if len(p) >= 6]  # COCO polygons have at least three points
        if polygons:
            regions.append(_polygon_region(polygons, label or UNLABELLED))
    return regions


def _polygon_region(polygons: list[list[float]], category: str) -> dict:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    area = sum(slicing.polygon_area(p) for p in polygons)
    return {"category": category, "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "area": area,
            "segmentation": polygons}


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # barriers and three counts: gloo on CPU and GPU machines alike
        return cls(dist.get_rank(), world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def sum(self, values: list[int]) -> list[int]:
        if self.world == 1:
            return values
        total = torch.tensor(values)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        largest = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        return float(largest)


@contextlib.contextmanager
def exclusive(path: Path):
    """One run per output: a POSIX lock on OUT.lock, which the kernel releases when the run dies. Not flock: a
    DataLoader worker forked from the run would share an flock and hold it after the run is killed."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES, by platform
            raise InputError(f"{path} is being written by another run; wait for it or use another --output") \
                from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # still ours: deleted before it is released
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> dict:
    """Predict every input not yet in the output; returns counts {"inputs", "skipped", "predicted", "errors"}
    over all ranks, and the seconds the predictions took (model loading aside)."""
    log_path = args.output.with_suffix(".jsonl") if args.format == "coco" else args.output
    log = ResultLog(log_path, args.task)
    inputs = Inputs(args.inputs, reads_text=args.task not in TASKS_WITHOUT_INPUT, text=args.text,
                    image_column=args.image_column, text_column=args.text_column, split=args.split,
                    needs_text=args.task if args.task in TASKS_NEEDING_TEXT else None)
    dist = Distributed.from_env()
    if dist.rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(log_path) if dist.rank == 0 else contextlib.nullcontext():
        if dist.rank == 0:
            log.recover()
        dist.barrier()
        done = log.done()
        dist.barrier()  # every rank has read what is done before any writes more
        seen, todo = Counter(), []
        for k, item in enumerate(inputs.items):
            seen[item.key] += 1
            if seen[item.key] > done[item.key]:
                todo.append(k)
        mine = todo[dist.rank::dist.world]
        counts = {"predicted": 0, "errors": 0, "seconds": 0.0}
        if mine:
            log.open(log_path if dist.world == 1 else log.part(dist.rank))
            try:
                _predict(args, inputs, mine, log, counts, show=dist.rank == 0)
            finally:
                log.close()
        dist.barrier()
        if dist.rank == 0:
            log.merge(inputs.items)
            if args.format == "coco":
                _write_coco(args.output, log, inputs.items, args.task)
    predicted, errors = dist.sum([counts["predicted"], counts["errors"]])
    seconds = dist.max(counts["seconds"])
    dist.close()
    return {"inputs": len(inputs.items), "skipped": len(inputs.items) - len(todo), "predicted": predicted,
            "errors": errors, "seconds": seconds}


def _predict(args, inputs: Inputs, positions: list[int], log: ResultLog, counts: dict, show: bool) -> None:
    from tqdm import tqdm  # comes with huggingface_hub

    from .image_size import processor_at
    from .model import Florence2
    from .predict import default_processor

    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    with quiet_hub():
        model = Florence2.from_pretrained(args.model, revision=args.revision, dtype=args.dtype, device=device)
    processor = default_processor(model)
    if args.image_size is not None:
        processor = processor_at(model, processor, args.image_size)
    options = {name: getattr(args, name) for name in ("num_beams", "max_new_tokens", "min_new_tokens")
               if getattr(args, name) is not None}
    if args.compile:
        options["compile"] = True
    task = args.task
    sliced = args.slice is not None
    loader = torch.utils.data.DataLoader(_Prepared(inputs, positions, model.config, processor, task, sliced),
                                         batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=list)
    started = time.perf_counter()
    with tqdm(total=len(positions), unit="img", disable=not show, dynamic_ncols=True) as bar:
        for rows in loader:
            good = [row for row in rows if row[3] is None]
            answers = []
            if good and sliced:
                from .sahi import sliced_answer

                answers = [sliced_answer(model, image, task, item.text, args.slice, args.slice_overlap,
                                         whole_page=not args.slice_only, processor=processor,
                                         batch_size=args.batch_size, **options)
                           for item, _, image, _ in good]
            elif good:
                answers = generate_answers(model, processor, collate([row[2] for row in good]), [task] * len(good),
                                           [row[1] for row in good], **options)
            answers = iter(answers)
            for item, size, _, error in rows:
                record = {"image": item.image}
                if item.text is not None:
                    record["text"] = item.text
                if item.index is not None:
                    record["index"] = item.index
                record["task"] = task
                if error is None:
                    record |= {"width": size[0], "height": size[1], "result": next(answers)}
                    counts["predicted"] += 1
                else:
                    record["error"] = error
                    counts["errors"] += 1
                log.write(record)
            bar.update(len(rows))
    counts["seconds"] = time.perf_counter() - started


def _write_coco(path: Path, log: ResultLog, order: list[Item], task: str) -> None:
    """OUT as COCO from the JSONL: each current input once, in order (lines of other inputs are left out)."""
    placed = sorted((p for p in in_input_order(log.records(), order) if p[0] < len(order)), key=lambda p: p[0])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(to_coco([record for _, record in placed], task)) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m florence2 predict", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, globs, .jsonl/.csv manifests, dataset folders or hub ids")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}; or <DocVQA>, <VQA>, free text")
    p.add_argument("--text", default=None, help="the task's input for every image (a row's own text wins)")
    p.add_argument("--output", required=True, type=Path, help="the JSONL results (with --format coco: the COCO file)")
    p.add_argument("--format", default="jsonl", choices=FORMATS)
    p.add_argument("--model", default="microsoft/Florence-2-base-ft", help="hub id or local checkpoint folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, per rank)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding and preprocessing images (0: in the main process)")
    p.add_argument("--num-beams", type=int, default=None, help="default: the checkpoint's (3)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="no end before this many tokens (equal to --max-new-tokens: answers of one length)")
    p.add_argument("--image-size", type=cli.image_size, default=None, metavar="S|HxW",
                   help="read the images at this size (multiples of 32; default: the checkpoint's)")
    p.add_argument("--compile", action="store_true",
                   help="run the decoder step through torch.compile (docs/compiled-decoding.md)")
    p.add_argument("--image-column", default="image", help="manifest or dataset column of the image")
    p.add_argument("--text-column", default="text", help="manifest or dataset column of the task's text, if any")
    p.add_argument("--split", default=None, help="dataset split (needed when a dataset has several)")
    slicing.add_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error("--batch-size must be at least 1 and --num-workers at least 0")
    for name, least in (("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        check_task(args.task)
    except InputError as e:
        p.error(str(e))
    slicing.check_arguments(p, args)
    if args.output.is_dir():
        p.error(f"--output {args.output} is a folder: give a file in it, such as {args.output / 'results.jsonl'}")
    if args.text is not None and args.task in TASKS_WITHOUT_INPUT:
        p.error(f"task {args.task} takes no input: drop --text")
    if args.format == "coco":
        if parse_type(args.task) not in REGION_PARSE_TYPES:
            p.error(f"--format coco needs a task that finds regions; {args.task} answers with text")
        if args.output.suffix == ".jsonl":
            p.error("with --format coco, --output is the COCO file (such as labels.json); the JSONL goes beside it")
    args.parser = p
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.slice is not None:
            from . import sahi  # noqa: F401  (sahi missing: said before anything loads)
        counts = run(args)
    except InputError as e:
        args.parser.error(str(e))
    except cli.USER_ERRORS as e:  # a checkpoint that cannot be found, a bad dtype or device, a missing extra
        return cli.report(args.parser.prog, e)
    if int(os.environ.get("RANK", "0")) == 0:
        where = args.output if args.format == "jsonl" else f"{args.output} (and {args.output.with_suffix('.jsonl')})"
        rate = f" ({counts['predicted'] / counts['seconds']:.2f} img/s)" if counts["seconds"] else ""
        print(f"{counts['inputs']} inputs: {counts['skipped']} already done, {counts['predicted']} predicted{rate}, "
              f"{counts['errors']} unreadable; results in {where}", file=sys.stderr)
    return 0


__all__ = ["Inputs", "Item", "ResultLog", "main", "run", "to_coco"]
