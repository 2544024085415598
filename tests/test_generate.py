"""Generation against the original's sequences, and its invariants."""

import json

import pytest
import torch

from florence2 import Florence2
from florence2.generate import GenerateOptions, _beam_search

from .conftest import TINY, load_case

SETTINGS = [(case["name"], name, settings)
            for case in json.loads((TINY / "cases.json").read_text())["cases"]
            for name, settings in case["generate_settings"].items()]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Florence2.from_pretrained(tiny_checkpoint, attn_implementation="eager")


@pytest.mark.parametrize("case, setting, options", SETTINGS, ids=[f"{c}-{s}" for c, s, _ in SETTINGS])
def test_reference_sequences(model, case, setting, options):
    ref = load_case(case)
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], **options)
    assert torch.equal(out, ref[f"generate.{setting}"])


def test_reference_sequences_with_sdpa(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)  # the default backend
    ref = load_case("case1")
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=24)
    assert torch.equal(out, ref["generate.beam3_default"])


def test_cached_equals_uncached(model):
    ref = load_case("case0")
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=12,
                         num_beams=1, no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None,
                         return_scores=True)
    sequences = out.sequences[:, :1]
    with torch.no_grad():
        for _ in range(12):  # step by step, the whole prefix through the decoder each time, no cache
            logits = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"],
                           decoder_input_ids=sequences).logits[:, -1]
            sequences = torch.cat([sequences, logits.argmax(-1, keepdim=True)], dim=1)
            expected_score = logits.log_softmax(-1).gather(1, sequences[:, -1:])[:, 0]
            torch.testing.assert_close(out.scores[:, sequences.shape[1] - 2], expected_score, rtol=0, atol=1e-5)
    assert torch.equal(out.sequences, sequences)


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_one_beam_equals_greedy(model, case):
    ref = load_case(case)
    greedy = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=24,
                            num_beams=1)
    opts = GenerateOptions.from_model(model.config, max_new_tokens=24, num_beams=1)
    with torch.no_grad():
        encoder_out, mask = model.encode(ref["input_ids"], None, ref["pixel_values"])
        beam = _beam_search(model, encoder_out, mask, opts)
    assert torch.equal(beam, greedy)


@pytest.mark.parametrize("options", [
    {"num_beams": 3},
    {"num_beams": 4, "early_stopping": False},
    {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
    {"num_beams": 1},
])
def test_padded_batch_equals_rows_alone(tiny_checkpoint, options):
    model = Florence2.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    with torch.no_grad():
        model.language_model.final_logits_bias[0, 2] += 4.0  # finish at different steps per row
    ref = load_case("case1")
    short = torch.cat([ref["input_ids"][1, :6], torch.tensor([2])])
    input_ids = torch.stack([ref["input_ids"][0], torch.cat([short, torch.ones(7, dtype=torch.long)])])
    mask = (input_ids != 1).long()
    px = ref["pixel_values"]
    batch = model.generate(pixel_values=px, input_ids=input_ids, attention_mask=mask, max_new_tokens=20, **options)
    rows = [model.generate(pixel_values=px[:1], input_ids=input_ids[:1], max_new_tokens=20, **options),
            model.generate(pixel_values=px[1:], input_ids=short[None], max_new_tokens=20, **options)]
    for i, row in enumerate(rows):
        assert torch.equal(batch[i, : row.shape[1]], row[0])
        assert (batch[i, row.shape[1]:] == 1).all()
    if options["num_beams"] in (1, 3) and "early_stopping" not in options:
        assert batch.shape[1] < 21  # hypotheses ended early, at different steps


def test_sequences_end_with_eos_then_pad(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.language_model.final_logits_bias[0, 2] += 4.0
    ref = load_case("case0")
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=20)
    for row in out.tolist():
        assert row[0] == 2 and row[1] == 0  # decoder start, then the forced <s>
        end = row.index(2, 1)
        assert all(t == 1 for t in row[end + 1:])


def test_beam_scores_are_consistent(model):
    ref = load_case("case1")
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=10,
                         num_beams=3, num_return_sequences=3, return_scores=True, length_penalty=1.5)
    assert out.sequences.shape[0] == 6
    lengths = (out.sequences[:, 1:] != 1).sum(dim=1)  # tokens generated (no pad was generated by this model)
    torch.testing.assert_close(out.scores.sum(dim=1) / lengths**1.5, out.sequence_scores, rtol=1e-5, atol=1e-5)
    assert (out.sequence_scores.view(2, 3).diff(dim=1) <= 0).all()  # best first
    default = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=10,
                             num_beams=3, length_penalty=1.5)
    assert torch.equal(out.sequences.view(2, 3, -1)[:, 0], default)


def test_min_new_tokens_blocks_eos(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.language_model.final_logits_bias[0, 2] += 50.0  # EOS always wins when allowed
    ref = load_case("case0")
    out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=10,
                         min_new_tokens=5, num_beams=1, forced_bos_token_id=None)
    assert out.shape[1] == 7 and (out[:, -1] == 2).all() and (out[:, 1:6] != 2).all()


def test_sampling_is_seeded(model):
    ref = load_case("case0")
    kwargs = dict(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=12, num_beams=1,
                  do_sample=True, no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None)
    a = model.generate(seed=3, temperature=2.0, **kwargs)
    assert torch.equal(a, model.generate(seed=3, temperature=2.0, **kwargs))
    assert not torch.equal(a, model.generate(seed=4, temperature=2.0, **kwargs))
    greedy = model.generate(**{**kwargs, "do_sample": False})
    assert torch.equal(model.generate(seed=5, top_k=1, **kwargs), greedy)
    several = model.generate(seed=3, num_return_sequences=3, **kwargs)
    assert several.shape[0] == 6


@pytest.mark.parametrize("options, error, message", [
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": 300}, ValueError, r"max_new_tokens 300 exceeds the decoder's position table \(256"),
    ({"num_beams": 0}, ValueError, "num_beams must be a positive integer"),
    ({"num_beams": 2, "num_return_sequences": 3}, ValueError, r"num_return_sequences \(3\) cannot exceed num_beams"),
    ({"num_beams": 1, "num_return_sequences": 2}, ValueError, "greedy decoding returns one sequence"),
    ({"no_repeat_ngram_size": -2}, ValueError, "no_repeat_ngram_size"),
    ({"early_stopping": "sometimes"}, ValueError, "early_stopping"),
    ({"temperature": 0}, ValueError, "temperature"),
    ({"beam_width": 3}, TypeError, r"unknown generate option\(s\) \['beam_width'\]"),
])
def test_bad_options(model, options, error, message):
    ref = load_case("case0")
    with pytest.raises(error, match=message):
        model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], **options)


def test_generate_keeps_training_mode(model):
    ref = load_case("case0")
    model.train()
    model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=2)
    assert model.training
    model.eval()


def test_default_max_new_tokens():
    from florence2.config import PRESETS

    assert GenerateOptions.from_model(PRESETS["base"]).max_new_tokens == 1024  # not the original's silent 20
    assert GenerateOptions.from_model(PRESETS["tiny"]).max_new_tokens == 256  # capped by the position table
    assert GenerateOptions.from_model(PRESETS["base"]).num_beams == 3


def test_generate_under_bf16_autocast(model):
    # The cache takes the keys' dtype (bf16 under autocast), not the encoder output's (float32 after LayerNorm).
    ref = load_case("case0")
    options = dict(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=8, num_beams=3,
                   no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None, return_scores=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(**options)
    with torch.no_grad():  # float32: the log-probs of the tokens bf16 chose
        logits = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"],
                       decoder_input_ids=out.sequences[:, :-1]).logits
    fp32 = logits.log_softmax(-1).gather(-1, out.sequences[:, 1:, None])[..., 0]
    generated = out.sequences[:, 1:] != 1
    torch.testing.assert_close(out.scores[generated], fp32[generated], rtol=0, atol=0.05)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_copies_attend_to_shared_keys_as_to_repeated_ones(backend):
    """Beams of an image read its cross keys/values once (one row per image) and get what the repeated rows give,
    padding mask included; a ratio that does not divide, or a causal mask, is refused."""
    from florence2.language import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, 0.0).eval()
    attn.backend = backend
    images, copies, keys = 2, 3, 7
    x = torch.randn(images * copies, 2, 64)
    k, v = torch.randn(2, images, 4, keys, 16).unbind(0)
    mask = torch.ones(images, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., 5:] = False  # the second image's encoder output is padded
    with torch.no_grad():
        shared = attn(x, k, v, mask)
        repeated = attn(x, k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0),
                        mask.repeat_interleave(copies, 0))
    torch.testing.assert_close(shared, repeated, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="6 query rows for 4 key rows"):
        attn(x, torch.randn(4, 4, keys, 16), torch.randn(4, 4, keys, 16))
    with pytest.raises(ValueError, match=r"6 query rows for 2 key rows \(causal\)"):
        attn(x, k, v, causal=True)


def test_beam_search_keeps_one_cross_cache_row_per_image(model):
    from florence2.generate import new_cache

    ref = load_case("case1")
    with torch.no_grad():
        encoder_out, mask = model.encode(ref["input_ids"], None, ref["pixel_values"])
        cache, _ = new_cache(model, encoder_out, mask, copies=3, max_length=8, static=False)
    batch = encoder_out.shape[0]
    assert all(layer.cross_k.shape[0] == layer.cross_v.shape[0] == batch for layer in cache)
    assert all(layer.k.shape[0] == layer.v.shape[0] == 3 * batch for layer in cache)


@pytest.mark.parametrize("samples", [1, 6])
def test_multinomial_from_its_noise_is_torch_multinomial(samples):
    """Sampling draws torch.multinomial's noise outside the step and picks inside it: the same draws."""
    from florence2.generate import _draw_noise, _multinomial

    probs = torch.randn(4, 300).mul(3).softmax(dim=-1)
    expected = torch.multinomial(probs, samples, generator=torch.Generator().manual_seed(7))
    noise = _draw_noise(probs.shape, torch.Generator().manual_seed(7), probs.device)
    assert torch.equal(_multinomial(probs, noise, samples), expected)


@pytest.mark.parametrize("options", [
    {"num_beams": 3},
    {"num_beams": 3, "early_stopping": False, "return_scores": True},
    {"num_beams": 1, "return_scores": True},
    {"num_beams": 1, "do_sample": True, "seed": 3},
    {"num_beams": 3, "do_sample": True, "seed": 3},
])
def test_steps_after_the_end_change_nothing(tiny_checkpoint, monkeypatch, options):
    """The loop reads the end once every END_CHECK_EVERY steps; the steps run after the end leave the result as it
    is (ended rows, finished beams, the output's length)."""
    import florence2.generate as generate

    model = Florence2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.language_model.final_logits_bias[0, 2] += 4.0  # rows end at different, early steps
    ref = load_case("case1")
    kwargs = dict(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=20, **options)
    every_step = model.generate(**kwargs)
    checks = []
    monkeypatch.setattr(generate, "END_CHECK_EVERY", {"cpu": 7})
    monkeypatch.setattr(generate, "reached_end", lambda done: checks.append(bool(done)) or checks[-1])
    sparse = model.generate(**kwargs)
    assert checks and not any(checks[:-1])  # read at steps 7, 14, ... until the end
    if options["num_beams"] == 1:  # rows ended after length - 1 steps; the loop ran on to the next multiple of 7
        length = (every_step.sequences if options.get("return_scores") else every_step).shape[1]
        assert length < 21 and len(checks) == min((length - 2) // 7 + 1, 20 // 7)  # none after the last step
    if options.get("return_scores"):
        for field in ("sequences", "scores", "sequence_scores"):
            assert torch.equal(getattr(sparse, field), getattr(every_step, field)), field
    else:
        assert torch.equal(sparse, every_step)
