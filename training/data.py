"""DocVQA-shaped data for fine-tuning: loading, one example per question, preprocessing in workers, batching.

Two dataset shapes are understood:
- DocumentVQA (HuggingFaceM4/DocumentVQA): one row per question, columns `question`, `answers` (a list), `image`.
- The Cauldron (HuggingFaceM4/the_cauldron, one config per source such as `docvqa`): one row per image, columns
  `images` (a list) and `texts` (a list of {user, assistant} turns); every turn is one example.

Images are read from their encoded bytes (the datasets `Image` feature with decode=False) so that a broken image is
an error of that example, not of the loader, and so that each image has a key (a hash of its bytes) shared by all
questions about it.
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

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Columns:
    question: str = "question"
    answers: str = "answers"
    image: str = "image"


class DataError(ValueError):
    """A dataset that cannot be used as asked: missing split or columns, unknown source."""


def load_split(source: str, split: str, config: str | None = None, revision: str | None = None):
    """A `datasets.Dataset` from a hub id, a `save_to_disk` folder, a parquet file, or a folder of data files."""
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
            if builder is None:
                raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use parquet, json or csv)")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise DataError(f"{path} has no split {split!r} (it has {sorted(loaded)})")
                    return loaded[split]
                return loaded
            return datasets.load_dataset(str(path), config, split=split)
        return datasets.load_dataset(source, config, split=split, revision=revision)
    except DataError:
        raise
    except ValueError as e:  # datasets reports an unknown split as ValueError
        raise DataError(f"cannot load split {split!r} of {source}: {e}") from None
    except FileNotFoundError as e:
        raise DataError(f"cannot find dataset {source}: {e}") from None


def dataset_shape(dataset, columns: Columns) -> str:
    names = set(dataset.column_names)
    if {columns.question, columns.answers, columns.image} <= names:
        return "docvqa"
    if {"images", "texts"} <= names:
        return "cauldron"
    raise DataError(f"dataset columns {sorted(names)} are neither DocumentVQA's ({columns.question!r}, "
                    f"{columns.answers!r}, {columns.image!r}; rename with --question-column etc.) nor The Cauldron's "
                    "('images', 'texts')")


def example_index(dataset, shape: str) -> list[tuple[int, int]]:
    """(row, turn) of every example: one per row for DocumentVQA, one per dialogue turn for The Cauldron."""
    if shape == "docvqa":
        return [(row, 0) for row in range(len(dataset))]
    return [(row, turn) for row, texts in enumerate(dataset["texts"]) for turn in range(len(texts or []))]


class QADataset(torch.utils.data.Dataset):
    """Examples as tensors, built in DataLoader workers. A broken example (unreadable image, empty question or
    answers) comes back as {"error": ...} so the batch can skip it and the run can count it."""

    def __init__(self, dataset, processor, prompt_template: str = "<DocVQA>{question}",
                 columns: Columns = Columns(), max_prompt_tokens: int | None = None, max_target_tokens: int = 256):
        import datasets

        self.shape = dataset_shape(dataset, columns)
        image_column = columns.image if self.shape == "docvqa" else "images"
        feature = datasets.Image(decode=False)
        if self.shape == "cauldron":
            feature = datasets.Sequence(feature) if not isinstance(dataset.features["images"], list) else [feature]
        self.dataset = dataset.cast_column(image_column, feature)
        self.index = example_index(self.dataset, self.shape)
        self.processor = processor
        self.prompt_template = prompt_template
        self.columns = columns
        self.max_prompt_tokens = max_prompt_tokens or processor.max_prompt_length
        self.max_target_tokens = max_target_tokens

    def __len__(self) -> int:
        return len(self.index)

    def text(self, i: int) -> tuple[str, list[str]]:
        """The question and the reference answers of example i (no image decoding)."""
        row, turn = self.index[i]
        if self.shape == "docvqa":
            record = self.dataset[row]
            answers = record[self.columns.answers]
            if isinstance(answers, str):
                answers = [answers]
            return record[self.columns.question], list(answers or [])
        texts = self.dataset[row]["texts"][turn]
        return texts["user"], [texts["assistant"]]

    def text_lengths(self) -> list[int]:
        """Prompt plus target tokens of every example, without decoding images (for length-grouped batching)."""
        lengths = []
        for i in range(len(self)):
            question, answers = self.text(i)
            prompt = self.prompt_template.format(question=question or "")
            lengths.append(len(self.processor.prompt_ids(prompt)) + len(self.processor.text_ids(answers[0] if answers
                                                                                                 else "")))
        return lengths

    def __getitem__(self, i: int) -> dict:
        try:
            return self._build(i)
        except Exception as e:  # one bad example must not kill an epoch hours in; the caller decides
            return {"error": f"example {i}: {type(e).__name__}: {e}", "index": i}

    def _build(self, i: int) -> dict:
        record = self.dataset[self.index[i][0]]
        question, answers = self.text(i)
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question")
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not answers:
            raise ValueError("no non-empty answer")
        stored = record[self.columns.image] if self.shape == "docvqa" else (record["images"] or [None])[0]
        image, key = open_image(stored)
        pixel_values = self.processor.image_tensor(image)
        prompt = self.prompt_template.format(question=question)
        prompt_ids = self.processor.prompt_ids(prompt)
        if len(prompt_ids) > self.max_prompt_tokens:
            prompt_ids = prompt_ids[: self.max_prompt_tokens - 1] + prompt_ids[-1:]  # keep </s>
        target_ids = self.processor.text_ids(answers[0])
        if len(target_ids) > self.max_target_tokens:
            target_ids = target_ids[: self.max_target_tokens - 1] + target_ids[-1:]
        return {"index": i, "pixel_values": pixel_values, "prompt_ids": prompt_ids, "target_ids": target_ids,
                "answers": answers, "image_key": key, "question_type": self.question_type(record)}

    def question_type(self, record: dict) -> str:
        types = record.get("question_types") if self.shape == "docvqa" else None
        return types[0] if isinstance(types, list) and types else "all"


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
    indices: list[int]
    answers: list[list[str]]
    image_keys: list[str]
    question_types: list[str]
    errors: list[str]  # examples dropped from this batch, with the reason

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device) -> Batch:
        move = {"device": device, "non_blocking": True}
        return Batch(self.pixel_values.to(**move), self.input_ids.to(**move), self.attention_mask.to(**move),
                     self.labels.to(**move), self.indices, self.answers, self.image_keys, self.question_types,
                     self.errors)


class Collator:
    """Pads a list of examples into a Batch on the CPU (the training loop moves it to the device)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> Batch:
        errors = [e["error"] for e in examples if "error" in e]
        good = [e for e in examples if "error" not in e]
        if not good:
            return Batch(torch.empty(0), torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long),
                         torch.empty(0, 0, dtype=torch.long), [], [], [], [], errors)
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
                     [e["index"] for e in good], [e["answers"] for e in good], [e["image_key"] for e in good],
                     [e["question_type"] for e in good], errors)


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
