"""From images to parsed answers in one call: prompt, preprocess, generate, decode, post-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
    list of them. Generation options (num_beams, max_new_tokens, ...) and `kernels` (None: the inference kernels
    where the layers allow them; True: required; False: the reference math) are passed to `generate`.
    """
    from .postprocess import parse_type

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
    prompts = [task + (t or "") for t in texts]
    dtype = model.image_projection.weight.dtype
    inputs = processor(text=prompts, images=images).to(model.image_projection.weight.device, dtype)
    scored = parse_type(task) in SCORED_PARSE_TYPES
    out = model.generate(**inputs, return_scores=scored, kernels=kernels, **generate_options)
    sequences = out.sequences if scored else out
    results = []
    for i, (image, sequence) in enumerate(zip(images, sequences)):
        size = (image.width, image.height)
        if scored:
            results.append(processor.post_process_generation(task=task, image_size=size, sequence=sequence,
                                                             transition_scores=out.scores[i]))
        else:
            text_out = processor.decode(sequence, skip_special_tokens=False)
            results.append(processor.post_process_generation(text_out, task=task, image_size=size))
    return results[0] if single else results


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
