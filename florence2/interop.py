"""config.json of the two checkpoint layouts: Microsoft's remote code and transformers' own Florence-2.

Both say `model_type: florence2`; they differ in the vision section (`dim_embed` and `model_type: davit` for
Microsoft, `embed_dim` and `model_type: florence_vision` for transformers) and in the vocabulary, which
transformers extends with an `<image>` token (`image_token_id` = the original vocabulary size) and pads to a
multiple of 64.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, Florence2Config, TextConfig

# Vision fields whose name differs: ours/Microsoft's -> transformers'.
_VISION_RENAMES = {"dim_embed": "embed_dim", "max_pos_embeddings": "max_position_embeddings"}
_GENERATION_DEFAULTS = {name: getattr(TextConfig(), name) for name in (
    "num_beams", "no_repeat_ngram_size", "early_stopping", "forced_bos_token_id", "forced_eos_token_id")}
IMAGE_TOKEN = "<image>"


def detect_layout(d: dict) -> str:
    vision = d.get("vision_config") if isinstance(d, dict) else None
    if d.get("model_type") == "florence2" and isinstance(vision, dict):
        if "dim_embed" in vision or vision.get("model_type") == "davit":
            return "microsoft"
        if "embed_dim" in vision or vision.get("model_type") == "florence_vision":
            return "transformers"
    raise ConfigError("config.json is neither Microsoft's Florence-2 layout (vision_config.dim_embed) nor "
                      "transformers' (vision_config.embed_dim)")


def read_config(folder: Path) -> tuple[Florence2Config, str]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    layout = detect_layout(d)
    return (Florence2Config.from_dict(d) if layout == "microsoft" else from_transformers_config(d)), layout


def from_transformers_config(d: dict) -> Florence2Config:
    vision = dict(d["vision_config"])
    text = dict(d.get("text_config") or {})
    vocab_size = d.get("image_token_id", 51289)  # the <image> token is the first id past the original vocabulary
    microsoft_vision = {"model_type": "davit"}
    for key, value in vision.items():
        if key == "max_temporal_embeddings":
            microsoft_vision["visual_temporal_embedding"] = {"type": "COSINE", "max_temporal_embeddings": value}
        elif key == "max_position_embeddings":
            microsoft_vision["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": value}
        elif key != "model_type":
            microsoft_vision[{v: k for k, v in _VISION_RENAMES.items()}.get(key, key)] = value
    microsoft_text = {**_GENERATION_DEFAULTS, **{k: v for k, v in text.items() if k != "model_type"},
                      "vocab_size": vocab_size}
    microsoft = {"model_type": "florence2", "vision_config": microsoft_vision, "text_config": microsoft_text,
                 "projection_dim": vision.get("projection_dim")}
    return Florence2Config.from_dict(microsoft)


def to_transformers_config(config: Florence2Config, padded_vocab_size: int) -> dict:
    v, t = config.vision, config.text
    vision = {"model_type": "florence_vision", "in_channels": 3, "embed_dim": list(v.dim_embed),
              "num_heads": list(v.num_heads), "num_groups": list(v.num_groups), "depths": list(v.depths),
              "patch_size": list(v.patch_size), "patch_stride": list(v.patch_stride),
              "patch_padding": list(v.patch_padding), "patch_prenorm": list(v.patch_prenorm),
              "window_size": v.window_size, "drop_path_rate": v.drop_path_rate, "mlp_ratio": 4.0, "qkv_bias": True,
              "activation_function": "gelu", "projection_dim": v.projection_dim,
              "max_temporal_embeddings": v.max_temporal_embeddings, "max_position_embeddings": v.max_pos_embeddings}
    text = {"model_type": "bart", **config.to_dict()["text_config"], "vocab_size": padded_vocab_size}
    return {"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
            "image_token_id": t.vocab_size, "is_encoder_decoder": True, "tie_word_embeddings": True,
            "vision_config": vision, "text_config": text}
