"""Generation on a faked CUDA device: every tensor on `cuda:0` in bf16 (and fp16), with no data.

torch's FakeTensorMode gives tensors a device and a dtype but no data: two devices meeting raise
FakeTensorDeviceMismatchError, mismatched dtypes raise in the op, and any read of a value on the host
(aten._local_scalar_dense: `.item()`, `bool(t)`, `int(t)`) raises. `HostReads` answers the reads made in the named
functions of ALLOWED_READS below, each with its reason, and fails on any other; so the decoder step itself, and every
step of the loop, may read nothing.

Not faked, with the reason:
- the processor (images and prompts to tensors) runs on the host before the tensors go to the device: it is called
  outside the fake mode (`host_side`);
- `predict.parse_answers` turns the generated tokens into text and boxes on the host, after generate: it reads every
  token, so the tests record what reaches it (device, dtype, shapes) instead of running it;
- sampling with a `seed` makes a torch.Generator on the device, which needs a real CUDA runtime: the sampling test
  draws from the global generator instead (no seed);
- compile=True: inductor needs the real device to compile for; under this mode the eager step runs (the same step
  function: tests/test_compile.py checks that compiled and eager agree).
"""

import contextlib
import sys
from collections import Counter

import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import florence2.predict
from florence2 import Florence2
from florence2.processor import Florence2Processor
from florence2.serve import Server

from .conftest import TINY

# With an index: a fake tensor moved to plain "cuda" asks the (absent) CUDA runtime for the current device.
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
MAX_NEW_TOKENS = 4
IMAGE = TINY / "images" / "rgb_640x480.png"

# function of the florence2 package -> (the stand-in value of its read, why it may read)
ALLOWED_READS = {
    "reached_end": (False, "the end check of the loop, once every END_CHECK_EVERY steps (False: run to the end)"),
    "output_length": (MAX_NEW_TOKENS + 1, "once, after the loop: the output's length, to cut the buffers"),
}

# (the model reads no ids and no mask of a tensor on a GPU: it checks ids only on the CPU, and uses a GPU mask as given)
ONCE_PER_CALL = Counter({"output_length": 1})


class HostReads(TorchDispatchMode):
    """Answers the host reads made in the functions of ALLOWED_READS with their stand-in value and counts them;
    raises for any other read."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            site = _caller_in_package()
            if site not in ALLOWED_READS:
                raise AssertionError(f"a read of a device value on the host in florence2's {site}()")
            self.reads.append(site)
            return ALLOWED_READS[site][0]
        return func(*args, **(kwargs or {}))


class FakeCudaGuard(TorchFunctionMode):
    """Some of torch's Python bindings (indexing `t[i]`, `t[i] = v`, `.contiguous()`, ...) take a device guard of
    the tensor's device before dispatching, which a CPU-only build of torch lacks for CUDA ("not linked with support
    for cuda devices"). Such a call is run again with the fake CUDA tensors set to the CPU for the call, and its
    tensor results set back to CUDA: what the op does is still checked by the fake mode below."""

    GUARD_MISSING = "not linked with support for cuda devices"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if self.GUARD_MISSING not in str(e):
                raise
        fakes = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, FakeTensor) and a.fake_device == CUDA]
        for a in fakes:
            a.fake_device = CPU
        try:
            out = func(*args, **kwargs)
        finally:
            for a in fakes:
                a.fake_device = CUDA
        for t in pytree.tree_leaves(out):
            if isinstance(t, FakeTensor) and t.fake_device == CPU and fakes:
                t.fake_device = CUDA
        return out


def _caller_in_package() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if "/florence2/" in frame.f_code.co_filename.replace("\\", "/"):
            return frame.f_code.co_name
        frame = frame.f_back
    return None


def fake_model(checkpoint, mode: FakeTensorMode, dtype: torch.dtype) -> Florence2:
    """The checkpoint's model with every parameter and buffer a fake tensor on CUDA (floating ones in `dtype`)."""
    model = Florence2.from_pretrained(checkpoint)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(_fake(mode, p.detach(), dtype), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = _fake(mode, b, dtype)
    return model.eval()


def _fake(mode, t: torch.Tensor, dtype: torch.dtype) -> FakeTensor:
    meta = t.to("meta", dtype if t.is_floating_point() else t.dtype)
    return FakeTensor(mode, meta, CUDA)


@contextlib.contextmanager
def faked(model_dtype):
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # host tensors (the processor's) may enter, as fakes on cpu
    with mode, FakeCudaGuard(), HostReads() as reads:
        yield reads


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def model(tiny_checkpoint, dtype):
    return fake_model(tiny_checkpoint, FakeTensorMode(allow_non_fake_inputs=True), dtype)


@pytest.fixture(scope="module")
def processor():
    return Florence2Processor(image_size=128)  # the tiny model's size


@pytest.fixture()
def recorded(monkeypatch):
    """What reaches the host-side parsing after generate (it reads every token: not faked)."""
    seen = []

    def record(processor, out, tasks, image_sizes, *args, **kwargs):
        seen.append(out)
        return [({task: None}, []) for task in tasks]

    monkeypatch.setattr(florence2.predict, "parse_answers", record)
    return seen


def host_side(fn, *args, **kwargs):
    with unset_fake_temporarily():
        return fn(*args, **kwargs)


def check_output(out, model, rows: int, scores: bool = False):
    sequences = out.sequences if scores else out
    assert isinstance(sequences, FakeTensor) and sequences.device == CUDA and sequences.dtype == torch.long
    assert sequences.shape == (rows, MAX_NEW_TOKENS + 1)
    if scores:
        assert out.scores.device == CUDA and out.scores.dtype == torch.float32
        assert out.scores.shape == (rows, MAX_NEW_TOKENS)


@pytest.mark.parametrize("options", [
    {"num_beams": 1},
    {"num_beams": 3},
    {"num_beams": 3, "return_scores": True},
    {"num_beams": 1, "do_sample": True},
    {"num_beams": 3, "do_sample": True},
], ids=["greedy", "beam3", "beam3-scores", "sampling", "beam-sampling"])
def test_generate(model, processor, options):
    inputs = host_side(processor, text=["<OD>", "<CAPTION>"], images=[Image.open(IMAGE)] * 2)  # padded prompts
    with faked(model) as host:
        on_device = inputs.to(CUDA, model.image_projection.weight.dtype)
        out = model.generate(**on_device, max_new_tokens=MAX_NEW_TOKENS, **options)
    check_output(out, model, rows=2, scores=options.get("return_scores", False))
    # once per call; and no end check: END_CHECK_EVERY is 8 steps on a GPU, more than these 4
    assert Counter(host.reads) == ONCE_PER_CALL


def test_predict_on_a_batch_of_two(model, processor, recorded):
    images = [Image.open(IMAGE), Image.open(IMAGE).resize((200, 100))]
    with faked(model) as host:
        florence2.predict.predict(model, images, "<OD>", processor=_on_host(processor), max_new_tokens=MAX_NEW_TOKENS)
    (out,) = recorded
    check_output(out, model, rows=2, scores=True)  # <OD> reports the confidences of its boxes
    assert Counter(host.reads) == ONCE_PER_CALL


def test_server_batched_generate(model, processor, recorded):
    """Server.run: the jobs of one batch through one generate call (the call the server makes for a batch)."""
    server = Server(model, _on_host(processor), max_batch_size=2)
    data = IMAGE.read_bytes()
    jobs = []
    for task, text in (("<OD>", None), ("<CAPTION_TO_PHRASE_GROUNDING>", "a red car")):
        task, text, options = server.check_request(task, text, {"max_new_tokens": MAX_NEW_TOKENS}, from_form=False)
        jobs.append(host_side(server.prepare, data, task + (text or ""), task, options, key=None))  # prompt, task
    with faked(model) as host:
        server.run(jobs)
    (out,) = recorded
    check_output(out, model, rows=2, scores=True)  # for the <OD> row
    assert Counter(host.reads) == ONCE_PER_CALL


class _on_host:
    """The processor run outside the fake mode: it turns images and prompts into host tensors."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        return host_side(self.processor, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)
