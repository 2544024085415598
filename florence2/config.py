"""Florence-2 configuration: dataclasses that read `config.json` in either layout and write Microsoft's.

Microsoft's format (`model_type: florence2`) nests a `vision_config` (DaViT, `dim_embed`, ...) and a `text_config`
(BART, `d_model`, ...) whose generation keys (`num_beams`, `no_repeat_ngram_size`, `forced_bos_token_id`, ...) are the
defaults the original's `generate` uses. Keys we do not model (`auto_map`, `label2id`, ...) are kept verbatim in
`extra` so that a config read and written again loses nothing.

transformers' own Florence-2 (`florence-community/*`) also says `model_type: florence2`; its vision section has
`embed_dim` and `model_type: florence_vision`, its vocabulary adds an `<image>` token (`image_token_id`, the original
vocabulary size) and is padded to a multiple of 64, and it reads the decoding defaults from generation_config.json.
`read_config` / `Florence2Config.from_json` / `from_dict` read both (`detect_layout`); the writer of that layout is
florence2/transformers_layout.py, which the model never imports.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value that no Florence-2 model can have."""


# The decoding settings text_config carries (and transformers' generation_config.json), as generate takes them.
GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty", "forced_bos_token_id",
                   "forced_eos_token_id")
VOCAB_MULTIPLE = 64  # transformers pads the vocabulary to a multiple of this
IGNORE_INDEX = -100  # a label position the loss leaves out (the original's config says so as `ignore_index`)

# Keys of Microsoft's config whose value is fixed by the architecture: anything else is an error, not a variant.
_FIXED_VISION_KEYS = {
    "model_type": "davit",
    "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
}


@dataclass(frozen=True)
class VisionConfig:
    """DaViT vision tower plus the image glue (2-D learned positions, cosine temporal row, projection)."""

    dim_embed: tuple[int, ...] = (128, 256, 512, 1024)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)  # window attention heads per stage
    num_groups: tuple[int, ...] = (4, 8, 16, 32)  # channel attention groups per stage
    depths: tuple[int, ...] = (1, 1, 9, 1)  # (spatial block, channel block) pairs per stage
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    window_size: int = 12
    drop_path_rate: float = 0.1
    projection_dim: int = 768
    max_pos_embeddings: int = 50  # rows/columns of the learned 2-D position table
    max_temporal_embeddings: int = 100  # rows of the cosine temporal table (only row 0 is used for images)

    def __post_init__(self):
        per_stage = ("dim_embed", "num_heads", "num_groups", "depths", "patch_size", "patch_stride",
                     "patch_padding", "patch_prenorm")
        lengths = {name: len(getattr(self, name)) for name in per_stage}
        if len(set(lengths.values())) != 1 or lengths["dim_embed"] == 0:
            raise ConfigError(f"vision_config: per-stage lists must have one equal, non-zero length, got {lengths}")
        for stage, (dim, heads, groups) in enumerate(zip(self.dim_embed, self.num_heads, self.num_groups)):
            if dim <= 0 or heads <= 0 or groups <= 0:
                raise ConfigError(f"vision_config stage {stage}: dims, heads and groups must be positive")
            if dim % heads or dim % groups:
                raise ConfigError(f"vision_config stage {stage}: dim_embed {dim} is not divisible by "
                                  f"num_heads {heads} and num_groups {groups}")
        for name in ("depths", "patch_size", "patch_stride"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ConfigError(f"vision_config.{name} must be positive, got {list(getattr(self, name))}")
        if any(p < 0 for p in self.patch_padding):
            raise ConfigError(f"vision_config.patch_padding must be >= 0, got {list(self.patch_padding)}")
        for name in ("window_size", "projection_dim", "max_pos_embeddings", "max_temporal_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"vision_config.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"vision_config.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def stride(self) -> int:
        """Total downsampling factor from pixels to final tokens (32 for Florence-2)."""
        return math.prod(self.patch_stride)

    def grid_size(self, image_size: int) -> int:
        """Side of the final token grid for a square image (24 for 768 px)."""
        side = image_size
        for k, s, p in zip(self.patch_size, self.patch_stride, self.patch_padding):
            side = (side + 2 * p - k) // s + 1
        return side


@dataclass(frozen=True)
class TextConfig:
    """The BART-style encoder-decoder, plus the generation defaults the original reads from `text_config`."""

    vocab_size: int = 51289
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    scale_embedding: bool = False
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    # Generation defaults, as the original's `language_model.generation_config` takes them from text_config.
    num_beams: int = 3
    no_repeat_ngram_size: int = 3
    early_stopping: bool | str = True
    length_penalty: float = 1.0
    forced_bos_token_id: int | None = 0
    forced_eos_token_id: int | None = 2

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"text_config.{name} must be positive, got {getattr(self, name)}")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ConfigError(f"text_config.d_model {self.d_model} is not divisible by {name} "
                                  f"{getattr(self, name)}")
        if self.activation_function != "gelu":
            raise ConfigError(f"text_config.activation_function {self.activation_function!r} is not supported "
                              "(Florence-2 uses 'gelu')")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"text_config.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"text_config.{name} {getattr(self, name)} is outside the vocabulary (size "
                                  f"{self.vocab_size})")
        check_decoding(self, self.vocab_size, "text_config.", ConfigError)


def check_decoding(settings, vocab_size: int, prefix: str = "", error: type[Exception] = ValueError) -> None:
    """The checks of the decoding settings (GENERATION_KEYS) shared by TextConfig and generate's options."""
    if not isinstance(settings.num_beams, int) or settings.num_beams < 1:
        raise error(f"{prefix}num_beams must be a positive integer, got {settings.num_beams!r}")
    if not isinstance(settings.no_repeat_ngram_size, int) or settings.no_repeat_ngram_size < 0:
        raise error(f"{prefix}no_repeat_ngram_size must be an integer >= 0, got {settings.no_repeat_ngram_size!r}")
    if settings.early_stopping not in (True, False, "never"):
        raise error(f"{prefix}early_stopping must be True, False or 'never', got {settings.early_stopping!r}")
    for name in ("forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(settings, name)
        if value is not None and not 0 <= value < vocab_size:
            raise error(f"{prefix}{name} {value} is outside the vocabulary (size {vocab_size})")


@dataclass(frozen=True)
class Florence2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Keys of config.json we do not model, kept so that writing the config back loses nothing:
    # {"": top-level keys, "vision_config": ..., "text_config": ...}.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.vision.projection_dim != self.text.d_model:
            raise ConfigError(f"vision_config.projection_dim {self.vision.projection_dim} must equal "
                              f"text_config.d_model {self.text.d_model}: image tokens enter the text encoder")

    def image_tokens(self, image_size: int) -> int:
        """Number of image tokens the encoder sees for a square image: the mean token plus the grid (577 at 768)."""
        return self.vision.grid_size(image_size) ** 2 + 1

    # ------------------------------------------------------------------------------------------ config.json
    @classmethod
    def from_dict(cls, d: dict, generation: dict | None = None) -> Florence2Config:
        """A config.json of either layout (`generation`: the transformers layout's generation_config.json)."""
        if detect_layout(d) == "transformers":
            return cls._from_microsoft_dict(_microsoft_dict(d, generation))
        return cls._from_microsoft_dict(d)

    @classmethod
    def _from_microsoft_dict(cls, d: dict) -> Florence2Config:
        for section in ("vision_config", "text_config"):
            if not isinstance(d.get(section), dict):
                raise ConfigError(f"config.json has no {section!r} section")
        vision_d, text_d = dict(d["vision_config"]), dict(d["text_config"])
        for key, expected in _FIXED_VISION_KEYS.items():
            if key in vision_d and vision_d.pop(key) != expected:
                raise ConfigError(f"vision_config.{key} must be {expected!r}, got {d['vision_config'][key]!r}")
        pos = vision_d.pop("image_pos_embed", {"type": "learned_abs_2d"})
        temporal = vision_d.pop("visual_temporal_embedding", {"type": "COSINE"})
        if pos.get("type") != "learned_abs_2d":
            raise ConfigError(f"vision_config.image_pos_embed.type {pos.get('type')!r} is not supported "
                              "(the original implements only 'learned_abs_2d')")
        if temporal.get("type") != "COSINE":
            raise ConfigError(f"vision_config.visual_temporal_embedding.type {temporal.get('type')!r} is not "
                              "supported (the original implements only 'COSINE')")
        vision_kwargs = {"max_pos_embeddings": pos.get("max_pos_embeddings", VisionConfig.max_pos_embeddings),
                         "max_temporal_embeddings": temporal.get("max_temporal_embeddings",
                                                                 VisionConfig.max_temporal_embeddings)}
        vision_kwargs.update(_take_fields(VisionConfig, vision_d, tuple_fields=True))
        if "projection_dim" not in vision_kwargs and "projection_dim" in d:
            vision_kwargs["projection_dim"] = d["projection_dim"]
        text_kwargs = _take_fields(TextConfig, text_d)
        top = {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}
        try:
            return cls(VisionConfig(**vision_kwargs), TextConfig(**text_kwargs),
                       extra={"": top, "vision_config": vision_d, "text_config": text_d})
        except TypeError as e:  # a value of the wrong type, e.g. a string where a list belongs
            raise ConfigError(f"invalid config value: {e}") from None

    def to_dict(self) -> dict:
        extra = copy.deepcopy(self.extra)
        vision = asdict(self.vision)
        text = asdict(self.text)
        vision_d = {"model_type": "davit", **extra.get("vision_config", {})}
        for key, value in vision.items():
            if key not in ("max_pos_embeddings", "max_temporal_embeddings"):
                vision_d[key] = list(value) if isinstance(value, tuple) else value
        vision_d["visual_temporal_embedding"] = {"type": "COSINE",
                                                 "max_temporal_embeddings": self.vision.max_temporal_embeddings}
        vision_d["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": self.vision.max_pos_embeddings}
        vision_d["image_feature_source"] = list(_FIXED_VISION_KEYS["image_feature_source"])
        text_d = {**extra.get("text_config", {}), **text}
        if text_d["length_penalty"] == 1.0:  # Microsoft's configs leave it out; 1.0 is generate's default anyway
            del text_d["length_penalty"]
        text_d.setdefault("is_encoder_decoder", True)
        text_d["num_hidden_layers"] = self.text.encoder_layers
        top = {
            "architectures": ["Florence2ForConditionalGeneration"],
            "bos_token_id": self.text.bos_token_id,
            "eos_token_id": self.text.eos_token_id,
            "ignore_index": IGNORE_INDEX,
            "is_encoder_decoder": True,
            **extra.get("", {}),
        }
        top.update({"model_type": "florence2", "pad_token_id": self.text.pad_token_id,
                    "projection_dim": self.vision.projection_dim, "vocab_size": self.text.vocab_size,
                    "text_config": text_d, "vision_config": vision_d})
        return top

    @classmethod
    def from_json(cls, path: str | Path) -> Florence2Config:
        """A config.json file, or the checkpoint folder that holds it, in either layout (see `read_config`)."""
        return read_config(path)[0]

    def to_json(self, path: str | Path, torch_dtype: str | None = None) -> None:
        d = self.to_dict()
        if torch_dtype is not None:
            d["torch_dtype"] = torch_dtype
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str) -> Florence2Config:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None


def _take_fields(cls, d: dict, tuple_fields: bool = False) -> dict:
    """Move the keys of `d` that are fields of `cls` into a kwargs dict (lists become tuples)."""
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            value = d.pop(f.name)
            kwargs[f.name] = tuple(value) if tuple_fields and isinstance(value, list) else value
    return kwargs


# --------------------------------------------------------------------------------- both layouts, and JSON files
def read_json(path: Path, required: bool = True) -> dict | None:
    """A JSON object from a file. A missing file raises ConfigError (or gives None when not `required`)."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise ConfigError(f"no {path.name} in {path.parent}")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(d).__name__}")
    return d


def detect_layout(d: dict) -> str:
    """"microsoft" or "transformers", from the vision section of a config.json."""
    vision = d.get("vision_config") if isinstance(d, dict) else None
    if isinstance(d, dict) and d.get("model_type") == "florence2" and not isinstance(vision, dict):
        raise ConfigError("config.json has no 'vision_config' section")
    if isinstance(vision, dict) and d.get("model_type") == "florence2":
        if "dim_embed" in vision or vision.get("model_type") == "davit":
            return "microsoft"
        if "embed_dim" in vision or vision.get("model_type") == "florence_vision":
            return "transformers"
    raise ConfigError(f"config.json is neither Microsoft's Florence-2 layout (model_type florence2, "
                      f"vision_config.dim_embed) nor transformers' (model_type florence2, vision_config.embed_dim); "
                      f"its model_type is {d.get('model_type') if isinstance(d, dict) else None!r}")


def read_config(path: str | Path) -> tuple[Florence2Config, str]:
    """config.json of either layout (the file, or the folder that holds it) -> (config, layout). For the
    transformers layout the decoding defaults come from generation_config.json beside it when it has them
    (transformers reads them there), else Microsoft's."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    d = read_json(path)
    layout = detect_layout(d)
    generation = read_json(path.parent / "generation_config.json", required=False) if layout == "transformers" else None
    return Florence2Config.from_dict(d, generation), layout


def padded_vocab_size(vocab_size: int) -> int:
    """The transformers layout's vocabulary: the original one plus `<image>`, rounded up to a multiple of 64."""
    return -(-(vocab_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# Vision keys of the transformers config that Microsoft's DaViT fixes: any other value is a different model.
FIXED_TRANSFORMERS_VISION = {"in_channels": 3, "mlp_ratio": 4.0, "qkv_bias": True, "activation_function": "gelu"}
# BartConfig's defaults where they differ from ours, for keys a transformers config.json leaves out.
_BART_DEFAULTS = {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
                  "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
                  "attention_dropout": 0.0, "activation_dropout": 0.0}
# Top-level keys of a transformers config that Microsoft's layout regenerates or has no use for.
_TRANSFORMERS_ONLY = ("image_token_id", "tie_word_embeddings", "dtype", "torch_dtype", "transformers_version",
                      "architectures", "is_encoder_decoder")


def _microsoft_dict(d: dict, generation: dict | None) -> dict:
    """A transformers-layout config.json (and its generation_config.json) as Microsoft's config.json. The
    vocabulary is the original one: `image_token_id`, the first id past it."""
    if not isinstance(d.get("vision_config"), dict) or not isinstance(d.get("text_config"), dict):
        raise ConfigError("config.json needs a vision_config and a text_config section")
    vision, text = dict(d["vision_config"]), dict(d["text_config"])
    vocab_size = d.get("image_token_id", TextConfig.vocab_size)
    padded = text.get("vocab_size", padded_vocab_size(vocab_size))
    if not isinstance(vocab_size, int) or not isinstance(padded, int) or not 0 < vocab_size < padded:
        raise ConfigError(f"image_token_id {vocab_size} must be a token id inside text_config.vocab_size {padded}: "
                          "the <image> token is the first id past the original vocabulary")
    for key, expected in FIXED_TRANSFORMERS_VISION.items():
        if vision.pop(key, expected) != expected:
            raise ConfigError(f"vision_config.{key} must be {expected!r} (Florence-2's DaViT), got "
                              f"{d['vision_config'][key]!r}")
    vision.pop("model_type", None)
    vision.pop("initializer_range", None)  # training-time init only
    if "embed_dim" in vision:
        vision["dim_embed"] = vision.pop("embed_dim")
    temporal = vision.pop("max_temporal_embeddings", VisionConfig.max_temporal_embeddings)
    positions = vision.pop("max_position_embeddings", VisionConfig.max_pos_embeddings)
    vision["visual_temporal_embedding"] = {"type": "COSINE", "max_temporal_embeddings": temporal}
    vision["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": positions}
    vision.setdefault("projection_dim", 1024)  # transformers' defaults for what its config.json leaves out
    text.pop("model_type", None)
    text = {**_BART_DEFAULTS, **text, "vocab_size": vocab_size}
    for key in GENERATION_KEYS:  # generation_config.json first, as transformers reads it; else Microsoft's defaults
        if generation and key in generation:
            text[key] = generation[key]
        text.setdefault(key, getattr(TextConfig, key))
    top = {k: v for k, v in d.items() if k not in (*_TRANSFORMERS_ONLY, "vision_config", "text_config")}
    return {**top, "model_type": "florence2", "projection_dim": vision["projection_dim"], "vision_config": vision,
            "text_config": text}


# Presets. `base` and `large` are the config.json of microsoft/Florence-2-base and microsoft/Florence-2-large
# (https://huggingface.co/microsoft/Florence-2-base/blob/main/config.json, .../Florence-2-large/...); the -ft
# checkpoints share them. `tiny` is a small model for tests and the CPU demo.
PRESETS: dict[str, Florence2Config] = {
    "base": Florence2Config(  # 0.23B
        VisionConfig(),
        TextConfig(),
    ),
    "large": Florence2Config(  # 0.77B
        VisionConfig(dim_embed=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), num_groups=(8, 16, 32, 64),
                     projection_dim=1024),
        TextConfig(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                   max_position_embeddings=4096),
    ),
    "tiny": Florence2Config(
        VisionConfig(dim_embed=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), num_groups=(1, 2, 3, 4),
                     depths=(1, 1, 2, 1), projection_dim=64),
        TextConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256),
    ),
}


def with_changes(config: Florence2Config, **changes: Any) -> Florence2Config:
    """A copy of `config` with top-level `vision`/`text` fields replaced, e.g. text={"dropout": 0.0}."""
    vision = replace(config.vision, **changes.pop("vision", {}))
    text = replace(config.text, **changes.pop("text", {}))
    if changes:
        raise ConfigError(f"unknown config sections {sorted(changes)}; use vision= or text=")
    return Florence2Config(vision, text, extra=copy.deepcopy(config.extra))
