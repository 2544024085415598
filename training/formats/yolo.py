"""YOLO, as ultralytics reads it: a data.yaml with `names` (a list, or {id: name}), optional `path`, and `train`,
`val`, `test` (a folder of images, a .txt list of image paths, or a list of those). Each image's labels are the .txt
file at the same place under `labels/` instead of `images/`, one object per line: `class cx cy w h` normalized to
0..1, or `class x1 y1 x2 y2 x3 y3 ...` for a polygon (its box is the polygon's extent). An image without a label
file has no objects (a background image). Relative paths start at `path`, else at the YAML's folder; "../train/images"
that does not exist there is tried as "train/images", as ultralytics does for Roboflow's exports.
"""

from __future__ import annotations

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
# ultralytics' keys of each split
SPLIT_KEYS = {"train": ("train",), "validation": ("val", "valid", "validation"), "test": ("test",)}


def find_yaml(root: Path, required: bool = True) -> Path | None:
    if root.is_file():
        return root
    found = [root / n for n in YAML_NAMES if (root / n).is_file()] or sorted(root.glob("*.yaml"))
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
    base = Path(data.get("path") or path.parent)
    base = base if base.is_absolute() else path.parent / base
    keys = next((k for name in split_names(split) for k in SPLIT_KEYS.get(name, (name,)) if data.get(k)), None)
    if keys is None:
        raise missing_split(split, path, [k for k in ("train", "val", "test") if data.get(k)])
    entries = data[keys] if isinstance(data[keys], list) else [data[keys]]
    samples = []
    for entry in entries:
        folder = base / str(entry)
        if not folder.exists() and str(entry).startswith("../"):
            folder = base / str(entry)[3:]
        if not folder.exists():
            raise DataError(f"{path}: the {keys!r} split is {entry!r}, and {folder} does not exist")
        for image in image_files(folder):
            sample = read_image(image, names, problems)
            if sample is not None:
                samples.append(sample)
    return Split(samples, names, problems.items, f"yolo: {path} ({keys})")


def read_image(image: Path, names: dict[int, str], problems: Problems) -> Sample | None:
    try:
        size = image_size_of(image)
    except OSError as e:
        problems.add(str(image), f"cannot read the image ({e})")
        return None
    sample = Sample(str(image), str(image), str(image), size)
    labels = label_file(image)
    if not labels.is_file():
        return sample  # a background image: no objects
    width, height = size
    for number, line in enumerate(labels.read_text(encoding="utf-8-sig").splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        where = f"{labels}:{number}"
        try:
            class_id, coordinates = int(values[0]), [float(v) for v in values[1:]]
        except ValueError:
            problems.add(where, f"not 'class cx cy w h' numbers: {line.strip()!r}")
            continue
        if class_id not in names:
            problems.add(where, f"unknown class {class_id} (data.yaml names classes {min(names)}..{max(names)})")
            continue
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
            problems.add(where, f"{len(coordinates)} coordinates: expected 4 (cx cy w h) or a polygon of 3+ points")
            continue
        if isinstance(box, str):
            problems.add(where, box)
            continue
        sample.regions.append(Region(box, names[class_id], class_id, (polygon,) if polygon else ()))
    return sample
