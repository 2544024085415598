"""Datasets in the formats people export, read into one shape: a list of `Sample`s per split.

    coco   COCO JSON: Roboflow's layout (train/ valid/ test/, each with _annotations.coco.json and its images), the
           official one (annotations/instances_val2017.json + val2017/), or one file per split (train.json ...)
    jsonl  {"image", "prefix", "suffix"} per line: maestro's and Roboflow's Florence-2 export (train/annotations.jsonl
           beside its images), or one file per split (train.jsonl)
    yolo   ultralytics: data.yaml (names, train/val/test folders or lists), images/ and labels/ with "class cx cy w h"
           (or "class x1 y1 x2 y2 ..." polygons) normalized to 0..1
    hf     Hugging Face datasets: a hub id, a save_to_disk folder, parquet files, an imagefolder with metadata.jsonl;
           detection (an `objects` column with `bbox` xywh and `category`, as cppe-5), captions, OCR text, and the QA
           shapes of DocumentVQA and The Cauldron

`--format auto` tells them apart by their files (`detect_format`). A split may be asked by any of its usual names
("validation", "valid", "val"); a missing one is an error that lists the splits found.

Bad data never stops a run unless asked (`on_bad_example="fail"`): boxes outside the image are clipped; zero-area
boxes, unknown categories, missing images and malformed lines are skipped, each reported with its file and line or
id (`Problems`). Unreadable image files are found when the example is first loaded (data.py) and counted the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("coco", "jsonl", "yolo", "hf")
# The usual names of each split, in the order they are looked for.
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing")}
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used as asked: missing split, file or columns, a file that is not what it says."""


@dataclass(frozen=True)
class Region:
    """One annotated object: its box (x1, y1, x2, y2 in pixels, inside the image), category, optional polygons
    (flat x, y, x, y, ... lists in pixels) and text (a description or a transcription)."""

    box: tuple[float, float, float, float]
    category: str
    category_id: int | None = None
    polygons: tuple[tuple[float, ...], ...] = ()
    text: str | None = None
    crowd: bool = False  # COCO iscrowd: kept in the ground truth (as COCO ignores it), never a training target


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    type: str = "all"


@dataclass
class Sample:
    """One image and what a format says about it. `image` is a file path or a `LazyCell` of a datasets table;
    `size` is the (width, height) its coordinates refer to (None for data without coordinates)."""

    image: object
    image_id: int | str
    where: str  # "valid/_annotations.coco.json, image 12": how messages name it
    size: tuple[int, int] | None = None
    regions: list[Region] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    text: str | None = None  # the whole image's text (OCR)
    questions: list[Question] = field(default_factory=list)
    prefix: str | None = None  # a JSONL line's prompt and target, used as they are
    suffix: str | None = None


@dataclass
class Split:
    samples: list[Sample]
    categories: dict[int, str]  # category id -> name, as the format numbers them (COCO's ids, YOLO's classes)
    problems: list[str]  # what was skipped, and why
    description: str  # "coco: data/valid/_annotations.coco.json"


@dataclass(frozen=True)
class LazyCell:
    """An image stored in a datasets table, read only when the example is built (in a DataLoader worker)."""

    table: object  # a datasets.Dataset holding only the image column, not decoded
    row: int
    column: str
    first: bool = False  # a list of images (The Cauldron): its first

    def get(self):
        value = self.table[self.row][self.column]
        return (value or [None])[0] if self.first else value


class Problems:
    """The bad items of a split: skipped and kept for the report, or, with fail=True, the first one stops the run."""

    def __init__(self, fail: bool):
        self.fail = fail
        self.items: list[str] = []

    def add(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.fail:
            raise DataError(f"bad example ({message}); use --on-bad-example skip to skip such examples")
        self.items.append(message)


def clipped_box(x1: float, y1: float, x2: float, y2: float, size: tuple[int, int]) -> tuple[float, ...] | str:
    """The box clipped to the image, or the reason it cannot be used."""
    coordinates = (x1, y1, x2, y2)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coordinates):
        return f"box {list(coordinates)} is not four finite numbers"
    width, height = size
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return f"zero-area box {list(coordinates)} (after clipping to the {width}x{height} image)"
    return float(x1), float(y1), float(x2), float(y2)


class BoxConvention:
    """Whether a split's [x, y, width, height] boxes in pixels are something else under the same name: corners
    [x1, y1, x2, y2] (some hub datasets store them so as `bbox`; cppe-5 and COCO store xywh) or fractions of the
    image. Read as pixel widths they make boxes that are clipped into garbage (or specks in the corner) without a
    word; so the split is refused, saying how to convert it, when many boxes run past the image as xywh while every
    box, read as corners, lies inside it, or when no coordinate of any box exceeds 1."""

    def __init__(self):
        self.count, self.past, self.fit, self.largest, self.first = 0, 0, True, 0.0, None

    def add(self, bbox, size: tuple[int, int], where: str) -> None:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            return
        x, y, a, b = bbox
        width, height = size
        slack_x, slack_y = max(1.0, width / 100), max(1.0, height / 100)  # annotators' slop past the edge
        self.count += 1
        self.largest = max(self.largest, *map(abs, bbox))
        if x + a > width + slack_x or y + b > height + slack_y:
            self.past += 1
            self.first = self.first or f"{where}: {list(bbox)} in the {width}x{height} image"
        self.fit = self.fit and x < a <= width + slack_x and y < b <= height + slack_y

    def check(self, what: str) -> None:
        """`what` names the boxes: "data/train.json: the annotations' bbox"."""
        if self.past and self.fit and self.past * 4 >= self.count:
            raise DataError(
                f"{what} look like corners [x1, y1, x2, y2], not [x, y, width, height] in pixels (COCO's convention, "
                f"which this reader reads): as widths and heights, {self.past} of {self.count} boxes run past the "
                f"image ({self.first}), while as corners every box lies inside it. Convert each box to [x1, y1, "
                "x2 - x1, y2 - y1] first")
        if self.count and self.largest <= 1.0:
            raise DataError(
                f"{what} look normalized (no coordinate of the {self.count} boxes exceeds 1), not [x, y, width, "
                "height] in pixels: multiply x and width by the image's width, y and height by its height first")


def clipped_polygon(points, size: tuple[int, int]) -> tuple[float, ...] | None:
    """A flat x, y, ... polygon clipped to the image; None when it has fewer than three points."""
    if len(points) < 6 or len(points) % 2 or not all(isinstance(v, (int, float)) for v in points):
        return None
    width, height = size
    return tuple(float(min(max(v, 0.0), width if i % 2 == 0 else height)) for i, v in enumerate(points))


def split_names(split: str) -> tuple[str, ...]:
    """The names under which `split` may be stored: itself first, then its usual aliases."""
    for names in SPLIT_NAMES.values():
        if split in names:
            return (split, *[n for n in names if n != split])
    return (split,)


def missing_split(split: str, source, found) -> DataError:
    found = sorted(set(found))
    return DataError(f"{source} has no {split!r} split (looked for {', '.join(split_names(split))}); found "
                     + (", ".join(found) if found else "no split at all"))


def image_size_of(path) -> tuple[int, int]:
    """(width, height) from the header of a file (a path or a file object), without decoding it."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def detect_format(source: str) -> str:
    """The format of `source` from its files: a YAML file -> yolo, COCO JSON -> coco, JSONL -> jsonl, datasets files
    or a hub id -> hf."""
    path = Path(source).expanduser()
    if not path.exists():
        if "/" in source.strip("/") and source.count("/") == 1 and not source.startswith((".", "~", "/")):
            return "hf"  # owner/name: a hub dataset
        raise DataError(f"{source}: no such file or folder (nor a hub dataset id owner/name)")
    if path.is_file():
        by_suffix = {".yaml": "yolo", ".yml": "yolo", ".jsonl": "jsonl", ".json": "coco", ".parquet": "hf",
                     ".arrow": "hf", ".csv": "hf"}
        if path.suffix in by_suffix:
            return by_suffix[path.suffix]
        raise DataError(f"{source}: cannot tell its format from the suffix {path.suffix!r}; pass --format")
    from . import coco, jsonl, yolo

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or imagefolder(path):
        return "hf"
    if yolo.find_yaml(path, required=False) is not None:
        return "yolo"
    if coco.looks_like_coco(path):
        return "coco"
    if jsonl.looks_like_jsonl(path):
        return "jsonl"
    if any(p.suffix in (".parquet", ".arrow") for p in path.rglob("*")):
        return "hf"
    found = sorted(p.name for p in path.iterdir())[:10]
    raise DataError(f"{source}: cannot tell the format of this folder (it holds {found}); pass --format "
                    f"{'|'.join(FORMATS)}")


IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def imagefolder(path: Path) -> bool:
    """A datasets imagefolder: images with a metadata file (metadata.jsonl ..., with `file_name`) in the folder or
    in its split folders; `datasets.load_dataset(folder)` reads it. (Not a JSONL export: its lines name an image by
    `file_name`, not `image`.)"""
    return any((folder / name).is_file() for folder in (path, *(p for p in path.iterdir() if p.is_dir()))
               for name in IMAGEFOLDER_METADATA)


@dataclass(frozen=True)
class Columns:
    """Column names of Hugging Face datasets (the QA shapes)."""

    question: str = "question"
    answers: str = "answers"
    image: str = "image"


def load_split(source: str, split: str, fmt: str = "auto", *, fail: bool = False, config: str | None = None,
               columns: Columns | None = None) -> Split:
    """One split of `source` in format `fmt` ("auto" detects it)."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    problems = Problems(fail)
    if fmt == "coco":
        from .coco import read_coco as read
    elif fmt == "jsonl":
        from .jsonl import read_jsonl as read
    elif fmt == "yolo":
        from .yolo import read_yolo as read
    elif fmt == "hf":
        from .hf import read_hf

        return read_hf(source, split, problems, config=config, columns=columns)
    else:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")
    return read(Path(source).expanduser(), split, problems)
