"""tools/convert_weights.py and florence2.transformers_layout: Microsoft's layout <-> transformers' layout, without
transformers.

(tests/test_transformers_parity.py loads the converted folders in transformers itself.)
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from florence2 import CheckpointError, ConfigError, Florence2, Florence2Config
from florence2.config import padded_vocab_size, read_config
from florence2.weights import TIED_ALIASES, rename

from .conftest import (
    ALIASES,
    BIAS,
    SHARED,
    TINY,
    load_case,
    load_convert_tool,
    offline_hub_cache,
)

ASSETS = Path(__file__).resolve().parents[1] / "florence2" / "assets"
cw = load_convert_tool()

VOCAB, PADDED = 51289, 51328
T_SHARED = "model.language_model.shared.weight"
T_PROJECTION = "model.multi_modal_projector.image_projection.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def back(converted, tmp_path_factory):
    return cw.convert(converted, tmp_path_factory.mktemp("back") / "out", "microsoft")


def logits(model, case="case0"):
    ref = load_case(case)
    with torch.no_grad():
        return model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).logits


# --------------------------------------------------------------------------------------------- to transformers
def test_transformers_names_shapes_and_values(source, converted):
    src = load_file(source / "model.safetensors")
    out = load_file(converted / "model.safetensors")
    expected = {rename(k, "microsoft", "transformers") for k in src} - {None}
    assert set(out) == expected  # every tensor once: no final_logits_bias, the tied embedding only as `shared`
    assert not set(out) & set(TIED_ALIASES["transformers"])
    for key, tensor in src.items():
        name = rename(key, "microsoft", "transformers")
        if name is None:
            assert key == BIAS
        elif name == T_PROJECTION:
            assert torch.equal(out[name], tensor.t())  # (in, out) matrix -> nn.Linear weight (out, in)
        elif name == T_SHARED:
            assert out[name].shape == (PADDED, tensor.shape[1]) == (padded_vocab_size(VOCAB), 32)
            assert torch.equal(out[name][:VOCAB], tensor)
            # <image> (51289) and the padding rows: the mean of the real rows
            assert torch.equal(out[name][VOCAB:], tensor.mean(0).expand(PADDED - VOCAB, -1))
        else:
            assert torch.equal(out[name], tensor), key


def test_transformers_config(converted, tiny_config_dict):
    d = json.loads((converted / "config.json").read_text())
    assert d["image_token_id"] == VOCAB and d["text_config"]["vocab_size"] == PADDED
    assert d["vision_config"]["model_type"] == "florence_vision"
    assert d["vision_config"]["embed_dim"] == tiny_config_dict["vision_config"]["dim_embed"]
    assert d["dtype"] == "float32" and "auto_map" not in d
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2,
                          "forced_bos_token_id": 0, "forced_eos_token_id": 2, "num_beams": 3,
                          "no_repeat_ngram_size": 3, "early_stopping": True}


def test_transformers_tokenizer(converted):
    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert tokenizer.token_to_id("<image>") == VOCAB
    assert tokenizer.token_to_id("<od>") == 50265 and tokenizer.token_to_id("<loc_0>") == 50269
    assert tokenizer.token_to_id("<and>") == 51288
    for prompt in json.loads((TINY / "processor.json").read_text())["prompts"][:4]:
        assert tokenizer.encode(prompt["prompt"]).ids == prompt["input_ids"]
    assert tokenizer.encode("<image><loc_5>", add_special_tokens=False).ids == [VOCAB, 50274]
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["extra_special_tokens"] == {"image_token": "<image>"}
    assert len(config["additional_special_tokens"]) == 1024
    assert json.loads((converted / "preprocessor_config.json").read_text())["image_seq_length"] == 577


def test_from_pretrained_reads_the_transformers_layout(source, converted):
    original = Florence2.from_pretrained(source, attn_implementation="eager")
    model = Florence2.from_pretrained(converted, attn_implementation="eager")
    assert model.config == original.config
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    for case in ("case0", "case1"):
        torch.testing.assert_close(logits(model, case), logits(original, case), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- and back
def test_back_to_microsoft_bit_for_bit(source, back):
    src, out = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(out) == set(src)
    for key in src:
        assert out[key].dtype == src[key].dtype and torch.equal(out[key], src[key]), key


def test_back_to_microsoft_config(back, tiny_config_dict):
    # Everything comes back but the pointer to Microsoft's remote code and the version of the library that wrote
    # the file (NOT_CARRIED_TO_TRANSFORMERS); torch_dtype is the dtype of the weights written (the tiny fixture's
    # config says float16 for float32 weights).
    d = json.loads((back / "config.json").read_text())
    expected = {k: v for k, v in tiny_config_dict.items() if k not in ("auto_map", "transformers_version")}
    assert d == {**expected, "torch_dtype": "float32"}


def test_back_to_microsoft_side_files(back):
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((ASSETS / name).read_text()), name


def test_bin_fp16_with_four_tied_names_both_ways(tiny_bin_checkpoint, tmp_path):
    # The fixture's final_logits_bias is random: dropped on purpose here; everything else must survive exactly.
    src = torch.load(tiny_bin_checkpoint / "pytorch_model.bin", weights_only=True)
    hf = cw.convert(tiny_bin_checkpoint, tmp_path / "hf", "transformers", drop_final_logits_bias=True)
    out = load_file(hf / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in out.values())
    assert json.loads((hf / "config.json").read_text())["dtype"] == "float16"
    assert torch.equal(out[T_SHARED][:VOCAB], src[SHARED])
    assert torch.equal(out[T_PROJECTION], src["image_projection"].t())
    msft = cw.convert(hf, tmp_path / "msft", "microsoft")
    again = load_file(msft / "model.safetensors")
    assert set(again) == set(src) - set(ALIASES)  # the tied embedding written once
    for key, tensor in again.items():
        expected = torch.zeros_like(src[key]) if key == BIAS else src[key]
        assert tensor.dtype == torch.float16 and torch.equal(tensor, expected), key
    assert json.loads((msft / "config.json").read_text())["torch_dtype"] == "float16"
    # Microsoft -> Microsoft: .bin to model.safetensors, the bias kept
    resaved = load_file(cw.convert(tiny_bin_checkpoint, tmp_path / "resaved", "microsoft") / "model.safetensors")
    assert set(resaved) == set(src) - set(ALIASES)
    assert all(torch.equal(t, src[k]) for k, t in resaved.items())


def test_transformers_bin_with_tied_names(converted, source, tmp_path):
    # A transformers-layout pytorch_model.bin (older transformers saves) holding all four tied names, in fp16.
    state = {k: v.half() for k, v in load_file(converted / "model.safetensors").items()}
    state.update({alias: state[T_SHARED] for alias in TIED_ALIASES["transformers"]})
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(converted / "config.json", tmp_path)
    out = load_file(cw.convert(tmp_path, tmp_path / "msft", "microsoft") / "model.safetensors")
    src = load_file(source / "model.safetensors")
    assert set(out) == set(src)
    assert all(out[k].dtype == torch.float16 and torch.equal(out[k], src[k].half()) for k in src)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype(source, tmp_path, dtype):
    out = cw.convert(source, tmp_path / "out", "transformers", dtype=dtype)
    stored = load_file(out / "model.safetensors")
    assert all(t.dtype == getattr(torch, dtype) for t in stored.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    reference = load_file(source / "model.safetensors")["image_projection"]
    assert torch.equal(stored[T_PROJECTION], reference.t().to(getattr(torch, dtype)))
    back = cw.convert(out, tmp_path / "back", "microsoft", dtype="float32")
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "float32"


def test_nonzero_final_logits_bias(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot be exact.*--drop-final-logits-bias"):
        cw.convert(tiny_checkpoint, tmp_path / "refused", "transformers")
    assert not (tmp_path / "refused").exists()  # nothing written
    out = cw.convert(tiny_checkpoint, tmp_path / "dropped", "transformers", drop_final_logits_bias=True)
    model = Florence2.from_pretrained(out, attn_implementation="eager")
    ref = load_case("case0")
    bias = load_file(tiny_checkpoint / "model.safetensors")[BIAS]
    torch.testing.assert_close(logits(model), ref["logits"] - bias[0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ errors
def test_neither_layout(tmp_path, source):
    shutil.copy(source / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 32}))
    with pytest.raises(ConfigError, match=r"neither Microsoft's Florence-2 layout .* nor transformers'"):
        cw.convert(tmp_path, tmp_path / "out", "transformers")


@pytest.mark.parametrize("layout", ["microsoft", "transformers"])
def test_partial_folder_names_the_missing_tensor(tmp_path, source, converted, layout):
    folder = source if layout == "microsoft" else converted
    key = rename("vision_tower.blocks.2.1.channel_block.ffn.fc2.bias", "ours", layout)
    state = load_file(folder / "model.safetensors")
    del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=f"missing tensors: {key}"):
        cw.convert(tmp_path, tmp_path / "out", "microsoft")


@pytest.mark.parametrize("config_from", ["microsoft", "transformers"])
def test_config_and_weights_of_different_layouts(tmp_path, source, converted, config_from):
    # the converter and from_pretrained read checkpoints with the same function: the same clear error for both
    config, weights_from = (source, converted) if config_from == "microsoft" else (converted, source)
    shutil.copy(weights_from / "model.safetensors", tmp_path)
    shutil.copy(config / "config.json", tmp_path)
    other = {"microsoft": "transformers", "transformers": "microsoft"}[config_from]
    message = f"config.json is in the {config_from} layout but the weights use {other} names"
    with pytest.raises(CheckpointError, match=message):
        cw.convert(tmp_path, tmp_path / "out", "transformers")
    with pytest.raises(CheckpointError, match=message):
        Florence2.from_pretrained(tmp_path)


def test_from_config_reads_the_transformers_layout(source, converted):
    model = Florence2.from_config(converted, seed=0)
    assert model.config == Florence2.from_pretrained(source).config
    assert model.config == Florence2Config.from_json(converted / "config.json")
    assert read_config(converted) == (model.config, "transformers")


def test_destination_not_empty(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*--overwrite"):
        cw.convert(source, dst, "transformers")
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    cw.convert(source, dst, "transformers", overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "model.safetensors").is_file()
    (dst / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"other weight files \(pytorch_model\.bin\)"):
        cw.convert(source, dst, "transformers", overwrite=True)
    with pytest.raises(FileExistsError, match="is the source folder"):
        cw.convert(source, source, "microsoft", overwrite=True)


def test_bad_arguments(source, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        cw.convert(source, tmp_path / "a", "transformers", dtype="float8")
    with pytest.raises(ValueError, match="unknown target layout"):
        cw.convert(source, tmp_path / "b", "onnx")
    with pytest.raises(SystemExit):
        cw.main([str(source), str(tmp_path / "c"), "--to", "transformers", "--dtype", "int8"])


def test_cli(source, tmp_path, capsys):
    assert cw.main([str(source), str(tmp_path / "out"), "--to", "transformers", "--dtype", "float16"]) == 0
    assert "wrote transformers layout" in capsys.readouterr().out
    assert read_config(tmp_path / "out")[1] == "transformers"
    assert cw.main([str(source), str(tmp_path / "out"), "--to", "transformers"]) == 1
    assert "error: " in capsys.readouterr().err


def test_hub_id_from_the_local_cache(tmp_path, source, monkeypatch):
    offline_hub_cache(monkeypatch, tmp_path / "hub", source)
    out = cw.convert("someone/florence-tiny", tmp_path / "out", "transformers")
    assert load_file(out / "model.safetensors").keys() == load_file(
        cw.convert(source, tmp_path / "local", "transformers") / "model.safetensors").keys()


def test_cli_mistakes_end_in_one_line(source, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cases = [
        ([str(tmp_path / "no" / "such"), str(tmp_path / "a"), "--to", "transformers"], 1,
         "neither a local folder nor a hub repo id"),
        (["someone/not-cached", str(tmp_path / "b"), "--to", "transformers"], 1,
         "cannot download config.json of someone/not-cached (revision main) and it is not in the local Hugging Face "
         "cache (HF_HUB_OFFLINE is set)"),
        ([str(source), str(source), "--to", "microsoft", "--overwrite"], 1, "is the source folder"),
        ([str(source), str(tmp_path / "c"), "--to", "onnx"], 2, "invalid choice: 'onnx'"),
        ([str(source), str(tmp_path / "d"), "--to", "transformers", "--dtype", "int8"], 2, "invalid choice: 'int8'"),
    ]
    for argv, expected_status, message in cases:
        try:
            status = cw.main(argv)
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == expected_status and err.startswith("convert_weights.py: error: "), (argv, err)
        assert message in err and err.count("\n") == 1, (argv, err)
