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

from . import DataError, Problems, Region, Sample, Split, clipped_box, clipped_polygon, missing_split, split_names

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
        if found:
            return found[:2] if "annotations" in found[0].parts else found[:1]
    return []


def found_splits(root: Path) -> list[str]:
    names = [p.parent.name for p in root.glob("*/_annotations.coco.json")]
    names += [p.stem.split("_", 1)[-1] for p in root.glob("annotations/*.json")]
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


def image_folder(path: Path, root: Path, split: str, file_name: str) -> Path:
    """Where the images of `path` are: the first candidate folder holding the split's first image."""
    tail = path.stem.split("_", 1)[-1]  # instances_val2017 -> val2017
    candidates = [path.parent, path.parent / "data", root / tail, root / path.stem,  # data/: FiftyOne's export
                  *(root / n for n in split_names(split)),
                  root / "images", *(root / "images" / n for n in split_names(split)), root]
    for folder in candidates:
        if (folder / file_name).is_file():
            return folder
    return path.parent


def read_coco(root: Path, split: str, problems: Problems) -> Split:
    files = split_files(root, split)
    if not files:
        raise missing_split(split, root, found_splits(root))
    samples: dict[int, Sample] = {}
    categories: dict[int, str] = {}
    for path in files:
        data = read_file(path)
        for c in data.get("categories") or []:
            if isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str):
                categories.setdefault(c["id"], c["name"])
        images = [im for im in data["images"] if isinstance(im, dict)]
        folder = image_folder(path, root if root.is_dir() else root.parent, split,
                              str(images[0].get("file_name", "")) if images else "")
        for image in images:
            add_image(image, path, folder, samples, problems)
        for annotation in data["annotations"]:
            add_annotation(annotation, path, samples, categories, problems)
    return Split([s for s in samples.values() if s is not None], categories, problems.items,
                 f"coco: {', '.join(map(str, files))}")


def add_image(image: dict, path: Path, folder: Path, samples: dict, problems: Problems) -> None:
    image_id, file_name = image.get("id"), image.get("file_name")
    where = f"{path}, image {image_id}"
    if not isinstance(image_id, int) or not isinstance(file_name, str):
        problems.add(where, "an image entry needs an integer 'id' and a 'file_name'")
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


def add_annotation(annotation: dict, path: Path, samples: dict, categories: dict, problems: Problems) -> None:
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
