"""YOLO, as ultralytics reads it: a data.yaml with `names` (a list, or {id: name}), optional `path`, and `train`,
`val`, `test` (a folder of images, a .txt list of image paths, or a list of those). Each image's labels are the .txt
file at the same place under `labels/` instead of `images/`, one object per line: `class cx cy w h` normalized to
0..1, or `class x1 y1 x2 y2 x3 y3 ...` for a polygon (its box is the polygon's extent); with `kpt_shape` in the
YAML (pose datasets) `class cx cy w h` and then the keypoints, of which the box is read. An image without a label
file has no objects (a background image). Relative paths start at `path`, else at the YAML's folder (and at the
YAML's folder when `path` is a folder of another machine); "../train/images" that does not exist there is tried as
"train/images", as ultralytics does for Roboflow's exports.

Coordinates a little outside 0..1 are clipped to the image (ultralytics refuses the whole label file for them); a line
with a coordinate far outside (pixels instead of fractions, say) is skipped and counted with its file and line, not
clipped into a box covering the image.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from . import (
    IMAGE_SUFFIXES,
    DataError,
    Problems,
    Region,
    Sample,
    Split,
    clipped_box,
    clipped_polygon,
    image_size_of,
    missing_split,
    split_names,
)

YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")
NAMES_KEY = re.compile(r"^names\s*:", re.MULTILINE)
# How far outside 0..1 a normalized coordinate may be and still be clipped: further is not a fraction of the image.
OUTSIDE = 0.5
# ultralytics' keys of each split
SPLIT_KEYS = {"train": ("train",), "validation": ("val", "valid", "validation"), "test": ("test",)}


def find_yaml(root: Path, required: bool = True) -> Path | None:
    """The dataset's YAML: data.yaml ..., else a YAML with a `names` key (the folder may hold other YAML: a config, a
    CI file). Without `required` (telling formats apart) only a YAML with `names` counts."""
    if root.is_file():
        return root
    candidates = [root / n for n in YAML_NAMES if (root / n).is_file()] + sorted(
        p for p in [*root.glob("*.yaml"), *root.glob("*.yml")] if not p.name.startswith(".") and p.is_file())
    named = [p for p in dict.fromkeys(candidates)
             if NAMES_KEY.search(p.read_text(encoding="utf-8-sig", errors="replace"))]
    found = named or (candidates if required else [])
    if not found and required:
        raise DataError(f"{root}: no data.yaml (a YOLO dataset describes its splits and class names there)")
    return found[0] if found else None


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("names"), (list, dict)):
        raise DataError(f"{path}: a YOLO data.yaml needs `names` (a list of class names or {{id: name}})")
    return data


def class_names(data: dict, path: Path) -> dict[int, str]:
    names = data["names"]
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    try:
        return {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: `names` must map integer class ids to names, got {names!r}") from None


def image_files(entry: Path) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    lines = [line.strip() for line in entry.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [p if p.is_absolute() else entry.parent / p for p in map(Path, lines)]


def label_file(image: Path) -> Path:
    parts = list(image.parts)
    if "images" in parts:
        at = len(parts) - 1 - parts[::-1].index("images")
        parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo(root: Path, split: str, problems: Problems) -> Split:
    path = find_yaml(root)
    data = read_yaml(path)
    names = class_names(data, path)
    base = dataset_root(data, path)
    keys = next((k for name in split_names(split) for k in SPLIT_KEYS.get(name, (name,)) if data.get(k)), None)
    if keys is None:
        raise missing_split(split, path, [k for k in ("train", "val", "test") if data.get(k)])
    entries = data[keys] if isinstance(data[keys], list) else [data[keys]]
    keypoints = keypoint_values(data, path)
    samples = []
    for entry in entries:
        folder = base / str(entry)
        if not folder.exists() and str(entry).startswith("../"):
            folder = base / str(entry)[3:]
        if not folder.exists():
            raise DataError(f"{path}: the {keys!r} split is {entry!r}, and {folder} does not exist")
        images = image_files(folder)
        if not images:
            raise DataError(f"{path}: the {keys!r} split is {entry!r}, and {folder} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        for image in images:
            sample = read_image(image, names, problems, keypoints)
            if sample is not None:
                samples.append(sample)
    return Split(samples, names, problems.items, f"yolo: {path} ({keys})")


def dataset_root(data: dict, path: Path) -> Path:
    """Where the splits' relative paths start: `path` (relative to the YAML's folder), else the YAML's folder. A
    `path` that does not exist here (a YAML written on another machine: /content/datasets/..., ../datasets/coco8) falls
    back to the YAML's folder, where the export's splits are when the YAML came with them."""
    base = Path(str(data["path"])).expanduser() if data.get("path") else path.parent
    base = base if base.is_absolute() else path.parent / base
    return base if base.is_dir() else path.parent


def keypoint_values(data: dict, path: Path) -> int:
    """How many values of keypoints follow `class cx cy w h` on a line: a pose dataset's `kpt_shape: [17, 3]` (17
    points of x, y, visibility) gives 51; 0 without keypoints."""
    shape = data.get("kpt_shape")
    if shape is None:
        return 0
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise DataError(f"{path}: kpt_shape must be [points, 2 or 3], got {shape!r}")
    return shape[0] * shape[1]


def read_image(image: Path, names: dict[int, str], problems: Problems, keypoints: int = 0) -> Sample | None:
    try:
        size = image_size_of(image)
    except OSError as e:
        problems.add(str(image), f"cannot read the image ({e})")
        return None
    sample = Sample(str(image), str(image), str(image), size)
    labels = label_file(image)
    if not labels.is_file():
        return sample  # a background image: no objects
    for number, line in enumerate(labels.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.split():
            continue
        region = read_line(line, names, size, keypoints)
        if isinstance(region, str):
            problems.add(f"{labels}:{number}", region)
        else:
            sample.regions.append(region)
    return sample


def read_line(line: str, names: dict[int, str], size: tuple[int, int], keypoints: int = 0) -> Region | str:
    """The object of one label line, or why it cannot be used. The class may be written "3" or "3.0" (ultralytics
    reads the line as floats)."""
    values = line.split()
    width, height = size
    try:
        number, coordinates = float(values[0]), [float(v) for v in values[1:]]
    except ValueError:
        return f"not 'class cx cy w h' numbers: {line.strip()!r}"
    if not all(math.isfinite(v) for v in (number, *coordinates)):
        return f"not finite numbers: {line.strip()!r}"
    if not number.is_integer():
        return f"class {values[0]} is not an integer"
    class_id = int(number)
    if class_id not in names:
        return f"unknown class {class_id} (data.yaml names classes {min(names)}..{max(names)})"
    if keypoints:
        if len(coordinates) != 4 + keypoints:
            return f"{len(coordinates)} values after the class: expected 4 (cx cy w h) + {keypoints} (kpt_shape)"
        coordinates = coordinates[:4]  # the keypoints are no target of any task here
    outside = [v for v in coordinates if not -OUTSIDE <= v <= 1 + OUTSIDE]
    if outside:
        return (f"coordinate {outside[0]:g} is not normalized to 0..1 (YOLO labels are fractions of the image's "
                f"width and height, not pixels)")
    polygon = None
    if len(coordinates) == 4:
        cx, cy, w, h = coordinates
        box = clipped_box((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                          (cy + h / 2) * height, size)
    elif len(coordinates) >= 6 and len(coordinates) % 2 == 0:
        points = [v * (width if i % 2 == 0 else height) for i, v in enumerate(coordinates)]
        polygon = clipped_polygon(points, size)
        box = clipped_box(min(points[0::2]), min(points[1::2]), max(points[0::2]), max(points[1::2]), size)
    else:
        return f"{len(coordinates)} coordinates: expected 4 (cx cy w h) or a polygon of 3+ points"
    if isinstance(box, str):
        return box
    return Region(box, names[class_id], class_id, (polygon,) if polygon else ())
