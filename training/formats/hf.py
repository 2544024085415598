"""Hugging Face datasets: a hub id, a `save_to_disk` folder, a parquet/arrow/csv file or a folder of data files.

The shapes understood, by their columns:
- detection: `image` and `objects` holding `bbox` (or `bboxes`, `boxes`: [x, y, width, height] in pixels, COCO's
  convention) and `category` (or `categories`, `label`, `category_id`: ClassLabel ids, names, or plain numbers),
  optionally `width`/`height` and `image_id` columns (cppe-5's layout; an imagefolder with a metadata.jsonl of
  `objects` {bbox, categories}, as the datasets documentation writes it). Boxes that are corners [x1, y1, x2, y2]
  instead (some hub datasets store them so, under the same name) or fractions of the image are recognized and
  refused with an error saying how to convert them, rather than read as pixel widths into garbage
  (`BoxConvention`);
- DocumentVQA (HuggingFaceM4/DocumentVQA): one question per row, `question`, `answers` (a list), `image`,
  optionally `question_types` (renamed with --question-column etc.);
- The Cauldron (HuggingFaceM4/the_cauldron): `images` (a list) and `texts` ({user, assistant} turns), one question
  per turn;
- captions: `image` and `caption` (a string) or `captions` (a list);
- OCR: `image` and `text`.
Images stay in the table, undecoded, until an example is built (so a broken image is that example's error, counted,
not the loader's), and each image's key for the feature cache is a hash of its bytes.
"""

from __future__ import annotations

from pathlib import Path

from . import (
    BoxConvention,
    Columns,
    DataError,
    LazyCell,
    Problems,
    Question,
    Region,
    Sample,
    Split,
    clipped_box,
    image_size_of,
    split_names,
)

# An object's category and box, by the names datasets give them: cppe-5 (category, bbox), an imagefolder's
# metadata.jsonl (categories, bbox, as in the datasets documentation), and look-alikes.
CATEGORY_KEYS = ("category", "categories", "label", "labels", "category_id", "class")
BOX_KEYS = ("bbox", "bboxes", "boxes", "box")


def load_table(source: str, split: str, config: str | None = None, revision: str | None = None):
    """The `datasets.Dataset` of one split, by any of its usual names."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
                       ".arrow": "arrow"}.get(path.suffix)
            if builder is None:
                raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use parquet, arrow or csv)")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if not isinstance(loaded, datasets.DatasetDict):
                return loaded
            name = next((n for n in split_names(split) if n in loaded), None)
            if name is None:
                from . import missing_split

                raise missing_split(split, path, list(loaded))
            return loaded[name]
        target = str(path) if path.is_dir() else source
        errors = []
        for name in split_names(split):
            try:
                return datasets.load_dataset(target, config, split=name, revision=None if path.is_dir() else revision)
            except ValueError as e:  # datasets reports an unknown split as ValueError, naming the splits it has
                errors.append(str(e))
        raise DataError(f"cannot load split {split!r} of {source}: {errors[0]}")
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"cannot find dataset {source}: {e}") from None
    except ConnectionError as e:
        raise DataError(f"cannot download dataset {source} (and it is not in the local cache): {e}") from None


def read_hf(source: str, split: str, problems: Problems, *, config: str | None = None,
            columns: Columns | None = None) -> Split:
    columns = columns or Columns()
    table = load_table(source, split, config)
    names = set(table.column_names)
    description = f"hf: {source} ({split})"
    if "objects" in names and columns.image in names:
        samples, categories = detection_samples(table, columns.image, source, problems)
        return Split(samples, categories, problems.items, description)
    if {columns.question, columns.answers, columns.image} <= names:
        return Split(docvqa_samples(table, columns, source, problems), {}, problems.items, description)
    if {"images", "texts"} <= names:
        return Split(cauldron_samples(table, source), {}, problems.items, description)
    if columns.image in names and names & {"caption", "captions", "text"}:
        return Split(text_samples(table, columns.image, source), {}, problems.items, description)
    raise DataError(f"{source}: columns {sorted(names)} are none of the shapes understood: detection ({columns.image!r}"
                    f" and 'objects'), DocumentVQA ({columns.question!r}, {columns.answers!r}, {columns.image!r}; "
                    "rename with --question-column etc.), The Cauldron ('images', 'texts'), captions "
                    f"({columns.image!r} and 'caption' or 'captions') or OCR ({columns.image!r} and 'text')")


def undecoded(table, column: str, many: bool = False):
    """The image column alone, not decoded: {bytes, path} per row (a list of them when `many`)."""
    import datasets

    feature = datasets.Image(decode=False)
    if many:
        feature = [feature] if isinstance(table.features[column], list) else datasets.Sequence(feature)
    return table.select_columns([column]).cast_column(column, feature)


def docvqa_samples(table, columns: Columns, source: str, problems: Problems) -> list[Sample]:
    """One sample per row, one question each. Rows with an empty question or no non-empty answer are skipped."""
    cells = undecoded(table, columns.image)
    types = table["question_types"] if "question_types" in table.column_names else [None] * len(table)
    samples = []
    for row, (question, answers, kinds) in enumerate(zip(table[columns.question], table[columns.answers], types)):
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        where = f"{source}, row {row}"
        if not isinstance(question, str) or not question.strip():
            problems.add(where, "empty question")
            continue
        if not answers:
            problems.add(where, "no non-empty answer")
            continue
        kind = kinds[0] if isinstance(kinds, list) and kinds else "all"
        samples.append(Sample(LazyCell(cells, row, columns.image), row, where,
                              questions=[Question(question, tuple(answers), kind)]))
    return samples


def cauldron_samples(table, source: str) -> list[Sample]:
    cells = undecoded(table, "images", many=True)
    samples = []
    for row, texts in enumerate(table["texts"]):
        questions = [Question(t["user"], (t["assistant"],)) for t in texts or []
                     if isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)]
        samples.append(Sample(LazyCell(cells, row, "images", first=True), row, f"{source}, row {row}",
                              questions=questions))
    return samples


def text_samples(table, image_column: str, source: str) -> list[Sample]:
    cells = undecoded(table, image_column)
    names = set(table.column_names)
    captions = table["captions"] if "captions" in names else table["caption"] if "caption" in names else None
    texts = table["text"] if "text" in names else None
    samples = []
    for row in range(len(table)):
        sample = Sample(LazyCell(cells, row, image_column), row, f"{source}, row {row}")
        if captions is not None:
            value = captions[row]
            sample.captions = [c.strip() for c in ([value] if isinstance(value, str) else value or [])
                               if isinstance(c, str) and c.strip()]
        if texts is not None and isinstance(texts[row], str) and texts[row].strip():
            sample.text = texts[row]
        samples.append(sample)
    return samples


def object_keys(feature, source: str) -> tuple[str, str, list[str] | None]:
    """The keys of an object's box and category, and the category names (a ClassLabel's; None when the categories
    are plain numbers or names). A layout without either key is one error listing the keys it has, not every
    object skipped."""
    feature = getattr(feature, "feature", feature)  # Sequence({...}) or List({...}) or {...}
    feature = feature[0] if isinstance(feature, list) else feature
    keys = list(feature) if isinstance(feature, dict) else []
    box_key = next((k for k in BOX_KEYS if k in keys), None)
    category_key = next((k for k in CATEGORY_KEYS if k in keys), None)
    if box_key is None or category_key is None:
        raise DataError(f"{source}: the 'objects' column needs a box ({' or '.join(BOX_KEYS)}: [x, y, width, "
                        f"height] in pixels) and a category ({' or '.join(CATEGORY_KEYS)}); its objects have "
                        f"{keys or type(feature).__name__}")
    category_feature = feature[category_key]
    category_feature = getattr(category_feature, "feature", category_feature)  # Sequence(ClassLabel) in a dict
    names = getattr(category_feature, "names", None)
    return box_key, category_key, list(names) if names else None


def detection_samples(table, image_column: str, source: str, problems: Problems) -> tuple[list[Sample], dict]:
    """One sample per row, its objects' boxes read as COCO's [x, y, width, height] in pixels (cppe-5's and the
    Hugging Face detection guide's convention). Categories are ClassLabel ids (named by the ClassLabel), names, or
    plain numbers without names (an imagefolder's metadata.jsonl), which are named by their number."""
    box_key, category_key, label_names = object_keys(table.features["objects"], source)
    categories = dict(enumerate(label_names or []))
    cells = undecoded(table, image_column)
    names = set(table.column_names)
    sizes = list(zip(table["width"], table["height"])) if {"width", "height"} <= names else None
    ids = table["image_id"] if "image_id" in names else None
    samples, convention = [], BoxConvention()
    for row, objects in enumerate(table["objects"]):
        image_id = ids[row] if ids is not None else row
        where = f"{source}, row {row}"
        cell = LazyCell(cells, row, image_column)
        size = sizes[row] if sizes is not None else None
        if not (size and all(isinstance(v, int) and v > 0 for v in size)):
            size = stored_size(cell.get())
            if isinstance(size, str):
                problems.add(where, size)
                continue
        sample = Sample(cell, image_id, where, tuple(size))
        if isinstance(objects, dict):  # Sequence({...}) gives a dict of lists
            objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
        for number, obj in enumerate(objects or []):
            category = obj.get(category_key)
            name = category_name(category, label_names, categories)
            if name is None:
                problems.add(f"{where}, object {number}", f"unknown category {category!r}")
                continue
            if isinstance(category, str):
                category = next((i for i, n in categories.items() if n == name), None)
                if category is None:
                    category = len(categories)
                    categories[category] = name
            bbox = obj.get(box_key)
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                problems.add(f"{where}, object {number}", f"{box_key} {bbox!r} is not [x, y, w, h]")
                continue
            convention.add(bbox, sample.size, f"{where}, object {number}")
            box = clipped_box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], sample.size)
            if isinstance(box, str):
                problems.add(f"{where}, object {number}", box)
                continue
            sample.regions.append(Region(box, name, category))
        samples.append(sample)
    convention.check(f"{source}: the objects' {box_key!r}")
    return samples, categories


def category_name(category, label_names: list[str] | None, categories: dict) -> str | None:
    """An object's category name: its ClassLabel's name, the name itself, or (without ClassLabel names) its
    number; None when it is none of these (a ClassLabel id out of range, -1, None)."""
    if isinstance(category, str):
        return category if category.strip() else None
    if not isinstance(category, int) or isinstance(category, bool):
        return None
    if label_names is not None:
        return label_names[category] if 0 <= category < len(label_names) else None
    return categories.setdefault(category, str(category))


def stored_size(stored) -> tuple[int, int] | str:
    """(width, height) of an undecoded image cell ({bytes, path}), or why it cannot be read."""
    import io

    if not isinstance(stored, dict) or (stored.get("bytes") is None and not stored.get("path")):
        return "no image in this row"
    try:
        return image_size_of(io.BytesIO(stored["bytes"]) if stored.get("bytes") is not None else stored["path"])
    except OSError as e:
        return f"cannot read the image ({e})"
