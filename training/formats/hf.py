"""Hugging Face datasets: a hub id, a `save_to_disk` folder, a parquet/arrow/csv file or a folder of data files.

The shapes understood, by their columns:
- detection: `image` and `objects` holding `bbox` ([x, y, width, height] in pixels, COCO's convention) and
  `category` (or `label`, `category_id`: ClassLabel ids, or names), optionally `width`/`height` and `image_id`
  columns (cppe-5's layout);
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

from . import Columns, DataError, LazyCell, Problems, Question, Region, Sample, Split, clipped_box, split_names

CATEGORY_KEYS = ("category", "label", "category_id")  # of an object, in cppe-5's layout and its look-alikes


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


def detection_samples(table, image_column: str, source: str, problems: Problems) -> tuple[list[Sample], dict]:
    import io

    from PIL import Image

    feature = table.features["objects"]
    feature = getattr(feature, "feature", feature)  # Sequence({...}) or List({...}) or {...}
    feature = feature[0] if isinstance(feature, list) else feature
    category_feature = next((feature[k] for k in CATEGORY_KEYS if k in feature), None) if isinstance(
        feature, dict) else None
    category_feature = getattr(category_feature, "feature", category_feature)
    label_names = list(getattr(category_feature, "names", None) or [])
    categories = dict(enumerate(label_names))
    cells = undecoded(table, image_column)
    names = set(table.column_names)
    sizes = list(zip(table["width"], table["height"])) if {"width", "height"} <= names else None
    ids = table["image_id"] if "image_id" in names else None
    samples = []
    for row, objects in enumerate(table["objects"]):
        image_id = ids[row] if ids is not None else row
        where = f"{source}, row {row}"
        cell = LazyCell(cells, row, image_column)
        if sizes is not None:
            size = tuple(int(v) for v in sizes[row])
        else:
            stored = cell.get()
            try:
                data = stored["bytes"] if stored.get("bytes") is not None else Path(stored["path"]).read_bytes()
                size = Image.open(io.BytesIO(data)).size
            except (OSError, TypeError, KeyError) as e:
                problems.add(where, f"cannot read the image ({e})")
                continue
        sample = Sample(cell, image_id, where, size)
        if isinstance(objects, dict):  # Sequence({...}) gives a dict of lists
            objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
        for number, obj in enumerate(objects or []):
            category = next((obj[k] for k in CATEGORY_KEYS if k in obj), None)
            name = label_names[category] if isinstance(category, int) and 0 <= category < len(label_names) else (
                category if isinstance(category, str) else None)
            if name is None:
                problems.add(f"{where}, object {number}", f"unknown category {category!r}")
                continue
            if isinstance(category, str):
                category = next((i for i, n in categories.items() if n == name), None)
                if category is None:
                    category = len(categories)
                    categories[category] = name
            bbox = obj.get("bbox")
            box = (clipped_box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], size)
                   if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else f"bbox {bbox!r} is not [x, y, w, h]")
            if isinstance(box, str):
                problems.add(f"{where}, object {number}", box)
                continue
            sample.regions.append(Region(box, name, category))
        samples.append(sample)
    return samples, categories
