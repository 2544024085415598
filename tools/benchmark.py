"""Benchmark this package's Florence-2 against transformers' own (`Florence2ForConditionalGeneration`).

Same config (base, or large with --size large), same random weights (ours converted with
`transformers_layout.to_layout`), same inputs, both implementations in one run:

  forward   inference forward pass (eval, no_grad), batch 2; its FLOPs counted with FlopCounterMode, and the
            achieved FLOP/s as a fraction of this machine's fp32 matmul peak (measured in the run: large sgemm)
  train     full fine-tuning step: forward, backward, AdamW; batch 2
  frozen    the same with the vision tower frozen (requires_grad False, eval mode: the tower runs without a graph)
  cached    ours only: the frozen step fed from DaViT features computed beforehand, as training/feature_cache.py
            does for images already seen; transformers has no such cache, its column shows the frozen step
  greedy    generation of exactly --new-tokens tokens (min = max), image encoding included; batch 1
  beam      the same with 3 beams
  serve1    ours: python -m florence2.serve (a subprocess, --max-batch-size 8) answering one client's requests;
  serve8    ... eight clients' at once (dynamic batching)
  chat8     ... eight clients' through the OpenAI-compatible POST /v1/chat/completions (JSON, a data: URL image)
  batch     ours: python -m florence2 predict over a folder (batch 8, a DataLoader worker)
            the three against transformers' generate looped one image at a time, on the same images: <OD> on
            1024x768 JPEGs (decoded and preprocessed in the timing), 3 beams, exactly --throughput-tokens new tokens
            (48 by default: about eight objects of a label and four locations each); seconds per image

Every measurement runs in a fresh subprocess (one per implementation and group of tasks), so that the peak
resident memory of one cannot leak into the other: each task resets the kernel's high-water mark
(/proc/self/clear_refs) after its warm-up and reads VmHWM after its timed repetitions. That is the whole process:
weights, optimizer state, activations, library code, allocator slack; what the OS has to provide. Both sides hold
the same weights, so the difference is the implementation's working memory (and transformers' larger import).
On CUDA the peak is torch.cuda.max_memory_allocated instead.

Timing: implementations alternate (ours, transformers, then transformers, ours, ...), every task is warmed up once
per process, and the table shows medians. Other processes on the machine make CPU timings noisy (two busy cores
are enough to double a step): before each timed repetition the child waits (a bounded time) for the machine to be
idle, and it records the CPU time other processes took during the repetition; a repetition where they took more
than a quarter of a core is repeated once. The JSON keeps every sample.

The process environment is the same for both (the children inherit it). With --tuned-malloc both children get
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ so that glibc keeps freed memory instead of returning
it to the OS and taking page faults on every new large tensor; the default run uses the plain environment.

    python tools/benchmark.py                      # base, CPU, about 16 minutes on 2 cores (7 of them throughput)
    python tools/benchmark.py --quick --json out.json
    python tools/benchmark.py --size large --tasks forward,beam
    python tools/benchmark.py --device cuda --dtype bfloat16 --compile   # CUDA: bf16 autocast, compiled towers
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "transformers")
TASKS = ("forward", "train", "frozen", "cached", "greedy", "beam", "serve1", "serve8", "chat8", "batch")
GROUPS = {"forward": "infer", "greedy": "infer", "beam": "infer", "train": "train", "frozen": "frozen",
          "cached": "frozen", "serve1": "throughput", "serve8": "throughput", "chat8": "throughput",
          "batch": "throughput"}  # tasks that share a child process
GOALS = {"train": 0.75, "frozen": 0.75, "beam": 0.6, "memory": 0.9, "peak_fraction": 0.8,
         "serve8": 0.5}  # serve8: half the seconds per image of transformers' loop, twice its images/s
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                "MALLOC_TOP_PAD_": "1073741824"}


# ------------------------------------------------------------------------------------------- child: models, inputs
def build_models(impl: str, args):
    """Our model from a seeded random init; transformers' gets the same tensors through transformers_layout."""
    sys.path.insert(0, str(ROOT))
    from florence2 import Florence2
    from florence2 import transformers_layout as tl
    from florence2.config import PRESETS
    from florence2.weights import TIED_ALIASES

    config = PRESETS[args.size]
    ours = Florence2.from_config(config, seed=0)
    if impl == "ours":
        return config, ours.to(args.device)
    from transformers import Florence2Config as HFConfig
    from transformers import Florence2ForConditionalGeneration

    hf_config = HFConfig.from_dict(tl.to_transformers_config(config))
    theirs = Florence2ForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa")
    state = tl.to_layout(ours.state_dict(), "transformers", config)
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(TIED_ALIASES["transformers"]):
        raise RuntimeError(f"weights do not fit transformers' model: missing {missing}, unexpected {unexpected}")
    del ours, state
    return config, theirs.to(args.device)


def make_inputs(config, args, batch: int):
    """Random pixels, a 10-token prompt (BOS ... EOS) and 32-token labels; transformers' prompt gets one <image> id
    per image token in front, as its processor makes it."""
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = config.text.vocab_size
    pixels = torch.randn(batch, 3, args.image_size, args.image_size, generator=g)
    prompt = torch.randint(3, vocab, (batch, 10), generator=g)
    prompt[:, 0], prompt[:, -1] = config.text.bos_token_id, config.text.eos_token_id
    labels = torch.randint(3, vocab, (batch, 32), generator=g)
    labels[:, -1] = config.text.eos_token_id
    image_tokens = torch.full((batch, config.image_tokens(args.image_size)), vocab)  # transformers' <image> id
    dev = args.device
    return {"pixels": pixels.to(dev), "labels": labels.to(dev),
            "ours": prompt.to(dev), "transformers": torch.cat([image_tokens, prompt], dim=1).to(dev)}


def autocast(args):
    import torch

    enabled = args.dtype != "float32"
    return torch.autocast(args.device, dtype=getattr(torch, args.dtype), enabled=enabled)


def vision_tower(impl, model):
    return model.vision_tower if impl == "ours" else model.model.vision_tower


# ----------------------------------------------------------------------------------------------- child: the tasks
def use_kernels(impl, module, preset: str) -> None:
    """Ours runs its kernels where the package runs them: generate and predict switch on the inference kernels
    themselves, the trainer the training kernels (and the inference kernels for a frozen tower's features)."""
    if impl == "ours":
        from florence2 import kernels

        kernels.use(module, preset)


def kernels_on(impl, model) -> dict[str, list[str]]:
    """{part of the model: the kernels switched on in it}, recorded with each timed task (ours only)."""
    if impl != "ours":
        return {}
    from florence2 import kernels

    parts = {}
    for site, on in kernels.active(model).items():
        parts.setdefault(site.split(".")[0], set()).update(on)
    return {part: sorted(on) for part, on in sorted(parts.items())}


def forward_fn(impl, model, inputs, args):
    import torch

    model.eval()
    use_kernels(impl, model, "inference")
    ids = inputs[impl]

    def run():
        with torch.no_grad(), autocast(args):
            return model(pixel_values=inputs["pixels"], input_ids=ids, labels=inputs["labels"]).logits
    return run


def train_fn(impl, model, inputs, args, frozen: bool, cached: bool = False):
    import torch

    tower = vision_tower(impl, model)
    model.train()
    use_kernels(impl, model, "training")
    if frozen:
        tower.eval()  # frozen means deterministic too, as our trainer does: no stochastic depth
        tower.requires_grad_(False)
        use_kernels(impl, tower, "inference")  # no graph through a frozen tower: it runs as in inference
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: what transformers' Trainer uses by default with torch >= 2.8; the same for both sides
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    image = {"pixel_values": inputs["pixels"]}
    if cached:  # what FeatureCache hands the model for images it has seen: the tower's output, computed once
        with torch.no_grad(), autocast(args):
            image = {"vision_features": tower(inputs["pixels"]).float()}

    if impl == "ours":  # the loss alone, as the trainer asks for it (fused with the LM head by a training kernel)
        image["return_logits"] = False

    def run():
        with autocast(args):
            loss = model(input_ids=inputs[impl], labels=inputs["labels"], **image).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return run


def generate_fn(impl, model, inputs, args, beams: int):
    import torch

    model.eval()
    pixels, ids = inputs["pixels"][:1], inputs[impl][:1]
    n = args.new_tokens
    options = dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams, no_repeat_ngram_size=3,
                   early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2)
    if impl == "transformers":  # its generate does not take these from the text config: pass them all
        options.update(do_sample=False, decoder_start_token_id=2, length_penalty=1.0)
    elif args.compile:  # our decoder step through torch.compile over a static cache (docs/compiled-decoding.md)
        options["compile"] = True

    def run():
        with torch.no_grad(), autocast(args):
            out = model.generate(pixel_values=pixels, input_ids=ids, **options)
        if out.shape[1] != n + 1:
            raise RuntimeError(f"{impl} generated {out.shape[1] - 1} tokens instead of {n}")
        return out
    return run


def count_flops(fn) -> int:
    """FLOPs of one call, as FlopCounterMode counts them (matmuls, convolutions, attention), with the CPU flash
    attention kernel counted like the CUDA ones (FlopCounterMode has no formula for it)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    sdpa = {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=sdpa) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(args, reps: int = 8) -> dict:
    """fp32 (or --dtype) GEMM throughput of a large square matmul: the hardware's practical peak."""
    import torch

    sys.path.insert(0, str(ROOT))
    from florence2.hardware import matmul_peak as measure

    return measure(args.device, getattr(torch, args.dtype), n=4096 if args.device == "cpu" else 8192, reps=reps)


# --------------------------------------------------------------------------------------- child: the ONNX export
ONNX_TASK = "onnx"  # only when asked for (--tasks onnx): it exports the model, which takes minutes at base
AGREEMENT_CASES = 4  # random (image, prompt) pairs on which the int8 graphs' tokens are compared with fp32's


def onnx_measurements(args) -> dict:
    """Our greedy decode beside onnxruntime's (fp32 and int8 graphs of florence2.export, the same random model and
    inputs, onnxruntime's CPU provider with as many threads as torch), the export's time and sizes, and the
    int8/fp32 token agreement on AGREEMENT_CASES random inputs."""
    import tempfile

    import onnxruntime as ort
    import torch

    from florence2.export import VARIANTS, OnnxFlorence2, export
    from florence2.export.graphs import GRAPHS
    from florence2.processor import Florence2Processor

    config, model = build_models("ours", args)
    model.eval()
    n = args.new_tokens
    options = dict(max_new_tokens=n, min_new_tokens=n, no_repeat_ngram_size=3, forced_bos_token_id=0,
                   forced_eos_token_id=2)  # as the greedy task's
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = export(model, Path(tmp) / "export", quantize="int8",
                        processor=Florence2Processor(image_size=args.image_size))
        result = {"export_seconds": time.perf_counter() - start, "sizes_mb": {}}
        for variant in ("fp32", "int8"):
            result["sizes_mb"][variant] = sum((folder / "onnx" / f"{g}{VARIANTS[variant]}.onnx").stat().st_size
                                              for g in GRAPHS) / 2**20
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = torch.get_num_threads()
        runners = {v: OnnxFlorence2(folder, variant=v, session_options=session_options) for v in ("fp32", "int8")}
        inputs = make_inputs(config, args, 1)
        pixels, ids = inputs["pixels"], inputs["ours"]
        fns = {"ours": lambda: model.generate(pixels, ids, num_beams=1, **options),
               **{f"onnx_{v}": (lambda r=r: r.generate(pixels, ids, **options)) for v, r in runners.items()}}
        with torch.no_grad():
            for name, fn in fns.items():
                result[name] = measure(fn, args, args.reps)
                result[name]["sequences"] = fn().tolist()
            cases = make_inputs(config, args, AGREEMENT_CASES)
            fp32, int8 = (runners[v].generate(cases["pixels"], cases["ours"], **options) for v in ("fp32", "int8"))
    generated = slice(2, None)  # after the start token and the forced <s>
    result["agreement"] = {"tokens": (int8[:, generated] == fp32[:, generated]).float().mean().item(),
                           "sequences": int((int8 == fp32).all(dim=1).sum()), "cases": AGREEMENT_CASES}
    return result


def onnx_table(result: dict) -> str:
    """The ONNX section of the report: greedy latency beside ours, sizes, int8 agreement."""
    ours = statistics.median(result["ours"]["times"])
    lines = ["| greedy decode, CPU | seconds | vs ours | model files (MB) |", "|---|---:|---:|---:|",
             f"| ours (PyTorch) | {ours:.2f} | 1.00x | |"]
    for variant in ("fp32", "int8"):
        t = statistics.median(result[f"onnx_{variant}"]["times"])
        lines.append(f"| onnxruntime {variant} | {t:.2f} | {t / ours:.2f}x | {result['sizes_mb'][variant]:.0f} |")
    same = result["onnx_fp32"]["sequences"] == result["ours"]["sequences"]
    a = result["agreement"]
    lines += ["", f"onnx fp32: {'the same' if same else 'DIFFERENT'} tokens as ours; int8/fp32: "
                  f"{result['sizes_mb']['int8'] / result['sizes_mb']['fp32']:.2f}x the size, {a['tokens']:.0%} of the "
                  f"tokens and {a['sequences']}/{a['cases']} sequences the same on {a['cases']} random inputs; "
                  f"export {result['export_seconds']:.0f} s"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ child: timing and memory
def clock(args) -> float:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def others_cpu(fn):
    """Run fn; return (its result, CPU seconds other processes used meanwhile, as a fraction of one core)."""
    if not Path("/proc/stat").exists():
        return fn(), 0.0
    busy0, own0, wall0 = _cpu_busy()[0], _own_cpu(), time.perf_counter()
    result = fn()
    busy1, own1, wall1 = _cpu_busy()[0], _own_cpu(), time.perf_counter()
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9)


def wait_for_idle(max_wait: float) -> None:
    """Wait (at most max_wait seconds) until other processes use less than a tenth of a core."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        _, share = others_cpu(lambda: time.sleep(0.3))
        if share < 0.1:
            return


def reset_peak_memory(args) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def peak_memory_mb(args) -> float:
    if args.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def measure(fn, args, reps: int) -> dict:
    fn()  # warm-up: kernels chosen, optimizer state and allocator pools created
    gc.collect()
    reset_peak_memory(args)
    times, others = [], []
    retries = 1
    while len(times) < reps:
        wait_for_idle(args.max_idle_wait)
        start = clock(args)
        _, share = others_cpu(fn)
        seconds = clock(args) - start
        if share > 0.25 and retries > 0:  # disturbed: once more
            retries -= 1
            continue
        times.append(seconds)
        others.append(round(share, 3))
    return {"times": times, "others_cpu": others, "peak_mb": peak_memory_mb(args)}


def run_child(impl: str, group: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"impl": impl, "group": group, "threads": torch.get_num_threads()}
    if group == "peak":
        result["peak"] = matmul_peak(args)
        return result
    if group == ONNX_TASK:
        result[ONNX_TASK] = onnx_measurements(args)
        return result
    tasks = [t for t in args.tasks if GROUPS[t] == group and not (t == "cached" and impl != "ours")]
    if group == "throughput":
        return result | run_throughput(impl, args, tasks)
    config, model = build_models(impl, args)
    if args.compile:
        vision_tower(impl, model).compile()
    batch = 1 if group == "infer" and set(tasks) <= {"greedy", "beam"} else args.batch
    inputs = make_inputs(config, args, batch)
    for task in tasks:
        if task == "forward":
            fn = forward_fn(impl, model, inputs, args)
            result["forward_flops"] = count_flops(fn)
        elif task in ("train", "frozen", "cached"):
            fn = train_fn(impl, model, inputs, args, frozen=task != "train", cached=task == "cached")
        else:
            fn = generate_fn(impl, model, inputs, args, beams=1 if task == "greedy" else 3)
        result[task] = measure(fn, args, args.reps)
        if task not in ("greedy", "beam"):  # generate switches its own (the inference kernels), for the call
            result[task]["kernels"] = kernels_on(impl, model)
        if task in ("greedy", "beam"):  # the parent checks that both sides generated the same
            result[task]["sequences"] = fn().tolist()
        del fn
    return result


# ------------------------------------------------------------------------------- child: serving and batch throughput
THROUGHPUT_TASK = "<OD>"
THROUGHPUT_BEAMS = 3  # the checkpoints' default
SERVE_CLIENTS = {"serve1": 1, "serve8": 8, "chat8": 8}
CHAT_TASKS = ("chat8",)  # through POST /v1/chat/completions
THROUGHPUT_IMAGES = {"serve1": 2, "serve8": 16, "chat8": 16, "batch": 16, "loop": 2}  # per timed repetition
LOOP = "loop"  # transformers' side of the three: its generate, one image at a time


def throughput_images(folder: Path, count: int) -> list[Path]:
    """`count` 1024x768 JPEGs (shapes and text on a gradient), as a camera or a scanner would give them."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        ramp = np.linspace(0, 255, 1024, dtype=np.float32)[None, :, None]
        pixels = (ramp * rng.uniform(0.3, 1.0, size=(1, 1, 3)) + rng.normal(0, 12, size=(768, 1024, 3)))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 900), rng.integers(0, 650)
            draw.rectangle((x, y, x + rng.integers(40, 300), y + rng.integers(40, 300)),
                           fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.text((40, 40 + 10 * i), f"picture {i}", fill="white")
        path = folder / f"image-{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def throughput_options(args) -> dict:
    n = args.throughput_tokens
    return {"max_new_tokens": n, "min_new_tokens": n, "num_beams": THROUGHPUT_BEAMS}


def measure_rate(fn, args, reps: int, warm_up=None) -> dict:
    """Seconds per image over `reps` calls of fn() -> (images, seconds); other processes' CPU is not measured
    (the server is one of them), the machine is only waited for to be idle."""
    if warm_up is not None:
        warm_up()
    gc.collect()
    reset_peak_memory(args)
    times = []
    for _ in range(reps):
        wait_for_idle(args.max_idle_wait)
        images, seconds = fn()
        times.append(seconds / images)
    return {"times": times, "others_cpu": [], "peak_mb": peak_memory_mb(args)}


def loop_fn(model, config, images: list[Path], args):
    """transformers' generate on one image after the other: decode, preprocess (our processor: the same pixels),
    generate."""
    import torch
    from PIL import Image

    from florence2.processor import Florence2Processor

    processor = Florence2Processor(image_size=args.image_size)
    image_tokens = torch.full((1, config.image_tokens(args.image_size)), config.text.vocab_size)  # <image> ids
    options = dict(throughput_options(args), no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0,
                   forced_eos_token_id=2, do_sample=False, decoder_start_token_id=2, length_penalty=1.0)
    model.eval()

    def run(paths=images):
        start = clock(args)
        for path in paths:
            with Image.open(path) as image:
                inputs = processor(text=THROUGHPUT_TASK, images=image)
            ids = torch.cat([image_tokens, inputs["input_ids"]], dim=1).to(args.device)
            with torch.no_grad(), autocast(args):
                out = model.generate(pixel_values=inputs["pixel_values"].to(args.device), input_ids=ids, **options)
            if out.shape[1] != args.throughput_tokens + 1:
                raise RuntimeError(f"transformers generated {out.shape[1] - 1} tokens, not {args.throughput_tokens}")
        return len(paths), clock(args) - start
    return run


class ServerProcess:
    """python -m florence2.serve on a free port, with its defaults but the batch size and the wait."""

    def __init__(self, folder: Path, args, log: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "florence2.serve", "--model", str(folder), "--port", str(port), "--device",
               args.device, "--max-batch-size", "8", "--max-wait-ms", "10"]
        if args.dtype != "float32":  # inference in that dtype (the loop autocasts)
            cmd += ["--dtype", args.dtype]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def served(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()["served"]

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve_fn(url: str, images: list[bytes], clients: int, args, chat: bool = False):
    """fn(requests) -> (requests, seconds): `clients` threads posting the images in turn, each waiting for its
    answer before it sends the next; to /v1/predict as a form, or with `chat` to /v1/chat/completions as the
    openai client sends them (JSON, the image a base64 data: URL, the package's options beside OpenAI's)."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    fields = {"task": THROUGHPUT_TASK, **{k: str(v) for k, v in throughput_options(args).items()}}
    client = httpx.Client(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=clients))
    model = client.get("/v1/models").json()["data"][0]["id"] if chat else None
    options = dict(throughput_options(args))
    chat_options = {"max_tokens": options.pop("max_new_tokens"), **options}

    def one(i: int) -> None:
        image = images[i % len(images)]
        if chat:
            url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": THROUGHPUT_TASK}]
            response = client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": content}], **chat_options})
        else:
            response = client.post("/v1/predict", files={"image": ("image.jpg", image, "image/jpeg")}, data=fields)
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {response.text}")

    def run(requests: int):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
        return requests, time.perf_counter() - start
    return run


def run_throughput(impl: str, args, tasks: list[str]) -> dict:
    """The serving and batch tasks of `impl` (ours), or transformers' loop they are compared with."""
    import tempfile

    result = {}
    with tempfile.TemporaryDirectory(prefix="florence2-throughput-") as tmp:
        tmp = Path(tmp)
        config, model = build_models(impl, args)  # (puts this checkout first on sys.path)
        from florence2 import batch
        from florence2.processor import Florence2Processor

        count = max(THROUGHPUT_IMAGES[t] for t in [*tasks, LOOP])
        images = throughput_images(tmp / "images", count)
        if impl == "transformers":
            fn = loop_fn(model, config, images[:THROUGHPUT_IMAGES[LOOP]], args)
            result[LOOP] = measure_rate(fn, args, args.reps, warm_up=lambda: fn(images[:1]))
            return result
        folder = tmp / "model"  # the server and the command read a checkpoint folder, as users give them
        model.save_pretrained(folder)
        Florence2Processor(image_size=args.image_size).save_pretrained(folder)
        del model
        if "batch" in tasks:
            runs = iter(range(args.reps))
            options = [f"--{k.replace('_', '-')}={v}" for k, v in throughput_options(args).items()]
            dtype = ["--dtype", args.dtype] if args.dtype != "float32" else []

            def batch_run():
                out = tmp / f"batch-{next(runs)}.jsonl"
                cli = batch.parse_args([str(tmp / "images"), "--task", THROUGHPUT_TASK, "--output", str(out),
                                        "--model", str(folder), "--batch-size", "8", "--num-workers", "1",
                                        "--device", args.device, *options, *dtype])
                counts = batch.run(cli)
                return counts["predicted"], counts["seconds"]
            result["batch"] = measure_rate(batch_run, args, args.reps)
        serving = [t for t in tasks if t in SERVE_CLIENTS]
        if serving:
            server = ServerProcess(folder, args, tmp / "server.log")
            try:
                server.wait()
                payloads = [p.read_bytes() for p in images]
                for task in serving:
                    fn = serve_fn(server.url, payloads, SERVE_CLIENTS[task], args, chat=task in CHAT_TASKS)
                    before = server.served()
                    result[task] = measure_rate(functools.partial(fn, THROUGHPUT_IMAGES[task]), args, args.reps,
                                                warm_up=functools.partial(fn, SERVE_CLIENTS[task]))
                    after = server.served()
                    result[task]["peak_mb"] = server.peak_mb()  # the server's whole life so far
                    result[task]["batch_size"] = ((after["requests"] - before["requests"]) /
                                                  (after["batches"] - before["batches"]))  # mean, warm-up included
            finally:
                server.close()
    return result


# ---------------------------------------------------------------------------------------------- parent: the run
def spawn(impl: str, group: str, args) -> dict:
    if args.in_process:
        return run_child(impl, group, args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, group]
    for name in ("size", "device", "dtype", "image_size", "batch", "new_tokens", "throughput_tokens", "reps",
                 "threads", "max_idle_wait"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--tasks", ",".join(args.tasks)] + (["--compile"] if args.compile else [])
    env = dict(os.environ, **(TUNED_MALLOC if args.tuned_malloc else {}))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl}/{group} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    started = time.perf_counter()
    groups = list(dict.fromkeys(GROUPS[t] for t in args.tasks if t != ONNX_TASK))
    samples = {impl: {} for impl in IMPLS}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    report = {"machine": machine(args), "args": settings,
              "samples": samples}
    if "forward" in args.tasks:
        report["peak"] = spawn("ours", "peak", args)["peak"]
        log(args, f"matmul peak: {report['peak']['best']:.1f} GFLOP/s (best of {len(report['peak']['gflops'])})")
    for r in range(args.rounds):
        for group in groups:
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                result = spawn(impl, group, args)
                for task in (*args.tasks, LOOP):
                    if task in result:
                        entry = samples[impl].setdefault(task, {"times": [], "others_cpu": [], "peak_mb": []})
                        entry["times"] += result[task]["times"]
                        entry["others_cpu"] += result[task]["others_cpu"]
                        entry["peak_mb"].append(result[task]["peak_mb"])
                        if "kernels" in result[task]:
                            entry["kernels"] = result[task]["kernels"]
                        if "batch_size" in result[task]:  # the server's batches
                            entry.setdefault("batch_size", []).append(result[task]["batch_size"])
                for task in ("greedy", "beam"):
                    if task in result:
                        report.setdefault("sequences", {}).setdefault(task, {})[impl] = result[task]["sequences"]
                if "forward_flops" in result:
                    report.setdefault("forward_flops", {})[impl] = result["forward_flops"]
                log(args, f"round {r + 1}/{args.rounds} {group:6s} {impl:12s} "
                          + " ".join(f"{t}={statistics.median(result[t]['times']):.2f}s"
                                     for t in (*args.tasks, LOOP) if t in result)
                          + f"  ({time.perf_counter() - started:.0f} s)")
    if ONNX_TASK in args.tasks:
        report[ONNX_TASK] = spawn("ours", ONNX_TASK, args)[ONNX_TASK]
        log(args, f"onnx: exported in {report[ONNX_TASK]['export_seconds']:.0f} s  "
                  f"({time.perf_counter() - started:.0f} s)")
    report["summary"] = summarize(report, args)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def summarize(report: dict, args) -> list[dict]:
    rows = []
    s = report["samples"]

    def median(impl, task, key="times"):
        entry = s[impl].get(task)
        return statistics.median(entry[key]) if entry else None

    labels = {"forward": f"forward, batch {args.batch} (s)", "train": f"training step, batch {args.batch} (s)",
              "frozen": "frozen-vision step (s)", "cached": "frozen step, cached features (s) [1]",
              "greedy": f"greedy, {args.new_tokens} tokens (s)", "beam": f"beam 3, {args.new_tokens} tokens (s)",
              "serve1": "server, 1 client (s/image) [2]", "serve8": "server, 8 clients (s/image) [2]",
              "chat8": "server, 8 clients, chat completions (s/image) [2]",
              "batch": "batch prediction (s/image) [2]"}
    # what transformers' column shows for the tasks it has no counterpart of
    counterpart = {"cached": "frozen", "serve1": LOOP, "serve8": LOOP, "chat8": LOOP, "batch": LOOP}
    tasks = [t for t in args.tasks if t != ONNX_TASK]
    for task in tasks:
        ours = median("ours", task)
        theirs = median("transformers", counterpart.get(task, task))
        rows.append(_row(labels[task], ours, theirs, GOALS.get(task), "time"))
    for task in tasks:
        ours = median("ours", task, "peak_mb")
        theirs = median("transformers", counterpart.get(task, task), "peak_mb")
        goal = GOALS["memory"] if task == "train" else None
        rows.append(_row(f"peak memory, {task} (MB)", ours, theirs, goal, "memory"))
    if "forward" in args.tasks and report.get("forward_flops"):
        peak = report["peak"]["best"]
        # The model's FLOPs as transformers' literal implementation counts them, for both: ours skips some work
        # in inference (channel attention folded into one matrix), which must not count as speed.
        counted = report["forward_flops"]
        nominal = counted.get("transformers", counted.get("ours"))
        for impl in IMPLS:
            flops = nominal if impl in counted else None
            t = median(impl, "forward")
            if flops and t:
                report.setdefault("forward_rate", {})[impl] = {
                    "gflops": flops / 1e9, "counted_gflops": counted[impl] / 1e9, "gflop_per_s": flops / t / 1e9,
                    "fraction_of_peak": flops / t / 1e9 / peak}
        rate = report.get("forward_rate", {})
        if len(rate) == 2:
            ours, theirs = rate["ours"]["fraction_of_peak"], rate["transformers"]["fraction_of_peak"]
            rows.append({"what": f"forward FLOP/s / matmul peak ({peak:.0f} GFLOP/s)", "ours": ours,
                         "transformers": theirs, "ratio": ours / theirs, "goal": GOALS["peak_fraction"],
                         "met": ours >= GOALS["peak_fraction"], "kind": "fraction"})
    return rows


def _row(what, ours, theirs, goal, kind):
    ratio = ours / theirs if ours is not None and theirs else None
    met = None if goal is None or ratio is None else ratio <= goal
    return {"what": what, "ours": ours, "transformers": theirs, "ratio": ratio, "goal": goal, "met": met,
            "kind": kind}


def table(report: dict) -> str:
    def fmt(v, kind):
        if v is None:
            return "n/a"
        return {"time": f"{v:.2f}", "memory": f"{v:.0f}", "fraction": f"{v:.0%}"}[kind]

    lines = ["| | ours | transformers | ratio | goal | met |", "|---|---:|---:|---:|---:|:---:|"]
    if not report["summary"]:  # --tasks onnx alone
        lines = []
    for r in report["summary"]:
        goal = "" if r["goal"] is None else (f">= {r['goal']:.0%}" if r["kind"] == "fraction" else
                                             f"<= {r['goal']:.2f}x")
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['what']} | {fmt(r['ours'], r['kind'])} | {fmt(r['transformers'], r['kind'])} | {ratio} "
                     f"| {goal} | {met} |")
    flops = report.get("forward_rate")
    lines.append("")
    if flops:
        any_rate = next(iter(flops.values()))
        lines.append(f"forward: {any_rate['gflops']:.0f} GFLOP (FlopCounterMode on transformers' model); "
                     + "; ".join(f"{impl} {v['gflop_per_s']:.1f} GFLOP/s (own count {v['counted_gflops']:.0f})"
                                 for impl, v in flops.items()))
    for task, outputs in report.get("sequences", {}).items():
        if len(outputs) == 2:
            same = outputs["ours"] == outputs["transformers"]
            lines.append(f"{task}: {'the same' if same else 'DIFFERENT'} sequences from both implementations")
    if "cached" in report["args"]["tasks"]:
        lines.append("[1] ours fed from the feature cache; transformers has none, its column is its plain frozen step")
    if ONNX_TASK in report:
        lines += [onnx_table(report[ONNX_TASK]), ""]
    throughput = [t for t in report["args"]["tasks"] if t in SERVE_CLIENTS or t == "batch"]
    if throughput:
        a = report["args"]
        lines.append(f"[2] {THROUGHPUT_TASK} on 1024x768 JPEGs at {a['image_size']} px, {THROUGHPUT_BEAMS} beams, "
                     f"exactly {a['throughput_tokens']} new tokens, decoding and preprocessing included; ours through "
                     "HTTP (python -m florence2.serve, --max-batch-size 8) or python -m florence2 predict (batch 8); "
                     "transformers' column: its generate looped one image at a time (the server's peak memory "
                     "against the loop's)")
        rows = [r for r in report["summary"] if r["what"].endswith("(s/image) [2]") and r["ours"]]
        if rows and rows[0]["transformers"]:
            lines.append("images/s: " + "; ".join(f"{r['what'].split(' (')[0]} {1 / r['ours']:.3f}" for r in rows)
                         + f"; transformers' loop {1 / rows[0]['transformers']:.3f}")
        sizes = {t: statistics.mean(report["samples"]["ours"][t]["batch_size"]) for t in SERVE_CLIENTS
                 if "batch_size" in report["samples"]["ours"].get(t, {})}
        if sizes:
            lines.append("the server's mean batch: " + "; ".join(f"{t} {v:.1f}" for t, v in sizes.items()))
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['memory_gb']:.0f} GB; "
                 f"torch {m['torch']}, transformers {m['transformers']}; {m['environment']}")
    return "\n".join(lines)


def machine(args) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = "tuned malloc (both)" if args.tuned_malloc else "default malloc"
    if args.device == "cuda":
        cpu = torch.cuda.get_device_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
            "memory_gb": memory, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": args.device, "dtype": args.dtype, "environment": env}


def log(args, message: str) -> None:
    if not args.silent:
        print(message, file=sys.stderr, flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=("base", "large", "tiny"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="float32, or autocast to bfloat16/float16 (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both vision towers and our decoder step "
                   "(CUDA)")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--batch", type=int, default=2, help="batch of forward and training steps (generation: 1)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--throughput-tokens", type=int, default=48, help="new tokens per image of the throughput tasks")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated subset of {','.join(TASKS)}; {ONNX_TASK}: the ONNX export (not by default)")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per implementation and task group; the order of the implementations alternates "
                        "from round to round (2 rounds: about 18 minutes at base on 2 cores)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per process (after a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--max-idle-wait", type=float, default=None,
                   help="seconds to wait for other processes to go quiet before each repetition")
    p.add_argument("--tuned-malloc", action="store_true", help="glibc keeps freed memory (both implementations)")
    p.add_argument("--quick", action="store_true", help="one timed repetition per task, short idle waits")
    p.add_argument("--json", type=Path, help="write the full report (every sample) here")
    p.add_argument("--in-process", action="store_true",
                   help="no subprocesses (for tests): fast, but peak memory then mixes the implementations")
    p.add_argument("--silent", action="store_true", help="no progress on stderr")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "GROUP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(args.tasks) - set(TASKS) - {ONNX_TASK}
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    if args.reps is None:
        args.reps = 1 if args.quick else 2
    if args.max_idle_wait is None:
        args.max_idle_wait = 2.0 if args.quick else 20.0
    if args.device == "cuda" and args.child is None:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(run_child(*args.child, args)))
        return
    report = run(args)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
