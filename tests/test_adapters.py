"""Florence2.from_pretrained(base, adapter=PATH): peft LoRA adapters made on transformers' own Florence-2 (and the
same adapters in Microsoft's module names) merge into our model with the logits of the peft model itself."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from florence2 import Florence2
from florence2.adapters import AdapterError

from .conftest import load_case
from .test_convert import VOCAB
from .test_transformers_parity import with_image_tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

# BART's attention and MLP, DaViT's attention and MLP (fc1 and fc2 match both), the image projection, and the
# patch-embedding convolutions (`conv`: convs.{s}.conv only; the depth-wise ones are conv1/conv2)
TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2", "qkv", "proj", "image_projection", "conv"]
VARIANTS = {
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"fc1": 2, "encoder_attn.q_proj": 3},
                     alpha_pattern={"v_proj": 3.0}),
    # lora_bias: B has a bias, which only merges into a layer that has one (the image projection has none)
    "rslora_lora_bias_all_biases": dict(r=4, lora_alpha=6, use_rslora=True, lora_bias=True, bias="all",
                                        target_modules=[t for t in TARGETS if t != "image_projection"]),
}


def hf_model(folder):
    return transformers.Florence2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def peft_logits(model, case="case0"):
    ref = load_case(case)
    with torch.no_grad():
        out = model(input_ids=with_image_tokens(ref["input_ids"]), pixel_values=ref["pixel_values"],
                    labels=ref["labels"])
    return out.logits[..., :VOCAB]


def our_logits(model, case="case0"):
    ref = load_case(case)
    with torch.no_grad():
        return model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).logits


def make_adapter(converted, folder, **options):
    """A peft adapter on transformers' Florence-2 with random (not zero) B, saved as PeftModel saves it; returns the
    peft model's logits on both cases."""
    torch.manual_seed(0)
    config = peft.LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **options})
    model = peft.get_peft_model(hf_model(converted), config)
    if options.get("bias") == "all":  # as if training had moved the biases: they are saved whole
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("fc1.base_layer.bias") or name.endswith("out_proj.base_layer.bias"):
                    param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on saving (embedding layers, base model config)
        model.save_pretrained(folder)
    return {case: peft_logits(model, case) for case in ("case0", "case1")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_logits_equal_peft(source, converted, tmp_path, variant):
    expected = make_adapter(converted, tmp_path / "adapter", **VARIANTS[variant])
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".lora_A." in k for k in saved) and all(k.startswith("base_model.model.model.") for k in saved)
    base = Florence2.from_pretrained(source, attn_implementation="eager")
    assert not torch.allclose(our_logits(base), expected["case0"], atol=1e-3)  # the adapter changes the model
    for checkpoint in (source, converted):  # the base in either layout; logits of a few units
        merged = Florence2.from_pretrained(checkpoint, adapter=tmp_path / "adapter", attn_implementation="eager")
        for case in ("case0", "case1"):
            torch.testing.assert_close(our_logits(merged, case), expected[case], rtol=0, atol=5e-5)


# Microsoft's module names for transformers' (the remote code's, as its checkpoints name the tensors)
MICROSOFT_NAMES = [
    ("base_model.model.model.language_model.", "base_model.model.language_model.model."),
    ("base_model.model.model.vision_tower.", "base_model.model.vision_tower."),
    ("window_attn.qkv.", "window_attn.fn.qkv."), ("window_attn.proj.", "window_attn.fn.proj."),
    ("channel_attn.qkv.", "channel_attn.fn.qkv."), ("channel_attn.proj.", "channel_attn.fn.proj."),
    ("ffn.fc1.", "ffn.fn.net.fc1."), ("ffn.fc2.", "ffn.fn.net.fc2."), (".conv.lora", ".proj.lora"),
]


def test_an_adapter_in_microsofts_names(source, tmp_path, converted):
    # Microsoft's image_projection is a raw parameter, which peft cannot adapt: the same adapter without it
    targets = [t for t in TARGETS if t != "image_projection"]
    expected = make_adapter(converted, tmp_path / "hf", **VARIANTS["patterns"], target_modules=targets)
    renamed = {}
    for key, tensor in load_file(tmp_path / "hf" / "adapter_model.safetensors").items():
        for theirs, microsoft in MICROSOFT_NAMES:
            key = key.replace(theirs, microsoft)
        renamed[key] = tensor
    assert "base_model.model.vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.lora_A.weight" in renamed
    assert "base_model.model.language_model.model.decoder.layers.1.encoder_attn.q_proj.lora_B.weight" in renamed
    (tmp_path / "msft").mkdir()
    save_file(renamed, str(tmp_path / "msft" / "adapter_model.safetensors"))
    shutil.copy(tmp_path / "hf" / "adapter_config.json", tmp_path / "msft" / "adapter_config.json")
    merged = Florence2.from_pretrained(source, adapter=tmp_path / "msft", attn_implementation="eager")
    for case in ("case0", "case1"):
        torch.testing.assert_close(our_logits(merged, case), expected[case], rtol=0, atol=5e-5)


def test_one_error_names_every_problem(source, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    prefix = "base_model.model.model.language_model."
    save_file({f"{prefix}encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
               f"{prefix}encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
               f"{prefix}encoder.layers.0.self_attn.x_proj.lora_A.weight": torch.randn(4, 32),
               f"{prefix}encoder.layers.0.self_attn.x_proj.lora_B.weight": torch.randn(32, 4),
               "base_model.model.lm_head.lora_A.weight": torch.randn(4, 32),
               "base_model.model.lm_head.lora_B.weight": torch.randn(51328, 4),
               f"{prefix}shared.lora_embedding_A": torch.randn(4, 51328),
               f"{prefix}decoder.layers.1.fc1.lora_A.weight": torch.randn(8, 32),
               f"{prefix}decoder.layers.1.fc1.lora_B.weight": torch.randn(64, 8)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "use_dora": True}))
    with pytest.raises(AdapterError) as error:
        Florence2.from_pretrained(source, adapter=folder)
    message = str(error.value)
    assert "DoRA" in message
    assert "encoder.layers.0.self_attn.x_proj: no such module" in message
    assert "lm_head: LoRA on the LM head" in message
    assert "shared.lora_embedding_A: LoRA on an embedding" in message
    assert "decoder.layers.1.fc1: lora_A (8, 32) and lora_B (64, 8) do not make a rank-4 update" in message
    assert "q_proj:" not in message  # the module that fits is not a problem
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        Florence2.from_pretrained(source, adapter=tmp_path)
