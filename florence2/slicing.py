"""Sliced prediction of large pages, the parts that need no SAHI: which tasks can be sliced, the --slice flags, and
the merge of OCR lines read slice by slice.

Florence-2 reads every image at one size (768x768 for Microsoft's checkpoints), so the small print of an A3 or
300-dpi scan is lost. Sliced, the page is read in overlapping windows (SAHI's geometry, florence2/sahi.py) and the
answers are mapped back to the page:
- box and polygon tasks go through SAHI's `get_sliced_prediction`, which merges the copies of an object seen in
  several slices (florence2.sahi);
- <OCR_WITH_REGION> reads each slice and keeps each text line once (`merge_lines`): copies of a line found in two
  overlapping slices are the lines that cover the same part of the slices' shared area, and of a line cut by a slice
  border the copy kept is the one whose slice holds the larger share of the line, the one that read more of it.
  <OCR> on a sliced page is those lines in reading order (`reading_order`), one per line of text.
Tasks whose answer is about the whole image (captions, questions) or that take a region of it (<REGION_TO_...>) have
no sliced meaning and are refused (`slice_refusal`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .postprocess import parse_type

# Parse types whose answers are regions that SAHI merges across slices: boxes (labelled or not) and polygons.
BOX_PARSE_TYPES = ("description_with_bboxes", "bboxes", "phrase_grounding", "description_with_bboxes_or_polygons",
                   "polygons")
OCR_LINES_TASK = "<OCR_WITH_REGION>"  # what a sliced <OCR> reads in each slice: lines with their positions
OCR_TASKS = ("<OCR>", OCR_LINES_TASK)
DEFAULT_OVERLAP = 0.2  # SAHI's default overlap ratio
# A slice side below this holds less than a word of a page's print, and a page would take thousands of generate
# calls: surely a mistake (a ratio meant for --slice-overlap, a missing zero).
MIN_SLICE_SIDE = 64
# Two lines of overlapping slices are copies of one line when, inside the area the slices share, their boxes
# overlap by at least this IoU (distinct lines of text, one above the other, overlap far less).
SAME_LINE_IOU = 0.5

_SLICE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in page pixels, x1 <= x2, y1 <= y2


def slice_refusal(task: str) -> str | None:
    """Why `task` cannot be sliced, or None when it can (box, polygon and OCR tasks)."""
    if task in OCR_TASKS:
        return None
    if task.startswith("<REGION_TO"):
        return f"--slice: {task} reads a region of the whole image, which no slice has"
    if parse_type(task) not in BOX_PARSE_TYPES:
        return (f"--slice: {task} answers about the whole image; slicing needs a task that finds regions "
                "(<OD>, <DENSE_REGION_CAPTION>, <OPEN_VOCABULARY_DETECTION>, <CAPTION_TO_PHRASE_GROUNDING>, ...) "
                "or reads text (<OCR>, <OCR_WITH_REGION>)")
    return None


def parse_slice(text: str) -> tuple[int, int]:
    """The --slice value: "768" -> (768, 768), "512x768" -> (512, 768), height x width in pixels."""
    match = _SLICE.match(str(text))
    if match is None:
        raise ValueError(f"--slice {text!r}: give one side in pixels (768) or height x width (512x768)")
    size = int(match.group(1)), int(match.group(2) or match.group(1))
    if min(size) < MIN_SLICE_SIDE:
        raise ValueError(f"--slice {text!r}: a slice side must be at least {MIN_SLICE_SIDE} pixels")
    return size


def check_overlap(overlap: float) -> float:
    """The --slice-overlap value: the share of a slice that its neighbour also covers, in [0, 1)."""
    if not 0 <= overlap < 1:  # also refuses nan
        raise ValueError(f"--slice-overlap {overlap}: the overlap is a share of the slice, at least 0 and below 1")
    return overlap


# ------------------------------------------------------------------------------------------------- the flags
def add_arguments(p: argparse.ArgumentParser) -> None:
    """--slice, --slice-overlap and --slice-only of both command lines (florence2.sahi does the slicing)."""

    def slice_size(text: str) -> tuple[int, int]:
        try:
            return parse_slice(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--slice", type=slice_size, default=None, metavar="S|HxW",
                   help="read the image in slices of this size in pixels, merged back (needs sahi)")
    p.add_argument("--slice-overlap", type=float, default=None, metavar="R",
                   help="share of a slice its neighbours also cover, in [0, 1) (default 0.2)")
    p.add_argument("--slice-only", action="store_true",
                   help="merge the slices' boxes only, without those of the whole page read once more (SAHI's "
                        "no_standard_prediction)")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the slice flags: an overlap outside [0, 1), --slice-overlap or --slice-only without --slice,
    a task slicing cannot serve; the default overlap filled in."""
    if args.slice is None:
        if args.slice_overlap is not None or args.slice_only:
            p.error(f"{'--slice-overlap' if args.slice_overlap is not None else '--slice-only'} needs --slice")
        return
    try:
        args.slice_overlap = check_overlap(DEFAULT_OVERLAP if args.slice_overlap is None else args.slice_overlap)
    except ValueError as e:
        p.error(str(e))
    refusal = slice_refusal(args.task)
    if refusal is not None:
        p.error(refusal)


# ------------------------------------------------------------------------------------------------- OCR lines
@dataclass(frozen=True)
class Line:
    """A text line read in slice `slice_index`, its quad (x1, y1, ..., x4, y4) in page pixels."""

    text: str
    quad: tuple[float, ...]
    slice_index: int

    @property
    def box(self) -> Box:
        xs, ys = self.quad[0::2], self.quad[1::2]
        return min(xs), min(ys), max(xs), max(ys)


def merge_lines(lines: Sequence[Line], slices: Sequence[Box]) -> list[Line]:
    """Each text line of the page once, from `lines` read in the `slices` (page boxes, by slice index).

    Copies of one line are lines of different slices whose boxes, clipped to the area the two slices share, have an
    IoU of at least SAME_LINE_IOU; copies of copies are one line too (a line across three slices). Of a group of
    copies the lines of one slice are kept: the slice that holds the largest share of the group's extent (the box
    around all its copies), first in slice order on a tie. So a line cut by a slice border is kept as read in the
    slice where more of it lies, and a line inside two slices' shared area as read in the first. Lines keep their
    order in `lines` otherwise."""
    group = list(range(len(lines)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, a in enumerate(lines):
        for j in range(i + 1, len(lines)):
            b = lines[j]
            if a.slice_index == b.slice_index:
                continue
            shared = _intersection(slices[a.slice_index], slices[b.slice_index])
            if shared is not None and _iou(_intersection(a.box, shared), _intersection(b.box, shared)) >= SAME_LINE_IOU:
                group[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(lines)):
        members.setdefault(root(i), []).append(i)
    kept = set()
    for indices in members.values():
        extent = _enclosing([lines[i].box for i in indices])
        best = max(sorted({lines[i].slice_index for i in indices}),
                   key=lambda s: _area(_intersection(extent, slices[s])))  # max keeps the first of equals
        kept.update(i for i in indices if lines[i].slice_index == best)
    return [line for i, line in enumerate(lines) if i in kept]


def reading_order(lines: Sequence[Line]) -> list[Line]:
    """`lines` as a page is read: rows from the top, each row from the left. A line belongs to the row of the line
    above it when its vertical centre lies above that line's bottom (lines of a row overlap vertically)."""
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda line: (_centre_y(line.box), line.box[0])):
        if rows and _centre_y(line.box) < rows[-1][0].box[3]:
            rows[-1].append(line)
        else:
            rows.append([line])
    return [line for row in rows for line in sorted(row, key=lambda line: line.box[0])]


def _centre_y(box: Box) -> float:
    return (box[1] + box[3]) / 2


def _intersection(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return None
    box = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return box if box[0] < box[2] and box[1] < box[3] else None


def _area(box: Box | None) -> float:
    return 0.0 if box is None else (box[2] - box[0]) * (box[3] - box[1])


def _iou(a: Box | None, b: Box | None) -> float:
    inter = _area(_intersection(a, b))
    return inter / (_area(a) + _area(b) - inter) if inter else 0.0


def _enclosing(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def polygon_area(p: Sequence[float]) -> float:
    """The area of a flat polygon [x1, y1, x2, y2, ...] (the shoelace formula)."""
    return abs(sum(p[i] * p[(i + 3) % len(p)] - p[(i + 2) % len(p)] * p[i + 1] for i in range(0, len(p), 2))) / 2
