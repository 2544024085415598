"""The two checkpoint layouts: Microsoft's remote code and transformers' own Florence-2 (`florence-community/*`).

Both config.json files say `model_type: florence2`; they differ in the vision section (`dim_embed` and
`model_type: davit` for Microsoft, `embed_dim` and `model_type: florence_vision` for transformers) and in the
vocabulary: transformers adds an `<image>` token (`image_token_id` = the original vocabulary size, 51289) and pads
the vocabulary to a multiple of 64 (51328). Here, for the loader and `tools/convert_weights.py`:

- config.json both ways (`read_config`, `from_transformers_config`, `to_transformers_config`), and the
  generation_config.json transformers reads its decoding defaults from (`generation_config`);
- tensors both ways (`load_state`: either layout -> our names; `to_layout`: ours -> either layout). Renames go
  through `weights.KEY_MAP`; the transformers side gets the extra embedding rows, and has no `final_logits_bias`;
- tokenizer and processor files of the transformers side (`transformers_tokenizer`, ...) and back.

The rows that transformers adds to the token embedding (the `<image>` row and the padding rows) are set to the mean
of the real rows (transformers' own `resize_token_embeddings` centres new rows on that mean). The logits of the real
tokens do not depend on them; a mean row's logit is the average of the real tokens' logits, so it never outscores
the best one, and it only takes a sliver of probability mass. They are removed again on the way back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import weights
from .config import ConfigError, Florence2Config, TextConfig

IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64  # transformers pads the vocabulary to a multiple of this
BIAS = "language_model.final_logits_bias"
# Top-level keys of Microsoft's config.json that a transformers-layout config.json does not carry (they do not come
# back on the way to Microsoft's layout). `torch_dtype` is not in the list: it is rewritten on either side as the
# dtype of the converted weights (`dtype` on the transformers side).
NOT_CARRIED_TO_TRANSFORMERS = {
    "auto_map": "points at Microsoft's remote code (configuration_florence2.py, modeling_florence2.py), which a "
                "converted folder does not hold and transformers must not run instead of its own Florence-2",
    "transformers_version": "the version of the library that wrote the file; stale once converted",
}
_GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty", "forced_bos_token_id",
                    "forced_eos_token_id")
_GENERATION_DEFAULTS = {name: getattr(TextConfig(), name) for name in _GENERATION_KEYS}
# Vision keys of the transformers config that Microsoft's DaViT fixes: any other value is a different model.
_FIXED_TRANSFORMERS_VISION = {"in_channels": 3, "mlp_ratio": 4.0, "qkv_bias": True, "activation_function": "gelu"}
# BartConfig's defaults where they differ from ours, for keys a transformers config.json leaves out.
_BART_DEFAULTS = {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
                  "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
                  "attention_dropout": 0.0, "activation_dropout": 0.0}
# Top-level keys of a transformers config that Microsoft's layout regenerates or has no use for.
_TRANSFORMERS_ONLY = ("image_token_id", "tie_word_embeddings", "dtype", "torch_dtype", "transformers_version",
                      "architectures", "is_encoder_decoder")


def padded_vocab_size(vocab_size: int) -> int:
    """The transformers layout's vocabulary: the original one plus `<image>`, rounded up to a multiple of 64."""
    return -(-(vocab_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ------------------------------------------------------------------------------------------------- config.json
def detect_layout(d: dict) -> str:
    vision = d.get("vision_config") if isinstance(d, dict) else None
    if d.get("model_type") == "florence2" and isinstance(vision, dict):
        if "dim_embed" in vision or vision.get("model_type") == "davit":
            return "microsoft"
        if "embed_dim" in vision or vision.get("model_type") == "florence_vision":
            return "transformers"
    raise ConfigError("config.json is neither Microsoft's Florence-2 layout (model_type florence2, "
                      "vision_config.dim_embed) nor transformers' (model_type florence2, vision_config.embed_dim)")


def read_config(folder: Path) -> tuple[Florence2Config, str]:
    """config.json of either layout -> (config, layout). For the transformers layout the decoding defaults come from
    generation_config.json when it has them (transformers reads them there), else Microsoft's."""
    d = _read_json(folder / "config.json", required=True)
    layout = detect_layout(d)
    if layout == "microsoft":
        return Florence2Config.from_dict(d), layout
    return from_transformers_config(d, _read_json(folder / "generation_config.json")), layout


def from_transformers_config(d: dict, generation: dict | None = None) -> Florence2Config:
    """A transformers-layout config.json (and its generation_config.json) as our config. The vocabulary is the
    original one: `image_token_id`, the first id past it."""
    if not isinstance(d.get("vision_config"), dict) or not isinstance(d.get("text_config"), dict):
        raise ConfigError("config.json needs a vision_config and a text_config section")
    vision, text = dict(d["vision_config"]), dict(d["text_config"])
    vocab_size = d.get("image_token_id", 51289)
    padded = text.get("vocab_size", padded_vocab_size(vocab_size))
    if not isinstance(vocab_size, int) or not isinstance(padded, int) or not 0 < vocab_size < padded:
        raise ConfigError(f"image_token_id {vocab_size} must be a token id inside text_config.vocab_size {padded}: "
                          "the <image> token is the first id past the original vocabulary")
    for key, expected in _FIXED_TRANSFORMERS_VISION.items():
        if vision.pop(key, expected) != expected:
            raise ConfigError(f"vision_config.{key} must be {expected!r} (Florence-2's DaViT), got "
                              f"{d['vision_config'][key]!r}")
    vision.pop("model_type", None)
    vision.pop("initializer_range", None)  # training-time init only
    if "embed_dim" in vision:
        vision["dim_embed"] = vision.pop("embed_dim")
    vision["visual_temporal_embedding"] = {"type": "COSINE",
                                           "max_temporal_embeddings": vision.pop("max_temporal_embeddings", 100)}
    vision["image_pos_embed"] = {"type": "learned_abs_2d",
                                 "max_pos_embeddings": vision.pop("max_position_embeddings", 50)}
    vision.setdefault("projection_dim", 1024)  # transformers' defaults for what its config.json leaves out
    text.pop("model_type", None)
    text = {**_BART_DEFAULTS, **text, "vocab_size": vocab_size}
    for key in _GENERATION_KEYS:  # generation_config.json first, as transformers reads it; else Microsoft's defaults
        if generation and key in generation:
            text[key] = generation[key]
        text.setdefault(key, _GENERATION_DEFAULTS[key])
    top = {k: v for k, v in d.items() if k not in (*_TRANSFORMERS_ONLY, "vision_config", "text_config")}
    microsoft = {**top, "model_type": "florence2", "vision_config": vision, "text_config": text}
    if "projection_dim" in vision:
        microsoft["projection_dim"] = vision["projection_dim"]
    return Florence2Config.from_dict(microsoft)


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
    vision = {"model_type": "florence_vision", **_FIXED_TRANSFORMERS_VISION, **vision}
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
         "decoder_start_token_id": t.decoder_start_token_id, "forced_bos_token_id": t.forced_bos_token_id,
         "forced_eos_token_id": t.forced_eos_token_id, "num_beams": t.num_beams,
         "no_repeat_ngram_size": t.no_repeat_ngram_size, "early_stopping": t.early_stopping}
    if t.length_penalty != 1.0:
        d["length_penalty"] = t.length_penalty
    return d


# ------------------------------------------------------------------------------------------------------ tensors
def load_state(state: dict[str, torch.Tensor], layout: str, config: Florence2Config) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors in `layout` -> our names, checked name by name and shape by shape against the model of
    `config` (weights.to_ours: unknown, missing and mis-shaped tensors are named). The optional buffers are filled
    in when absent: the cosine temporal table recomputed, `final_logits_bias` zeros (the transformers layout has
    none). Tensors keep their stored dtype."""
    from .model import Florence2, cosine_table

    _check_names_fit(state, layout)
    with torch.device("meta"):
        model = Florence2(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours = weights.to_ours(state, layout, expected, config.text.vocab_size)
    dtype = ours[weights.SHARED].dtype
    if "temporal_embedding" not in ours:
        ours["temporal_embedding"] = cosine_table(*expected["temporal_embedding"]).to(dtype)
    if BIAS not in ours:
        ours[BIAS] = torch.zeros(expected[BIAS], dtype=dtype)
    return ours


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
    bias = ours.get(BIAS)
    if bias is not None and bias.count_nonzero() and not drop_final_logits_bias:
        raise weights.CheckpointError(
            f"the checkpoint's {weights.rename(BIAS, 'ours', 'microsoft')} is not zero (largest magnitude "
            f"{bias.abs().max().item():.3g}), and transformers' Florence-2 has no such bias: the conversion cannot be "
            "exact. Pass --drop-final-logits-bias (drop_final_logits_bias=True) to convert without it; the logits "
            "then differ by the bias")
    out = weights.from_ours(ours, "transformers")
    shared = weights.rename(weights.SHARED, "ours", "transformers")
    out[shared] = pad_embedding(out[shared], padded_vocab_size(config.text.vocab_size))
    return out


def pad_embedding(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    """(vocab, d) -> (rows, d): the new rows (`<image>`, then padding) are the mean of the existing ones."""
    mean = embedding.float().mean(dim=0, keepdim=True).to(embedding.dtype)
    return torch.cat([embedding, mean.expand(rows - embedding.shape[0], -1)]).contiguous()


def _check_names_fit(state: dict[str, torch.Tensor], layout: str) -> None:
    """A config of one layout with weights of the other gets one clear error instead of a list of every name."""
    other = {"microsoft": "transformers", "transformers": "microsoft"}[layout]
    fits = {name: sum(_known(k, name) for k in state) for name in (layout, other)}
    if fits[other] > fits[layout]:
        raise weights.CheckpointError(f"config.json is in the {layout} layout but the weights use {other} names "
                                      f"({fits[other]} of {len(state)} tensors): a mixed-up folder?")


def _known(key: str, layout: str) -> bool:
    if key in weights.TIED_ALIASES[layout]:
        return True
    try:
        weights.rename(key, layout, "ours")
    except KeyError:
        return False
    return True


# ----------------------------------------------------------------------------------- tokenizer and processor
def florence_tokens() -> list[str]:
    """The 1024 tokens Microsoft's processor adds to BART's 50265 at load time, in id order (50265..51288)."""
    return ["<od>", "</od>", "<ocr>", "</ocr>", *(f"<loc_{i}>" for i in range(1000)), "<cap>", "</cap>", "<ncap>",
            "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>",
            "</region_cap>", "<region_to_desciption>", "</region_to_desciption>", "<proposal>", "</proposal>",
            "<poly>", "</poly>", "<and>"]  # (sic) desciption: the token as Microsoft trained it


def transformers_tokenizer(tokenizer: dict, vocab_size: int) -> dict:
    """tokenizer.json of the transformers side: the Florence tokens (added to the file, since transformers' processor
    does not add them) and `<image>` at id `vocab_size`."""
    added = [dict(t) for t in tokenizer.get("added_tokens", [])]
    tok = {**tokenizer, "added_tokens": added}  # the rest (the 50k-entry vocabulary) is shared, not copied
    first = max(tokenizer["model"]["vocab"].values()) + 1
    if first + len(florence_tokens()) != vocab_size:
        raise ConfigError(f"the tokenizer ({first} tokens + {len(florence_tokens())} Florence tokens) does not match "
                          f"the model's vocabulary of {vocab_size}")
    have = {t["content"]: t["id"] for t in added}
    taken = {t["id"]: t["content"] for t in added}
    for i, content in enumerate([*florence_tokens(), IMAGE_TOKEN]):
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
    first = vocab_size - len(florence_tokens())
    florence = {t: first + i for i, t in enumerate(florence_tokens())}
    kept = [t for t in tokenizer.get("added_tokens", []) if t["content"] != IMAGE_TOKEN and t["id"] < vocab_size
            and florence.get(t["content"]) != t["id"]]
    return {**tokenizer, "added_tokens": kept}


def _added_token(content: str, token_id: int) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def transformers_tokenizer_config(tokenizer_config: dict) -> dict:
    """tokenizer_config.json for transformers' BartTokenizer, with `<image>` as the named `image_token`."""
    return {"tokenizer_class": "BartTokenizer", "processor_class": "Florence2Processor",
            "model_max_length": tokenizer_config.get("model_max_length", 1024), "add_prefix_space": False,
            "errors": "replace", "trim_offsets": True, "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
            "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
            "additional_special_tokens": florence_tokens(), "extra_special_tokens": {"image_token": IMAGE_TOKEN}}


def microsoft_tokenizer_config(tokenizer_config: dict) -> dict:
    return {"model_max_length": tokenizer_config.get("model_max_length", 1024)}


_REMOTE_CODE_KEYS = ("auto_map", "_valid_processor_keys")  # Microsoft's preprocessor_config.json only


def transformers_preprocessor_config(preprocessor: dict, config: Florence2Config) -> dict:
    """preprocessor_config.json for transformers' CLIPImageProcessor, with `image_seq_length`, the number of
    `<image>` tokens the processor puts before each prompt (577 for 768x768)."""
    d = {k: v for k, v in preprocessor.items() if k not in _REMOTE_CODE_KEYS}
    size = d.get("size", {"height": 768, "width": 768})
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
                "ocr": {"pattern": r"(.+?)" + r"<loc_(\d+)>" * 8, "area_threshold": 0.0},
                "phrase_grounding": {"banned_grounding_tokens": _BANNED_GROUNDING_PHRASES},
                **{name: {} for name in ("pure_text", "description_with_bboxes", "description_with_polygons",
                                         "polygons", "bboxes", "description_with_bboxes_or_polygons")}}}


# Phrases the original's phrase grounding drops (pronouns, determiners, "the image", ...).
_BANNED_GROUNDING_PHRASES = sorted({
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself", "himself", "herself",
    "itself", "ourselves", "yourselves", "themselves", "this", "that", "these", "those", "who", "whom", "whose",
    "which", "what", "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody", "everyone",
    "everything", "few", "many", "nobody", "none", "several", "some", "somebody", "someone", "something",
    "each other", "one another", "the image", "image", "images", "the", "a", "an", "a group", "other objects",
    "lots", "a set"})


def _read_json(path: Path, required: bool = False) -> dict | None:
    if not path.is_file():
        if required:
            raise ConfigError(f"no {path.name} in {path.parent}")
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return d
