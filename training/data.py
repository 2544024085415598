"""From examples to batches: each example built in a DataLoader worker, padded into batches, sampled per epoch.

An example is a task's (prompt, target) for one image of a split (tasks.py, formats/). Building it reads and decodes
the image (a broken file is that example's error, skipped and counted by the trainer, never the loader's), resizes
it to pixel values, tokenizes the prompt (truncated to the encoder's room, keeping </s>) and the target. Each image
has a key, a hash of its bytes, shared by all examples of the image (the feature cache uses it).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from florence2.config import IGNORE_INDEX

from .formats import LazyCell, Split


class TaskDataset(torch.utils.data.Dataset):
    """The examples of one split as tensors. A broken example (an unreadable image) comes back as
    {"error": ...} so that the batch can skip it and the run can count it."""

    def __init__(self, split: Split, examples: list, processor, max_prompt_tokens: int | None = None,
                 max_target_tokens: int = 256):
        self.samples = split.samples
        self.examples = examples
        self.processor = processor
        self.max_prompt_tokens = max_prompt_tokens or processor.max_prompt_length
        self.max_target_tokens = max_target_tokens

    def __len__(self) -> int:
        return len(self.examples)

    def text_lengths(self) -> list[int]:
        """Prompt plus target tokens of every example, without decoding images (for length-grouped batching)."""
        return [len(self.processor.prompt_ids(e.prompt)) + len(self.processor.text_ids(e.target))
                for e in self.examples]

    def __getitem__(self, i: int) -> dict:
        try:
            return self._build(i)
        except Exception as e:  # one bad example must not kill an epoch hours in; the caller decides
            where = self.samples[self.examples[i].sample].where
            return {"error": f"example {i} ({where}): {type(e).__name__}: {e}", "index": i}

    def _build(self, i: int) -> dict:
        example = self.examples[i]
        sample = self.samples[example.sample]
        stored = sample.image.get() if isinstance(sample.image, LazyCell) else {"bytes": None, "path": sample.image}
        image, key = open_image(stored)
        pixel_values = self.processor.image_tensor(image)
        prompt_ids = self.processor.prompt_ids(example.prompt)
        if len(prompt_ids) > self.max_prompt_tokens:
            prompt_ids = prompt_ids[: self.max_prompt_tokens - 1] + prompt_ids[-1:]  # keep </s>
        target_ids = self.processor.text_ids(example.target)
        if len(target_ids) > self.max_target_tokens:
            target_ids = target_ids[: self.max_target_tokens - 1] + target_ids[-1:]
        return {"index": i, "pixel_values": pixel_values, "prompt_ids": prompt_ids, "target_ids": target_ids,
                "image_key": key, "image_size": image.size}


def open_image(stored) -> tuple[Image.Image, str]:
    """Decode an image stored as {bytes, path} (or already a PIL image); the key identifies the image content."""
    if isinstance(stored, Image.Image):
        return stored, hashlib.blake2b(stored.tobytes(), digest_size=12).hexdigest()
    if not isinstance(stored, dict) or (stored.get("bytes") is None and not stored.get("path")):
        raise ValueError("no image")
    data = stored.get("bytes")
    if data is None:
        data = Path(stored["path"]).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, inside the worker
    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image {image.size}")
    return image, hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, L) right-padded with the pad id
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, T) right-padded with -100
    indices: list[int]  # the examples' indices in their dataset
    image_keys: list[str]
    image_sizes: list[tuple[int, int]]  # (width, height) of each decoded image
    errors: list[str]  # examples dropped from this batch, with the reason

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) in its pinning thread; an object without this method is passed
        on unpinned, and the non-blocking copy in `to` would then wait for each batch."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        return Batch(fn(self.pixel_values), fn(self.input_ids), fn(self.attention_mask), fn(self.labels),
                     self.indices, self.image_keys, self.image_sizes, self.errors)


class Collator:
    """Pads a list of examples into a Batch on the CPU (the training loop moves it to the device)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> Batch:
        errors = [e["error"] for e in examples if "error" in e]
        good = [e for e in examples if "error" not in e]
        if not good:
            return Batch(torch.empty(0), torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long),
                         torch.empty(0, 0, dtype=torch.long), [], [], [], errors)
        prompt_len = max(len(e["prompt_ids"]) for e in good)
        target_len = max(len(e["target_ids"]) for e in good)
        input_ids = torch.full((len(good), prompt_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(good), prompt_len), dtype=torch.long)
        labels = torch.full((len(good), target_len), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(good):
            input_ids[row, : len(e["prompt_ids"])] = torch.tensor(e["prompt_ids"])
            attention_mask[row, : len(e["prompt_ids"])] = 1
            labels[row, : len(e["target_ids"])] = torch.tensor(e["target_ids"])
        return Batch(torch.stack([e["pixel_values"] for e in good]), input_ids, attention_mask, labels,
                     [e["index"] for e in good], [e["image_key"] for e in good], [e["image_size"] for e in good],
                     errors)


class EpochSampler(torch.utils.data.Sampler):
    """The indices of one epoch for one rank: a permutation seeded by (seed, epoch), cut into global batches of
    `batch_size * world_size` samples from sample `start` on; rank r takes the r-th slice of each global batch.
    The same (seed, epoch, start) gives the same global batches for any number of ranks, which is what lets a run
    resume at `start` on a different number of ranks. The last incomplete global batch is dropped."""

    def __init__(self, length: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, lengths: list[int] | None = None):
        self.length, self.batch_size, self.seed, self.epoch, self.start = length, batch_size, seed, epoch, start
        self.rank, self.world_size, self.shuffle, self.lengths = rank, world_size, shuffle, lengths

    def global_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        if self.lengths is not None:  # group similar lengths: sort within chunks of 64 global batches, then shuffle
            group = self.batch_size * self.world_size
            chunk = 64 * group
            order = [i for s in range(0, len(order), chunk)
                     for i in sorted(order[s:s + chunk], key=lambda j: self.lengths[j])]
            full = len(order) // group
            batch_order = torch.randperm(full, generator=generator).tolist()
            order = [i for b in batch_order for i in order[b * group:(b + 1) * group]] + order[full * group:]
        return order

    def global_batches(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def __iter__(self):
        group = self.batch_size * self.world_size
        order = self.global_order()
        for s in range(self.start - self.start % group, self.global_batches() * group, group):
            if s < self.start:
                continue
            yield from order[s + self.rank * self.batch_size: s + (self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        group = self.batch_size * self.world_size
        return max(0, self.global_batches() - math.ceil(self.start / group)) * self.batch_size


def loader(dataset, sampler, batch_size: int, num_workers: int, seed: int, pin_memory: bool):
    """A DataLoader over `sampler` (an EpochSampler or a list of indices) that collates into Batches."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=Collator(dataset.processor.pad_token_id),
        num_workers=num_workers, pin_memory=pin_memory,
        # a private generator: creating an iterator must not consume the global RNG (dropout), or a resumed run
        # would draw different dropout masks than the run it continues
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
        prefetch_factor=4 if num_workers else None)
