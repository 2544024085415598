"""Shared fixtures: the small reference model of tests/fixtures/tiny as real checkpoint folders."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence2 import weights

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
# Microsoft's names of the bias buffer, the tied token embedding and its three aliases (tests/fixtures/
# florence2-base.json lists the real checkpoint's names; test_model checks the key table against it)
BIAS = weights.rename(weights.FINAL_LOGITS_BIAS, "ours", "microsoft")
SHARED = weights.rename(weights.SHARED, "ours", "microsoft")
ALIASES = weights.TIED_ALIASES["microsoft"]


def tiny_reference_state() -> dict[str, torch.Tensor]:
    """The tiny model's weights in Microsoft's names, `shared` only (as a save_pretrained fine-tune has them)."""
    state = load_file(TINY / "model-part1.safetensors")
    rows = [state.pop(SHARED + ".rows_0"), load_file(TINY / "model-part2.safetensors")[SHARED + ".rows_1"]]
    state[SHARED] = torch.cat(rows)
    return state


def load_case(name: str) -> dict[str, torch.Tensor]:
    return load_file(TINY / f"{name}.safetensors")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Folder with config.json + model.safetensors (shared embedding only)."""
    folder = tmp_path_factory.mktemp("tiny_safetensors")
    shutil.copy(TINY / "config.json", folder / "config.json")
    save_file(tiny_reference_state(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def tiny_bin_checkpoint(tmp_path_factory) -> Path:
    """Folder with config.json + an fp16 pytorch_model.bin holding all four tied names, like Microsoft's files."""
    folder = tmp_path_factory.mktemp("tiny_bin")
    shutil.copy(TINY / "config.json", folder / "config.json")
    state = {k: v.half() for k, v in tiny_reference_state().items()}
    for alias in ALIASES:
        state[alias] = state[SHARED]  # one storage under four names, as in Microsoft's pickles
    torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_config_dict() -> dict:
    return json.loads((TINY / "config.json").read_text())


def load_convert_tool():
    """tools/convert_weights.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_bias_folder(folder: Path) -> Path:
    """The tiny reference checkpoint with final_logits_bias set to zero, as real checkpoints hold it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_reference_state()
    state[BIAS] = torch.zeros_like(state[BIAS])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(TINY / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """The zero-bias tiny checkpoint in Microsoft's layout: the source of the conversion tests."""
    return zero_bias_folder(tmp_path_factory.mktemp("msft") / "ckpt")


@pytest.fixture(scope="session")
def converted(source, tmp_path_factory) -> Path:
    """`source` converted to transformers' layout by tools/convert_weights.py."""
    return load_convert_tool().convert(source, tmp_path_factory.mktemp("hf") / "out", "transformers")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to share out: one thread is much faster than a pool (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def offline_hub_cache(monkeypatch, hub: Path, checkpoint: Path, repos: tuple[str, ...] = ("someone/florence-tiny",),
                      files: tuple[str, ...] | None = ("config.json", "model.safetensors")) -> None:
    """No network, and a Hugging Face cache under `hub` holding `checkpoint`'s `files` (None: the whole folder) as
    each of `repos` (its main ref pointing to that snapshot)."""
    from huggingface_hub import constants

    revision = "a" * 40
    for repo in repos:
        snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
        if files is None:
            shutil.copytree(checkpoint, snapshot)
        else:
            snapshot.mkdir(parents=True)
            for name in files:
                shutil.copy(checkpoint / name, snapshot / name)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------------------------- training runs
TRAIN_IMAGE_SIZE = 64


def _tiny_model_folder(folder: Path, vision_changes: dict | None = None, **text_changes) -> Path:
    from florence2 import Florence2
    from florence2.config import PRESETS, with_changes
    from florence2.processor import Florence2Processor

    config = with_changes(PRESETS["tiny"], vision=vision_changes or {}, text=text_changes)
    Florence2.from_config(config, seed=0).save_pretrained(folder)
    Florence2Processor(image_size=TRAIN_IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized tiny Florence-2 with its processor (64 px images), as a checkpoint folder."""
    return _tiny_model_folder(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def no_dropout_model_dir(tmp_path_factory) -> Path:
    """The same without dropout or stochastic depth: runs that draw masks differently (1 vs 2 processes) must then
    agree."""
    return _tiny_model_folder(tmp_path_factory.mktemp("tiny_no_dropout"), {"drop_path_rate": 0.0}, dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """A few synthetic DocVQA-shaped documents saved with save_to_disk (train and validation splits)."""
    from training.synthetic import build_dataset

    folder = tmp_path_factory.mktemp("docs") / "data"
    build_dataset(train_documents=6, validation_documents=2, seed=0).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory) -> Path:
    """Fewer documents (18 questions to train on, 4 steps an epoch at batch 4), for the runs under torchrun."""
    from training.synthetic import build_dataset

    folder = tmp_path_factory.mktemp("small_docs") / "data"
    build_dataset(train_documents=3, validation_documents=1, seed=0).save_to_disk(str(folder))
    return folder


def train_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(data_dir), "--output-dir", str(out), "--epochs", "2",
            "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--eval-limit", "4", "--max-new-tokens", "4",
            "--num-beams", "1", "--log-every", "1", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in metrics(out) if "train_loss" in r]


def last_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def prepared(cfg):
    """A training run set up as `fit` sets it up (model, data, optimizer), without training."""
    from training import distributed
    from training.trainer import Run, prepare

    run = Run(cfg, distributed.setup(cfg.device))
    prepare(run)
    return run


@pytest.fixture(scope="session")
def detection_exports(tmp_path_factory) -> dict[str, Path]:
    """The same small detection data (train: 4 images, valid: 2) as a Roboflow COCO export, a JSONL export, a YOLO
    folder and a saved HF dataset."""
    from . import detection_data as dd

    root = tmp_path_factory.mktemp("exports")
    splits = {"train": dd.make_split(4, 0), "valid": dd.make_split(2, 1)}
    dd.hf_dataset(splits).save_to_disk(str(root / "hf"))
    return {"coco": dd.write_coco(root / "coco", splits), "jsonl": dd.write_jsonl(root / "jsonl", splits),
            "yolo": dd.write_yolo(root / "yolo", splits), "hf": root / "hf"}


def detection_args(model_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "<OD>", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
            "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--num-workers", "0", "--max-new-tokens", "8",
            "--num-beams", "1", "--log-every", "1", *extra]
