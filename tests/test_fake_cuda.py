"""The CUDA path, checked on a machine without a GPU, and what a user without one is told.

The cases in tests/fake_cuda/cases.py put every tensor on a faked `cuda` (PyTorch's FakeTensorMode: a device, a dtype
and a shape, no data) and run the trainer's real training steps, the model's forward and the ONNX export's graph
modules through it: a device mismatch, a dtype mismatch or a value read back on the way fails them. A CPU-only build
of PyTorch has no CUDA device for fake tensors to name (indexing, `.to` and autograd ask for its device guard and
streams), so tests/fake_cuda/device.cpp registers one that does nothing, built here with the C++ compiler against the
installed torch and loaded before torch in a process of its own (it would tell the rest of the test session that
CUDA exists). The real GPU tests are tests/test_gpu.py (marked `gpu`, skipped here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from florence2.config import PRESETS
from florence2.language import EncoderLayer
from training import distributed, trainer
from training.data import EpochSampler, loader
from training.docvqa import parse_args

from .conftest import ROOT, TRAIN_IMAGE_SIZE, prepared, train_args

HERE = Path(__file__).parent / "fake_cuda"
# Loads the fake device, then runs pytest (which imports torch only now, in the cases' conftest).
LAUNCH = "import ctypes, sys; ctypes.CDLL(sys.argv[1]); import pytest; sys.exit(pytest.main(sys.argv[2:]))"


@pytest.fixture(scope="session")
def fake_cuda_device(tmp_path_factory) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("building the fake CUDA device needs a C++ compiler (c++ or g++)")
    torch_dir = Path(torch.__file__).parent
    library = tmp_path_factory.mktemp("fake_cuda") / "device.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-std=c++20", "-O0", "-w", f"-I{torch_dir / 'include'}",
                    str(HERE / "device.cpp"), "-o", str(library), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
                    f"-Wl,-rpath,{torch_dir / 'lib'}"], check=True, capture_output=True)
    return library


def test_the_cuda_path_under_fake_tensors(fake_cuda_device, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(fake_cuda_device), "-q", "-rA", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "cases"), str(HERE / "cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        result.stdout[-20000:] + result.stderr[-5000:])
def test_fp16_encoder_clamps_overflow_only_when_there_is_some():
    """The original's fp16 clamp, now chosen on the device: all of h clamped when any of it overflowed, untouched
    (values near the fp16 maximum included) otherwise."""
    config = PRESETS["tiny"].text
    layer = EncoderLayer(config).eval().half()
    limit = torch.tensor(torch.finfo(torch.float16).max - 1000).half()
    h = torch.randn(1, 4, config.d_model, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        layer.final_layer_norm.bias.fill_(0.0)
        layer.final_layer_norm.weight.fill_(60000.0)  # normalized values of a few units: beyond the fp16 maximum
        overflowing = layer(h, None)
        assert torch.isfinite(overflowing).all() and overflowing.abs().max() == limit
        layer.final_layer_norm.weight.fill_(0.0)
        layer.final_layer_norm.bias.fill_(65000.0)  # in the fp16 range, above the clamp's limit: nothing overflowed
        assert (layer(h, None) == torch.tensor(65000.0).half()).all()


# ------------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(("device", "precision", "native_bf16", "bf16"), [
    ("cuda", "auto", True, True),  # Ampere and later: bf16 autocast by default
    ("cuda", "auto", False, False),  # a T4 or a V100 would emulate bf16: float32
    ("cpu", "auto", False, False),
    ("cuda", "fp32", True, False),
    ("cpu", "bf16", False, True),  # asked for: bf16 autocast on the CPU too
])
def test_precision_of_training(device, precision, native_bf16, bf16, monkeypatch):
    def is_bf16_supported(including_emulation=True):
        return native_bf16 or including_emulation  # every CUDA GPU emulates it

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cfg = parse_args(["--output-dir", "out", "--precision", precision])
    assert trainer.Run(cfg, distributed.Dist(device=torch.device(device, 0))).bf16 == bf16


def test_bf16_training_step_on_the_cpu(tiny_model_dir, small_dataset_dir, tmp_path):
    """--precision bf16 is bf16 autocast on the CPU as well: a real step, in bf16, with a finite loss."""
    run = prepared(parse_args(train_args(tiny_model_dir, small_dataset_dir, tmp_path / "run", "--device", "cpu",
                                         "--precision", "bf16", "--batch-size", "2", "--train-vision")))
    dtypes = []
    run.module.language_model.decoder.layers[0].fc1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    batches = iter(loader(run.train_set, EpochSampler(len(run.train_set), 2, 0), 2, 0, 0, False))
    loss = trainer.train_step(run, [next(batches)])
    assert dtypes == [torch.bfloat16] and 0 < loss < 100
    assert run.module.image_projection.weight.dtype == torch.float32  # autocast: the weights stay float32


# --------------------------------------------------------------------------------------- asking for a missing GPU
def _image(tmp_path) -> Path:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (TRAIN_IMAGE_SIZE, TRAIN_IMAGE_SIZE)).save(tmp_path / "images" / "a.png")
    return tmp_path / "images" / "a.png"


def _commands(model, image, tmp_path, data):
    from florence2 import __main__, batch, serve
    from florence2.export import main as export
    from training import evaluate, finetune

    out = tmp_path / "out"
    return {
        "python -m florence2": (__main__.main, [str(image), "--task", "<OD>", "--model", str(model)]),
        "python -m florence2 predict": (batch.main, [str(image.parent), "--task", "<OD>", "--model", str(model),
                                                     "--output", str(tmp_path / "p.jsonl")]),
        "python -m florence2.serve": (serve.main, ["--model", str(model)]),
        "python -m training.finetune": (finetune.main, ["--task", "<OD>", "--model", str(model), "--dataset",
                                                       str(data), "--output-dir", str(out)]),
        "python -m training.evaluate": (evaluate.main, ["--task", "<OD>", "--model", str(model), "--dataset",
                                                       str(data), "--output-dir", str(out)]),
        "python -m florence2.export": (export, [str(model), str(out)]),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA")
@pytest.mark.parametrize("command", ["python -m florence2", "python -m florence2 predict", "python -m florence2.serve",
                                     "python -m training.finetune", "python -m training.evaluate",
                                     "python -m florence2.export"])
def test_asking_for_cuda_without_one_is_one_line(command, tiny_model_dir, small_dataset_dir, tmp_path, capsys):
    main, argv = _commands(tiny_model_dir, _image(tmp_path), tmp_path, small_dataset_dir)[command]
    try:
        status = main([*argv, "--device", "cuda"])
    except SystemExit as e:  # argparse, and the training commands' sys.exit(message)
        status = e.code
        if isinstance(status, str):
            print(status, file=sys.stderr)
            status = 1
    err = capsys.readouterr().err.strip()
    assert status not in (0, None) and len(err.splitlines()) == 1, err
    assert err.startswith(f"{command}: error: ")
    # export runs on the CPU whatever the machine (its graphs are traced in float32): it has no --device
    expected = "unrecognized arguments: --device cuda" if "export" in command else "CUDA is not available"
    assert expected in err


def test_flash_attention_without_the_package_names_the_install_line(tiny_model_dir, monkeypatch):
    from florence2 import Florence2

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    with pytest.raises(ImportError, match=r'flash-attn package: pip install -e "\.\[flash\]"'):
        Florence2.from_pretrained(tiny_model_dir, attn_implementation="flash_attention_2")


def test_causal_attention_through_sdpa_flag_equals_the_written_out_math():
    from florence2.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    # sdpa: its is_causal flag; eager: softmax(q k^T) v with the causal mask written out
    torch.testing.assert_close(attention(q, k, v, causal=True), attention(q, k, v, causal=True, backend="eager"),
                               rtol=0, atol=1e-6)
