"""The model against the original's outputs (tests/fixtures/tiny), loading every checkpoint form, saving."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence2 import CheckpointError, ConfigError, Florence2
from florence2.config import PRESETS
from florence2.weights import from_ours

from .conftest import ALIASES, FIXTURES, SHARED, TINY, load_case, offline_hub_cache, tiny_reference_state

CASES = ["case0", "case1"]


def assert_reference_outputs(model, case, tol=1e-4, loss_tol=1e-5):
    ref = load_case(case)
    with torch.no_grad():
        features = model.encode_image(ref["pixel_values"])
        out = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"])
    torch.testing.assert_close(features, ref["image_features"], rtol=0, atol=tol)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref["encoder_last_hidden_state"], rtol=0, atol=tol)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref["logits"], rtol=0, atol=tol)
    torch.testing.assert_close(out.loss, ref["loss"][0], rtol=0, atol=loss_tol)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_reference_outputs_from_safetensors(tiny_checkpoint, backend, case):
    model = Florence2.from_pretrained(tiny_checkpoint, attn_implementation=backend)
    assert_reference_outputs(model, case)


@pytest.mark.parametrize("case", CASES)
def test_reference_outputs_from_bin_with_four_tied_names(tmp_path, case):
    state = tiny_reference_state()
    state.update({alias: state[SHARED] for alias in ALIASES})
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(TINY / "config.json", tmp_path)
    assert_reference_outputs(Florence2.from_pretrained(tmp_path), case)


def test_fp16_bin_with_four_tied_names(tiny_bin_checkpoint, tiny_checkpoint):
    # The fp16 file holds the reference weights rounded to fp16: the model gets exactly those values in float32,
    # and computes what the float32 model computes on them.
    from_bin = Florence2.from_pretrained(tiny_bin_checkpoint)
    rounded = Florence2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for t in rounded.state_dict().values():
            t.copy_(t.half().float())
    for (name, a), b in zip(from_bin.state_dict().items(), rounded.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    ref = load_case("case0")
    with torch.no_grad():
        logits = from_bin(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=2e-2)  # fp16 rounding of the weights only


def test_dtype_and_auto(tiny_bin_checkpoint):
    assert Florence2.from_pretrained(tiny_bin_checkpoint, dtype="auto").image_projection.weight.dtype == torch.float16
    assert Florence2.from_pretrained(tiny_bin_checkpoint, dtype=torch.bfloat16).image_projection.weight.dtype == (
        torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        Florence2.from_pretrained(tiny_bin_checkpoint, dtype="float13")


def test_sharded_safetensors(tmp_path):
    state = tiny_reference_state()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(TINY / "config.json", tmp_path)
    assert_reference_outputs(Florence2.from_pretrained(tmp_path, attn_implementation="eager"), "case1")


def test_buffers_are_optional(tmp_path):
    state = tiny_reference_state()
    del state["visual_temporal_embed.pos_idx_to_embed"]
    bias = state.pop("language_model.final_logits_bias")
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(TINY / "config.json", tmp_path)
    model = Florence2.from_pretrained(tmp_path)
    assert torch.equal(model.language_model.final_logits_bias, torch.zeros_like(bias))
    row0 = model.temporal_embedding[0]
    assert (row0[0::2] == 0).all() and (row0[1::2] == 1).all()
    ref = load_case("case0")
    with torch.no_grad():
        logits = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).logits
    torch.testing.assert_close(logits, ref["logits"] - bias[0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad checkpoints
def _checkpoint_with(tmp_path, edit):
    state = tiny_reference_state()
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(TINY / "config.json", tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("vision_tower.blocks.2.1.channel_block.ffn.fn.net.fc2.bias"),
     r"missing tensors: vision_tower\.blocks\.2\.1\.channel_block\.ffn\.fn\.net\.fc2\.bias"),
    (lambda s: s.update({"vision_tower.head.weight": torch.zeros(3)}), r"unknown tensors: vision_tower\.head\.weight"),
    (lambda s: s.update({"image_projection": torch.zeros(32, 64)}),
     r"shape mismatches: image_projection: checkpoint \(32, 64\), model \(64, 32\)"),
    (lambda s: s.update({"language_model.lm_head.weight": torch.zeros_like(s[SHARED])}),
     r"language_model\.lm_head\.weight should be the tied token embedding"),
    (lambda s: s.pop(SHARED), r"missing tensors: language_model\.model\.shared\.weight"),
])
def test_bad_checkpoint_errors_name_the_tensor(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        Florence2.from_pretrained(_checkpoint_with(tmp_path, edit))


def test_every_problem_in_one_error(tmp_path):
    def edit(s):
        s.pop("image_proj_norm.bias")
        s["extra.weight"] = torch.zeros(1)
    message = r"unknown tensors: extra\.weight.*missing tensors: image_proj_norm\.bias"
    with pytest.raises(CheckpointError, match=message):
        Florence2.from_pretrained(_checkpoint_with(tmp_path, edit))


def test_truncated_file(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors.*truncated"):
        Florence2.from_pretrained(tmp_path)


def test_truncated_bin(tmp_path, tiny_bin_checkpoint):
    shutil.copy(tiny_bin_checkpoint / "config.json", tmp_path)
    data = (tiny_bin_checkpoint / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cannot read .*pytorch_model\.bin"):
        Florence2.from_pretrained(tmp_path)


def test_bin_with_code_is_refused(tmp_path):
    # weights_only=True: a pickle that would build arbitrary objects is refused, never executed.
    shutil.copy(TINY / "config.json", tmp_path)
    torch.save({"image_projection": torch.zeros(1), "evil": shutil.rmtree}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read"):
        Florence2.from_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    shutil.copy(TINY / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        Florence2.from_pretrained(tmp_path)


def test_folder_without_config(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        Florence2.from_pretrained(tmp_path)


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local folder nor a hub repo id"):
        Florence2.from_pretrained(tmp_path / "missing" / "deeper" / "path")


def test_device_not_available(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Florence2.from_pretrained(tiny_checkpoint, device="cuda")


def test_offline_from_hub_cache(tmp_path, tiny_checkpoint, monkeypatch):
    # A hub repo id resolves from the local Hugging Face cache when there is no network.
    offline_hub_cache(monkeypatch, tmp_path / "hub", tiny_checkpoint)
    model = Florence2.from_pretrained("someone/florence-tiny", attn_implementation="eager")
    assert_reference_outputs(model, "case0")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        Florence2.from_pretrained("someone/not-cached")


# --------------------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("name", ["base", "large"])
def test_saved_names_and_shapes_are_microsofts(name):
    with torch.device("meta"):
        model = Florence2(PRESETS[name])
    saved = {k: list(v.shape) for k, v in from_ours(model.state_dict(), "microsoft").items()}
    reference = json.loads((FIXTURES / f"florence2-{name}.json").read_text())["keys"]
    # save_pretrained writes the tied embedding once, under `shared`, as save_pretrained fine-tunes do;
    # the three other names of that tensor are the only reference names not written.
    assert set(reference) - set(saved) == set(ALIASES)
    assert saved == {k: v for k, v in reference.items() if k not in ALIASES}


def test_save_and_reload_bit_for_bit(tmp_path, tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(tiny_checkpoint / "model.safetensors").keys()
    again = Florence2.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"


def test_random_base_saves_and_reloads(tmp_path):
    model = Florence2.from_config("base", seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reference = json.loads((FIXTURES / "florence2-base.json").read_text())["keys"]
    stored = load_file(tmp_path / "model.safetensors")
    assert {k: list(v.shape) for k, v in stored.items()} == {k: v for k, v in reference.items() if k not in ALIASES}
    again = Florence2.from_pretrained(tmp_path, dtype="auto")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# --------------------------------------------------------------------------------------------- inputs and padding
def test_padded_batch_equals_rows_alone(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    ref = load_case("case1")
    short = ref["input_ids"][1, :9].clone()
    short[-1] = 2
    input_ids = torch.stack([ref["input_ids"][0], torch.cat([short, torch.ones(5, dtype=torch.long)])])
    mask = (torch.arange(14) < torch.tensor([[14], [9]])).long()
    labels = ref["labels"]
    with torch.no_grad():
        batch = model(pixel_values=ref["pixel_values"], input_ids=input_ids, attention_mask=mask, labels=labels).logits
        alone = model(pixel_values=ref["pixel_values"][1:], input_ids=short[None], labels=labels[1:]).logits
        unpadded = model(pixel_values=ref["pixel_values"][:1], input_ids=input_ids[:1], labels=labels[:1]).logits
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[0], unpadded[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(unpadded[0], ref["logits"][0], rtol=0, atol=1e-4)


def test_input_errors(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    ref = load_case("case0")
    px, ids = ref["pixel_values"], ref["input_ids"]
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        model(pixel_values=px[:, :1], input_ids=ids, labels=ref["labels"])
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        model(pixel_values=px, input_ids=ids[:1], labels=ref["labels"][:1])
    with pytest.raises(ValueError, match="exceeds the encoder's 256 positions"):
        model(pixel_values=px, input_ids=torch.zeros(2, 240, dtype=torch.long), labels=ref["labels"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(pixel_values=px, input_ids=ids + 60000, labels=ref["labels"])
    with pytest.raises(ValueError, match="give decoder_input_ids or labels"):
        model(pixel_values=px, input_ids=ids)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(pixel_values=px, input_ids=ids, attention_mask=torch.ones(2, 3), labels=ref["labels"])


def test_labels_make_decoder_inputs_like_the_original(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    ref = load_case("case0")
    labels = ref["labels"]
    expected = torch.cat([torch.full((2, 1), 2), labels[:, :-1]], dim=1).masked_fill(
        torch.cat([torch.zeros(2, 1, dtype=torch.bool), labels[:, :-1] == -100], dim=1), 1)
    with torch.no_grad():
        a = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=labels).logits
        b = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], decoder_input_ids=expected).logits
    assert torch.equal(a, b)


def test_gradient_checkpointing_same_loss_and_grads_in_less_memory(tiny_checkpoint):
    ref = load_case("case0")
    results = []
    for enabled in (False, True):
        model = Florence2.from_pretrained(tiny_checkpoint, attn_implementation="eager")
        model.set_gradient_checkpointing(enabled)
        model.train()
        torch.manual_seed(0)
        saved = []  # what autograd keeps for backward: checkpointed layers keep their inputs only

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=1e-6, msg=name)
    assert saved_b < 0.7 * saved_a  # tests/test_transformers_parity.py checks the gradients themselves


def test_from_config_presets_and_paths(tmp_path):
    tiny = Florence2.from_config("tiny", seed=1)
    again = Florence2.from_config(PRESETS["tiny"], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))
    shutil.copy(TINY / "config.json", tmp_path)
    from_folder = Florence2.from_config(tmp_path)
    assert from_folder.config.text.d_model == 32
    # the architecture the config.json describes is the reference checkpoint's, tensor for tensor
    shapes = {k: v.shape for k, v in from_ours(from_folder.state_dict(), "microsoft").items()}
    assert shapes == {k: v.shape for k, v in tiny_reference_state().items()}
