"""The data format readers on small datasets written here: what each reads, how it finds splits, bad data."""

import json

import datasets
import pytest
from PIL import Image

from training.formats import DataError, Region, detect_format, load_split
from training.formats.yolo import label_file

from . import detection_data as dd


@pytest.fixture(scope="module")
def splits():
    return {"train": dd.make_split(4, 0), "valid": dd.make_split(2, 1, size=(80, 48))}


@pytest.fixture(scope="module")
def written(tmp_path_factory, splits):
    root = tmp_path_factory.mktemp("formats")
    dd.hf_dataset(splits).save_to_disk(str(root / "hf"))
    return {"coco": dd.write_coco(root / "coco", splits), "jsonl": dd.write_jsonl(root / "jsonl", splits),
            "yolo": dd.write_yolo(root / "yolo", splits), "hf": root / "hf"}


def boxes(split):
    return [[(r.category, *r.box) for r in s.regions] for s in split.samples]


def expected_boxes(images):
    return [[(c, float(x), float(y), float(x + w), float(y + h)) for c, x, y, w, h in image["objects"]]
            for image in images]


@pytest.mark.parametrize("fmt", ["coco", "jsonl", "yolo", "hf"])
def test_auto_detects_each_format_by_its_files(written, fmt):
    assert detect_format(str(written[fmt])) == fmt


@pytest.mark.parametrize("fmt", ["coco", "yolo", "hf"])
def test_box_formats_read_the_same_objects(written, splits, fmt):
    for split, images in (("train", splits["train"]), ("validation", splits["valid"])):  # "valid" found as validation
        data = load_split(str(written[fmt]), split)
        assert [s.size for s in data.samples] == [image["size"] for image in images]
        got = boxes(data)
        want = expected_boxes(images)
        if fmt == "yolo":  # normalized cx cy w h back to pixels: equal up to float rounding
            assert [[r[0] for r in image] for image in got] == [[r[0] for r in image] for image in want]
            for g, w in zip([r for image in got for r in image], [r for image in want for r in image]):
                assert g[1:] == pytest.approx(w[1:], abs=1e-6)
        else:
            assert got == want
        assert not data.problems
    coco = load_split(str(written["coco"]), "train")
    assert coco.categories == {1: "stamp", 2: "signature"}  # Roboflow's ids, kept; its superclass 0 is no class
    assert coco.samples[0].regions[0].polygons  # the segmentation polygon is read too


def test_jsonl_keeps_prefix_and_suffix_as_they_are(written, splits):
    data = load_split(str(written["jsonl"]), "validation")
    assert [(s.prefix, s.suffix) for s in data.samples] == [("<OD>", dd.od_target(i)) for i in splits["valid"]]
    assert [s.size for s in data.samples] == [(80, 48), (80, 48)]
    assert data.samples[0].where.endswith("valid/annotations.jsonl:1")


def test_a_missing_split_names_what_was_found(written):
    for fmt in ("coco", "jsonl", "yolo", "hf"):
        with pytest.raises(DataError, match=r"no 'test' split .* found:? .*train.*val"):
            load_split(str(written[fmt]), "test")


def test_official_coco_layout_merges_instances_and_captions(tmp_path):
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "val2017" / "000000000001.jpg")
    images = [{"id": 1, "file_name": "000000000001.jpg", "width": 40, "height": 30}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 18, "bbox": [1, 2, 10, 20], "iscrowd": 0}]}))
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": images, "annotations": [{"id": 9, "image_id": 1, "caption": "A dog on a mat."}]}))
    data = load_split(str(tmp_path), "validation")
    assert detect_format(str(tmp_path)) == "coco"
    (sample,) = data.samples
    assert sample.regions == [Region((1.0, 2.0, 11.0, 22.0), "dog", 18)]
    assert sample.captions == ["A dog on a mat."] and sample.image.endswith("val2017/000000000001.jpg")


def test_fiftyone_coco_export_per_split_and_as_one_file(tmp_path):
    for split in ("train", "validation"):  # dataset.export(export_dir=root / split, COCODetectionDataset)
        (tmp_path / split / "data").mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / split / "data" / f"{split}.jpg")
        (tmp_path / split / "labels.json").write_text(json.dumps({
            "info": {}, "licenses": [], "categories": [{"id": 1, "name": "dog", "supercategory": None}],
            "images": [{"id": 1, "file_name": f"{split}.jpg", "height": 30, "width": 40, "license": None}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20], "area": 200,
                             "iscrowd": 0, "segmentation": []}]}))
    assert detect_format(str(tmp_path)) == "coco"
    for data in (load_split(str(tmp_path), "validation"), load_split(str(tmp_path / "validation" / "labels.json"),
                                                                     "validation")):
        (sample,) = data.samples
        assert sample.regions == [Region((1.0, 2.0, 11.0, 22.0), "dog", 1)]
        assert sample.image.endswith("validation/data/validation.jpg") and not data.problems


def coco_file(folder, annotations, images=None, categories=None):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (100, 50)).save(folder / "a.png")
    images = images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}]
    (folder / "_annotations.coco.json").write_text(json.dumps({
        "images": images, "categories": categories or [{"id": 1, "name": "cat"}], "annotations": annotations}))
    return folder.parent


def test_coco_bad_annotations_are_clipped_or_skipped_with_their_id(tmp_path):
    root = coco_file(tmp_path / "d" / "train", [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-10, 40, 30, 30]},  # clipped to x 0..20, y 40..50
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 10, 5, 5]},  # outside: nothing left
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 8]},  # zero width
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [10, 10, 5, 5]},  # unknown category
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [10, 10, 5, 5]},  # unknown image
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 2, "x", 4]},
    ], images=[{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
               {"id": 3, "file_name": "missing.png", "width": 100, "height": 50}])
    data = load_split(str(root), "train")
    assert [r.box for r in data.samples[0].regions] == [(0.0, 40.0, 20.0, 50.0)]
    problems = data.problems
    assert len(problems) == 6
    file = str(root / "train" / "_annotations.coco.json")
    assert problems[0] == f"{file}, image 3: image file {root / 'train' / 'missing.png'} not found"
    assert problems[1] == f"{file}, annotation 2: zero-area box [120, 10, 125, 15] (after clipping to the 100x50 image)"
    assert problems[2].startswith(f"{file}, annotation 3: zero-area box")
    assert problems[3] == f"{file}, annotation 4: unknown category_id 5 (the file's categories: [1])"
    assert problems[4] == f"{file}, annotation 5: image_id 2 is not among the file's images"
    assert problems[5] == f"{file}, annotation 6: bbox [1, 2, 'x', 4] is not four numbers"
    with pytest.raises(DataError, match=r"bad example \(.*image 3: image file .* not found\); use --on-bad-example "
                                        r"skip"):
        load_split(str(root), "train", fail=True)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not a COCO file \(not valid JSON"),
    (json.dumps({"images": []}), r"not a COCO file \(it needs 'images' and 'annotations' lists; it has \['images'\]"),
    (json.dumps([1, 2]), r"not a COCO file \(it needs 'images' and 'annotations' lists; it has list"),
])
def test_a_broken_coco_file_is_one_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_annotations.coco.json").write_text(content)
    with pytest.raises(DataError, match=str(tmp_path / "train" / "_annotations.coco.json") + ": " + message):
        load_split(str(tmp_path), "train", fmt="coco")


def test_jsonl_malformed_lines_are_skipped_with_file_and_line(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "a.png")
    good = json.dumps({"image": "a.png", "prefix": "<CAPTION>", "suffix": "a black square"})
    lines = [good, "{broken", json.dumps({"image": "a.png", "prefix": "<CAPTION>"}), "",
             json.dumps({"image": "gone.png", "prefix": "<CAPTION>", "suffix": "x"}), json.dumps([1]), good]
    (folder / "annotations.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n")  # with a BOM, as some editors save
    data = load_split(str(tmp_path), "train")
    assert [s.where.rsplit(":", 1)[1] for s in data.samples] == ["1", "7"]
    file = folder / "annotations.jsonl"
    assert [p.split(": ", 1)[0] for p in data.problems] == [f"{file}:2", f"{file}:3", f"{file}:5", f"{file}:6"]
    assert "not a JSON object" in data.problems[0] and "needs string values for image, prefix, suffix" in \
        data.problems[1] and "image 'gone.png' not found" in data.problems[2]
    with pytest.raises(DataError, match=f"bad example \\({file}:2: not a JSON object"):
        load_split(str(tmp_path), "train", fail=True)


def test_yolo_lines_polygons_backgrounds_and_bad_lines(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (200, 100)).save(tmp_path / "images" / "train" / f"{name}.jpg")
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/train\n"
                                        "names:\n  0: cat\n  1: dog\n")
    (tmp_path / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"  # box: x 80..120, y 30..70
        "1 0.1 0.1 0.3 0.1 0.3 0.5\n"  # polygon (20,10) (60,10) (60,50)
        "7 0.5 0.5 0.1 0.1\n"  # unknown class
        "0 0.5 0.5\n"  # too few values
        "0 1.2 0.5 0.2 0.2\n")  # outside the image
    data = load_split(str(tmp_path), "train")
    assert [s.image.rsplit("/", 1)[1] for s in data.samples] == ["a.jpg", "b.jpg"]
    a, b = data.samples
    assert [(r.category, r.box) for r in a.regions] == [("cat", pytest.approx((80.0, 30.0, 120.0, 70.0))),
                                                        ("dog", pytest.approx((20.0, 10.0, 60.0, 50.0)))]
    assert a.regions[1].polygons == (pytest.approx((20.0, 10.0, 60.0, 10.0, 60.0, 50.0)),)
    assert b.regions == []  # no label file: a background image
    label = tmp_path / "labels" / "train" / "a.txt"
    assert [p.split(": ", 1)[0] for p in data.problems] == [f"{label}:3", f"{label}:4", f"{label}:5"]
    assert "unknown class 7" in data.problems[0] and "zero-area box" in data.problems[2]
    assert label_file(tmp_path / "images" / "train" / "a.jpg") == label


def test_hf_qa_and_caption_shapes(tmp_path):
    png = {"bytes": _png(), "path": None}
    qa = datasets.Dataset.from_dict({"question": ["What?", "", "Why?"], "answers": [["x", "y"], ["z"], ["  "]],
                                     "image": [png] * 3}, features=datasets.Features({
                                         "question": datasets.Value("string"),
                                         "answers": datasets.Sequence(datasets.Value("string")),
                                         "image": datasets.Image()}))
    datasets.DatasetDict({"train": qa}).save_to_disk(str(tmp_path / "qa"))
    data = load_split(str(tmp_path / "qa"), "train")
    assert [(q.question, q.answers) for s in data.samples for q in s.questions] == [("What?", ("x", "y"))]
    assert [p.split(": ", 1)[1] for p in data.problems] == ["empty question", "no non-empty answer"]
    captions = datasets.Dataset.from_dict({"image": [png], "captions": [["One.", "Two."]]},
                                          features=datasets.Features({"image": datasets.Image(), "captions":
                                                                      datasets.Sequence(datasets.Value("string"))}))
    datasets.DatasetDict({"train": captions}).save_to_disk(str(tmp_path / "cap"))
    assert load_split(str(tmp_path / "cap"), "train").samples[0].captions == ["One.", "Two."]


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()
