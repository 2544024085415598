"""From images to parsed answers in one call: prompt, preprocess, generate, decode, post-process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .generate import GenerateOutput
from .postprocess import parse_type

if TYPE_CHECKING:
    from .processor import Florence2Inputs

# Tasks whose parsed boxes carry the original's confidence scores (from the generation's token scores).
SCORED_PARSE_TYPES = ("description_with_bboxes",)


def default_processor(model):
    """The processor of the checkpoint the model was loaded from, else the standard one; kept on the model."""
    from .processor import Florence2Processor

    processor = getattr(model, "_processor", None)
    if processor is None:
        source = getattr(model, "name_or_path", None)
        processor = Florence2Processor.from_pretrained(source) if source else Florence2Processor()
        model._processor = processor
    return processor


@torch.no_grad()
def predict(model, images, task: str, text: str | list[str] | None = None, processor=None, *,
            kernels: bool | None = None, **generate_options):
    """Run `task` (e.g. "<OD>", "<CAPTION>", "<DocVQA>") on one image or a list of images.

    `text` is the task's input (the phrase of "<CAPTION_TO_PHRASE_GROUNDING>", the question of "<DocVQA>", ...):
    one string for every image, or one per image. Returns the parsed result ({task: answer}) for one image, or a
    list of them. Generation options (num_beams, max_new_tokens, ...), `kernels` (None: the inference kernels
    where the layers allow them; True: required; False: the reference math) and `compile` (True: the compiled
    decoder step, docs/compiled-decoding.md) are passed to `generate`.
    """
    processor = processor or default_processor(model)
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if not images:
        raise ValueError("no images given")
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a task token such as '<OD>', got {task!r}")
    texts = text if isinstance(text, (list, tuple)) else [text] * len(images)
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts for {len(images)} images: give one text, or one per image")
    if generate_options.get("num_return_sequences", 1) != 1:
        raise ValueError("predict returns one answer per image; call generate for several sequences")
    images = [_as_image(im, i) for i, im in enumerate(images)]
    inputs = processor(text=[task + (t or "") for t in texts], images=images)
    results = generate_answers(model, processor, inputs, [task] * len(images), [im.size for im in images],
                               kernels=kernels, **generate_options)
    return results[0] if single else results


@torch.no_grad()
def generate_answers(model, processor, inputs, tasks: list[str], image_sizes: list[tuple[int, int]], *,
                     kernels: bool | None = None, all_scores: bool = False, **generate_options) -> list[dict]:
    """The parsed answer ({task: answer}) of each row of a processed batch: generate, decode, post-process.

    The one path from model inputs to answers, shared by `predict`, batch prediction and the server. Each row has
    its own task and (width, height) of its original image; rows of several tasks may share a batch (detection
    scores are computed for the rows that report them). `all_scores` adds them to every answer with coordinates,
    which the original leaves unscored (<OPEN_VOCABULARY_DETECTION>, OCR quads, ...: the sliced path ranks them).
    """
    return [answer for answer, _ in generate_answers_and_tokens(model, processor, inputs, tasks, image_sizes,
                                                                kernels=kernels, all_scores=all_scores,
                                                                **generate_options)]


@torch.no_grad()
def generate_answers_and_tokens(model, processor, inputs, tasks: list[str], image_sizes: list[tuple[int, int]], *,
                                kernels: bool | None = None, all_scores: bool = False,
                                **generate_options) -> list[tuple[dict, list[int]]]:
    """generate_answers, with the generated token ids of each answer (the start token left out, through the first
    end token): num_return_sequences answers per row, a row's together (what the server counts and streams)."""
    dtype = model.image_projection.weight.dtype
    inputs = inputs.to(model.image_projection.weight.device, dtype)
    scoring = [all_scores or parse_type(task) in SCORED_PARSE_TYPES for task in tasks]
    scored = any(scoring)
    out = model.generate(**inputs, return_scores=scored, kernels=kernels, **generate_options)
    return parse_answers(processor, out, tasks, image_sizes, model.config.text.eos_token_id, scoring,
                         copies=generate_options.get("num_return_sequences", 1))


def parse_answers(processor, out, tasks: list[str], image_sizes: list[tuple[int, int]], eos: int,
                  scoring: list[bool], copies: int = 1) -> list[tuple[dict, list[int]]]:
    """The parsed answer of each generated row with its generated ids: on the host, from one copy of the sequences
    (and their scores); `copies` rows per task (num_return_sequences), `scoring` per task."""
    scored = isinstance(out, GenerateOutput)
    sequences = (out.sequences if scored else out).cpu()
    scores = out.scores.cpu() if scored else None
    results = []
    for i, sequence in enumerate(sequences):
        task, size = tasks[i // copies], image_sizes[i // copies]
        # a batch pads the rows that ended early: what a row gives alone ends at its first end token
        ends = (sequence[1:] == eos).nonzero()
        sequence = sequence[:int(ends[0]) + 2] if len(ends) else sequence
        if scoring[i // copies]:
            answer = processor.post_process_generation(task=task, image_size=size, sequence=sequence,
                                                       transition_scores=scores[i, :len(sequence) - 1])
        else:
            text_out = processor.decode(sequence, skip_special_tokens=False)
            answer = processor.post_process_generation(text_out, task=task, image_size=size)
        results.append((answer, sequence[1:].tolist()))
    return results


def check_prompt(config, processor, prompt: str) -> None:
    """ValueError if `prompt` has more tokens than a model of `config` reads: the processor's limit, or fewer when
    the encoder's positions left after the image tokens are fewer (small models)."""
    capacity = min(processor.max_prompt_length, config.text.max_position_embeddings - processor.image_seq_length)
    length = len(processor.prompt_ids(prompt))
    if length > capacity:
        raise ValueError(f"the prompt has {length} tokens, more than the {capacity} this model reads")


def collate(rows: list) -> Florence2Inputs:
    """One batch from processed single examples (each `processor(text=prompt, images=image)`): prompts
    right-padded with the pad token and masked, as the processor pads a batch; pixel values stacked."""
    from torch.nn.utils.rnn import pad_sequence

    from .processor import PAD_ID, Florence2Inputs

    ids = [row["input_ids"][0] for row in rows]
    return Florence2Inputs(
        input_ids=pad_sequence(ids, batch_first=True, padding_value=PAD_ID),
        attention_mask=pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        pixel_values=torch.cat([row["pixel_values"] for row in rows]))


def _as_image(image, index: int) -> Image.Image:
    """Open paths; keep PIL images; arrays and tensors are converted by the processor, but their size is needed
    here for the coordinates."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"image {index}: cannot read {image}: {e}") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        from .processor import to_pil

        return to_pil(image, index)
    raise TypeError(f"image {index}: expected a PIL image, a path, a numpy array or a tensor, got "
                    f"{type(image).__name__}")
