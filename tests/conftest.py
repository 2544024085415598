"""Shared fixtures: the small reference model of tests/fixtures/tiny as real checkpoint folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
SHARED = "language_model.model.shared.weight"
ALIASES = ("language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
           "language_model.lm_head.weight")


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
