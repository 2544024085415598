"""florence2.export: the ONNX graphs against the PyTorch model, greedy decoding over them, int8 and fp16, the
command line, and transformers.js itself running an exported folder (tests/js, Node).

The exported model is the tiny reference model (random weights, 128 px images) with its end-of-sequence logit
raised, so that greedy sequences of one batch end at different steps.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from florence2 import Florence2
from florence2.processor import Florence2Processor

from .conftest import BIAS, ROOT, TINY, load_case, tiny_reference_state

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from florence2.export import OnnxFlorence2, export, main  # noqa: E402  (needs the export extra)
from florence2.export.graphs import DECODER, EMBED, ENCODER, VISION, to_fp16  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIDE = 128
EOS_BOOST = 2.0  # with it greedy rows of the four-prompt batch end after 21, 21, 21 and 6 tokens
LAYERS, HEADS, HEAD_DIM, D, VOCAB = 2, 4, 8, 32, 51289
HARNESS = ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("export_src") / "tiny"
    folder.mkdir()
    state = tiny_reference_state()
    state[BIAS] = state[BIAS].clone()
    state[BIAS][0, 2] += EOS_BOOST
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(TINY / "config.json", folder / "config.json")
    Florence2Processor(image_size=IMAGE_SIDE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint) -> Florence2:
    return Florence2.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export(checkpoint, tmp_path_factory.mktemp("export") / "tiny-onnx", quantize="int8")


def session_options():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


@pytest.fixture(scope="module")
def runner(exported) -> OnnxFlorence2:
    return OnnxFlorence2(exported, session_options=session_options())


def four_prompts():
    """case0's and case1's rows in one batch, case0's shorter prompts right-padded."""
    a, b = load_case("case0"), load_case("case1")
    length = b["input_ids"].shape[1]
    padded = torch.cat([a["input_ids"], torch.ones(2, length - a["input_ids"].shape[1], dtype=torch.long)], dim=1)
    input_ids = torch.cat([padded, b["input_ids"]])
    return input_ids, (input_ids != 1).long(), torch.cat([a["pixel_values"], b["pixel_values"]])


# ------------------------------------------------------------------------------------------ the interface
def test_files_and_names_are_what_transformers_js_reads(exported):
    onnx_dir = exported / "onnx"
    for graph in (VISION, EMBED, ENCODER, DECODER):
        for suffix in ("", "_quantized"):
            assert (onnx_dir / f"{graph}{suffix}.onnx").is_file()
    probe = exported.parent / "probe"
    probe.write_text("")  # any new file's permissions: a web server must be able to read a served folder
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (exported / name).stat().st_mode & 0o777 == probe.stat().st_mode & 0o777, name

    def io(graph):
        session = ort.InferenceSession(str(onnx_dir / f"{graph}.onnx"))
        return ({i.name: (i.shape, i.type) for i in session.get_inputs()},
                {o.name: o.shape for o in session.get_outputs()})

    inputs, outputs = io(VISION)
    assert inputs == {"pixel_values": (["batch_size", 3, IMAGE_SIDE, IMAGE_SIDE], "tensor(float)")}
    assert outputs == {"image_features": ["batch_size", 17, D]}
    inputs, outputs = io(EMBED)
    assert list(inputs) == ["input_ids"] and list(outputs) == ["inputs_embeds"]
    inputs, outputs = io(ENCODER)
    assert list(inputs) == ["inputs_embeds", "attention_mask"] and list(outputs) == ["last_hidden_state"]
    inputs, outputs = io(DECODER)
    past = [f"past_key_values.{i}.{side}.{kv}" for i in range(LAYERS) for side in ("decoder", "encoder")
            for kv in ("key", "value")]
    assert list(inputs) == ["inputs_embeds", "encoder_attention_mask", "encoder_hidden_states", *past,
                            "use_cache_branch"]
    assert inputs["use_cache_branch"] == ([1], "tensor(bool)")
    for name in past:  # transformers.js builds the empty past from these: `batch_size` resolved, others 0
        shape, _ = inputs[name]
        assert shape[0] == "batch_size" and shape[1] == HEADS and shape[3] == HEAD_DIM and isinstance(shape[2], str)
    assert list(outputs) == ["logits", *(p.replace("past_key_values", "present") for p in past)]

    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "florence2" and config["text_config"]["model_type"] == "florence2_language"
    assert config["text_config"]["decoder_layers"] == LAYERS and config["is_encoder_decoder"] is True
    preprocessor = json.loads((exported / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    assert preprocessor["task_prompts_without_inputs"]["<OD>"] == "Locate the objects with category name in the image."


def test_the_folder_loads_back_in_this_package(exported, checkpoint):
    processor, source = Florence2Processor.from_pretrained(exported), Florence2Processor.from_pretrained(checkpoint)
    image = Image.open(TINY / "images" / "rgb_640x480.png")
    a, b = processor(text="<OD>", images=image), source(text="<OD>", images=image)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert OnnxFlorence2(exported, session_options=session_options()).config == Florence2.from_pretrained(
        checkpoint).config


# ----------------------------------------------------------------------------------- each graph vs PyTorch
def test_each_graph_matches_pytorch(model, runner):
    ref = load_case("case1")
    input_ids, mask, pixels = four_prompts()
    with torch.no_grad():
        for batch in (1, 3):
            image = runner.run(VISION, pixel_values=pixels[:batch].numpy())["image_features"]
            np.testing.assert_allclose(image, model.encode_image(pixels[:batch]).numpy(), rtol=0, atol=1e-4)
        embeds = runner.run(EMBED, input_ids=input_ids.numpy())["inputs_embeds"]
        np.testing.assert_allclose(embeds, model.language_model.embed(input_ids).numpy(), rtol=0, atol=1e-6)

        encoder_out, encoder_mask = runner.encode(pixels, input_ids, mask)  # padded prompts: masked
        expected, expected_mask = model.encode(input_ids, mask, pixels)
        np.testing.assert_allclose(encoder_out, expected.numpy(), rtol=0, atol=1e-4)
        assert np.array_equal(encoder_mask.astype(bool), expected_mask.numpy())

        # the decoder: a first step of 4 tokens, then one token at a time, against the teacher-forced pass
        tokens = ref["labels"].clamp(min=0).repeat(2, 1)  # (4, 7)
        full = model.decode(tokens, expected, expected_mask).numpy()
        logits, past = runner.step(tokens[:, :4].numpy(), encoder_out, encoder_mask, None)
        np.testing.assert_allclose(logits, full[:, :4], rtol=0, atol=1e-4)
        for i, layer in enumerate(model.language_model.decoder.layers):
            cross_k, cross_v = layer.encoder_attn.project_kv(expected)
            np.testing.assert_allclose(past[f"past_key_values.{i}.encoder.key"], cross_k.numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(past[f"past_key_values.{i}.encoder.value"], cross_v.numpy(), rtol=0,
                                       atol=1e-4)
            assert past[f"past_key_values.{i}.decoder.key"].shape == (4, HEADS, 4, HEAD_DIM)
        for t in range(4, 7):
            logits, past = runner.step(tokens[:, t:t + 1].numpy(), encoder_out, encoder_mask, past)
            np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=0, atol=1e-4)
        assert past["past_key_values.0.decoder.key"].shape == (4, HEADS, 7, HEAD_DIM)


SETTINGS = [
    {},  # the checkpoint's: no repeated 3-grams, <s> forced first and </s> last
    {"no_repeat_ngram_size": 0, "forced_bos_token_id": None, "forced_eos_token_id": None},
    {"no_repeat_ngram_size": 2, "min_new_tokens": 4},
    {"forced_bos_token_id": None},
]


@pytest.mark.parametrize("options", SETTINGS, ids=["defaults", "plain", "ngram2_min4", "no_forced_bos"])
def test_greedy_over_the_graphs_gives_generates_tokens(model, runner, options):
    input_ids, mask, pixels = four_prompts()
    expected = model.generate(pixels, input_ids, mask, num_beams=1, max_new_tokens=20, **options)
    got = runner.generate(pixels, input_ids, mask, max_new_tokens=20, **options)
    assert got.shape == expected.shape and torch.equal(got, expected)
    for case in ("case0", "case1"):  # unpadded batches of two
        ref = load_case(case)
        expected = model.generate(ref["pixel_values"], ref["input_ids"], num_beams=1, max_new_tokens=12, **options)
        assert torch.equal(runner.generate(ref["pixel_values"], ref["input_ids"], max_new_tokens=12, **options),
                           expected)


def test_rows_of_the_batch_end_at_different_steps(model):
    # what makes the test above cover rows that finish early and are padded after their </s>
    input_ids, mask, pixels = four_prompts()
    out = model.generate(pixels, input_ids, mask, num_beams=1, max_new_tokens=20)
    assert len(set((out != 1).sum(dim=1).tolist())) > 1


def test_the_runner_refuses_beams(runner):
    ref = load_case("case0")
    with pytest.raises(ValueError, match="greedily"):
        runner.generate(ref["pixel_values"], ref["input_ids"], num_beams=3)


# ------------------------------------------------------------------------------------------ int8 and fp16
def test_int8_is_small_and_runs(exported, runner):
    onnx_dir = exported / "onnx"
    fp32 = sum((onnx_dir / f"{g}.onnx").stat().st_size for g in (VISION, EMBED, ENCODER, DECODER))
    int8 = sum((onnx_dir / f"{g}_quantized.onnx").stat().st_size for g in (VISION, EMBED, ENCODER, DECODER))
    assert int8 <= 0.3 * fp32, (int8, fp32)
    decoder = onnx.load(str(onnx_dir / f"{DECODER}_quantized.onnx"))
    big = [t for t in decoder.graph.initializer if np.prod(t.dims) >= VOCAB * D]
    assert big and all(t.data_type == onnx.TensorProto.INT8 for t in big)  # the LM head's weight
    quantized = OnnxFlorence2(exported, variant="int8", session_options=session_options())
    input_ids, mask, pixels = four_prompts()
    a = quantized.generate(pixels, input_ids, mask, max_new_tokens=20)
    b = runner.generate(pixels, input_ids, mask, max_new_tokens=20)
    assert a.shape[0] == 4 and (a[:, 0] == 2).all() and (a[:, 1] == 0).all()  # start token, then the forced <s>
    assert (a[:, 2:4] == b[:, 2:4]).float().mean() >= 0.5  # random weights: only the first tokens must agree


def test_fp16_graphs_take_float32_and_stay_close(exported, runner, tmp_path):
    half = {graph: to_fp16(exported / "onnx" / f"{graph}.onnx", tmp_path) for graph in (VISION, ENCODER)}
    _, _, pixels = four_prompts()
    session = ort.InferenceSession(str(half[VISION]), session_options())
    assert session.get_inputs()[0].type == "tensor(float)"
    image = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, runner.run(VISION, pixel_values=pixels.numpy())["image_features"], atol=2e-2)
    weights = onnx.load(str(half[ENCODER])).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


# ------------------------------------------------------------------------------------------ command line
def test_cli_refuses_a_non_empty_folder_and_leaves_it_alone(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(checkpoint), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_refuses_graphs_it_would_leave_stale(exported, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(exported, out)
    assert main([str(exported), str(out), "--dtype", "fp16", "--overwrite"]) == 1  # fp32 and int8 would go stale
    err = capsys.readouterr().err
    assert "vision_encoder.onnx" in err and "remove them first" in err and err.count("\n") == 1
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(p.name for p in (exported / "onnx").iterdir())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and err.count("\n") == 1 and "missing" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), str(tmp_path / "out"), "--dtype", "bf16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype" in err and "bf16" in err


def test_cli_checks_the_image_size_against_the_model(tmp_path, capsys):
    folder = tmp_path / "no_processor"  # the tiny model's 256 positions cannot take 768 px images (577 tokens)
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    from safetensors.torch import save_file

    save_file(tiny_reference_state(), str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match="standard"):
        assert main([str(folder), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "577 image tokens" in err and err.count("\n") == 1


def test_a_missing_extra_is_said_with_the_install_line(monkeypatch, checkpoint, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main([str(checkpoint), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert 'pip install -e ".[export]"' in err and "onnxruntime" in err


# ------------------------------------------------------------------------------------------ transformers.js
def node_harness() -> Path:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the transformers.js test needs Node.js >= 18")
    if not (HARNESS / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"transformers.js is not installed for the harness: cd {HARNESS} && npm ci --ignore-scripts")
    return Path(node)


def run_transformers_js(folder: Path, cases: list[dict], tmp_path: Path, dtype: str = "fp32") -> list[dict]:
    node = node_harness()
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model_dir": str(folder), "dtype": dtype, "cases": cases}))
    proc = subprocess.run([str(node), str(HARNESS / "generate.mjs"), str(request)], capture_output=True, text=True,
                          timeout=300, cwd=HARNESS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


JS_CASES = [  # transformers.js' names for the options; greedy (its generate has no beam search)
    ({"task": "<CAPTION>", "max_new_tokens": 20, "num_beams": 1}, {}),
    ({"task": "<OD>", "max_new_tokens": 20, "num_beams": 1, "no_repeat_ngram_size": 0}, {"no_repeat_ngram_size": 0}),
    ({"task": "<DocVQA>What is the invoice number?", "max_new_tokens": 16, "num_beams": 1, "forced_bos_token_id": None,
      "forced_eos_token_id": None}, {"forced_bos_token_id": None, "forced_eos_token_id": None}),
]


def test_transformers_js_generates_our_text(exported, model, tmp_path):
    node_harness()
    image_path = tmp_path / "image.png"  # already at the model's size: no resize that could differ
    Image.open(TINY / "images" / "rgb_640x480.png").convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE)).save(image_path)
    results = run_transformers_js(exported, [{"image": str(image_path), **js} for js, _ in JS_CASES], tmp_path)
    processor = Florence2Processor.from_pretrained(exported)
    for (js, ours), result in zip(JS_CASES, results):
        inputs = processor(text=js["task"], images=Image.open(image_path))
        ids = model.generate(**inputs, num_beams=1, max_new_tokens=js["max_new_tokens"], **ours)
        assert result["text"] == processor.batch_decode(ids, skip_special_tokens=False)[0], js["task"]
        assert result["ids"] == ids.tolist()


def test_transformers_js_runs_the_int8_graphs_as_onnxruntime_does(exported, tmp_path):
    # Our pixels, not transformers.js' (it normalizes in float32 and differs by one ulp here and there, which the
    # int8 graphs' on-the-fly quantization of activations can turn into other tokens of a random model).
    image = Image.open(TINY / "images" / "gray_1000x200.png").convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE))
    image.save(tmp_path / "image.png")
    js, _ = JS_CASES[0]
    inputs = Florence2Processor.from_pretrained(exported)(text=js["task"], images=image)
    inputs.pixel_values.numpy().tofile(tmp_path / "pixels.bin")
    pixels = {"file": str(tmp_path / "pixels.bin"), "dims": list(inputs.pixel_values.shape)}
    [result] = run_transformers_js(exported, [{"image": str(tmp_path / "image.png"), "pixel_values": pixels, **js}],
                                   tmp_path, dtype="q8")
    quantized = OnnxFlorence2(exported, variant="int8", session_options=session_options())
    assert result["ids"] == quantized.generate(**inputs, max_new_tokens=js["max_new_tokens"]).tolist()


# ------------------------------------------------------------------------------------------ the benchmark
def test_benchmark_onnx_task_runs_on_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")  # the benchmark reports its version
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "tools" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "report.json"
    benchmark.main(["--size", "tiny", "--image-size", "64", "--new-tokens", "4", "--tasks", "onnx", "--quick",
                    "--in-process", "--max-idle-wait", "0", "--silent", "--json", str(out)])
    report = json.loads(out.read_text())["onnx"]
    assert "onnxruntime int8" in capsys.readouterr().out
    assert report["onnx_fp32"]["sequences"] == report["ours"]["sequences"]  # the same random model and inputs
    assert report["sizes_mb"]["int8"] < report["sizes_mb"]["fp32"] and 0 <= report["agreement"]["tokens"] <= 1
