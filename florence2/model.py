"""Florence-2: DaViT image tokens in front of the prompt, through a BART encoder-decoder.

    pixels (B, 3, 768, 768) -> DaViT -> (B, 24, 24, C) -> + 2-D learned position [column | row halves]
      -> flatten (B, 576, C) -> + cosine temporal row 0 (+1.0 on every odd channel)
      -> [mean token, 576 tokens] (B, 577, C) -> @ projection -> LayerNorm -> image tokens (B, 577, d)
    encoder input = [image tokens, prompt embeddings]  ->  encoder  ->  decoder (teacher forcing or generation)

Deviation from the original, on purpose: the original attends to padded prompt tokens in a batch (it builds an
all-ones mask); here `attention_mask` masks them in the encoder and in cross-attention. Without padding the result
is identical.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import weights
from .attention import check_backend
from .config import IGNORE_INDEX, Florence2Config, read_config
from .davit import DaViT
from .hub import resolve_checkpoint
from .language import LanguageModel


@dataclass
class Florence2Output:
    logits: torch.Tensor  # (B, T, vocab) float32
    loss: torch.Tensor | None = None  # cross-entropy over labels != IGNORE_INDEX (-100): mean, or sum
    encoder_last_hidden_state: torch.Tensor | None = None  # (B, S, d)
    encoder_mask: torch.Tensor | None = None  # (B, S) bool, None when nothing is padded


class LearnedPosition2D(nn.Module):
    def __init__(self, dim: int, max_positions: int, stride: int):
        super().__init__()
        self.stride = stride  # pixels per token, for the error message
        self.row_embeddings = nn.Embedding(max_positions, dim // 2)
        self.column_embeddings = nn.Embedding(max_positions, dim - dim // 2)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """(height, width, dim): the first half of the channels encodes the column, the second half the row."""
        max_positions = self.row_embeddings.num_embeddings
        if height > max_positions or width > max_positions:
            raise ValueError(f"image token grid {height}x{width} exceeds the {max_positions}x{max_positions} "
                             f"position table: images must be at most {self.stride * max_positions} px per side")
        columns = self.column_embeddings.weight[:width]  # (W, C/2)
        rows = self.row_embeddings.weight[:height]  # (H, C/2)
        return torch.cat([columns.expand(height, -1, -1), rows[:, None].expand(-1, width, -1)], dim=-1)


def cosine_table(length: int, dim: int) -> torch.Tensor:
    """The original's 1-D sinusoidal table: even channels sin, odd channels cos."""
    freqs = torch.exp(-math.log(10000) * torch.arange(0, dim, 2) / dim)
    angles = torch.arange(length)[:, None] * freqs  # (length, dim/2)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: labels shifted right behind the start token, -100 -> pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 0] = start_token_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class Florence2(nn.Module):
    def __init__(self, config: Florence2Config, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        v = config.vision
        self.vision_tower = DaViT(v)
        self.image_projection = nn.Linear(v.dim_embed[-1], v.projection_dim, bias=False)
        self.image_proj_norm = nn.LayerNorm(v.projection_dim)
        self.image_pos_embed = LearnedPosition2D(v.dim_embed[-1], v.max_pos_embeddings, v.stride)
        self.register_buffer("temporal_embedding", cosine_table(v.max_temporal_embeddings, v.dim_embed[-1]))
        self.language_model = LanguageModel(config.text)
        self.set_attention_backend(attn_implementation)

    # ---------------------------------------------------------------------------------------------- setup
    def set_attention_backend(self, backend: str) -> None:
        """"sdpa" (default), "eager" (reference) or "flash_attention_2" (needs flash-attn, CUDA)."""
        check_backend(backend)
        self.attn_implementation = backend
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward (vision blocks and text layers) to save memory in training."""
        for module in (self.vision_tower, self.language_model.encoder, self.language_model.decoder):
            module.gradient_checkpointing = enabled

    def init_weights(self, seed: int | None = None) -> None:
        """Random initialization for training from scratch: normal(0, init_std) for linear and embedding weights."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.text.init_std
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Conv2d):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            self.language_model.shared.weight[self.config.text.pad_token_id].zero_()
            self.language_model.final_logits_bias.zero_()
            self.temporal_embedding.copy_(cosine_table(*self.temporal_embedding.shape))

    # --------------------------------------------------------------------------------------------- forward
    def project_image(self, vision_features: torch.Tensor) -> torch.Tensor:
        """DaViT output (B, h, w, C) -> image tokens (B, 1 + h*w, d): positions, mean token, projection, norm."""
        B, h, w, C = vision_features.shape
        x = vision_features + self.image_pos_embed(h, w).to(vision_features.dtype)
        x = x.reshape(B, h * w, C) + self.temporal_embedding[0].to(x.dtype)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return self.image_proj_norm(self.image_projection(x))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> image tokens (B, 1 + (H/32)*(W/32), d): 577 at 768 px."""
        _check_pixels(pixel_values, self.image_projection.weight)
        return self.project_image(self.vision_tower(pixel_values.to(self.image_projection.weight.dtype)))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None,
               vision_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the text encoder on [image tokens, prompt]. Give `pixel_values`, or `vision_features` (the DaViT
        output, e.g. from a cache while the tower is frozen). Returns the encoder output (B, S, d) and its mask
        (B, S) bool, or None when nothing is padded (or no mask was given)."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("give exactly one of pixel_values and vision_features")
        _check_ids(input_ids, "input_ids", self.config.text.vocab_size)
        image = self.encode_image(pixel_values) if vision_features is None else self.project_image(vision_features)
        if image.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{image.shape[0]} images for {input_ids.shape[0]} prompts: give one image per prompt")
        max_positions = self.config.text.max_position_embeddings
        if image.shape[1] + input_ids.shape[1] > max_positions:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens plus {image.shape[1]} image tokens exceeds the "
                             f"encoder's {max_positions} positions: keep prompts to at most "
                             f"{max_positions - image.shape[1]} tokens")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            # A mask that pads nothing is dropped (the unmasked attention, flash attention's path) when it can be
            # read for free, on the CPU; on a GPU reading it would be a host sync per call: it is used as given
            # there (the same result), and callers that know nothing is padded pass None.
            if attention_mask.device.type != "cpu" or not attention_mask.bool().all():
                image_mask = attention_mask.new_ones(image.shape[:2])
                mask = torch.cat([image_mask, attention_mask], dim=1).bool()
        embeds = torch.cat([image, self.language_model.embed(input_ids).to(image.dtype)], dim=1)
        return self.language_model.encoder(embeds, mask), mask

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced decoder pass -> logits (B, T, vocab) float32."""
        return self.language_model.logits(self.decode_hidden(decoder_input_ids, encoder_out, encoder_mask))

    def decode_hidden(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
                      encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced decoder pass -> the last layer's hidden states (B, T, d_model), before the LM head."""
        lm = self.language_model
        return lm.decoder(lm.embed(decoder_input_ids).to(encoder_out.dtype), encoder_out, encoder_mask)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *,
                vision_features: torch.Tensor | None = None, return_logits: bool = True,
                loss_reduction: str = "mean") -> Florence2Output:
        """Teacher-forced pass. With labels, the loss is their cross-entropy, the mean over the target tokens or
        (loss_reduction="sum") their sum; `return_logits=False` (with labels) computes the loss alone, through the
        fused_cross_entropy training kernel where it is on, and leaves `logits` None: the (B, T, vocab) logits are
        the largest tensor of a text-model step."""
        if input_ids is None:
            raise ValueError("input_ids is required (the tokenized prompt; Florence2Processor makes it)")
        text = self.config.text
        if labels is not None:
            _check_ids(labels, "labels", text.vocab_size, allow_ignore=True)
            if labels.shape[0] != input_ids.shape[0]:
                raise ValueError(f"labels has batch size {labels.shape[0]}, input_ids {input_ids.shape[0]}")
            if decoder_input_ids is None:
                decoder_input_ids = shift_right(labels, text.decoder_start_token_id, text.pad_token_id)
        if decoder_input_ids is None:
            raise ValueError("give decoder_input_ids or labels")
        _check_ids(decoder_input_ids, "decoder_input_ids", text.vocab_size)
        if decoder_input_ids.shape[1] > text.max_position_embeddings:
            raise ValueError(f"decoder length {decoder_input_ids.shape[1]} exceeds the decoder's "
                             f"{text.max_position_embeddings} positions")
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from decoder_input_ids shape "
                             f"{tuple(decoder_input_ids.shape)}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False computes the loss alone: give labels")
        encoder_out, encoder_mask = self.encode(input_ids, attention_mask, pixel_values, vision_features)
        h = self.decode_hidden(decoder_input_ids, encoder_out, encoder_mask)
        logits = self.language_model.logits(h) if return_logits else None
        loss = None if labels is None else self.language_model.loss(h, labels, loss_reduction, logits)
        return Florence2Output(logits, loss, encoder_out, encoder_mask)

    # ----------------------------------------------------------------------------------- build, load, save
    @classmethod
    def from_config(cls, config: Florence2Config | str | os.PathLike, seed: int | None = None,
                    attn_implementation: str = "sdpa") -> Florence2:
        """A randomly initialized model from a Florence2Config, a preset name ("base", "large", "tiny") or the
        path of a config.json / checkpoint folder (either layout)."""
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            is_path = path.is_dir() or path.suffix == ".json"
            config = Florence2Config.from_json(path) if is_path else Florence2Config.from_name(str(config))
        model = cls(config, attn_implementation)
        model.init_weights(seed)
        return model

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None,
                        dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                        attn_implementation: str = "sdpa", adapter: str | os.PathLike | None = None) -> Florence2:
        """Load a checkpoint in Microsoft's layout (microsoft/Florence-2-*, fine-tunes of them) or in transformers'
        layout (florence-community/Florence-2-*), from a folder or the hub. Weights are cast to `dtype`
        (default float32, as the original loads them; "auto" keeps the stored dtype) and placed on `device`.
        `adapter`: a peft LoRA adapter folder (trained on either layout), merged into the weights (adapters.py)."""
        device = _resolve_device(device)
        dtype = None if dtype == "auto" else _resolve_dtype(dtype)
        folder = resolve_checkpoint(path_or_repo_id, revision)
        config, _, state = load_state(folder, dtype, adapter)
        with torch.device("meta"):
            model = cls(config, attn_implementation)
        model.load_state_dict({k: v.to(device).contiguous() for k, v in state.items()}, strict=True, assign=True)
        model.name_or_path = str(path_or_repo_id)  # predict() builds the checkpoint's own processor from it
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json and model.safetensors in Microsoft's names and layout (the tied embedding once, as
        `language_model.model.shared.weight`, as save_pretrained fine-tunes have it). Other files are left alone.
        `state_dict` replaces the module's own (e.g. the full weights gathered from a sharded model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        state = weights.from_ours({k: v.detach().cpu() for k, v in state.items()}, "microsoft")
        weights.save_weights(state, folder / "model.safetensors")
        dtype = str(state["image_projection"].dtype).removeprefix("torch.")
        weights.atomic_write(folder / "config.json", lambda tmp: self.config.to_json(tmp, torch_dtype=dtype))

    # ------------------------------------------------------------------------------------------- inference
    # generation and the one-call API live beside the model (generate.py, predict.py); the model stays a Module
    from .generate import generate
    from .predict import predict


def load_state(folder: Path, dtype: torch.dtype | None = None,
               adapter: str | os.PathLike | None = None) -> tuple[Florence2Config, str, dict[str, torch.Tensor]]:
    """A checkpoint folder of either layout -> (config, layout, its tensors in our names), for from_pretrained and
    tools/convert_weights.py alike.

    Every tensor is checked by name and shape against the model of the config (weights.to_ours: one error lists
    every unknown, missing or mis-shaped tensor; weights of the other layout get one clear error). Floating tensors
    are cast to `dtype`; None keeps the checkpoint's (that of its token embedding). The optional buffers are filled
    in when absent: the cosine temporal table, computed in float32, and zeros for `final_logits_bias` (the
    transformers layout has none). `adapter`, a peft LoRA adapter folder, is merged in before the cast."""
    config, layout = read_config(folder)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Florence2(config).state_dict().items()}
    state = weights.to_ours(weights.read_weights(weights.weight_files(folder)), layout, expected,
                            config.text.vocab_size)
    if dtype is None:
        dtype = state[weights.SHARED].dtype
    if adapter is not None:
        from .adapters import merge_adapter

        state = merge_adapter(state, adapter)
    state.setdefault("temporal_embedding", cosine_table(*expected["temporal_embedding"]))
    state.setdefault(weights.FINAL_LOGITS_BIAS, torch.zeros(expected[weights.FINAL_LOGITS_BIAS]))
    return config, layout, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _check_pixels(pixel_values: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}; "
                        "Florence2Processor turns images into pixel_values")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (batch, 3, height, width), got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point (normalized pixels), got {pixel_values.dtype}")
    if pixel_values.device != like.device:
        raise ValueError(f"pixel_values are on {pixel_values.device} but the model is on {like.device}")


def _check_ids(ids: torch.Tensor, name: str, vocab_size: int, allow_ignore: bool = False) -> None:
    """Shape and dtype always; the values (ids in the vocabulary) where reading them is free, on the CPU. On a GPU
    it would be a host sync in every forward: ids made by the processor and the trainer's batches are in range by
    construction, and an out-of-range id there ends in the embedding's device-side assert."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a 2-D (batch, length) tensor, got {shape}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and ids.device.type == "cpu":
        valid = ids if not allow_ignore else ids[ids != IGNORE_INDEX]
        if valid.numel() and (valid.min() < 0 or valid.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size})"
                             + (f" (use {IGNORE_INDEX} to ignore a position)" if allow_ignore else ""))


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16, bfloat16 or 'auto'")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    return dtype


def _resolve_device(device: torch.device | str | None) -> torch.device:
    try:
        device = torch.device(device if device is not None else "cpu")
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} was asked for but MPS is not available on this machine")
    return device
