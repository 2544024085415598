"""The converted checkpoint in transformers' own Florence-2: the second, independent check of the model.

The tiny reference weights (random, so any swapped or mis-tied tensor shows) converted to the transformers layout
must give the original's logits and generations in `transformers.Florence2ForConditionalGeneration`, and our
generate must pick the same sequences as transformers' generate. transformers' model has no final_logits_bias:
where a test needs one (the reference's random bias, a raised EOS logit), both models get the same bias, ours in
`final_logits_bias`, transformers' as the bias of its lm_head (the padded rows get 0).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from florence2 import Florence2
from florence2.model import shift_right
from florence2.transformers_layout import IMAGE_TOKEN

from .conftest import BIAS, TINY, load_case
from .test_convert import VOCAB, cw

transformers = pytest.importorskip("transformers")

IMAGE_ID = VOCAB  # <image>, the first id past the original vocabulary
IMAGE_TOKENS = 17  # 1 + (128 / 32) ** 2 at the fixtures' 128 x 128
CASES = json.loads((TINY / "cases.json").read_text())["cases"]
DEFAULTS = {"num_beams": 3, "no_repeat_ngram_size": 3, "early_stopping": True, "forced_bos_token_id": 0,
            "forced_eos_token_id": 2, "decoder_start_token_id": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(folder, bias=None):
    model = transformers.Florence2ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    if bias is not None:  # the same function as ours with this final_logits_bias: lm_head(h) = h @ E^T + bias
        shared = model.model.language_model.shared.weight
        head = torch.nn.Linear(shared.shape[1], shared.shape[0], bias=True)
        head.weight = shared
        head.bias = torch.nn.Parameter(torch.cat([bias, bias.new_zeros(shared.shape[0] - bias.shape[0])]))
        model.lm_head = head
    return model.eval()


def with_image_tokens(input_ids):
    """transformers' model takes one <image> id per image token in front of the prompt."""
    return torch.cat([torch.full((input_ids.shape[0], IMAGE_TOKENS), IMAGE_ID), input_ids], dim=1)


@pytest.fixture(scope="module")
def reference_bias():
    return load_file(TINY / "model-part1.safetensors")[BIAS][0]


def test_logits_match_the_original(converted, reference_bias):
    model, info = transformers.Florence2ForConditionalGeneration.from_pretrained(
        converted, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mis-shaped tensor
    model.eval()
    assert model.config.image_token_id == IMAGE_ID
    assert Florence2.from_pretrained(converted).config.image_tokens(128) == IMAGE_TOKENS
    for case in ("case0", "case1"):
        ref = load_case(case)
        with torch.no_grad():
            out = model(input_ids=with_image_tokens(ref["input_ids"]), pixel_values=ref["pixel_values"],
                        labels=ref["labels"])
        assert out.logits.shape[-1] == 51328
        # the reference has a random final_logits_bias, the converted checkpoint none
        torch.testing.assert_close(out.logits[..., :VOCAB], ref["logits"] - reference_bias, rtol=0, atol=1e-4)


@pytest.mark.parametrize("training_kernels", [False, True])
def test_gradients_match_transformers(source, converted, training_kernels):
    # Every parameter's gradient of the loss, ours against transformers' on the same weights (eval mode: no
    # dropout). transformers' softmax also covers its extra vocabulary rows: its loss is taken on the real ones.
    from florence2 import kernels
    from florence2.weights import rename

    ours = Florence2.from_pretrained(source, attn_implementation="eager")
    kernels.use(ours, "training" if training_kernels else None)
    theirs = hf_model(converted)
    ref = load_case("case0")
    loss = ours(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"]).loss
    loss.backward()
    decoder_input_ids = shift_right(ref["labels"], start_token_id=2, pad_token_id=1)
    logits = theirs(input_ids=with_image_tokens(ref["input_ids"]), pixel_values=ref["pixel_values"],
                    decoder_input_ids=decoder_input_ids).logits
    their_loss = torch.nn.functional.cross_entropy(logits[..., :VOCAB].flatten(0, 1), ref["labels"].flatten())
    their_loss.backward()
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-5)
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        their_grad = their_params[rename(name, "ours", "transformers")].grad
        if name == "language_model.shared.weight":
            their_grad = their_grad[:VOCAB]
        torch.testing.assert_close(param.grad, their_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_generate_reproduces_the_reference_sequences(converted, reference_bias, case):
    model = hf_model(converted, bias=reference_bias)
    ref = load_case(case["name"])
    for setting, options in case["generate_settings"].items():
        # transformers 5 does not read decoding defaults from text_config: every one is passed
        out = model.generate(input_ids=with_image_tokens(ref["input_ids"]), pixel_values=ref["pixel_values"],
                             do_sample=False, **{**DEFAULTS, **options})
        assert torch.equal(out, ref[f"generate.{setting}"]), setting


GENERATE_SETTINGS = [
    {"num_beams": 3},
    {"num_beams": 4, "early_stopping": False},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
    {"num_beams": 2, "num_return_sequences": 2},
    {"num_beams": 1},
    {"num_beams": 3, "min_new_tokens": 3},
]


def four_prompts():
    """case0's and case1's rows in one batch: case0's shorter prompts right-padded, which both models mask (the
    original attends to padding; see model.py)."""
    a, b = load_case("case0"), load_case("case1")
    length = b["input_ids"].shape[1]
    padded = torch.cat([a["input_ids"], torch.ones(2, length - a["input_ids"].shape[1], dtype=torch.long)], dim=1)
    input_ids = torch.cat([padded, b["input_ids"]])
    return input_ids, (input_ids != 1).long(), torch.cat([a["pixel_values"], b["pixel_values"]])


@pytest.mark.parametrize("eos_boost", [2.5, 4.0])
def test_our_generate_equals_transformers_when_hypotheses_end_early(source, converted, eos_boost):
    # A raised EOS logit makes hypotheses finish early: with 2.5 at different steps within the batch, with 4.0
    # mostly right away. That exercises the beam bookkeeping, early stopping, padding and min_new_tokens.
    ours = Florence2.from_pretrained(source, attn_implementation="eager")
    with torch.no_grad():
        ours.language_model.final_logits_bias[0, 2] += eos_boost
    theirs = hf_model(converted, bias=ours.language_model.final_logits_bias[0].clone())
    input_ids, mask, pixel_values = four_prompts()
    image_mask = torch.ones(4, IMAGE_TOKENS, dtype=torch.long)
    lengths = set()
    for options in GENERATE_SETTINGS:
        a = ours.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask, max_new_tokens=20,
                          **options)
        b = theirs.generate(input_ids=with_image_tokens(input_ids), attention_mask=torch.cat([image_mask, mask], 1),
                            pixel_values=pixel_values, do_sample=False, max_new_tokens=20, **{**DEFAULTS, **options})
        assert a.shape == b.shape and torch.equal(a, b), options
        lengths.update((a != 1).sum(1).tolist())
    assert min(lengths) < 21 and len(lengths) > 1  # some hypotheses did end early, at different lengths


def test_processor_loads_offline(converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(converted)
    assert type(processor).__name__ == "Florence2Processor"
    assert processor.image_token == IMAGE_TOKEN and processor.image_token_id == IMAGE_ID
    prompts = json.loads((TINY / "processor.json").read_text())["prompts"]
    from PIL import Image

    image = Image.new("RGB", (64, 48), (120, 30, 200))
    for prompt in prompts[:6]:
        inputs = processor(text=prompt["text"], images=image, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids == [IMAGE_ID] * 577 + prompt["input_ids"], prompt["text"]
        assert inputs["pixel_values"].shape == (1, 3, 768, 768)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<od>", "<loc_0>", "<loc_999>", "<and>"]) == [50265, 50269, 51268, 51288]
    answer = processor.post_process_generation("</s><s>car<loc_53><loc_333><loc_933><loc_774></s>", task="<OD>",
                                               image_size=(640, 480))
    assert answer == {"<OD>": {"bboxes": [[34, 160, 597, 371]], "labels": ["car"]}}


def test_a_checkpoint_saved_by_transformers(source, converted, tmp_path):
    # A fine-tune made with transformers: its own save_pretrained (no decoding keys in text_config, `dtype`, ...).
    saved = tmp_path / "saved"
    hf_model(converted).save_pretrained(saved)
    original = Florence2.from_pretrained(source, attn_implementation="eager")
    loaded = Florence2.from_pretrained(saved, attn_implementation="eager")
    assert loaded.config.text == original.config.text and loaded.config.vision == original.config.vision
    for (name, a), b in zip(loaded.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
    back = cw.convert(saved, tmp_path / "back", "microsoft")
    src = load_file(source / "model.safetensors")
    out = load_file(back / "model.safetensors")
    assert out.keys() == src.keys() and all(torch.equal(out[k], src[k]) for k in src)
