"""What this machine computes: its float32 (or other dtype) matrix-multiply rate, measured.

Times of runs from different sittings compare only beside the speed of the machine they ran on: the same CPU gives
half the rate on a busy or throttled day. `matmul_peak` measures it the way BLAS-bound training sees it, as the
GFLOP/s of large square matmuls (tools/benchmark.py reports its ratios to it; the offline demos print it beside their
time).
"""

from __future__ import annotations

import statistics
import time

import torch

WARMUP = 2  # matmuls left out: the first ones page in memory and spin up BLAS threads


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 4096,
                reps: int = 8) -> dict:
    """GFLOP/s of `reps` (n, n) @ (n, n) matmuls after WARMUP more: {"n", "gflops": [per matmul], "best",
    "median"}. At n=2048, reps=4 this is about a second of sgemm on a 2-core CPU."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    for i in range(WARMUP + reps):
        start = _clock(device)
        a @ b
        seconds = _clock(device) - start
        if i >= WARMUP:
            rates.append(2 * n**3 / seconds / 1e9)
    return {"n": n, "gflops": rates, "best": max(rates), "median": statistics.median(rates)}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
