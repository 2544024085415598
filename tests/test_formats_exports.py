"""The readers on datasets written as the tools people use export them: Roboflow's COCO, YOLOv8 and Florence-2
JSONL exports, the official COCO layout, ultralytics' own layouts, Hugging Face datasets saved to disk (cppe-5's
layout, an imagefolder's metadata.jsonl) and their usual defects. Each fixture is written field for field as its
tool writes it (Roboflow's info/licenses/superclass, ultralytics' data.yaml keys, ...)."""

import io
import json

import datasets
import pytest
from PIL import Image

from training.formats import DataError, detect_format, load_split


def image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def regions(split):
    return [[(r.category, r.category_id, pytest.approx(r.box)) for r in s.regions] for s in split.samples]


# ----------------------------------------------------------------------------------------------------------- COCO
def roboflow_coco(root, categories, annotations, split_names=("train", "valid", "test")):
    """Roboflow's COCO export: <split>/_annotations.coco.json beside the images, with its info, licenses, the
    project's superclass as category 0, images with license, date_captured and extra, box-only annotations with
    `segmentation: []`."""
    for split in split_names:
        image(root / split / "IMG_0001_jpg.rf.3f2a.jpg", (416, 416))
        (root / split / "_annotations.coco.json").write_text(json.dumps({
            "info": {"year": "2024", "version": "2", "description": "Exported from roboflow.com", "contributor": "",
                     "url": "https://public.roboflow.com/object-detection/x", "date_created":
                         "2024-03-01T10:00:00+00:00"},
            "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
            "categories": categories,
            "images": [{"id": 0, "license": 1, "file_name": "IMG_0001_jpg.rf.3f2a.jpg", "height": 416, "width": 416,
                        "date_captured": "2024-03-01T10:00:00+00:00", "extra": {"name": "IMG_0001.jpg"}}],
            "annotations": annotations}))
    (root / "README.roboflow.txt").write_text("\nThis dataset was exported via roboflow.com\n")
    (root / "README.dataset.txt").write_text("# Cells > 2024-03-01\n")
    return root


def box(id_, category_id, bbox, **extra):
    return {"id": id_, "image_id": 0, "category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3],
            "segmentation": [], "iscrowd": 0, **extra}


def test_roboflow_coco_export_reads_every_split_without_its_superclass(tmp_path):
    categories = [{"id": 0, "name": "cells", "supercategory": "none"},
                  {"id": 1, "name": "Platelets", "supercategory": "cells"},
                  {"id": 2, "name": "RBC", "supercategory": "cells"}]
    root = roboflow_coco(tmp_path / "export", categories, [
        box(0, 2, [10, 20, 30.5, 40]),
        box(1, 1, [100, 120, 30, 40], segmentation=[[100, 120, 130, 120, 130, 160, 100, 160]]),
        box(2, 2, [400, 400, 30, 30])])  # runs past the 416x416 image: clipped
    assert detect_format(str(root)) == "coco"
    for split in ("train", "validation", "test"):  # validation is Roboflow's valid/
        data = load_split(str(root), split)
        assert data.description == f"coco: {root / ('valid' if split == 'validation' else split)}" \
                                   "/_annotations.coco.json"
        # the superclass no annotation uses is no category: ids kept as Roboflow numbers them, 0 left out
        assert data.categories == {1: "Platelets", 2: "RBC"}
        assert regions(data) == [[("RBC", 2, (10, 20, 40.5, 60)), ("Platelets", 1, (100, 120, 130, 160)),
                                  ("RBC", 2, (400, 400, 416, 416))]]
        assert data.samples[0].regions[1].polygons == ((100, 120, 130, 120, 130, 160, 100, 160),)
        assert data.samples[0].regions[0].polygons == () and data.samples[0].size == (416, 416)
        assert not data.problems


def test_roboflow_single_class_superclass_of_the_same_name_is_left_out(tmp_path):
    # a one-class project: Roboflow names its superclass like the class. Kept, the ground truth written for
    # pycocotools numbered "helmet" 0 (the first id of the name) and predictions.coco.json did not score against
    # the export's own file, whose annotations are category 1.
    categories = [{"id": 0, "name": "helmet", "supercategory": "none"},
                  {"id": 1, "name": "helmet", "supercategory": "helmet"}]
    root = roboflow_coco(tmp_path / "export", categories, [box(0, 1, [5, 5, 50, 60])], ("train",))
    data = load_split(str(root), "train")
    assert data.categories == {1: "helmet"}
    assert regions(data) == [[("helmet", 1, (5, 5, 55, 65))]]


def test_coco_category_used_by_annotations_is_kept_even_when_it_names_a_group(tmp_path):
    # the official COCO "person" is its own supercategory; a category that annotations use is never dropped
    categories = [{"id": 1, "name": "animal", "supercategory": "none"},
                  {"id": 2, "name": "dog", "supercategory": "animal"}]
    root = roboflow_coco(tmp_path / "export", categories, [box(0, 1, [5, 5, 10, 10]), box(1, 2, [1, 1, 4, 4])],
                         ("train",))
    assert load_split(str(root), "train").categories == {1: "animal", 2: "dog"}


def official_coco(root):
    """The official layout: annotations/{instances,captions,person_keypoints}_<split>2017.json, <split>2017/."""
    for split in ("train2017", "val2017"):
        image(root / split / "000000000139.jpg", (64, 48))
        image(root / split / "000000000285.jpg", (64, 48))
    images = [{"license": 2, "file_name": "000000000139.jpg", "coco_url": "http://images.cocodataset.org/val2017/"
               "000000000139.jpg", "height": 48, "width": 64, "date_captured": "2013-11-21 01:34:01",
               "flickr_url": "http://farm9.staticflickr.com/8035/8024364858_9c41dc1666_z.jpg", "id": 139},
              {"license": 4, "file_name": "000000000285.jpg", "coco_url": "", "height": 48, "width": 64,
               "date_captured": "2013-11-18 22:10:24", "flickr_url": "", "id": 285}]
    categories = [{"supercategory": "person", "id": 1, "name": "person"},
                  {"supercategory": "animal", "id": 23, "name": "bear"}]
    instances = [
        {"segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0], [40.0, 5.0, 50.0, 5.0, 50.0, 15.0]], "area": 250.0,
         "iscrowd": 0, "image_id": 139, "bbox": [10.0, 5.0, 40.0, 25.0], "category_id": 1, "id": 1},
        # a crowd: RLE, compressed (a string) and uncompressed (a list) as in the official files
        {"segmentation": {"counts": "Y2c0o0", "size": [48, 64]}, "area": 90.0, "iscrowd": 1, "image_id": 139,
         "bbox": [20.0, 20.0, 10.0, 9.0], "category_id": 1, "id": 900100139},
        {"segmentation": {"counts": [100, 5, 43, 5, 2919], "size": [48, 64]}, "area": 10.0, "iscrowd": 1,
         "image_id": 285, "bbox": [2.0, 4.0, 2.0, 5.0], "category_id": 23, "id": 900100285},
        {"segmentation": [[1.0, 1.0, 60.0, 1.0, 60.0, 40.0, 1.0, 40.0]], "area": 2301.0, "iscrowd": 0,
         "image_id": 285, "bbox": [1.0, 1.0, 59.0, 39.0], "category_id": 23, "id": 1254}]
    (root / "annotations").mkdir(parents=True)
    info = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017}
    for split in ("train2017", "val2017"):
        for kind, annotations, extra in (
                ("instances", instances, {"categories": categories}),
                ("captions", [{"image_id": 139, "id": 1, "caption": "A woman stands in the dining area. "},
                              {"image_id": 139, "id": 2, "caption": "A room with chairs."},
                              {"image_id": 285, "id": 3, "caption": "A big brown bear."}], {}),
                ("person_keypoints", [], {"categories": categories[:1]})):
            (root / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(
                {"info": info, "licenses": [], "images": images, "annotations": annotations, **extra}))
    return root


def test_official_coco_layout_with_polygons_crowds_and_captions(tmp_path):
    root = official_coco(tmp_path / "coco")
    assert detect_format(str(root)) == "coco"
    data = load_split(str(root), "validation")
    first, second = data.samples
    assert [(r.category, r.box, r.crowd) for r in first.regions] == [("person", (10.0, 5.0, 50.0, 30.0), False),
                                                                      ("person", (20.0, 20.0, 30.0, 29.0), True)]
    assert first.regions[0].polygons == ((10, 10, 30, 10, 30, 30), (40, 5, 50, 5, 50, 15))
    assert first.regions[1].polygons == ()  # RLE: a crowd, kept for the ground truth, no polygon to learn
    assert [(r.category, r.crowd) for r in second.regions] == [("bear", True), ("bear", False)]
    assert first.captions == ["A woman stands in the dining area.", "A room with chairs."]
    assert second.captions == ["A big brown bear."] and not data.problems
    assert data.categories == {1: "person", 23: "bear"}
    with pytest.raises(DataError, match=r"no 'test' split .*; found train2017, val2017$"):  # not keypoints_...
        load_split(str(root), "test")


@pytest.mark.parametrize("name", ["instances_val2017.json", "captions_val2017.json"])
def test_an_official_coco_file_given_alone_finds_its_images_beside_annotations(tmp_path, name):
    # `--dataset coco/annotations/instances_val2017.json`: its images are in coco/val2017/, not in annotations/
    root = official_coco(tmp_path / "coco")
    data = load_split(str(root / "annotations" / name), "validation")
    assert [s.image for s in data.samples] == [str(root / "val2017" / "000000000139.jpg"),
                                               str(root / "val2017" / "000000000285.jpg")]
    assert not data.problems


def test_coco_images_found_though_the_first_is_missing(tmp_path):
    # file names listed first in the JSON decide where the images are; the first one missing must not send every
    # image to the wrong folder (each then "not found")
    (tmp_path / "annotations").mkdir()
    for name in ("b.jpg", "c.jpg"):
        image(tmp_path / "images" / name, (40, 30))
    (tmp_path / "annotations" / "instances_default.json").write_text(json.dumps({  # CVAT's export
        "licenses": [{"name": "", "id": 0, "url": ""}], "info": {"contributor": "", "version": ""},
        "categories": [{"id": 1, "name": "car", "supercategory": ""}],
        "images": [{"id": i + 1, "width": 40, "height": 30, "file_name": n, "license": 0, "flickr_url": "",
                    "coco_url": "", "date_captured": 0} for i, n in enumerate(("a.jpg", "b.jpg", "c.jpg"))],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "segmentation": [], "area": 20.0,
                         "bbox": [1.0, 2.0, 5.0, 4.0], "iscrowd": 0, "attributes": {"occluded": False}}]}))
    data = load_split(str(tmp_path), "default")
    assert [s.image for s in data.samples] == [str(tmp_path / "images" / "b.jpg"), str(tmp_path / "images" / "c.jpg")]
    assert regions(data) == [[], [("car", 1, (1, 2, 6, 6))]]
    assert data.problems == [f"{tmp_path / 'annotations' / 'instances_default.json'}, image 1: image file "
                             f"{tmp_path / 'images' / 'a.jpg'} not found"]


def test_coco_whose_images_are_nowhere_is_one_error_naming_the_file(tmp_path):
    root = roboflow_coco(tmp_path / "export", [{"id": 1, "name": "cat", "supercategory": "none"}],
                         [box(0, 1, [1, 1, 5, 5])], ("train",))
    (root / "train" / "IMG_0001_jpg.rf.3f2a.jpg").unlink()
    file = root / "train" / "_annotations.coco.json"
    with pytest.raises(DataError, match=f"^{file}: none of its images is found \\(looked for "
                                        r"'IMG_0001_jpg.rf.3f2a.jpg' in .*train"):
        load_split(str(root), "train")


def test_coco_files_merged_with_an_image_id_twice_skip_both_and_say_so(tmp_path):
    # two exports concatenated without renumbering: id 0 is two images, and its annotations are of either
    root = roboflow_coco(tmp_path / "export", [{"id": 1, "name": "cat", "supercategory": "none"}],
                         [box(0, 1, [1, 1, 5, 5]), box(1, 1, [10, 10, 5, 5], image_id=1)], ("train",))
    file = root / "train" / "_annotations.coco.json"
    data = json.loads(file.read_text())
    image(root / "train" / "other.jpg", (416, 416))
    data["images"] += [{**data["images"][0], "file_name": "other.jpg"},
                       {**data["images"][0], "id": 1, "file_name": "other.jpg"}]
    file.write_text(json.dumps(data))
    split = load_split(str(root), "train")
    assert [(s.image_id, s.image) for s in split.samples] == [(1, str(root / "train" / "other.jpg"))]
    assert regions(split) == [[("cat", 1, (10, 10, 15, 15))]]
    assert split.problems == [f"{file}, image 0: id 0 is listed for two images ('IMG_0001_jpg.rf.3f2a.jpg' and "
                              "'other.jpg'); both skipped, with the annotations of that id"]


def test_coco_file_with_corner_boxes_is_refused(tmp_path):
    # a home-made converter that wrote VOC's corners into COCO's bbox
    root = roboflow_coco(tmp_path / "export", [{"id": 1, "name": "cat", "supercategory": "none"}],
                         [box(0, 1, [300, 200, 380, 260]), box(1, 1, [20, 30, 120, 90]), box(2, 1, [200, 10, 400, 50])],
                         ("train",))
    with pytest.raises(DataError, match=f"^{root / 'train' / '_annotations.coco.json'}: the annotations' bbox look "
                                        r"like corners .* 2 of 3 boxes run past the image \(.*annotation 0: "
                                        r"\[300, 200, 380, 260\] in the 416x416 image\)"):
        load_split(str(root), "train")


# ----------------------------------------------------------------------------------------------------------- JSONL
def test_roboflow_florence2_jsonl_export_with_its_blemishes(tmp_path):
    root = tmp_path / "export"
    od = {"image": "a_jpg.rf.1.jpg", "prefix": "<OD>", "suffix": "cat<loc_100><loc_200><loc_300><loc_400>"}
    for split in ("train", "valid", "test"):
        image(root / split / "a_jpg.rf.1.jpg", (640, 480))
    lines = [json.dumps(od).encode(), b"",  # a blank line
             json.dumps({**od, "prefix": "<OCR>", "suffix": "Caf\u00e9 \u00e0 Paris"}, ensure_ascii=False).encode(),
             json.dumps({**od, "suffix": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"),  # not UTF-8
             b'{"image": "a_jpg.rf.1.jpg", "prefix": "<OD>", "suffix": "trunc',  # cut short
             json.dumps(od).encode()]
    (root / "train" / "annotations.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))  # BOM, CRLF, no last \n
    (root / "valid" / "annotations.jsonl").write_text(json.dumps(od) + "\n")
    (root / "test" / "annotations.jsonl").write_text(json.dumps(od))
    assert detect_format(str(root)) == "jsonl"
    data = load_split(str(root), "train")
    file = root / "train" / "annotations.jsonl"
    assert [(s.where, s.prefix, s.suffix, s.size) for s in data.samples] == [
        (f"{file}:1", "<OD>", od["suffix"], (640, 480)), (f"{file}:3", "<OCR>", "Café à Paris", (640, 480)),
        (f"{file}:6", "<OD>", od["suffix"], (640, 480))]
    # the Latin-1 line is not read with its é replaced by U+FFFD: it is a bad line, with its file and line
    assert data.problems == [f"{file}:4: not UTF-8 text (byte 0xe9, the line's byte 61)",
                             f"{file}:5: not a JSON object (Invalid control character at column 63)"]
    assert [len(load_split(str(root), s).samples) for s in ("validation", "test")] == [1, 1]
    with pytest.raises(DataError, match=f"bad example \\({file}:4: not UTF-8 text"):
        load_split(str(root), "train", fail=True)


def test_roboflow_paligemma_jsonl_layout(tmp_path):
    # Roboflow's PaliGemma export: one folder, _annotations.<split>.jsonl beside all the images, the same keys
    image(tmp_path / "a.jpg", (64, 48))
    for split in ("train", "valid"):
        (tmp_path / f"_annotations.{split}.jsonl").write_text(json.dumps(
            {"image": "a.jpg", "prefix": "detect cat", "suffix": "<loc0100><loc0200><loc0300><loc0400> cat"}) + "\n")
    assert detect_format(str(tmp_path)) == "jsonl"
    data = load_split(str(tmp_path), "validation")
    assert [(s.prefix, s.image) for s in data.samples] == [("detect cat", str(tmp_path / "a.jpg"))]
    with pytest.raises(DataError, match=r"no 'test' split .* found train, valid$"):
        load_split(str(tmp_path), "test")


# ----------------------------------------------------------------------------------------------------------- YOLO
ROBOFLOW_YAML = """train: ../train/images
val: ../valid/images
test: ../test/images

nc: 3
names: ['cat', 'dog', 'fish']

roboflow:
  workspace: my-workspace
  project: pets-abc12
  version: 3
  license: CC BY 4.0
  url: https://universe.roboflow.com/my-workspace/pets-abc12/dataset/3
"""


def roboflow_yolo(root, yaml=ROBOFLOW_YAML, labels=None):
    """Roboflow's YOLOv8 export: data.yaml at the top with ../<split>/images, <split>/images and <split>/labels."""
    labels = labels if labels is not None else {"a_jpg.rf.1": "0 0.5 0.5 0.2 0.4\n", "b_jpg.rf.2": ""}
    for split in ("train", "valid", "test"):
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for name in ("a_jpg.rf.1", "b_jpg.rf.2", "c_jpg.rf.3"):  # c has no label file: a background image
            image(root / split / "images" / f"{name}.jpg", (200, 100))
        for name, text in labels.items():
            (root / split / "labels" / f"{name}.txt").write_text(text)
    (root / "data.yaml").write_text(yaml)
    (root / "README.roboflow.txt").write_text("exported via roboflow.com\n")
    return root


@pytest.mark.parametrize("paths", ["../train/images", "train/images"])
def test_roboflow_yolov8_export(tmp_path, paths):
    yaml = ROBOFLOW_YAML if paths.startswith("../") else ROBOFLOW_YAML.replace("../", "")
    root = roboflow_yolo(tmp_path / "export", yaml, {"a_jpg.rf.1": (
        "0 0.5 0.5 0.2 0.4\n"  # x 80..120, y 30..70
        "1 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n"  # YOLO-seg polygon: its extent x 20..60, y 10..50
        "2 1.0000001 0.5 0.2 0.2\n"  # a hair past the image: clipped
        "7 0.5 0.5 0.1 0.1\n"),  # no class 7
        "b_jpg.rf.2": ""})  # empty: no objects
    assert detect_format(str(root)) == "yolo"
    for split, folder in (("train", "train"), ("validation", "valid"), ("test", "test")):
        data = load_split(str(root), split)
        assert [s.image for s in data.samples] == [str(root / folder / "images" / f"{n}.jpg") for n in
                                                   ("a_jpg.rf.1", "b_jpg.rf.2", "c_jpg.rf.3")]
        assert regions(data) == [[("cat", 0, (80, 30, 120, 70)), ("dog", 1, (20, 10, 60, 50)),
                                  ("fish", 2, (180.00001, 40, 200, 60))], [], []]
        assert data.samples[0].regions[1].polygons == (pytest.approx((20, 10, 60, 10, 60, 50, 20, 50)),)
        label = root / folder / "labels" / "a_jpg.rf.1.txt"
        assert data.problems == [f"{label}:4: unknown class 7 (data.yaml names classes 0..2)"]
        assert data.categories == {0: "cat", 1: "dog", 2: "fish"}


def test_yolo_pixel_coordinates_are_refused_not_clipped_to_the_whole_image(tmp_path):
    # pixels where fractions belong: read as fractions and clipped, this line was a box covering the whole image
    root = roboflow_yolo(tmp_path / "export", labels={"a_jpg.rf.1": "0 10 10 30 30\n0 0.5 0.5 0.2 0.4\n"})
    data = load_split(str(root), "train")
    assert regions(data)[0] == [("cat", 0, (80, 30, 120, 70))]
    label = root / "train" / "labels" / "a_jpg.rf.1.txt"
    assert data.problems == [f"{label}:1: coordinate 10 is not normalized to 0..1 (YOLO labels are fractions of "
                             "the image's width and height, not pixels)"]
    with pytest.raises(DataError, match=f"^bad example \\({label}:1: coordinate 10 is not normalized"):
        load_split(str(root), "train", fail=True)


def test_yolo_class_written_as_a_float_is_read(tmp_path):
    # ultralytics reads a label file as floats: "1.0 ..." is class 1 (some converters write it so)
    root = roboflow_yolo(tmp_path / "export", labels={"a_jpg.rf.1": "1.0 0.5 0.5 0.2 0.4\n1.5 0.5 0.5 0.2 0.4\n"})
    data = load_split(str(root), "train")
    assert regions(data)[0] == [("dog", 1, (80, 30, 120, 70))]
    assert data.problems == [f"{root / 'train' / 'labels' / 'a_jpg.rf.1.txt'}:2: class 1.5 is not an integer"]


def test_yolo_pose_labels_read_their_box_not_their_keypoints_as_a_polygon(tmp_path):
    yaml = "train: train/images\nval: valid/images\nkpt_shape: [2, 3]\nflip_idx: [1, 0]\nnames:\n  0: person\n"
    # class cx cy w h, then 2 keypoints of x y visibility: 10 values, which read as a polygon made a garbage box
    root = roboflow_yolo(tmp_path / "export", yaml, {"a_jpg.rf.1": "0 0.5 0.5 0.2 0.4 0.45 0.4 2 0.55 0.6 2\n"
                                                                    "0 0.5 0.5 0.2 0.4\n"})
    data = load_split(str(root), "train")
    assert regions(data)[0] == [("person", 0, (80, 30, 120, 70))]
    assert data.samples[0].regions[0].polygons == ()
    assert data.problems == [f"{root / 'train' / 'labels' / 'a_jpg.rf.1.txt'}:2: 4 values after the class: "
                             "expected 4 (cx cy w h) + 6 (kpt_shape)"]


def ultralytics_layout(root, yaml):
    """ultralytics' own layout: images/<split>, labels/<split>, a .txt list of images, names as {id: name}."""
    for split in ("train2017", "val2017"):
        image(root / "images" / split / "000000000009.jpg", (100, 50))
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / "000000000009.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "train2017.txt").write_text("./images/train2017/000000000009.jpg\n")
    (root / "data.yaml").write_text(yaml)
    return root


@pytest.mark.parametrize("path", ["", "path: {root}\n", "path: .\n", "path: /content/datasets/coco8\n",
                                  "path: ../datasets/coco8  # dataset root dir\n"])
def test_ultralytics_layout_lists_and_path(tmp_path, path):
    # `path` absent, absolute, relative, or written on another machine (Colab's /content/..., ultralytics'
    # ../datasets/...): the splits are found beside the YAML when `path` is not a folder here
    root = tmp_path / "coco8"
    yaml = (path.format(root=root) + "train: train2017.txt\nval: [images/val2017, images/train2017]\ntest:\n\n"
            "names:\n  0: person\n  1: bicycle\n")
    ultralytics_layout(root, yaml)
    train, val = load_split(str(root), "train"), load_split(str(root), "val")
    assert [s.image for s in train.samples] == [str(root / "images/train2017/000000000009.jpg")]
    assert [s.image for s in val.samples] == [str(root / f"images/{s}/000000000009.jpg")
                                              for s in ("val2017", "train2017")]
    assert regions(val) == [[("bicycle", 1, (40, 20, 60, 30))]] * 2 and not val.problems
    with pytest.raises(DataError, match=r"no 'test' split .* found train, val$"):  # `test:` empty
        load_split(str(root), "test")


def test_yolo_split_folder_without_images_is_an_error(tmp_path):
    root = ultralytics_layout(tmp_path / "d", "train: images/train2017\nval: images/empty\nnames: [a, b]\n")
    (root / "images" / "empty").mkdir()
    with pytest.raises(DataError, match=f"data.yaml: the 'val' split is 'images/empty', and {root}/images/empty "
                                        "holds no images"):
        load_split(str(root), "validation")


def test_auto_is_not_fooled_by_a_yaml_that_is_no_yolo_dataset(tmp_path):
    root = roboflow_coco(tmp_path / "export", [{"id": 1, "name": "cat", "supercategory": "none"}],
                         [box(0, 1, [1, 1, 5, 5])], ("train",))
    (root / "config.yaml").write_text("model: florence2\nlr: 1.0e-5\n")
    (root / ".pre-commit-config.yaml").write_text("repos: []\n")
    assert detect_format(str(root)) == "coco"


# ------------------------------------------------------------------------------------------------- Hugging Face
def png(size):
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def cppe5_features(names, objects=None):
    """cppe-5's features: image_id, image, width, height, objects Sequence({id, area, bbox, category})."""
    return datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"), "objects": objects or datasets.Sequence({
            "id": datasets.Value("int64"), "area": datasets.Value("int64"),
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "category": datasets.ClassLabel(names=names)})})


def test_cppe5_saved_to_disk_with_its_train_and_test_splits(tmp_path):
    names = ["Coverall", "Face_Shield", "Gloves", "Goggles", "Mask"]
    rows = [{"image_id": 15, "image": png((943, 663)), "width": 943, "height": 663,
             "objects": {"id": [114, 115, 116], "area": [3796, 1596, 152768],
                         "bbox": [[302.0, 109.0, 73.0, 52.0], [810.0, 100.0, 57.0, 28.0], [160.0, 31.0, 248.0, 616.0]],
                         "category": [4, 4, 0]}}]
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(rows, features=cppe5_features(names))
                               for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "cppe-5"))
    assert detect_format(str(tmp_path / "cppe-5")) == "hf"
    data = load_split(str(tmp_path / "cppe-5"), "test")
    assert regions(data) == [[("Mask", 4, (302, 109, 375, 161)), ("Mask", 4, (810, 100, 867, 128)),
                              ("Coverall", 0, (160, 31, 408, 647))]]
    assert data.samples[0].image_id == 15 and data.samples[0].size == (943, 663)
    assert data.categories == dict(enumerate(names)) and not data.problems
    with pytest.raises(DataError, match=r"has no 'validation' split \(looked for validation, valid, val, dev\); "
                                        r"found test, train$"):
        load_split(str(tmp_path / "cppe-5"), "validation")


@pytest.mark.parametrize("objects", [
    # a list of objects, `categories` as the key
    datasets.List({"bbox": datasets.List(datasets.Value("float32"), length=4),
                   "categories": datasets.ClassLabel(names=["cat", "dog"])}),
    # a dict of lists, `bboxes` and a Sequence(ClassLabel) `category`
    {"bboxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
     "category": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog"]))},
])
def test_hf_objects_under_other_key_names(tmp_path, objects):
    features = datasets.Features({"image": datasets.Image(), "objects": objects})
    if isinstance(objects, dict):
        row = {"image": png((100, 50)), "objects": {"bboxes": [[10, 5, 20, 10], [0, 0, 5, 5]], "category": [1, 0]}}
    else:
        row = {"image": png((100, 50)), "objects": [{"bbox": [10, 5, 20, 10], "categories": 1},
                                                    {"bbox": [0, 0, 5, 5], "categories": 0}]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([row], features=features)}).save_to_disk(
        str(tmp_path / "d"))
    data = load_split(str(tmp_path / "d"), "valid")
    assert regions(data) == [[("dog", 1, (10, 5, 30, 15)), ("cat", 0, (0, 0, 5, 5))]] and not data.problems
    assert data.categories == {0: "cat", 1: "dog"}


def test_hf_imagefolder_with_object_metadata(tmp_path):
    # the datasets documentation's object detection imagefolder: metadata.jsonl with objects {bbox, categories},
    # plain numbers without names, a folder per split
    for split in ("train", "validation"):
        image(tmp_path / split / "0001.png", (100, 50))
        image(tmp_path / split / "0002.png", (100, 50))
        (tmp_path / split / "metadata.jsonl").write_text(
            json.dumps({"file_name": "0001.png", "objects": {"bbox": [[10.0, 5.0, 20.0, 10.0]], "categories": [2]}})
            + "\n" + json.dumps({"file_name": "0002.png", "objects": {"bbox": [], "categories": []}}) + "\n")
    assert detect_format(str(tmp_path)) == "hf"
    data = load_split(str(tmp_path), "validation")
    assert regions(data) == [[("2", 2, (10, 5, 30, 15))], []] and not data.problems
    assert data.categories == {2: "2"} and [s.size for s in data.samples] == [(100, 50), (100, 50)]


def test_hf_corner_boxes_are_refused_not_read_as_widths(tmp_path):
    # detection-datasets' layout (objects {bbox_id, category, bbox, area}) with corners [x1, y1, x2, y2]: read as
    # [x, y, w, h] they were clipped at the image's edge into garbage, silently
    objects = datasets.Sequence({"bbox_id": datasets.Value("int64"), "category": datasets.ClassLabel(names=["a"]),
                                 "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                 "area": datasets.Value("float32")})
    rows = [{"image_id": 1, "image": png((400, 300)), "width": 400, "height": 300,
             "objects": {"bbox_id": [1, 2], "category": [0, 0], "bbox": [[300, 200, 380, 260], [20, 30, 120, 90]],
                         "area": [4800, 6000]}},
            {"image_id": 2, "image": png((400, 300)), "width": 400, "height": 300,
             "objects": {"bbox_id": [3], "category": [0], "bbox": [[250, 10, 390, 100]], "area": [12600]}}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=cppe5_features([], objects))}
                         ).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"the objects' 'bbox' look like corners \[x1, y1, x2, y2\], not \[x, y, "
                                        r"width, height\] .* 2 of 3 boxes run past the image \(.*row 0, object 0: "
                                        r"\[300.0, 200.0, 380.0, 260.0\] in the 400x300 image\)"):
        load_split(str(tmp_path / "d"), "train")


def test_hf_normalized_boxes_are_refused_not_read_as_pixels(tmp_path):
    rows = [{"image_id": 1, "image": png((400, 300)), "width": 400, "height": 300,
             "objects": {"id": [1, 2], "area": [0, 0], "bbox": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.25, 0.1]],
                         "category": [0, 0]}}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=cppe5_features(["a"]))}).save_to_disk(
        str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"the objects' 'bbox' look normalized \(no coordinate of the 2 boxes exceeds "
                                        r"1\), not \[x, y, width, height\] in pixels"):
        load_split(str(tmp_path / "d"), "train")


def test_hf_xywh_boxes_a_little_past_the_image_are_clipped_not_taken_for_corners(tmp_path):
    # a few xywh boxes past the edge (annotators' slop) do not make a split of corners: most boxes have w <= x
    rows = [{"image_id": 1, "image": png((400, 300)), "width": 400, "height": 300,
             "objects": {"id": [1, 2, 3], "area": [1, 1, 1], "bbox": [[350, 10, 60, 20], [100, 100, 30, 30],
                                                                      [200, 150, 40, 20]], "category": [0, 0, 0]}}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=cppe5_features(["a"]))}).save_to_disk(
        str(tmp_path / "d"))
    data = load_split(str(tmp_path / "d"), "train")
    assert [r.box for r in data.samples[0].regions] == [(350, 10, 400, 30), (100, 100, 130, 130), (200, 150, 240, 170)]


def test_hf_objects_without_a_box_is_one_error_listing_their_keys(tmp_path):
    objects = datasets.Sequence({"xmin": datasets.Value("float32"), "category": datasets.ClassLabel(names=["a"])})
    row = {"image_id": 1, "image": png((40, 30)), "width": 40, "height": 30, "objects": {"xmin": [1], "category": [0]}}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row], features=cppe5_features([], objects))}
                         ).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"the 'objects' column needs a box \(bbox or bboxes or boxes or box: .*its "
                                        r"objects have \['xmin', 'category'\]"):
        load_split(str(tmp_path / "d"), "train")


def test_hf_row_without_an_image_is_counted_not_a_crash(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence({
        "bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": datasets.ClassLabel(names=["a"])})})
    rows = [{"image": None, "objects": {"bbox": [[1, 1, 5, 5]], "category": [0]}},
            {"image": png((40, 30)), "objects": {"bbox": [[1, 1, 5, 5]], "category": [0]}}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(
        str(tmp_path / "d"))
    data = load_split(str(tmp_path / "d"), "train")
    assert regions(data) == [[("a", 0, (1, 1, 6, 6))]]
    assert data.problems == [f"{tmp_path / 'd'}, row 0: no image in this row"]
