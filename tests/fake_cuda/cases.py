"""The CUDA path with every tensor faked on `cuda`; run by tests/test_fake_cuda.py in a process of its own, with
the fake CUDA device of device.cpp loaded before torch.

PyTorch's FakeTensorMode gives tensors a device, a dtype and a shape but no data, and runs the real operators' shape
and device rules: two devices meeting in an operator raise FakeTensorDeviceMismatchError, and reading a value back
(`.item()`, `bool(tensor)`, `.tolist()`: `aten._local_scalar_dense`; nonzero or a boolean mask: a data-dependent
shape) raises as well. Real tensors are refused as inputs (allow_non_fake_inputs=False). What runs is the package's
own code: the trainer's `train_step` (full fine-tuning, the frozen vision tower, the frozen tower fed from the
feature cache, LoRA through peft) in bf16 autocast (the default on CUDA) and in float32, with flash attention, the
model's forward in bf16 and fp16 weights, and the ONNX export's graph modules.

What is replaced, each by name (see `fake_cuda` and `train_step`):
- the two reads of a training step that are meant: the target tokens counted on the loader's CPU batch before it
  goes to the device (`trainer.target_tokens`: host memory, but fake tensors hold no values, so the count is made
  on the real batch first), and the step's loss and gradient norm read once for the finite check and the log
  (`trainer.step_values`, the one device-to-host read of a step);
- `torch.autocast("cuda")` switches itself off when torch.cuda says there is no CUDA, and asks the device whether
  it has bf16 (the fake device answers the C++ side only).
The feature cache on disk is not run: safetensors writes a tensor's bytes, which a fake tensor does not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from florence2 import Florence2
from florence2.export import graphs
from training import trainer
from training.data import EpochSampler, loader
from training.docvqa import parse_args

from ..conftest import TRAIN_IMAGE_SIZE, prepared, train_args

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda", 0)  # what training.distributed.setup gives one process (an index, as torch does)


# ------------------------------------------------------------------------------------------------- the fake GPU
@contextlib.contextmanager
def fake_cuda(step_loss: list | None = None):
    """A FakeTensorMode (real tensors refused as inputs) in which tensors live on `cuda`, with the replacements named
    in the module docstring. `step_loss` collects what `trainer.step_values` was given."""

    def step_values(loss, grad_norm):
        assert loss.device == grad_norm.device == CUDA and loss.dtype == torch.float32
        step_loss.append((loss, grad_norm))
        return 1.0, 1.0  # a finite step

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False))
        stack.enter_context(mock.patch("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True))
        if step_loss is not None:
            stack.enter_context(mock.patch.object(trainer, "step_values", step_values))
        yield stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))


def on_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """`module` moved to the GPU: a fake copy of each of its tensors, moved with `.to(CUDA)`. (In one pass: a module
    of fake tensors cannot `.to` again, Module._apply's swap_tensors refuses fake parameters.)"""
    return module._apply(lambda t: mode.from_tensor(t).to(CUDA))


def assert_on_cuda(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device == CUDA, (type(t), t.device)
        assert dtype is None or t.dtype == dtype, t.dtype


# ---------------------------------------------------------------------------------------------- training steps
RECIPES = {
    "full": ["--train-vision"],
    "frozen tower": [],
    "feature cache": ["--feature-cache", "memory"],
    "lora": ["--lora"],
}


def prepared_on_cpu(model_dir, data_dir, out, *extra):
    """A run prepared by the trainer on the CPU (model, data, LoRA, optimizer), and one step's micro-batches."""
    cfg = parse_args(train_args(model_dir, data_dir, out, "--device", "cpu", "--batch-size", "2", *extra))
    run = prepared(cfg)
    sampler = EpochSampler(len(run.train_set), cfg.batch_size, cfg.seed)
    batches = iter(loader(run.train_set, sampler, cfg.batch_size, 0, cfg.seed, False))
    return run, [next(batches) for _ in range(cfg.grad_accum)]


def move_to_fake_cuda(run, micro, mode) -> list:
    """The prepared run on the fake GPU: its weights, the device the trainer reads, and the optimizer rebuilt by the
    trainer over the moved weights. Returns the micro-batches as the loader gives them, on the CPU."""
    run.module = run.model = on_fake_cuda(run.module, mode)  # one process: prepare's distributed.wrap is the module
    run.dist = dataclasses.replace(run.dist, device=CUDA)
    run.optimizer, run.scheduler = trainer.optimizer_and_schedule(run)
    fields = ("pixel_values", "input_ids", "attention_mask", "labels")
    return [dataclasses.replace(b, **{f: mode.from_tensor(getattr(b, f)) for f in fields}) for b in micro]


def train_step(run, micro, tokens: int) -> None:
    """`trainer.train_step`, given the target tokens the trainer counted on the real CPU batch (fake tensors hold
    no values)."""
    with mock.patch.object(trainer, "target_tokens", lambda batches: tokens):
        assert trainer.train_step(run, micro) == 1.0


def record_dtypes(module: torch.nn.Module, names: list[str]) -> dict[str, list[torch.dtype]]:
    """The output dtypes of the named submodules, call by call."""
    seen = {name: [] for name in names}
    for name in names:
        module.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: seen[name].append(out.dtype))
    return seen


@pytest.mark.parametrize(("recipe", "precision"), [(recipe, "auto") for recipe in RECIPES] + [("full", "fp32")])
def test_training_step_on_cuda(tiny_model_dir, small_dataset_dir, tmp_path, recipe, precision):
    run, micro = prepared_on_cpu(tiny_model_dir, small_dataset_dir, tmp_path / "run", "--precision", precision,
                                 "--grad-accum", "2", *RECIPES[recipe])
    trainable = {n for n, p in run.module.named_parameters() if p.requires_grad}
    tokens = trainer.target_tokens(micro)
    losses = []
    with fake_cuda(losses) as mode:
        gpu_micro = move_to_fake_cuda(run, micro, mode)
        tower, decoder = "vision_tower.convs.0.conv", "language_model.decoder.layers.0.fc1"
        seen = record_dtypes(run.module, [tower, decoder])
        train_step(run, gpu_micro, tokens)
        tower_calls = len(seen[tower])
        if recipe == "feature cache":
            train_step(run, gpu_micro, tokens)  # the same images again: all from the cache
        assert run.bf16 == (precision == "auto")  # on a GPU with bf16 (as the fake one says)
    autocast = torch.bfloat16 if precision == "auto" else torch.float32
    assert set(seen[decoder]) == {autocast} and set(seen[tower]) == {autocast}
    # the tower runs on the batch when it trains; frozen, on one image at a time, and once per image with the cache
    images = {"full": len(micro), "frozen tower": sum(len(b) for b in micro),
              "feature cache": len({k for b in micro for k in b.image_keys}), "lora": sum(len(b) for b in micro)}
    assert tower_calls == len(seen[tower]) == images[recipe]
    assert len(losses) == (2 if recipe == "feature cache" else 1)
    # every trainable weight, and only those, got a step of the fused AdamW on the GPU
    state = run.optimizer.state
    stepped = {n for n, p in run.module.named_parameters() if p in state}
    assert stepped == trainable and trainable
    for p in state:
        assert_on_cuda(p, state[p]["exp_avg"], state[p]["exp_avg_sq"], dtype=torch.float32)
    if recipe == "lora":
        assert all("lora_" in n for n in trainable)


def test_training_step_takes_sdpa_causal_flag(tiny_model_dir, small_dataset_dir, tmp_path, monkeypatch):
    """The decoder's causal self-attention reaches SDPA as its is_causal flag, without a mask tensor: on a GPU, SDPA
    can then take its flash kernel (it takes none with a mask)."""
    sdpa, calls = F.scaled_dot_product_attention, []

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        calls.append((attn_mask is None, is_causal, q.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    run, micro = prepared_on_cpu(tiny_model_dir, small_dataset_dir, tmp_path / "run", "--train-vision")
    tokens = trainer.target_tokens(micro)
    with fake_cuda([]) as mode:
        train_step(run, move_to_fake_cuda(run, micro, mode), tokens)
    assert calls.count((True, True, torch.bfloat16)) == run.module.config.text.decoder_layers
    assert all(no_mask for no_mask, causal, _ in calls if causal)


def test_training_step_with_flash_attention(tiny_model_dir, small_dataset_dir, tmp_path, monkeypatch):
    """--attn-implementation flash_attention_2 with flash-attn installed (a stand-in module computing SDPA): the
    unmasked attentions of a bf16 step call it with its layout (B, T, heads, head_dim); in float32 none does."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((q.dtype, causal, q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, scale=softmax_scale, is_causal=causal)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    for precision in ("auto", "fp32"):
        run, micro = prepared_on_cpu(tiny_model_dir, small_dataset_dir, tmp_path / precision, "--precision", precision,
                                     "--train-vision", "--attn-implementation", "flash_attention_2")
        assert run.module.attn_implementation == "flash_attention_2"
        calls.clear()
        tokens = trainer.target_tokens(micro)
        with fake_cuda([]) as mode:
            train_step(run, move_to_fake_cuda(run, micro, mode), tokens)
        if precision == "fp32":
            assert calls == []  # flash-attn takes fp16/bf16 only: SDPA ran
            continue
        config = run.module.config
        window = config.vision.window_size**2
        heads = config.text.decoder_attention_heads
        head_dim = config.text.d_model // heads
        decoder_length = micro[0].labels.shape[1]
        # the windows of every vision block, and the decoder's causal self-attention of every layer (the padded
        # prompts mask the encoder and the cross-attention: those run SDPA with the mask)
        assert {(causal, shape[1]) for _, causal, shape in calls} == {(False, window), (True, decoder_length)}
        assert all(dtype == torch.bfloat16 for dtype, _, _ in calls)
        causal = [shape for _, c, shape in calls if c]
        assert causal == [torch.Size([2, decoder_length, heads, head_dim])] * config.text.decoder_layers


# ------------------------------------------------------------------------------------------- model and export
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_in_half_precision_weights(tiny_model_dir, dtype):
    model = Florence2.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    with fake_cuda() as mode:
        model = on_fake_cuda(model, mode)
        pixel_values = torch.randn(2, 3, TRAIN_IMAGE_SIZE, TRAIN_IMAGE_SIZE, device=CUDA, dtype=dtype)
        input_ids = torch.randint(0, 100, (2, 5), device=CUDA)
        attention_mask = torch.ones(2, 5, dtype=torch.long, device=CUDA)
        labels = torch.randint(0, 100, (2, 7), device=CUDA)
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert_on_cuda(out.logits, out.loss, dtype=torch.float32)  # the LM head's output is float32, as the original's
    assert_on_cuda(out.encoder_last_hidden_state, dtype=dtype)
    assert out.logits.shape == (2, 7, model.config.text.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_graph_modules(tiny_model_dir, dtype):
    model = Florence2.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    config = model.config
    shapes = graphs.interface(config, (TRAIN_IMAGE_SIZE, TRAIN_IMAGE_SIZE))
    batch, prompt, past, new = 2, 5, 3, 1
    image_tokens = shapes[graphs.VISION]["image_features"][1]
    sizes = {"batch_size": batch, "sequence_length": prompt, "encoder_sequence_length": image_tokens + prompt,
             "encoder_sequence_length_out": image_tokens + prompt, "decoder_sequence_length": new,
             "past_decoder_sequence_length": past, "present_decoder_sequence_length": past + new}

    def example(graph, name):
        dims = [sizes.get(d, d) for d in shapes[graph][name]]
        if name == "input_ids":
            return torch.randint(0, config.text.vocab_size, dims, device=CUDA)
        if "mask" in name:
            return torch.ones(dims, dtype=torch.long, device=CUDA)
        return torch.randn(dims, dtype=dtype, device=CUDA)

    def check(graph, name, tensor):
        assert_on_cuda(tensor, dtype=torch.float32 if name == "logits" else dtype)
        assert list(tensor.shape) == [sizes.get(d, d) for d in shapes[graph][name]], name

    layers = graphs.past_names(config.text.decoder_layers)
    present = graphs.past_names(config.text.decoder_layers, "present")
    with fake_cuda() as mode, torch.no_grad():
        model = on_fake_cuda(model, mode)
        check(graphs.VISION, "image_features", graphs.VisionEncoder(model)(example(graphs.VISION, "pixel_values")))
        check(graphs.EMBED, "inputs_embeds", graphs.EmbedTokens(model)(example(graphs.EMBED, "input_ids")))
        encoded = graphs.TextEncoder(model)(*(example(graphs.ENCODER, n) for n in ("inputs_embeds", "attention_mask")))
        check(graphs.ENCODER, "last_hidden_state", encoded)
        step = [example(graphs.DECODER, n) for n in ("inputs_embeds", "encoder_attention_mask")]
        first = graphs.DecoderStep(model, with_past=False)(*step, example(graphs.DECODER, "encoder_hidden_states"))
        later = graphs.DecoderStep(model, with_past=True)(*step, None, *(example(graphs.DECODER, n) for n in layers))
    for outputs, length in ((first, new), (later, past + new)):
        sizes["present_decoder_sequence_length"] = length
        for name, tensor in zip(["logits", *present], outputs):
            check(graphs.DECODER, name, tensor)
