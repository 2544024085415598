"""Helpers of the batch prediction and server tests: small checkpoints, test images, a server in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from .conftest import ROOT, TINY, tiny_reference_state

IMAGE_SIZE = 128  # the tiny reference model's
EOS_BIAS = 2.2  # added to the end token's logit bias: the tiny model then stops at lengths that vary with the input


def stopping_model(folder: Path) -> Path:
    """The tiny reference model (its processor at 128 px) whose answers end after 1 to 30 tokens depending on the
    image and the prompt, so that the rows of a batch end at different steps and the shorter ones get padded."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_reference_state()
    state["language_model.final_logits_bias"][..., 2] += EOS_BIAS
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(TINY / "config.json", folder / "config.json")
    from florence2.processor import Florence2Processor

    Florence2Processor(image_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def answering_model(folder: Path, answer: str) -> Path:
    """The tiny model set to generate `answer` (then </s>) for any image and prompt: the decoder's sublayers
    add nothing (zero output projections), so its state at step k is the normalized sum of the input token's
    embedding and position k's; position k points at the k-th answer token's embedding, 25x longer than any."""
    from florence2 import Florence2
    from florence2.processor import EOS_ID, Florence2Processor

    model = Florence2.from_pretrained(stopping_model(folder))
    processor = Florence2Processor(image_size=IMAGE_SIZE)
    ids = processor.tokenizer.encode(answer, add_special_tokens=False).ids + [EOS_ID]
    lm = model.language_model
    d = lm.config.d_model
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(d, len(ids), generator=g)
    directions, _ = torch.linalg.qr(directions - directions.mean(dim=0))  # orthonormal, zero-mean: LayerNorm keeps
    with torch.no_grad():
        for layer in lm.decoder.layers:
            for projection in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                projection.weight.zero_()
                projection.bias.zero_()
        for norm in [lm.decoder.layernorm_embedding] + [n for layer in lm.decoder.layers for n in (
                layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm)]:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        lm.final_logits_bias.zero_()
        for k, token in enumerate(ids):
            lm.shared.weight[token] = 4 * directions[:, k]
            # the step at decoder position 1 + k (after the start token and the forced <s>) emits ids[k]
            lm.decoder.embed_positions.weight[1 + k + lm.decoder.embed_positions.OFFSET] = 100 * directions[:, k]
    model.save_pretrained(folder)
    return folder


def pictures(folder: Path, count: int) -> list[Path]:
    """`count` small PNG pictures of different sizes and modes (shapes on a plain background)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 48), (31, 17), (200, 90), (90, 160), (128, 128)]
    modes = ["RGB", "L", "RGBA", "RGB", "P"]
    paths = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        image = Image.new("RGB", size, (20 * i % 256, 100, 200 - 10 * i % 200))
        draw = ImageDraw.Draw(image)
        draw.rectangle((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(255, 255 - 20 * i % 256, 0))
        draw.ellipse((size[0] // 2, size[1] // 3, size[0] - 2, size[1] - 2), fill=(0, 40 * i % 256, 90))
        path = folder / f"picture-{i:02d}.png"
        image.convert(modes[i % len(modes)]).save(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """python -m florence2.serve in a subprocess on a free port; stopped (and waited for) on close."""

    def __init__(self, model_dir: Path, log: Path, *args: str, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "florence2.serve", "--model", str(model_dir), "--port", str(self.port),
                 "--device", "cpu", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log.read_text()}")

    def rss_mb(self) -> float:
        """The server's resident memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
