"""Writers of transformers' own Florence-2 layout (`florence-community/*`), for tools/convert_weights.py and the
exporters; the model never imports this module (it reads either layout through config.read_config and
model.load_state).

transformers' layout differs from Microsoft's in the config's vision section (`embed_dim`, `model_type:
florence_vision`), in the vocabulary (an added `<image>` token, `image_token_id` = the original vocabulary size 51289,
padded to a multiple of 64: 51328), in the tensor names (weights.KEY_MAP) and in the files beside the weights:
- config.json (`to_transformers_config`) and the generation_config.json transformers reads its decoding defaults
  from (`generation_config`);
- tensors (`to_layout`: ours -> either layout): the transformers side gets the extra embedding rows, and has no
  `final_logits_bias`;
- tokenizer and processor files of either side (`transformers_tokenizer`, `microsoft_tokenizer`, ...).

The rows that transformers adds to the token embedding (the `<image>` row and the padding rows) are set to the mean
of the real rows (transformers' own `resize_token_embeddings` centres new rows on that mean). The logits of the real
tokens do not depend on them; a mean row's logit is the average of the real tokens' logits, so it never outscores
the best one, and it only takes a sliver of probability mass. They are removed again on the way back.
"""

from __future__ import annotations

import torch

from . import weights
from .config import FIXED_TRANSFORMERS_VISION, GENERATION_KEYS, ConfigError, Florence2Config, padded_vocab_size
from .postprocess import OCR_LINE_PATTERN, PHRASE_GROUNDING_BLACKLIST
from .processor import FLORENCE_TOKENS, MODEL_MAX_LENGTH, ImageSettings

IMAGE_TOKEN = "<image>"
# Top-level keys of Microsoft's config.json that a transformers-layout config.json does not carry (they do not come
# back on the way to Microsoft's layout). `torch_dtype` is not in the list: it is rewritten on either side as the
# dtype of the converted weights (`dtype` on the transformers side).
NOT_CARRIED_TO_TRANSFORMERS = {
    "auto_map": "points at Microsoft's remote code (configuration_florence2.py, modeling_florence2.py), which a "
                "converted folder does not hold and transformers must not run instead of its own Florence-2",
    "transformers_version": "the version of the library that wrote the file; stale once converted",
}


# ------------------------------------------------------------------------------------------------- config.json
def to_transformers_config(config: Florence2Config, dtype: torch.dtype | str | None = None) -> dict:
    """Our config as a transformers-layout config.json. Everything of Microsoft's config.json is carried (unknown
    keys too), except the keys of NOT_CARRIED_TO_TRANSFORMERS and the ones transformers names differently."""
    msft = config.to_dict()
    vision, text = msft.pop("vision_config"), msft.pop("text_config")
    vision.pop("model_type")
    vision.pop("image_feature_source")  # fixed by the architecture, restored on the way back
    vision["max_temporal_embeddings"] = vision.pop("visual_temporal_embedding")["max_temporal_embeddings"]
    vision["max_position_embeddings"] = vision.pop("image_pos_embed")["max_pos_embeddings"]
    vision["embed_dim"] = vision.pop("dim_embed")
    vision = {"model_type": "florence_vision", **FIXED_TRANSFORMERS_VISION, **vision}
    text = {"model_type": "bart", **text, "vocab_size": padded_vocab_size(config.text.vocab_size)}
    # regenerated from the sections on the way back: the token ids, projection_dim, vocab_size, ...
    regenerated = ("bos_token_id", "eos_token_id", "pad_token_id", "projection_dim", "vocab_size", "model_type",
                   "architectures", "is_encoder_decoder", "torch_dtype")
    top = {k: v for k, v in msft.items() if k not in regenerated and k not in NOT_CARRIED_TO_TRANSFORMERS}
    out = {"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"], **top,
           "image_token_id": config.text.vocab_size, "is_encoder_decoder": True, "tie_word_embeddings": True}
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    out.update(vision_config=vision, text_config=text)
    return out


def generation_config(config: Florence2Config) -> dict:
    """generation_config.json for transformers: Microsoft's decoding defaults (3 beams, no repeated 3-grams, early
    stopping, <s> forced first and </s> last), which transformers 5 no longer reads from text_config."""
    t = config.text
    d = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
         "decoder_start_token_id": t.decoder_start_token_id, **{key: getattr(t, key) for key in GENERATION_KEYS}}
    if t.length_penalty == 1.0:  # transformers' default; Microsoft's configs leave it out
        del d["length_penalty"]
    return d


# ------------------------------------------------------------------------------------------------------ tensors
def to_layout(ours: dict[str, torch.Tensor], layout: str, config: Florence2Config,
              drop_final_logits_bias: bool = False) -> dict[str, torch.Tensor]:
    """Our tensors in `layout`'s names, the tied embedding written once (as `shared`).

    The transformers layout has no `final_logits_bias`: a bias of zeros (as in every released checkpoint) is left
    out, anything else raises CheckpointError unless `drop_final_logits_bias` (the logits then change by the bias).
    Its token embedding gets the `<image>` row and the padding rows, all set to the mean of the real rows."""
    if layout == "microsoft":
        return weights.from_ours(ours, "microsoft")
    if layout != "transformers":
        raise ValueError(f"unknown layout {layout!r}; use 'microsoft' or 'transformers'")
    bias = ours.get(weights.FINAL_LOGITS_BIAS)
    if bias is not None and bias.count_nonzero() and not drop_final_logits_bias:
        name = weights.rename(weights.FINAL_LOGITS_BIAS, "ours", "microsoft")
        raise weights.CheckpointError(
            f"the checkpoint's {name} is not zero (largest magnitude {bias.abs().max().item():.3g}), and "
            "transformers' Florence-2 has no such bias: the conversion cannot be exact. Pass "
            "--drop-final-logits-bias (drop_final_logits_bias=True) to convert without it; the logits then differ "
            "by the bias")
    out = weights.from_ours(ours, "transformers")
    shared = weights.rename(weights.SHARED, "ours", "transformers")
    out[shared] = pad_embedding(out[shared], padded_vocab_size(config.text.vocab_size))
    return out


def pad_embedding(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    """(vocab, d) -> (rows, d): the new rows (`<image>`, then padding) are the mean of the existing ones."""
    mean = embedding.float().mean(dim=0, keepdim=True).to(embedding.dtype)
    return torch.cat([embedding, mean.expand(rows - embedding.shape[0], -1)]).contiguous()


# ----------------------------------------------------------------------------------- tokenizer and processor
def transformers_tokenizer(tokenizer: dict, vocab_size: int) -> dict:
    """tokenizer.json of the transformers side: the Florence tokens (added to the file, since transformers' processor
    does not add them) and `<image>` at id `vocab_size`."""
    added = [dict(t) for t in tokenizer.get("added_tokens", [])]
    tok = {**tokenizer, "added_tokens": added}  # the rest (the 50k-entry vocabulary) is shared, not copied
    first = max(tokenizer["model"]["vocab"].values()) + 1
    if first + len(FLORENCE_TOKENS) != vocab_size:
        raise ConfigError(f"the tokenizer ({first} tokens + {len(FLORENCE_TOKENS)} Florence tokens) does not match "
                          f"the model's vocabulary of {vocab_size}")
    have = {t["content"]: t["id"] for t in added}
    taken = {t["id"]: t["content"] for t in added}
    for i, content in enumerate([*FLORENCE_TOKENS, IMAGE_TOKEN]):
        token_id = first + i
        if have.get(content, token_id) != token_id or taken.get(token_id, content) != content:
            raise ConfigError(f"the tokenizer has {content} at id {have.get(content)} and id {token_id} holds "
                              f"{taken.get(token_id)}; Florence-2 expects {content} at {token_id}")
        if content not in have:
            added.append(_added_token(content, token_id))
    return tok


def microsoft_tokenizer(tokenizer: dict, vocab_size: int) -> dict:
    """tokenizer.json of Microsoft's side: without `<image>` and without the Florence tokens, which Microsoft's
    processor adds itself when it loads."""
    first = vocab_size - len(FLORENCE_TOKENS)
    florence = {t: first + i for i, t in enumerate(FLORENCE_TOKENS)}
    kept = [t for t in tokenizer.get("added_tokens", []) if t["content"] != IMAGE_TOKEN and t["id"] < vocab_size
            and florence.get(t["content"]) != t["id"]]
    return {**tokenizer, "added_tokens": kept}


def _added_token(content: str, token_id: int) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def transformers_tokenizer_config(tokenizer_config: dict) -> dict:
    """tokenizer_config.json for transformers' BartTokenizer, with `<image>` as the named `image_token`."""
    return {"tokenizer_class": "BartTokenizer", "processor_class": "Florence2Processor",
            "model_max_length": tokenizer_config.get("model_max_length", MODEL_MAX_LENGTH), "add_prefix_space": False,
            "errors": "replace", "trim_offsets": True, "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
            "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
            "additional_special_tokens": list(FLORENCE_TOKENS), "extra_special_tokens": {"image_token": IMAGE_TOKEN}}


def microsoft_tokenizer_config(tokenizer_config: dict) -> dict:
    return {"model_max_length": tokenizer_config.get("model_max_length", MODEL_MAX_LENGTH)}


_REMOTE_CODE_KEYS = ("auto_map", "_valid_processor_keys")  # Microsoft's preprocessor_config.json only


def transformers_preprocessor_config(preprocessor: dict, config: Florence2Config) -> dict:
    """preprocessor_config.json for transformers' CLIPImageProcessor, with `image_seq_length`, the number of
    `<image>` tokens the processor puts before each prompt (577 for 768x768)."""
    d = {k: v for k, v in preprocessor.items() if k not in _REMOTE_CODE_KEYS}
    size = d.get("size", {"height": ImageSettings.height, "width": ImageSettings.width})
    d.update(image_processor_type="CLIPImageProcessor", processor_class="Florence2Processor",
             image_seq_length=config.vision.grid_size(size["height"]) * config.vision.grid_size(size["width"]) + 1)
    return d


def microsoft_preprocessor_config(preprocessor: dict, template: dict) -> dict:
    """preprocessor_config.json of Microsoft's side: the image settings of `preprocessor`, the remote-code keys of
    `template` (the shipped file)."""
    d = {k: v for k, v in template.items() if k in _REMOTE_CODE_KEYS}
    d.update({k: v for k, v in preprocessor.items() if k not in _REMOTE_CODE_KEYS})
    d.update(image_processor_type="CLIPImageProcessor", processor_class="Florence2Processor")
    return d


def transformers_processor_config() -> dict:
    """processor_config.json: transformers' Florence2Processor parses an answer only for the parse types its
    `post_processor_config` lists, so it lists all of them."""
    return {"processor_class": "Florence2Processor", "num_additional_image_tokens": 0,
            "post_processor_config": {
                "ocr": {"pattern": OCR_LINE_PATTERN, "area_threshold": 0.0},
                "phrase_grounding": {"banned_grounding_tokens": sorted(PHRASE_GROUNDING_BLACKLIST)},
                **{name: {} for name in ("pure_text", "description_with_bboxes", "description_with_polygons",
                                         "polygons", "bboxes", "description_with_bboxes_or_polygons")}}}
