"""compile=True: the decoder step through torch.compile over a static cache gives the eager tokens.

CPU inductor compiles take seconds each: the model is shared by the module, the inputs are small (tiny model, a few
tokens), and each test compiles one step function for one shape."""

import contextlib
import warnings

import pytest
import torch

import florence2.generate as generate
from florence2 import Florence2

from .conftest import load_case

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = Florence2.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.language_model.final_logits_bias[0, 2] += 4.0  # the rows of a batch end at different steps
    return model


@pytest.fixture(scope="module")
def padded():
    """Two images with prompts of different lengths: the second right-padded and masked, as the processor pads."""
    ref = load_case("case1")
    short = torch.cat([ref["input_ids"][1, :6], torch.tensor([2])])
    input_ids = torch.stack([ref["input_ids"][0], torch.cat([short, torch.ones(7, dtype=torch.long)])])
    return dict(pixel_values=ref["pixel_values"], input_ids=input_ids, attention_mask=(input_ids != 1).long())


@contextlib.contextmanager
def no_fallback():
    """Fails if generate warns that it could not compile (torch's own deprecation warnings may come)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    assert not [w for w in record if "torch.compile failed" in str(w.message)]


def assert_same(compiled, eager):
    if isinstance(eager, generate.GenerateOutput):
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(compiled.scores, eager.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled.sequence_scores, eager.sequence_scores, rtol=0, atol=1e-5)
    else:
        assert torch.equal(compiled, eager)


@pytest.mark.parametrize("options", [
    {"num_beams": 1, "return_scores": True},
    {"num_beams": 3, "return_scores": True},
    {"num_beams": 1, "do_sample": True, "seed": 5, "temperature": 1.5},
], ids=["greedy", "beam3", "sampling"])
def test_compiled_gives_the_eager_tokens(model, padded, options):
    eager = model.generate(**padded, max_new_tokens=MAX_NEW_TOKENS, **options)
    with no_fallback():  # it really compiled
        compiled = model.generate(**padded, max_new_tokens=MAX_NEW_TOKENS, compile=True, **options)
    assert_same(compiled, eager)
    if not options.get("do_sample"):  # rows ended early, at different steps: finished rows and beams are exercised
        assert eager.sequences.shape[1] < MAX_NEW_TOKENS + 1


def test_one_compile_serves_prompts_of_other_lengths(model, padded):
    """The cross keys/values are padded to a multiple of STATIC_ENCODER_MULTIPLE positions: a prompt of another
    length (a different encoder length) reuses the compiled step, and still gets its eager tokens."""
    from torch._dynamo.utils import counters

    options = dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=1, return_scores=True)
    model.generate(**padded, compile=True, **options)  # compiled by the greedy test above, or here
    frames = counters["stats"]["unique_graphs"]
    shorter = {**padded, "input_ids": padded["input_ids"][:, :-2], "attention_mask": padded["attention_mask"][:, :-2]}
    assert_same(model.generate(**shorter, compile=True, **options), model.generate(**shorter, **options))
    assert counters["stats"]["unique_graphs"] == frames  # no new graph


def test_falls_back_to_eager_with_one_warning(model, padded, monkeypatch):
    """Without a working C++ compiler inductor fails: one warning, then the eager step, and no retry."""
    monkeypatch.setattr(generate, "_compile_failure", [])
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cached graph needs no compiler
    one = {k: v[:1] for k, v in padded.items()}  # a shape no other test compiled
    options = dict(max_new_tokens=4, num_beams=1)
    with pytest.warns(UserWarning, match="torch.compile failed") as record:
        out = model.generate(**one, compile=True, **options)
    assert len([w for w in record if "torch.compile" in str(w.message)]) == 1
    assert torch.equal(out, model.generate(**one, **options))
    with no_fallback():
        assert torch.equal(model.generate(**one, compile=True, **options), out)  # eager, silently


def test_compile_must_be_a_bool(model, padded):
    with pytest.raises(ValueError, match="compile must be True or False"):
        model.generate(**padded, max_new_tokens=2, compile="yes")


def test_the_command_line_flag_reaches_the_compiled_step(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """--compile on `python -m florence2` runs the compiled step (here stood in for by the eager step, which
    the tests above compare it with: the compile itself is theirs)."""
    import shutil

    from florence2.__main__ import main
    from florence2.processor import Florence2Processor

    from .conftest import TINY

    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    Florence2Processor(image_size=128).save_pretrained(tmp_path)
    compiled = []
    monkeypatch.setattr(generate, "_compiled", lambda step: compiled.append(step) or step)
    argv = [str(TINY / "images" / "rgb_640x480.png"), "--task", "<CAPTION>", "--model", str(tmp_path), "--json",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert not compiled
    assert main([*argv, "--compile"]) == 0
    assert compiled == [generate.beam_step] and capsys.readouterr().out == eager


def test_the_server_and_batch_flags_reach_the_compiled_step(tiny_checkpoint, tmp_path, monkeypatch):
    """--compile on `python -m florence2 predict` and on the server (Server(compile=True), what its flag sets) run
    the compiled step and answer what they answer without it."""
    import json
    import shutil

    from florence2.batch import main as predict_main
    from florence2.processor import Florence2Processor
    from florence2.serve import Server
    from florence2.serve.command import parse_args

    from .conftest import TINY

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    Florence2Processor(image_size=128).save_pretrained(checkpoint)
    compiled = []
    monkeypatch.setattr(generate, "_compiled", lambda step: compiled.append(step) or step)
    image = TINY / "images" / "rgb_640x480.png"
    argv = [str(image), "--task", "<CAPTION>", "--model", str(checkpoint), "--max-new-tokens", "4",
            "--device", "cpu", "--num-beams", "1"]
    outputs = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert predict_main([*argv, "--output", str(out), *flags]) == 0
        outputs.append([json.loads(line)["result"] for line in out.read_text().splitlines()])
    assert compiled == [generate.sample_step] and outputs[0] == outputs[1]

    assert parse_args(["--model", "m", "--compile"]).compile and not parse_args(["--model", "m"]).compile
    from florence2.predict import default_processor

    model = Florence2.from_pretrained(checkpoint)
    answers = []
    for compile in (False, True):
        compiled.clear()
        server = Server(model, default_processor(model), compile=compile)
        options = server.check_options({"num_beams": 1, "max_new_tokens": 4}, from_form=False)
        job = server.prepare(image.read_bytes(), "<CAPTION>", "<CAPTION>", options, server.batch_key(options))
        answers.append([answer.result for answer in server.run([job, job])[0]])
        assert compiled == ([generate.sample_step] if compile else [])
    assert answers[0] == answers[1]
