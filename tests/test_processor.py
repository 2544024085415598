"""The processor against the original's prompts, ids and pixel values (tests/fixtures/tiny/processor.json)."""

from __future__ import annotations

import ast
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer

import florence2
from florence2.postprocess import PARSE_TYPES
from florence2.processor import ASSETS, Florence2Processor, to_pil
from tests.conftest import TINY

REFERENCE = json.loads((TINY / "processor.json").read_text())
PROMPTS = REFERENCE["prompts"]
IMAGES = REFERENCE["images"]


@pytest.fixture(scope="module")
def processor() -> Florence2Processor:
    return Florence2Processor()


@pytest.fixture(scope="module")
def small() -> Florence2Processor:
    """64 px: the same code path, cheaper for tests that compare images with each other."""
    return Florence2Processor(image_size=64)


def tiny_image() -> Image.Image:
    return Image.open(TINY / "images" / "rgb_31x17.png")


def random_rgb(height=23, width=37, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- text
def test_prompts_and_ids_match_original(processor):
    for case in PROMPTS:
        assert processor.construct_prompt(case["text"]) == case["prompt"], case["text"]
        assert processor.prompt_ids(case["text"]) == case["input_ids"], case["text"]


def test_prompt_through_call(processor):
    case = next(c for c in PROMPTS if c["text"].startswith("<REGION_TO_SEGMENTATION>"))
    inputs = processor(text=case["text"], images=tiny_image())
    assert inputs["input_ids"].tolist() == [case["input_ids"]]
    assert inputs["attention_mask"].tolist() == [[1] * len(case["input_ids"])]
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == torch.long


def test_batch_pads_right_with_one(processor):
    image = tiny_image()
    inputs = processor(text=[c["text"] for c in PROMPTS], images=[image] * len(PROMPTS))
    longest = max(len(c["input_ids"]) for c in PROMPTS)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (len(PROMPTS), longest)
    assert inputs["pixel_values"].shape == (len(PROMPTS), 3, 768, 768)
    for row, mask, case in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), PROMPTS):
        n = len(case["input_ids"])
        assert row == case["input_ids"] + [1] * (longest - n)
        assert mask == [1] * n + [0] * (longest - n)


def test_florence_tokens_at_their_ids(processor):
    tok = processor.tokenizer
    assert tok.token_to_id("<od>") == 50265
    assert tok.token_to_id("</ocr>") == 50268
    assert tok.token_to_id("<loc_0>") == 50269
    assert tok.token_to_id("<loc_999>") == 51268
    assert tok.token_to_id("<cap>") == 51269
    assert tok.token_to_id("<and>") == 51288
    assert processor.vocab_size == 51289
    assert processor.prompt_ids("<loc_0><poly>") == [0, 50269, 51286, 2]


def test_task_token_with_extra_text_raises(processor):
    with pytest.raises(ValueError, match=r"<OD>.*whole prompt"):
        processor.construct_prompt("<OD> extra")
    with pytest.raises(ValueError, match="<CAPTION>"):
        processor(text="<CAPTION>please", images=tiny_image())


def test_with_input_tasks_keep_the_input_verbatim(processor):
    assert processor.construct_prompt("<OPEN_VOCABULARY_DETECTION> a car ") == "Locate  a car  in the image."
    assert processor.construct_prompt("<DocVQA>What?") == "<DocVQA>What?"


def test_text_none_is_an_empty_prompt(processor):
    assert processor(images=tiny_image())["input_ids"].tolist() == [[0, 2]]


def test_long_prompt_refused_or_truncated(processor):
    assert processor.max_prompt_length == 1024 - 577
    long = " ".join(["word"] * 600)
    assert len(processor.prompt_ids(long)) == 602
    with pytest.raises(ValueError, match=r"prompt 1 has 602 tokens.*max_prompt_length 447"):
        processor(text=["<OD>", long], images=[tiny_image()] * 2)
    with pytest.warns(UserWarning, match="prompt 0 has 602 tokens"):
        inputs = processor(text=long, images=tiny_image(), truncation=True)
    row = inputs["input_ids"][0].tolist()
    assert len(row) == 447 and row[0] == 0 and row[-1] == 2
    assert row[:-1] == processor.prompt_ids(long)[:446]


def test_counts(processor):
    image = tiny_image()
    with pytest.raises(ValueError, match=r"2 prompts for 3 images"):
        processor(text=["<OD>", "<OCR>"], images=[image] * 3)
    with pytest.raises(ValueError, match="empty"):
        processor(text="<OD>", images=[])
    with pytest.raises(ValueError, match="empty"):
        processor(text=[], images=[image])
    with pytest.raises(ValueError, match="images are required"):
        processor(text="<OD>")
    broadcast = processor(text="<OD>", images=[image, image.convert("L")])
    od = next(c["input_ids"] for c in PROMPTS if c["text"] == "<OD>")
    assert broadcast["input_ids"].tolist() == [od, od]


def test_to_casts_only_floating_tensors(processor):
    inputs = processor(text="<OD>", images=tiny_image())
    half = inputs.to("cpu", torch.bfloat16)
    assert half["pixel_values"].dtype == torch.bfloat16
    assert half["input_ids"].dtype == half["attention_mask"].dtype == torch.long
    assert inputs.to(torch.float16).pixel_values.dtype == torch.float16
    assert inputs["pixel_values"].dtype == torch.float32  # the original is left alone
    assert torch.equal(half.input_ids, inputs["input_ids"])


# ----------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("reference", IMAGES, ids=lambda r: r["name"])
def test_pixels_match_original(processor, reference):
    slices = load_file(TINY / "pixel_values.safetensors")
    image = Image.open(TINY / "images" / f"{reference['name']}.png")
    assert image.mode == reference["mode"] and list(image.size) == reference["size"]
    pixels = processor(text="<OD>", images=image)["pixel_values"][0]
    assert list(pixels.shape) == reference["shape"] and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[:, :32, :32], slices[f"{reference['name']}.top_left"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[:, 352:416, 352:416], slices[f"{reference['name']}.center"], atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor(reference["channel_mean"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels.std(dim=(1, 2)), torch.tensor(reference["channel_std"]), atol=1e-4, rtol=0)


def pil_modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(random_rgb())
    ramp = np.arange(23 * 37).reshape(23, 37)
    palette = rgb.quantize(8)
    palette.info["transparency"] = 3
    palette_bytes = rgb.quantize(8)
    palette_bytes.info["transparency"] = bytes(range(0, 256, 32))
    return {
        "I;16": Image.fromarray((ramp * 70).astype(np.uint16)),
        "I": Image.fromarray((ramp - 300).astype(np.int32)),
        "F": Image.fromarray((ramp / 3).astype(np.float32)),
        "CMYK": rgb.convert("CMYK"),
        "LA": rgb.convert("LA"),
        "RGBA": rgb.convert("RGBA"),
        "P": palette,
        "P-bytes": palette_bytes,
        "1": rgb.convert("1"),
        "L": rgb.convert("L"),
    }


@pytest.mark.parametrize("mode", list(pil_modes()))
def test_pil_modes_equal_convert_rgb(small, mode):
    image = pil_modes()[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conversion must not warn either
        converted = to_pil(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = image.convert("RGB")
    assert converted.mode == "RGB"
    assert np.array_equal(np.asarray(converted), np.asarray(expected))
    assert torch.equal(small.image_tensor(image), small.image_tensor(expected))


def test_arrays_and_tensors_equal_the_pil_path(small):
    rgb = random_rgb()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    gray = rgb[..., 0]
    as_rgb = small.image_tensor(Image.fromarray(rgb))
    as_gray = small.image_tensor(Image.fromarray(gray).convert("RGB"))
    same_as_rgb = {
        "HWC uint8": rgb,
        "CHW uint8": rgb.transpose(2, 0, 1),
        "HWC float": rgb / 255.0,
        "HWC float32": (rgb / 255.0).astype(np.float32),
        "HWC RGBA": np.dstack([rgb, alpha]),  # alpha dropped, as convert("RGB") does
        "tensor CHW uint8": torch.from_numpy(rgb.transpose(2, 0, 1).copy()),
        "tensor HWC uint8": torch.from_numpy(rgb),
        "tensor CHW float": torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0),
        "tensor CHW float16": torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0).half(),
    }
    for name, image in same_as_rgb.items():
        assert torch.equal(small.image_tensor(image), as_rgb), name
    for name, image in {"HW": gray, "HW1": gray[..., None], "1HW": gray[None], "tensor HW": torch.from_numpy(gray),
                        "tensor 1HW float": torch.from_numpy(gray[None] / 255.0)}.items():
        assert torch.equal(small.image_tensor(image), as_gray), name


def test_image_paths(small, tmp_path):
    rgb = random_rgb()
    Image.fromarray(rgb).save(tmp_path / "page.png")
    expected = small.image_tensor(Image.fromarray(rgb))
    assert torch.equal(small.image_tensor(tmp_path / "page.png"), expected)
    assert torch.equal(small.image_tensor(str(tmp_path / "page.png")), expected)


def test_bad_images_name_the_index(small, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    good = random_rgb()
    bad = {
        "expected shape": np.zeros((2, 2, 2, 2), np.uint8),
        r"empty \(shape": np.zeros((0, 4, 3), np.uint8),
        "empty \\(0x3\\)": Image.new("RGB", (0, 3)),
        "channel dimension of 1, 3 or 4": np.zeros((5, 5, 2), np.uint8),
        "cannot read": tmp_path / "notes.txt",
        "cannot read .*missing": str(tmp_path / "missing.png"),
        r"\[0, 1\]": np.full((4, 4, 3), 2.0),
        "nan": np.full((4, 4, 3), np.nan),
    }
    for message, image in bad.items():
        with pytest.raises(ValueError, match=f"image 1: .*{message}"):
            small(text="<OD>", images=[good, image])
    for message, image in {"int64": np.zeros((4, 4, 3), np.int64), "got int": 42, "got list": [[1, 2]]}.items():
        with pytest.raises(TypeError, match=f"image 1: .*{message}"):
            small(text="<OD>", images=[good, image])


def test_image_size_override(tmp_path):
    processor = Florence2Processor(image_size=256)
    assert processor.image_seq_length == (256 // 32) ** 2 + 1 == 65
    assert processor.max_prompt_length == 1024 - 65
    assert processor(text="<OD>", images=tiny_image())["pixel_values"].shape == (1, 3, 256, 256)
    processor.save_pretrained(tmp_path)
    again = Florence2Processor.from_pretrained(tmp_path)
    assert again.image_size == (256, 256) and again.image_seq_length == 65
    with pytest.raises(ValueError, match="multiple of 32"):
        Florence2Processor(image_size=100)


# ----------------------------------------------------------------------------------------- decoding
def car_ids(tokenizer: Tokenizer) -> list[int]:
    """</s><s>car<loc_53><loc_333><loc_933><loc_774></s><pad>, by hand."""
    return [2, 0, tokenizer.token_to_id("car"), 50269 + 53, 50269 + 333, 50269 + 933, 50269 + 774, 2, 1]


def test_decode_keeps_special_tokens(processor):
    ids = car_ids(processor.tokenizer)
    assert processor.decode(ids) == "</s><s>car<loc_53><loc_333><loc_933><loc_774></s><pad>"
    assert processor.decode(torch.tensor(ids), skip_special_tokens=True) == "car"
    assert processor.batch_decode(torch.tensor([ids, ids])) == [processor.decode(ids)] * 2


def test_decode_cleans_up_spaces_like_transformers_4_41(processor):
    text = "Hello , world . Is it ? Yes ! I 'm sure it 's done , we 've seen they 're n't ' here"
    ids = processor.text_ids(text)
    assert processor.decode(ids, skip_special_tokens=True) == (
        "Hello, world. Is it? Yes! I'm sure it's done, we've seen they'ren't'here")


# ----------------------------------------------------------------------------------------- answers
def test_post_process_text(processor):
    text = processor.decode(car_ids(processor.tokenizer))
    answer = processor.post_process_generation(text, task="<OD>", image_size=(640, 480))
    assert answer == {"<OD>": {"bboxes": [[pytest.approx(34.24, abs=1e-4), pytest.approx(160.08, abs=1e-4),
                                           pytest.approx(597.44, abs=1e-4), pytest.approx(371.76, abs=1e-4)]],
                               "labels": ["car"]}}


PURE_TEXT = [task for task, kind in PARSE_TYPES.items() if kind == "pure_text"] + ["<DocVQA>", "<VQA>", "free text"]


@pytest.mark.parametrize("task", PURE_TEXT)
def test_pure_text_tasks_need_no_image_size(processor, task):
    # as the original's post_process_generation: the size only matters for coordinates
    assert processor.post_process_generation("</s><s>a red car</s>", task=task) == {task: "a red car"}
    sequence = [2, *processor.text_ids("a red car")]
    assert processor.post_process_generation(sequence=sequence, task=task) == {task: "a red car"}


@pytest.mark.parametrize("task", [task for task, kind in PARSE_TYPES.items() if kind != "pure_text"])
def test_tasks_with_coordinates_still_need_the_image_size(processor, task):
    with pytest.raises(ValueError, match=r"image_size must be \(width, height\)"):
        processor.post_process_generation("</s><s>car<loc_1><loc_2><loc_3><loc_4></s>", task=task)
    with pytest.raises(ValueError, match=r"image_size must be \(width, height\)"):
        processor.post_process_generation("</s><s>a car</s>", task="<CAPTION>", image_size=(0, 4))  # bad if given


def test_the_processor_is_exported_at_the_top_level():
    from florence2 import Florence2, Florence2Processor  # as transformers users write it

    assert Florence2Processor is florence2.processor.Florence2Processor
    assert Florence2 is florence2.model.Florence2


def test_scores_are_exp_mean_of_the_loc_token_scores(processor):
    tok = processor.tokenizer
    # the generated sequence: decoder start </s>, then <s> car <loc_1> <loc_2> <loc_3> <loc_4> </s>
    sequence = torch.tensor([2, 0, tok.token_to_id("car"), 50270, 50271, 50272, 50273, 2])
    scores = torch.tensor([-0.05, -0.2, -0.1, -0.3, -0.6, -0.2, -0.01])  # one per token after the start
    answer = processor.post_process_generation(task="<OD>", image_size=(640, 480), sequence=sequence,
                                               transition_scores=scores)["<OD>"]
    loc_scores = [float(np.float32(s)) for s in (-0.1, -0.3, -0.6, -0.2)]
    assert answer["labels"] == ["car"]
    assert answer["scores"] == [pytest.approx(math.exp(sum(loc_scores) / 4), rel=1e-12)]
    assert answer["bboxes"] == [[pytest.approx(1.5 * 0.64, abs=1e-6), pytest.approx(2.5 * 0.48, abs=1e-6),
                                 pytest.approx(3.5 * 0.64, abs=1e-6), pytest.approx(4.5 * 0.48, abs=1e-6)]]
    # without scores the sequence path gives the text path's answer
    plain = processor.post_process_generation(task="<OD>", image_size=(640, 480), sequence=sequence)
    text = processor.post_process_generation(processor.decode(sequence), task="<OD>", image_size=(640, 480))
    assert plain == text
    with pytest.raises(ValueError, match="7 generated tokens"):
        processor.post_process_generation(task="<OD>", image_size=(640, 480), sequence=sequence,
                                          transition_scores=scores[:-1])


def test_scores_with_several_boxes_and_repeated_start(processor):
    tok = processor.tokenizer
    wheel = processor.tokenizer.encode("wheel", add_special_tokens=False).ids
    sequence = [2, 0, 0, 0, tok.token_to_id("car"), 50270, 50271, 50272, 50273, *wheel, 50274, 50275, 50276, 50277,
                50278, 50279, 50280, 50281, 2]
    scores = [-5.0] * 4 + [-0.1, -0.2, -0.3, -0.4] + [-5.0] * len(wheel) + [-1.0] * 4 + [-2.0] * 4 + [-5.0]
    answer = processor.post_process_generation(task="<OD>", image_size=(1000, 1000), sequence=torch.tensor(sequence),
                                               transition_scores=torch.tensor(scores, dtype=torch.float64))["<OD>"]
    assert answer["labels"] == ["car", "wheel", "wheel"]
    assert answer["scores"] == [pytest.approx(math.exp(-0.25)), pytest.approx(math.exp(-1.0)),
                                pytest.approx(math.exp(-2.0))]


# ----------------------------------------------------------------------------------------- files
def test_save_and_load_give_identical_ids(processor, tmp_path):
    (tmp_path / "config.json").write_text('{"keep": "me"}')
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1024, "old": "settings"}')
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"keep": "me"}'
    loaded = Florence2Processor.from_pretrained(tmp_path)  # its tokenizer.json holds the Florence tokens already
    assert loaded.vocab_size == 51289
    for case in PROMPTS:
        assert loaded.prompt_ids(case["text"]) == case["input_ids"]
    assert loaded.image_settings == processor.image_settings
    assert loaded.max_prompt_length == processor.max_prompt_length


def test_vocab_and_merges_checkpoint(tmp_path):
    spec = json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(ASSETS / name, tmp_path / name)
    loaded = Florence2Processor.from_pretrained(tmp_path)
    assert loaded.vocab_size == 51289
    for case in PROMPTS:
        assert loaded.prompt_ids(case["text"]) == case["input_ids"]
    assert loaded.decode(car_ids(loaded.tokenizer)) == "</s><s>car<loc_53><loc_333><loc_933><loc_774></s><pad>"


def test_folder_without_processor_files_falls_back_with_a_warning(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"no tokenizer.json .*tokenizer_config.json, preprocessor_config.json"):
        loaded = Florence2Processor.from_pretrained(tmp_path)
    assert loaded.prompt_ids("<OD>") == next(c["input_ids"] for c in PROMPTS if c["text"] == "<OD>")


def test_tokenizer_with_other_ids_is_refused():
    tokenizer = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<extra>", special=True)])
    with pytest.raises(ValueError, match="not a Florence-2 tokenizer"):
        Florence2Processor(tokenizer=tokenizer)


def test_hub_repo_from_the_offline_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--florence-ft"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    Florence2Processor(image_size=256).save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Florence2Processor.from_pretrained("someone/florence-ft")
    assert loaded.image_size == (256, 256)
    assert loaded.prompt_ids("<OD>") == next(c["input_ids"] for c in PROMPTS if c["text"] == "<OD>")
    # a file the cache has not seen: an error offline, unless the cache recorded that the repo has none
    (repo / "snapshots" / commit / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json of someone/florence-ft"):
        Florence2Processor.from_pretrained("someone/florence-ft")
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "preprocessor_config.json").touch()
    with pytest.warns(UserWarning, match="no preprocessor_config.json"):
        assert Florence2Processor.from_pretrained("someone/florence-ft").image_size == (768, 768)


def test_not_a_folder_nor_a_repo_id():
    with pytest.raises(ValueError, match="neither a local folder nor a hub repo id"):
        Florence2Processor.from_pretrained("./no/such/folder")


def test_no_transformers_import():
    for name in ("processor.py", "postprocess.py", "draw.py"):
        tree = ast.parse((Path(florence2.__file__).parent / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "transformers" not in imported, name


def test_preprocessing_in_a_thread_starts_no_openmp_team():
    """The server preprocesses in threads beside the model; a large torch op there would start an OpenMP team of
    that thread's own, and libgomp, with more threads than cores, then stops spinning: the model ran 15% slower."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    script = """
import os, threading
from PIL import Image
from florence2.processor import Florence2Processor
processor, image = Florence2Processor(image_size=768), Image.new("RGB", (1024, 768), "white")
threads = lambda: len(os.listdir("/proc/self/task"))
before, during = threads(), []
def prepare():
    processor(text="<OD>", images=image)
    during.append(threads())
worker = threading.Thread(target=prepare)
worker.start()
worker.join()
print(during[0] - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]  # the thread itself, and no OpenMP worker beside it
