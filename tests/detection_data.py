"""Small detection datasets written in every format the trainer reads, from one description (for the tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("stamp", "signature")
COLORS = {"stamp": (200, 30, 30), "signature": (30, 30, 200)}


def make_split(count: int, seed: int, size=(64, 64)) -> list[dict]:
    """`count` images, each with 1-2 boxes ({"file", "size", "objects": [(category, x, y, w, h)]})."""
    rng = random.Random(seed)
    images = []
    for i in range(count):
        objects = []
        for _ in range(rng.randint(1, 2)):
            w, h = rng.randint(10, 24), rng.randint(8, 20)
            x, y = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
            objects.append((rng.choice(CATEGORIES), x, y, w, h))
        images.append({"file": f"page{seed}_{i}.png", "size": size, "objects": objects})
    return images


def draw(image: dict) -> Image.Image:
    page = Image.new("RGB", image["size"], "white")
    pen = ImageDraw.Draw(page)
    for category, x, y, w, h in image["objects"]:
        pen.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[category])
    return page


def write_coco(root: Path, splits: dict[str, list[dict]]) -> Path:
    """Roboflow's COCO export: <split>/_annotations.coco.json beside the images; category 0 is the dataset's
    supercategory, as Roboflow writes it."""
    categories = [{"id": 0, "name": "documents", "supercategory": "none"}] + [
        {"id": i + 1, "name": name, "supercategory": "documents"} for i, name in enumerate(CATEGORIES)]
    for split, images in splits.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for image_id, image in enumerate(images):
            draw(image).save(folder / image["file"])
            entries.append({"id": image_id, "file_name": image["file"], "width": image["size"][0],
                            "height": image["size"][1]})
            for category, x, y, w, h in image["objects"]:
                annotations.append({"id": len(annotations), "image_id": image_id,
                                    "category_id": CATEGORIES.index(category) + 1, "bbox": [x, y, w, h],
                                    "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                                    "iscrowd": 0})
        (folder / "_annotations.coco.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "categories": categories, "images": entries, "annotations": annotations}))
    return root


def od_target(image: dict) -> str:
    """The <OD> target of an image, computed here from the spec as the original's processor quantizes (in float32,
    as its tensors are): floor(v / (side / 1000)) clamped to 0..999."""
    width, height = image["size"]
    parts = []
    for category, x, y, w, h in image["objects"]:
        bins = [min(int(np.floor(np.float32(v) / np.float32(side / 1000))), 999) for v, side in
                ((x, width), (y, height), (x + w, width), (y + h, height))]
        parts.append(category + "".join(f"<loc_{b}>" for b in bins))
    return "".join(parts)


def write_jsonl(root: Path, splits: dict[str, list[dict]]) -> Path:
    """maestro's / Roboflow's Florence-2 JSONL: <split>/annotations.jsonl beside the images."""
    for split, images in splits.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for image in images:
            draw(image).save(folder / image["file"])
            lines.append(json.dumps({"image": image["file"], "prefix": "<OD>", "suffix": od_target(image)}))
        (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_yolo(root: Path, splits: dict[str, list[dict]]) -> Path:
    """Roboflow's YOLO export: data.yaml with ../<split>/images paths, labels/ beside images/."""
    keys = {"train": "train", "valid": "val", "test": "test"}
    yaml = [f"{keys[split]}: ../{split}/images" for split in splits]
    yaml += [f"nc: {len(CATEGORIES)}", f"names: {list(CATEGORIES)}"]
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("\n".join(yaml) + "\n")
    for split, images in splits.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for image in images:
            draw(image).save(root / split / "images" / image["file"])
            width, height = image["size"]
            rows = [f"{CATEGORIES.index(c)} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}"
                    for c, x, y, w, h in image["objects"]]
            (root / split / "labels" / Path(image["file"]).with_suffix(".txt")).write_text("\n".join(rows) + "\n")
    return root


def hf_dataset(splits: dict[str, list[dict]]):
    """A DatasetDict in cppe-5's layout: image_id, image, width, height, objects {id, area, bbox, category}."""
    import io

    import datasets

    features = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence({"id": datasets.Value("int64"), "area": datasets.Value("int64"),
                                      "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "category": datasets.ClassLabel(names=list(CATEGORIES))})})
    result = {}
    for split, images in splits.items():
        rows = []
        for image_id, image in enumerate(images):
            encoded = io.BytesIO()
            draw(image).save(encoded, format="PNG")
            objects = image["objects"]
            rows.append({"image_id": image_id, "image": {"bytes": encoded.getvalue(), "path": None},
                         "width": image["size"][0], "height": image["size"][1],
                         "objects": {"id": list(range(len(objects))), "area": [w * h for _, _, _, w, h in objects],
                                     "bbox": [[x, y, w, h] for _, x, y, w, h in objects],
                                     "category": [CATEGORIES.index(c) for c, *_ in objects]}})
        result["validation" if split == "valid" else split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(result)
