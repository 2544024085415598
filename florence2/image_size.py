"""Image sizes other than 768x768: what bounds them, and the text position table that grows when it must.

Two learned tables bound the image a Florence-2 model reads, at one token per 32x32 patch:
- DaViT's 2-D position table (vision_config.image_pos_embed.max_pos_embeddings: 50 rows, 50 columns), so at most
  50 * 32 = 1600 px a side. Past it there is nothing learned to start from, and such a size is refused.
- the text encoder's learned positions (text_config.max_position_embeddings: 1024), which hold the image tokens,
  (H/32)(W/32) + 1, and then the prompt: 768x768 takes 577 and leaves 447 prompt tokens, 768x1024 takes 769 and
  leaves 255, 1024x1024 takes 1025 and does not fit at all.
When the image tokens and the prompts need more positions than the table has, the table grows (with the decoder's:
BART's config has one max_position_embeddings for both, so the checkpoint still loads in the original code). Each
new position p starts as a copy of learned position p mod n (n the old size), as Longformer grew RoBERTa's table:
positions past n begin as the positions they repeat, and fine-tuning tells them apart. This is a deviation from the
original, which has no such path (named in the README).

Sizes are (height, width), as `Florence2Processor.image_size` and the `HxW` of `--image-size`.
"""

from __future__ import annotations

import re

import torch

from .config import with_changes
from .processor import PATCH, Florence2Processor

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")


def parse_image_size(text: str) -> tuple[int, int]:
    """"768" -> (768, 768); "1024x768" -> (1024, 768): height x width, each a positive multiple of 32."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"image size {text!r}: give one side (768) or height x width (1024x768)")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    for name, side in (("height", height), ("width", width)):
        if side <= 0 or side % PATCH:
            raise ValueError(f"image size {text!r}: the {name} {side} is not a positive multiple of {PATCH} "
                             f"(one image token per {PATCH}x{PATCH} patch)")
    return height, width


def image_tokens(size: tuple[int, int]) -> int:
    """Image tokens in front of the prompt for (height, width): one per 32x32 patch, plus their mean."""
    height, width = size
    return (height // PATCH) * (width // PATCH) + 1


def check_image_size(model, size: tuple[int, int]) -> None:
    """Refuse a size past DaViT's 2-D position table, with the arithmetic."""
    cells = model.config.vision.max_pos_embeddings
    for name, side in zip(("height", "width"), size):
        if side // PATCH > cells:
            raise ValueError(f"image size {size[0]}x{size[1]}: the {name} of {side} px needs {side // PATCH} "
                             f"position cells of {PATCH} px, and DaViT's 2-D position table has {cells} a side "
                             f"(at most {cells * PATCH} px)")


def fit_image_size(model, processor: Florence2Processor, size: tuple[int, int],
                   prompt_tokens: int) -> Florence2Processor:
    """Make `model` read images of `size` with prompts of up to `prompt_tokens` tokens, and return the processor
    for that size (its tokenizer, with model_max_length = the encoder's positions).

    The encoder's position table grows in place when image tokens + prompt_tokens do not fit it (see above)."""
    check_image_size(model, size)
    needed = image_tokens(size) + prompt_tokens
    if needed > model.config.text.max_position_embeddings:
        grow_positions(model, needed)
    return _processor(model, processor, size)


def processor_at(model, processor: Florence2Processor, size: tuple[int, int]) -> Florence2Processor:
    """The processor that reads images of `size` with `model` as it is, for prediction: no table grows (new rows
    would be untrained copies). Refused with the arithmetic past DaViT's table, or when the image tokens leave no
    room for a prompt; a model fine-tuned at such a size has grown its table, and its checkpoint records the size."""
    check_image_size(model, size)
    positions = model.config.text.max_position_embeddings
    if image_tokens(size) + 2 > positions:
        raise ValueError(f"image size {size[0]}x{size[1]}: its {image_tokens(size)} image tokens "
                         f"(({size[0]}/{PATCH})({size[1]}/{PATCH}) + 1) and a prompt of at least <s></s> need more "
                         f"than the text encoder's {positions} positions; fine-tune at this size "
                         "(python -m training.finetune --image-size), which grows them")
    return _processor(model, processor, size)


def _processor(model, processor: Florence2Processor, size: tuple[int, int]) -> Florence2Processor:
    """`processor` at `size`, its prompts bounded by the model's positions (its tokenizer and image settings kept)."""
    return Florence2Processor(image_size=size, tokenizer=processor.tokenizer,
                              tokenizer_config={"model_max_length": model.config.text.max_position_embeddings},
                              preprocessor_config=processor.image_settings.to_config())


@torch.no_grad()
def grow_positions(model, positions: int) -> None:
    """Grow the encoder's and decoder's learned position tables to `positions` rows (plus BART's offset of 2), each
    new position p initialized from learned position p mod n; model.config records the new size."""
    text = model.config.text
    old = text.max_position_embeddings
    if positions <= old:
        raise ValueError(f"the position tables already have {old} positions (asked to grow to {positions})")
    for part in (model.language_model.encoder, model.language_model.decoder):
        table = part.embed_positions
        offset = table.OFFSET
        weight = table.weight
        rows = torch.arange(positions) % old + offset
        grown = torch.cat([weight[:offset], weight[rows]])
        table.weight = torch.nn.Parameter(grown, requires_grad=weight.requires_grad)
        table.num_embeddings = grown.shape[0]
    model.config = with_changes(model.config, text={"max_position_embeddings": positions})
    model.language_model.config = model.config.text
