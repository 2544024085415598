"""COCO JSON: `images`, `annotations` (bbox xywh in pixels, optional polygon `segmentation`, `iscrowd`; or
`caption`), `categories`.

Where a split's files are looked for, in `root`, for each name of the split (valid, val, ...):
- `<name>/_annotations.coco.json`, images beside it (Roboflow's export);
- `annotations/instances_<name>*.json` and `annotations/captions_<name>*.json`, images in `<name>2017/` or
  `<name>/` (the official COCO layout; both files of a split are read and merged by image id);
- `<name>.json` or `<name>/*.json`, images beside the file, in `data/` beside it (FiftyOne's export:
  `<name>/labels.json` and `<name>/data/`), in `images/` or in `<name>/`.
A region's text (a description or a transcription, for <DENSE_REGION_CAPTION>, <OCR_WITH_REGION>, ...) is its
annotation's "text", "utf8_string" (COCO-Text), "description" or "caption" field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import (
    BoxConvention,
    DataError,
    Problems,
    Region,
    Sample,
    Split,
    clipped_box,
    clipped_polygon,
    missing_split,
    split_names,
)

REGION_TEXT_KEYS = ("text", "utf8_string", "description", "caption")


def split_files(root: Path, split: str) -> list[Path]:
    if root.is_file():
        return [root]
    for name in split_names(split):
        candidates = [root / name / "_annotations.coco.json"]
        if (root / "annotations").is_dir():
            candidates += sorted((root / "annotations").glob(f"instances_{name}*.json"))
            candidates += sorted((root / "annotations").glob(f"captions_{name}*.json"))
        candidates += [root / f"{name}.json", *sorted((root / name).glob("*.json"))]
        found = [p for p in dict.fromkeys(candidates) if p.is_file()]
        if found:  # the official layout's instances and captions files are read together; else the first file
            return found[:2] if found[0].parent == root / "annotations" else found[:1]
    return []


# The official layout's file names: instances_val2017.json, captions_val2017.json, person_keypoints_val2017.json
OFFICIAL_PREFIX = re.compile(r"^(instances|captions|person_keypoints|image_info)_")


def found_splits(root: Path) -> list[str]:
    names = [p.parent.name for p in root.glob("*/_annotations.coco.json")]
    names += [OFFICIAL_PREFIX.sub("", p.stem) for p in root.glob("annotations/*.json")]
    names += [p.stem for p in root.glob("*.json")]
    return names


def looks_like_coco(root: Path) -> bool:
    if any(root.glob("*/_annotations.coco.json")) or any(root.glob("annotations/instances_*.json")) or any(
            root.glob("annotations/captions_*.json")):
        return True
    return any(_starts_like_coco(p) for p in [*root.glob("*.json"), *root.glob("*/*.json")])


def _starts_like_coco(path: Path) -> bool:
    """A JSON file whose first 64 kB hold an "images" list (COCO files list their images before the annotations)."""
    with open(path, "rb") as f:
        return re.search(rb'"images"\s*:\s*\[', f.read(65536)) is not None


def read_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a COCO file (not UTF-8 text: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a COCO file (not valid JSON: {e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: not a COCO file (it needs 'images' and 'annotations' lists; it has {keys})")
    return data


def image_folder(path: Path, root: Path, split: str, file_names: list[str]) -> Path:
    """Where the images of `path` are: the first candidate folder holding one of the split's first images (the
    first of them may be the one that is missing). A file given as `--dataset annotations/instances_val2017.json`
    has its images in `val2017/` beside `annotations/`, as in the official layout. None of them found anywhere is
    one error naming the file and the folders looked in: a layout not understood, not bad examples."""
    tail = OFFICIAL_PREFIX.sub("", path.stem)  # instances_val2017 -> val2017
    above = path.parent.parent if path.parent.name == "annotations" else path.parent
    candidates = [path.parent, path.parent / "data", root / tail, root / path.stem,  # data/: FiftyOne's export
                  above / tail, above / "images" / tail, above / "images",
                  *(root / n for n in split_names(split)),
                  root / "images", *(root / "images" / n for n in split_names(split)), root, above]
    candidates = list(dict.fromkeys(candidates))
    for names in (file_names[:20], file_names[20:]):  # the first images decide, unless all of them are missing
        for folder in candidates:
            if any((folder / name).is_file() for name in names):
                return folder
    if file_names:
        raise DataError(f"{path}: none of its images is found (looked for {file_names[0]!r} in "
                        f"{', '.join(str(c) for c in candidates if c.is_dir())}); put the images beside the file "
                        "or in a folder named after the split")
    return path.parent


def read_coco(root: Path, split: str, problems: Problems) -> Split:
    files = split_files(root, split)
    if not files:
        raise missing_split(split, root, found_splits(root))
    samples: dict[int, Sample] = {}
    categories: dict[int, str] = {}
    supercategories: dict[int, object] = {}
    used: set[int] = set()
    for path in files:
        data = read_file(path)
        for c in data.get("categories") or []:
            if isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str):
                categories.setdefault(c["id"], c["name"])
                supercategories.setdefault(c["id"], c.get("supercategory"))
        images = [im for im in data["images"] if isinstance(im, dict)]
        folder = image_folder(path, root if root.is_dir() else root.parent, split,
                              [str(im.get("file_name", "")) for im in images])
        listed: dict[int, str] = {}  # this file's image ids and file names
        for image in images:
            add_image(image, path, folder, samples, problems, listed)
        convention = BoxConvention()
        for annotation in data["annotations"]:
            add_annotation(annotation, path, samples, categories, problems, convention)
            if isinstance(annotation, dict) and annotation.get("category_id") in categories:
                used.add(annotation["category_id"])
        convention.check(f"{path}: the annotations' bbox")
    for category_id in superclasses(categories, supercategories, used):
        del categories[category_id]
    return Split([s for s in samples.values() if s is not None], categories, problems.items,
                 f"coco: {', '.join(map(str, files))}")


def superclasses(categories: dict[int, str], supercategories: dict[int, object], used: set[int]) -> list[int]:
    """The categories that only name a group of the others: no annotation uses them, and other categories give
    their name as `supercategory`. Roboflow writes one, id 0 named after the project ({"id": 0, "name": "cells",
    "supercategory": "none"}, the classes {"id": 1, "name": "RBC", "supercategory": "cells"}); a single-class
    project repeats the class's name ({"id": 0, "name": "helmet"}, {"id": 1, "name": "helmet"}). Left among the
    categories, the ground truth written for pycocotools would number "helmet" 0, and predictions.coco.json would
    not score against the export's own file, whose annotations say 1."""
    return [i for i, name in categories.items() if i not in used and any(
        supercategories.get(j) == name for j in categories if j != i)]


def add_image(image: dict, path: Path, folder: Path, samples: dict, problems: Problems,
              listed: dict[int, str]) -> None:
    """One entry of `images`. An id listed twice in one file for two files (COCO files merged without renumbering)
    leaves its annotations without a way to tell which image they are of: both are skipped, and said."""
    image_id, file_name = image.get("id"), image.get("file_name")
    where = f"{path}, image {image_id}"
    if not isinstance(image_id, int) or not isinstance(file_name, str):
        problems.add(where, "an image entry needs an integer 'id' and a 'file_name'")
        return
    first = listed.setdefault(image_id, file_name)
    if first != file_name:
        if samples.get(image_id) is not None:
            problems.add(where, f"id {image_id} is listed for two images ({first!r} and {file_name!r}); both "
                                "skipped, with the annotations of that id")
        samples[image_id] = None
        return
    if image_id in samples:  # listed by an earlier file of the split too (instances + captions)
        return
    file = folder / file_name
    if not file.is_file():
        problems.add(where, f"image file {file} not found")
        samples[image_id] = None
        return
    width, height = image.get("width"), image.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        from . import image_size_of

        try:
            width, height = image_size_of(file)
        except OSError as e:
            problems.add(where, f"cannot read {file} as an image ({e})")
            samples[image_id] = None
            return
    samples[image_id] = Sample(str(file), image_id, where, (width, height))


def add_annotation(annotation: dict, path: Path, samples: dict, categories: dict, problems: Problems,
                   convention: BoxConvention) -> None:
    if not isinstance(annotation, dict):
        problems.add(str(path), f"an annotation is a {type(annotation).__name__}, not an object")
        return
    where = f"{path}, annotation {annotation.get('id')}"
    image_id = annotation.get("image_id")
    if image_id not in samples:
        problems.add(where, f"image_id {image_id!r} is not among the file's images")
        return
    sample = samples[image_id]
    if sample is None:  # its image was skipped (and reported) already
        return
    if "bbox" not in annotation:
        if isinstance(annotation.get("caption"), str) and annotation["caption"].strip():
            sample.captions.append(annotation["caption"].strip())
        else:
            problems.add(where, "neither a 'bbox' nor a 'caption'")
        return
    category_id = annotation.get("category_id")
    if category_id not in categories:
        problems.add(where, f"unknown category_id {category_id!r} (the file's categories: {sorted(categories)})")
        return
    bbox = annotation["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        problems.add(where, f"bbox {bbox!r} is not [x, y, width, height]")
        return
    convention.add(bbox, sample.size, where)  # (it leaves out boxes that are not four numbers)
    box = clipped_box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], sample.size) if all(
        isinstance(v, (int, float)) for v in bbox) else f"bbox {bbox!r} is not four numbers"
    if isinstance(box, str):
        problems.add(where, box)
        return
    segmentation = annotation.get("segmentation")
    polygons = []
    if isinstance(segmentation, list):  # polygons; a dict is RLE (crowds), which has no polygon to learn
        polygons = [p for p in (clipped_polygon(points, sample.size) for points in segmentation
                                if isinstance(points, list)) if p is not None]
    text = next((annotation[k].strip() for k in REGION_TEXT_KEYS if isinstance(annotation.get(k), str)
                 and annotation[k].strip()), None)
    sample.regions.append(Region(box, categories[category_id], category_id, tuple(polygons), text,
                                 bool(annotation.get("iscrowd", 0))))
