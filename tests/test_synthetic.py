"""The synthetic DocVQA-shaped data: deterministic, DocumentVQA's schema, disjoint splits, answers that match the
pixels, and a CLI that never overwrites by accident."""

import dataclasses
import io
import random
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from training import synthetic
from training.synthetic import PALETTE, build_dataset, main, make_documents, render, sample_spec

DOCUMENTVQA_FEATURES = {  # HuggingFaceM4/DocumentVQA's dataset card
    "questionId": datasets.Value("int32"), "question": datasets.Value("string"),
    "question_types": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
    "docId": datasets.Value("int32"), "ucsf_document_id": datasets.Value("string"),
    "ucsf_document_page_no": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string")),
}


def find_spec(predicate, seed: int = 0) -> synthetic.DocumentSpec:
    rng = random.Random(seed)
    while not predicate(spec := sample_spec(rng)):
        pass
    return spec


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def dataset() -> datasets.DatasetDict:
    return build_dataset(train_documents=12, validation_documents=6, seed=5)


def test_same_seed_same_bytes_and_rows():
    first, again, other = make_documents(5, seed=1), make_documents(5, seed=1), make_documents(5, seed=2)
    assert [(d.png, d.questions) for d in first] == [(d.png, d.questions) for d in again]
    assert [d.png for d in first] != [d.png for d in other]


def test_pages_are_written_at_half_their_drawn_size_as_the_mean_of_each_2x2_block():
    (document,) = make_documents(1, seed=3)
    written = Image.open(io.BytesIO(document.png))
    drawn, _ = render(document.spec)
    assert written.size == (drawn.width // 2, drawn.height // 2) and written.mode == drawn.mode
    blocks = pixels(drawn).reshape(drawn.height // 2, 2, drawn.width // 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(pixels(written) - blocks).max() <= 1  # rounded to the nearest integer


def test_validation_pages_do_not_depend_on_the_training_size():
    assert [d.png for d in make_documents(3, seed=0, split="validation")] == \
           [d.png for d in make_documents(4, seed=0, split="validation")[:3]]


def test_schema_matches_documentvqa(dataset):
    assert set(dataset) == {"train", "validation"}
    for split in dataset.values():
        assert dict(split.features) == DOCUMENTVQA_FEATURES
        row = split[0]
        assert isinstance(row["questionId"], int) and isinstance(row["docId"], int)
        assert isinstance(row["image"], Image.Image) and row["image"].mode in ("L", "RGB")
        assert row["ucsf_document_page_no"] == "1" and row["ucsf_document_id"].startswith("synth")
        for types, answers in zip(split["question_types"], split["answers"]):
            assert len(types) == 1 and types[0] in synthetic.LEARNABLE + synthetic.READING
            assert answers and all(isinstance(a, str) and a for a in answers)


def test_splits_are_disjoint_and_questions_share_their_page(dataset):
    raw = {name: split.cast_column("image", datasets.Image(decode=False)) for name, split in dataset.items()}
    pages = {name: {} for name in raw}
    for name, split in raw.items():
        for doc_id, image in zip(split["docId"], split["image"]):
            assert pages[name].setdefault(doc_id, image["bytes"]) == image["bytes"]  # one image per docId
        assert len(pages[name]) == {"train": 12, "validation": 6}[name]
    assert not set(pages["train"]) & set(pages["validation"])
    assert not set(pages["train"].values()) & set(pages["validation"].values())
    question_ids = [*raw["train"]["questionId"], *raw["validation"]["questionId"]]
    assert len(set(question_ids)) == len(question_ids)


def test_question_mix():
    counts = Counter(q.type for d in make_documents(60, seed=0) for q in d.questions)
    reading = sum(counts[t] for t in synthetic.READING) / sum(counts.values())
    assert 0.1 < reading < 0.35, counts  # mostly questions a small model learns from layout
    for document in make_documents(20, seed=3):
        types = [q.type for q in document.questions]
        assert len(types) == len(set(types))
        assert ("header_color" in types) == document.spec.rgb
        assert ("row_count" in types) == (document.spec.kind in ("invoice", "table"))
        assert 1 <= sum(t in synthetic.READING for t in types) <= 2
        assert Image.open(io.BytesIO(document.png)).mode == ("RGB" if document.spec.rgb else "L")


@pytest.mark.parametrize("rgb", [True, False])
def test_header_band_has_the_answer_colour(rgb):
    for color, value in PALETTE.items():
        spec = dataclasses.replace(find_spec(lambda s: True), rgb=rgb, header_color=color)
        image, layout = render(spec)
        band = pixels(image.crop(layout.header)).reshape(-1, 3)
        expected = value if rgb else (Image.new("RGB", (1, 1), value).convert("L").getpixel((0, 0)),) * 3
        colours, counts = np.unique(band, axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == expected


@pytest.mark.parametrize("count", range(2, 8))
@pytest.mark.parametrize("kind", ["invoice", "table"])
def test_table_has_the_answer_row_count(kind, count):
    spec = find_spec(lambda s: s.kind == kind and len(s.rows) == count)
    image, layout = render(spec)
    assert len(layout.rows) == count
    # down a column of the table where no text is: the dark header row, then one rule under each data row
    left, top, _, bottom = layout.rows[0]
    column = np.asarray(image.convert("L"))[top - (bottom - top) - 4: layout.rows[-1][3] + 4, left + 4] < 128
    assert np.count_nonzero(column[1:] & ~column[:-1]) + column[0] == count + 1


@pytest.mark.parametrize("part", ["stamp", "signature"])
def test_stamp_and_signature_are_drawn_where_the_layout_says(part):
    spec = find_spec(lambda s: s.stamp and s.signed and s.rgb)
    with_part, layout = render(spec)
    without, without_layout = render(dataclasses.replace(spec, **{"stamp": None} if part == "stamp" else
                                                         {"signed": False}))
    assert getattr(without_layout, part) is None
    changed = np.any(pixels(with_part) != pixels(without), axis=2)
    ys, xs = np.nonzero(changed)
    left, top, right, bottom = getattr(layout, part)
    assert changed.sum() > 300  # a visible mark, not a stray pixel
    assert left - 2 <= xs.min() and xs.max() <= right + 2 and top - 2 <= ys.min() and ys.max() <= bottom + 2


def test_marks_stay_on_the_page_and_off_the_other_cues():
    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    rng = random.Random(0)
    for _ in range(60):
        spec = dataclasses.replace(sample_spec(rng), stamp="RECEIVED", signed=True)  # the widest stamp word
        image, layout = render(spec)
        for box in (layout.stamp, layout.signature, *layout.rows):
            assert 0 <= box[0] and 0 <= box[1] and box[2] <= image.width and box[3] <= image.height, (spec, box)
        for box in (layout.header, layout.title, layout.signature, *layout.rows):
            assert not overlap(layout.stamp, box), (spec, layout)


def test_title_is_the_largest_text():
    spec = find_spec(lambda s: s.kind == "letter")
    _, layout = render(spec)
    assert layout.title[3] - layout.title[1] >= 38  # body text is 11-16 px, the band's 20 px, the stamp's 18 px


def test_cli_writes_a_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo-data"
    argv = [str(out), "--train-documents", "3", "--validation-documents", "2", "--seed", "7"]
    main(argv)
    assert "train:" in capsys.readouterr().out
    loaded = datasets.load_from_disk(str(out))
    assert set(loaded) == {"train", "validation"} and len(set(loaded["validation"]["docId"])) == 2
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([*argv[:-1], "8", "--overwrite"])
    assert len(set(datasets.load_from_disk(str(out))["train"]["docId"])) == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "demo-data"]  # no staging folder left behind

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main([str(precious), "--overwrite"])  # not a saved dataset: never deleted, even with --overwrite
    assert (precious / "notes.txt").read_text() == "keep me"


def test_captions_describe_their_own_pages_never_the_question_pages(capsys, tmp_path):
    captions = build_dataset(train_documents=4, validation_documents=2, seed=5, captions=True)
    questions = build_dataset(train_documents=4, validation_documents=2, seed=5)
    assert dict(captions["train"].features) == DOCUMENTVQA_FEATURES
    caption_pages = {i for split in captions.values() for i in split["docId"]}
    assert len(caption_pages) == 6 and not caption_pages & {i for split in questions.values() for i in split["docId"]}
    assert set(captions["train"]["question"]) == {"<CAPTION>"}
    assert {t for types in captions["train"]["question_types"] for t in types} == {"caption"}

    for document in make_documents(4, seed=5, split="captions"):
        text, spec = synthetic.caption(document.spec), document.spec
        assert text.startswith((f"A {spec.kind} with ", f"An {spec.kind} with ")) and f"the title {spec.title}" in text
        assert (f"{spec.header_color} header" in text) == spec.rgb
        assert (f"stamped {spec.stamp}" in text) == bool(spec.stamp) and ("no stamp" in text) != bool(spec.stamp)
        assert ("not signed" in text) != spec.signed
        assert (f"table of {synthetic.NUMBER_WORDS.get(len(spec.rows))} rows" in text) == bool(spec.rows)
    spec = find_spec(lambda s: s.rgb and s.stamp and s.signed and len(s.rows) == 3 and s.kind == "invoice"
                     and s.header_color == "orange")
    assert synthetic.caption(spec) == (f"An invoice with an orange header and the title {spec.title}, "
                                       f"a table of three rows, stamped {spec.stamp}, signed.")
    spec = find_spec(lambda s: not s.rgb and not s.stamp and not s.signed and s.kind == "form")
    assert synthetic.caption(spec) == f"A form with a header and the title {spec.title}, no stamp, not signed."

    main([str(tmp_path / "captions"), "--captions", "--train-documents", "2", "--validation-documents", "1"])
    assert "caption" in capsys.readouterr().out
    assert datasets.load_from_disk(str(tmp_path / "captions"))["validation"][0]["question"] == "<CAPTION>"
