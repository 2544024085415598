"""Checkpoint names, reading and writing.

One table, `KEY_MAP`, lists every tensor of the model under three names: ours (the module paths in this package),
Microsoft's (the remote-code checkpoints microsoft/Florence-2-*, and fine-tunes saved from them) and transformers'
(the port inside `transformers`, florence-community/Florence-2-*). Loading, saving and `tools/convert_weights.py`
all go through it; a name that matches no row is an error, never silently dropped.

Tensor transforms beside the renames:
- `image_projection` is a raw (in, out) matrix used as `x @ W` in Microsoft's layout and an nn.Linear weight
  (out, in) in ours and transformers': transposed.
- The token embedding is one tensor under four names (`shared`, encoder/decoder `embed_tokens`, `lm_head`). Files
  hold all four (Microsoft's pytorch_model.bin) or `shared` alone (save_pretrained fine-tunes): every alias present
  must equal `shared`; we keep one.
- Buffers: `final_logits_bias` (zeros in real checkpoints) and the cosine temporal table are optional on load.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, read_json

LAYOUTS = ("ours", "microsoft", "transformers")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: missing, unknown or mis-shaped tensors, unreadable files."""


def _vision_block_rows(block: str, attn: str) -> list[tuple[str, str, str]]:
    ours = f"vision_tower.blocks.{{}}.{{}}.{block}."
    msft = ours
    hf = "model." + ours
    return [
        (ours + "conv1.*", msft + "conv1.fn.dw.*", hf + "conv1.*"),
        (ours + "norm1.*", msft + f"{attn}.norm.*", hf + "norm1.*"),
        (ours + f"{attn}.qkv.*", msft + f"{attn}.fn.qkv.*", hf + f"{attn}.qkv.*"),
        (ours + f"{attn}.proj.*", msft + f"{attn}.fn.proj.*", hf + f"{attn}.proj.*"),
        (ours + "conv2.*", msft + "conv2.fn.dw.*", hf + "conv2.*"),
        (ours + "norm2.*", msft + "ffn.norm.*", hf + "norm2.*"),
        (ours + "ffn.fc1.*", msft + "ffn.fn.net.fc1.*", hf + "ffn.fc1.*"),
        (ours + "ffn.fc2.*", msft + "ffn.fn.net.fc2.*", hf + "ffn.fc2.*"),
    ]


def _language_rows(stack: str, sublayers: list[str]) -> list[tuple[str, str, str]]:
    ours = f"language_model.{stack}."
    msft = f"language_model.model.{stack}."
    hf = f"model.language_model.{stack}."
    rows = [(ours + m, msft + m, hf + m) for m in ("embed_positions.weight", "layernorm_embedding.*")]
    rows += [(ours + f"layers.{{}}.{m}", msft + f"layers.{{}}.{m}", hf + f"layers.{{}}.{m}") for m in sublayers]
    return rows


_ATTENTION = [f"{{attn}}.{p}_proj.*" for p in ("q", "k", "v", "out")]
_ENCODER_SUBLAYERS = [a.format(attn="self_attn") for a in _ATTENTION] + [
    "self_attn_layer_norm.*", "fc1.*", "fc2.*", "final_layer_norm.*"]
_DECODER_SUBLAYERS = _ENCODER_SUBLAYERS + [a.format(attn="encoder_attn") for a in _ATTENTION] + [
    "encoder_attn_layer_norm.*"]

# (ours, microsoft, transformers). `{}` is a layer/stage index, `*` a parameter name (weight or bias);
# None: the layout has no such tensor.
KEY_MAP: list[tuple[str, str, str | None]] = [
    ("vision_tower.convs.{}.conv.*", "vision_tower.convs.{}.proj.*", "model.vision_tower.convs.{}.conv.*"),
    ("vision_tower.convs.{}.norm.*", "vision_tower.convs.{}.norm.*", "model.vision_tower.convs.{}.norm.*"),
    *_vision_block_rows("spatial_block", "window_attn"),
    *_vision_block_rows("channel_block", "channel_attn"),
    ("image_projection.weight", "image_projection", "model.multi_modal_projector.image_projection.weight"),
    ("image_proj_norm.*", "image_proj_norm.*", "model.multi_modal_projector.image_proj_norm.*"),
    ("image_pos_embed.row_embeddings.weight", "image_pos_embed.row_embeddings.weight",
     "model.multi_modal_projector.image_position_embed.row_embeddings.weight"),
    ("image_pos_embed.column_embeddings.weight", "image_pos_embed.column_embeddings.weight",
     "model.multi_modal_projector.image_position_embed.column_embeddings.weight"),
    ("temporal_embedding", "visual_temporal_embed.pos_idx_to_embed",
     "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    ("language_model.shared.weight", "language_model.model.shared.weight", "model.language_model.shared.weight"),
    ("language_model.final_logits_bias", "language_model.final_logits_bias", None),
    *_language_rows("encoder", _ENCODER_SUBLAYERS),
    *_language_rows("decoder", _DECODER_SUBLAYERS),
]

SHARED = "language_model.shared.weight"
# The other names of the tied token embedding, per layout.
TIED_ALIASES = {
    "microsoft": ("language_model.model.encoder.embed_tokens.weight",
                  "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight"),
    "transformers": ("model.language_model.encoder.embed_tokens.weight",
                     "model.language_model.decoder.embed_tokens.weight", "lm_head.weight"),
}
TRANSPOSED_IN_MICROSOFT = {"image_projection.weight"}  # ours: nn.Linear (out, in); Microsoft: (in, out)
FINAL_LOGITS_BIAS = "language_model.final_logits_bias"  # zeros in the released checkpoints; not in transformers'
OPTIONAL_ON_LOAD = {"temporal_embedding", FINAL_LOGITS_BIAS}  # recomputed / zeros when absent


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{\}", r"(\d+)").replace(r"\*", r"(weight|bias)")
    return re.compile(regex + "$")


def _fill(pattern: str, groups: tuple[str, ...]) -> str:
    parts = re.split(r"(\{\}|\*)", pattern)
    it = iter(groups)
    return "".join(next(it) if p in ("{}", "*") else p for p in parts)


_COMPILED = {layout: [(_compile(row[i]) if row[i] else None) for row in KEY_MAP] for i, layout in enumerate(LAYOUTS)}


def rename(key: str, src: str, dst: str) -> str | None:
    """Name of tensor `key` of layout `src` in layout `dst`; None if `dst` has no such tensor.
    Raises KeyError for a name that matches no row of KEY_MAP."""
    column = LAYOUTS.index(dst)
    for regex, row in zip(_COMPILED[src], KEY_MAP):
        m = regex.match(key) if regex else None
        if m:
            return _fill(row[column], m.groups()) if row[column] else None
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------- file reading
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in order of preference: safetensors, sharded safetensors, .bin."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if not name.endswith(".index.json"):
                return [path]
            shards = shard_names(path)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{path} lists shards that are not in {folder}: {missing}")
            return [folder / s for s in shards]
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def shard_names(index: Path) -> list[str]:
    """The shard files a *.index.json lists."""
    try:
        return sorted(set(read_json(index)["weight_map"].values()))
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({e})") from None


def read_weights(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the files, as stored. Pickled .bin files are read with weights_only=True: tensors only."""
    state = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                part = load_file(path, device=str(device))
            else:
                part = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated, corrupted or not a weight file?)") from None
        except Exception as e:  # weights_only refuses pickles that are more than tensors
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{path} does not hold a flat dict of tensors")
        duplicated = state.keys() & part.keys()
        if duplicated:
            raise CheckpointError(f"tensors stored twice across shards: {sorted(duplicated)[:5]}")
        state.update(part)
    return state


# --------------------------------------------------------------------------------------- layout conversion
def to_ours(state: dict[str, torch.Tensor], layout: str, expected: dict[str, torch.Size],
            vocab_size: int) -> dict[str, torch.Tensor]:
    """Rename a checkpoint of `layout` to our names and check it against `expected` (name -> shape).

    Every problem (unknown names, missing tensors, wrong shapes, aliases that differ from `shared`) is collected
    and reported in one CheckpointError; weights that fit the other layout better get one clear error instead.
    """
    _check_layout_fits(state, layout)
    aliases = set(TIED_ALIASES[layout])
    ours, unknown, alias_values = {}, [], {}
    for key, tensor in state.items():
        if key in aliases:
            alias_values[key] = tensor
            continue
        try:
            name = rename(key, layout, "ours")
        except KeyError:
            unknown.append(key)
            continue
        if name in TRANSPOSED_IN_MICROSOFT and layout == "microsoft":
            tensor = tensor.t() if tensor.ndim == 2 else tensor
        ours[name] = tensor
    problems = []
    if unknown:
        problems.append(f"unknown tensors: {_listing(unknown)}")
    if SHARED not in ours and alias_values:  # a file may hold only an alias (e.g. lm_head) of the embedding
        first = sorted(alias_values)[0]
        ours[SHARED] = alias_values.pop(first)
    if layout == "transformers" and SHARED in ours:
        # transformers adds an <image> token and pads the vocabulary to a multiple of 64: keep the real rows.
        ours[SHARED] = ours[SHARED][:vocab_size]
        alias_values = {k: v[:vocab_size] for k, v in alias_values.items()}
    for key, tensor in alias_values.items():
        if SHARED in ours and (tensor.shape != ours[SHARED].shape or not torch.equal(tensor, ours[SHARED])):
            problems.append(f"{key} should be the tied token embedding but differs from the shared embedding")
    missing = sorted(expected.keys() - ours.keys() - OPTIONAL_ON_LOAD)
    if missing:
        problems.append(f"missing tensors: {_listing([rename(k, 'ours', layout) or k for k in missing])}")
    def as_stored(name, shape):  # shapes in the checkpoint's own layout
        return tuple(reversed(shape)) if name in TRANSPOSED_IN_MICROSOFT and layout == "microsoft" else tuple(shape)

    wrong = [f"{rename(k, 'ours', layout)}: checkpoint {as_stored(k, ours[k].shape)}, model "
             f"{as_stored(k, expected[k])}" for k in sorted(ours.keys() & expected.keys())
             if ours[k].shape != expected[k]]
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the model ({layout} layout): " + "; ".join(problems))
    return ours


def from_ours(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our state dict in `layout`'s names (the tied embedding written once, as `shared`)."""
    out = {}
    for name, tensor in state.items():
        key = rename(name, "ours", layout)
        if key is None:
            continue
        if name in TRANSPOSED_IN_MICROSOFT and layout == "microsoft":
            tensor = tensor.t()
        out[key] = tensor.contiguous()
    return out


def _check_layout_fits(state: dict[str, torch.Tensor], layout: str) -> None:
    """A config of one layout with weights of the other gets one clear error instead of a list of every name."""
    other = {"microsoft": "transformers", "transformers": "microsoft"}[layout]
    fits = {name: sum(_known(k, name) for k in state) for name in (layout, other)}
    if fits[other] > fits[layout]:
        raise CheckpointError(f"config.json is in the {layout} layout but the weights use {other} names "
                              f"({fits[other]} of {len(state)} tensors): a mixed-up folder?")


def _known(key: str, layout: str) -> bool:
    if key in TIED_ALIASES[layout]:
        return True
    try:
        rename(key, layout, "ours")
    except KeyError:
        return False
    return True


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------------ saving
def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place, so that a crash or a full
    disk never leaves a half-written file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
