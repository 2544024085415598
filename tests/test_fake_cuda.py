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

from .conftest import ROOT

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
