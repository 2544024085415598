"""On a CUDA device: fp32 equals the CPU and the original, bf16 autocast stays close to fp32, flash-attn 2 equals SDPA.

Skipped without CUDA. On a machine with a GPU: python -m pytest -m gpu tests/test_gpu.py
"""

import pytest
import torch

from florence2 import Florence2, kernels

from .conftest import load_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = ("case0", "case1")


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN's convolutions would otherwise run in TF32 (a 10-bit mantissa) by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_cuda(ref: dict) -> dict:
    return {k: v.cuda() for k, v in ref.items()}


def outputs(model, ref, autocast=False):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], labels=ref["labels"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("inference_kernels", [False, True])
def test_fp32_on_cuda_gives_the_original_outputs(tiny_checkpoint, case, inference_kernels):
    model = Florence2.from_pretrained(tiny_checkpoint, device="cuda")
    kernels.use(model, "inference" if inference_kernels else None)
    ref = on_cuda(load_case(case))
    out = outputs(model, ref)
    torch.testing.assert_close(out.logits, ref["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.loss, ref["loss"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setting", ["beam3_default", "greedy_default"])
def test_cuda_generation_equals_the_cpu_and_the_original(tiny_checkpoint, case, setting):
    ref = load_case(case)
    options = {"num_beams": 3 if setting.startswith("beam") else 1, "max_new_tokens": 24}
    cpu = Florence2.from_pretrained(tiny_checkpoint).generate(
        pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], **options)
    cuda_ref = on_cuda(ref)
    cuda = Florence2.from_pretrained(tiny_checkpoint, device="cuda").generate(
        pixel_values=cuda_ref["pixel_values"], input_ids=cuda_ref["input_ids"], **options)
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(cuda.cpu(), ref[f"generate.{setting}"])


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_forward_is_close_to_fp32(tiny_checkpoint, case):
    model = Florence2.from_pretrained(tiny_checkpoint, device="cuda")
    ref = on_cuda(load_case(case))
    fp32, bf16 = outputs(model, ref), outputs(model, ref, autocast=True)
    assert bf16.logits.dtype == torch.float32  # the LM head's output is float32, as the original's
    # bf16 keeps 8 bits of mantissa: logits within a few hundredths, the loss within a percent
    torch.testing.assert_close(bf16.logits, fp32.logits, rtol=0, atol=0.1)
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.01, atol=0)


def teacher_forced_scores(model, ref, sequences):
    """The log-prob the model gives each token of `sequences` after the ones before it (float32 math)."""
    with torch.no_grad():
        logits = model(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"],
                       decoder_input_ids=sequences[:, :-1]).logits
    return logits.log_softmax(-1).gather(-1, sequences[:, 1:, None])[..., 0]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bf16_autocast_generation_scores_match_fp32(tiny_checkpoint, num_beams):
    # Under bf16 a near tie may pick another token; whatever it picks, the log-probs it reports for its tokens must
    # be what fp32 gives those same tokens (teacher-forced), within bf16's rounding.
    model = Florence2.from_pretrained(tiny_checkpoint, device="cuda")
    ref = on_cuda(load_case("case0"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=16,
                             num_beams=num_beams, no_repeat_ngram_size=0, forced_bos_token_id=None,
                             forced_eos_token_id=None, return_scores=True)
    generated = out.sequences[:, 1:] != 1  # not the right padding
    fp32 = teacher_forced_scores(model, ref, out.sequences)
    torch.testing.assert_close(out.scores[generated], fp32[generated], rtol=0, atol=0.05)


def test_flash_attention_2_equals_sdpa(tiny_checkpoint):
    pytest.importorskip("flash_attn")
    ref = on_cuda(load_case("case1"))
    ref["pixel_values"] = ref["pixel_values"].bfloat16()
    sdpa = Florence2.from_pretrained(tiny_checkpoint, device="cuda", dtype="bfloat16")
    flash = Florence2.from_pretrained(tiny_checkpoint, device="cuda", dtype="bfloat16",
                                      attn_implementation="flash_attention_2")
    torch.testing.assert_close(outputs(flash, ref).logits, outputs(sdpa, ref).logits, rtol=0, atol=0.05)
    out = flash.generate(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"], max_new_tokens=12,
                         num_beams=1, return_scores=True)
    generated = out.sequences[:, 1:] != 1
    torch.testing.assert_close(out.scores[generated], teacher_forced_scores(sdpa, ref, out.sequences)[generated],
                               rtol=0, atol=0.05)


def test_the_loader_pins_batches():
    """DataLoader(pin_memory=True) pins what has a pin_memory method and passes anything else on as it is."""
    from training.data import Batch

    def collate(rows):
        ids = torch.tensor(rows).view(-1, 1)
        return Batch(torch.zeros(len(rows), 3, 8, 8), ids, torch.ones_like(ids), ids, rows, ["k"] * len(rows),
                     [(8, 8)] * len(rows), [])
    batch = next(iter(torch.utils.data.DataLoader([1, 2], batch_size=2, collate_fn=collate, pin_memory=True)))
    assert all(t.is_pinned() for t in (batch.pixel_values, batch.input_ids, batch.attention_mask, batch.labels))
    assert batch.to(torch.device("cuda")).labels.device.type == "cuda"
