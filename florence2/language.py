"""The BART-style encoder-decoder of Florence-2, with a KV cache for incremental decoding.

BART details the original keeps (and that parity depends on):
- post-LN layers: h = LN(h + sublayer(h)); no final LayerNorm after the last layer;
- learned positions with an offset of 2 (the table has max_position_embeddings + 2 rows; ids 0/1 are never used),
  followed by `layernorm_embedding`;
- one token embedding `shared` for encoder, decoder and the (tied) LM head, plus a `final_logits_bias` buffer;
- q is scaled by head_dim^-0.5 before the dot product; exact-erf GELU.

Module names mirror the original's (`layers.{i}.self_attn.q_proj`, `encoder_attn`, `fc1`, `final_layer_norm`),
without its `model.` level. The linear layers are `Linear`, an nn.Linear that can run the few_rows_linear kernel
(kernels.py) when it is switched on; peft's LoRA wraps them as any nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import kernels
from .attention import attention
from .config import IGNORE_INDEX, TextConfig


class LearnedPositions(nn.Embedding):
    OFFSET = 2  # BART's fairseq heritage: positions are looked up at index + 2

    def __init__(self, max_positions: int, dim: int):
        super().__init__(max_positions + self.OFFSET, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.OFFSET)


class Linear(nn.Linear):
    """nn.Linear that multiplies few rows from the left when the few_rows_linear kernel is on (kernels.py)."""

    KERNELS = ("few_rows_linear",)
    active_kernels = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "few_rows_linear" in self.active_kernels:
            return kernels.few_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)
        self.backend = "sdpa"

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, D/H)"""
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (B, T, D) attends to keys/values (B, H, S, D/H) -> (B, T, D).

        Keys/values may also be shared: (B / c, H, S, D/H) for c consecutive rows of x each (the beams or returned
        sequences of one image attending to its encoder output). Their queries are then stacked into one block of
        c * T queries per key row, so the keys are read once instead of being copied c times; a mask is per key
        row (broadcastable to (B / c, H, c * T, S)). Not with causal, whose diagonal is per sequence."""
        q = self.heads(self.q_proj(x))  # (B, H, T, D/H)
        B, H, T, Dh = q.shape
        copies = B // k.shape[0]
        if copies * k.shape[0] != B or (copies > 1 and causal):
            raise ValueError(f"{B} query rows for {k.shape[0]} key rows{' (causal)' if causal else ''}: each key row "
                             f"must serve the same number of consecutive query rows, without a causal mask")
        if copies > 1:
            q = q.view(B // copies, copies, H, T, Dh).transpose(1, 2).reshape(B // copies, H, copies * T, Dh)
        out = attention(q, k, v, mask=mask, causal=causal, dropout=self.dropout if self.training else 0.0,
                        backend=self.backend)
        if copies > 1:
            out = out.view(B // copies, H, copies, T, Dh).transpose(1, 2).reshape(B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


def _feed_forward(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """fc1 -> GELU -> dropout -> fc2 -> dropout; fc1/fc2 sit flat on the layer, as in the checkpoints."""
    h = F.dropout(F.gelu(layer.fc1(h)), p=layer.activation_dropout, training=layer.training)
    return F.dropout(layer.fc2(h), p=layer.dropout, training=layer.training)


class EncoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c.d_model, c.encoder_attention_heads, c.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = Linear(c.d_model, c.encoder_ffn_dim)
        self.fc2 = Linear(c.encoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.dropout, self.activation_dropout = c.dropout, c.activation_dropout

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.self_attn.project_kv(h)
        attn = F.dropout(self.self_attn(h, k, v, mask), p=self.dropout, training=self.training)
        h = self.self_attn_layer_norm(h + attn)
        h = self.final_layer_norm(h + _feed_forward(self, h))
        if h.dtype == torch.float16:
            # The original clamps fp16 overflow in the encoder so that the next LayerNorm stays finite: all of h,
            # when any of it is inf or nan. Chosen on the device (torch.where), not by reading the test back.
            limit = torch.finfo(torch.float16).max - 1000
            h = torch.where(torch.isfinite(h).all(), h, h.clamp(-limit, limit))
        return h


@dataclass
class LayerCache:
    """Decoder state of one layer: self-attention keys/values written step by step into buffers of the full
    decoding length, and the cross-attention keys/values computed once from the encoder output."""

    k: torch.Tensor  # (B, H, T_max, D/H)
    v: torch.Tensor
    cross_k: torch.Tensor  # (B, H, S, D/H), or one row per image shared by its copies (see Attention.forward)
    cross_v: torch.Tensor


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c.d_model, c.decoder_attention_heads, c.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.encoder_attn = Attention(c.d_model, c.decoder_attention_heads, c.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = Linear(c.d_model, c.decoder_ffn_dim)
        self.fc2 = Linear(c.decoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.dropout, self.activation_dropout = c.dropout, c.activation_dropout

    def forward(self, h: torch.Tensor, encoder_out: torch.Tensor | None, encoder_mask: torch.Tensor | None,
                cache: LayerCache | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: full causal self-attention over h. With one: h holds the tokens at `positions`; their
        keys/values are written into the cache and each attends to every cached position up to its own."""
        k, v = self.self_attn.project_kv(h)
        if cache is None:
            attn = self.self_attn(h, k, v, causal=True)
            cross_k, cross_v = self.encoder_attn.project_kv(encoder_out)
        else:
            cache.k.index_copy_(2, positions, k)
            cache.v.index_copy_(2, positions, v)
            visible = torch.arange(cache.k.shape[2], device=h.device) <= positions[:, None]  # (T, T_max)
            attn = self.self_attn(h, cache.k, cache.v, mask=visible)
            cross_k, cross_v = cache.cross_k, cache.cross_v
        h = self.self_attn_layer_norm(h + F.dropout(attn, p=self.dropout, training=self.training))
        cross = self.encoder_attn(h, cross_k, cross_v, encoder_mask)
        h = self.encoder_attn_layer_norm(h + F.dropout(cross, p=self.dropout, training=self.training))
        return self.final_layer_norm(h + _feed_forward(self, h))


class Stack(nn.Module):
    """What the encoder and the decoder share: learned positions and `layernorm_embedding` on the input, then the
    layers, each skipped with probability `layerdrop` in training, or recomputed in backward (gradient
    checkpointing)."""

    def __init__(self, c: TextConfig, layer: type[nn.Module], num_layers: int, layerdrop: float):
        super().__init__()
        self.embed_positions = LearnedPositions(c.max_position_embeddings, c.d_model)
        self.layernorm_embedding = nn.LayerNorm(c.d_model)
        self.layers = nn.ModuleList(layer(c) for _ in range(num_layers))
        self.dropout, self.layerdrop = c.dropout, layerdrop
        self.gradient_checkpointing = False

    def embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.layernorm_embedding(embeds + self.embed_positions(positions))
        return F.dropout(h, p=self.dropout, training=self.training)

    def run(self, layer: nn.Module, h: torch.Tensor, *args) -> torch.Tensor:
        if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
            return h
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, h, *args, use_reentrant=False)
        return layer(h, *args)


class Encoder(Stack):
    def __init__(self, c: TextConfig):
        super().__init__(c, EncoderLayer, c.encoder_layers, c.encoder_layerdrop)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """embeds (B, S, D) (image tokens then prompt tokens); mask (B, S) bool, True for real tokens, or None."""
        h = self.embed(embeds, torch.arange(embeds.shape[1], device=embeds.device))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            h = self.run(layer, h, attn_mask)
        return h


class Decoder(Stack):
    def __init__(self, c: TextConfig):
        super().__init__(c, DecoderLayer, c.decoder_layers, c.decoder_layerdrop)

    def forward(self, embeds: torch.Tensor, encoder_out: torch.Tensor | None, encoder_mask: torch.Tensor | None,
                cache: list[LayerCache] | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device)
        h = self.embed(embeds, positions)
        attn_mask = None if encoder_mask is None else encoder_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            h = self.run(layer, h, encoder_out, attn_mask, None if cache is None else cache[i], positions)
        return h


class LanguageModel(nn.Module):
    KERNELS = ("few_rows_linear", "fused_cross_entropy")  # in the LM head
    active_kernels = frozenset()

    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.shared = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.register_buffer("final_logits_bias", torch.zeros(1, c.vocab_size))
        self.embed_scale = c.d_model**0.5 if c.scale_embedding else 1.0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.shared(ids) * self.embed_scale

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head tied to `shared`, plus `final_logits_bias`; float32 like the original's output."""
        head = kernels.few_rows_linear if "few_rows_linear" in self.active_kernels else F.linear
        return (head(h, self.shared.weight) + self.final_logits_bias).float()

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
             logits: torch.Tensor | None = None) -> torch.Tensor:
        """The cross-entropy ("mean" or "sum" over the targets, IGNORE_INDEX left out) of the LM head's logits at h
        (B, T, d) against labels (B, T): of `logits` where the caller has them, else through the
        fused_cross_entropy kernel when it is on."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
        if logits is None and "fused_cross_entropy" in self.active_kernels:
            total = kernels.linear_cross_entropy(h, self.shared.weight, self.final_logits_bias, labels, IGNORE_INDEX)
            return total if reduction == "sum" else total / (labels != IGNORE_INDEX).sum()
        logits = self.logits(h) if logits is None else logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)

    def new_cache(self, encoder_out: torch.Tensor, max_length: int, copies: int = 1) -> list[LayerCache]:
        """Empty self-attention buffers of `max_length` positions for `copies` sequences per image (beams, returned
        sequences), and the cross keys/values of `encoder_out`, one row per image, which its copies share (see
        Attention.forward). The buffers take the dtype of the projected keys: under autocast that is the autocast
        dtype (bf16), while `encoder_out`, a LayerNorm's output, stays float32."""
        B = encoder_out.shape[0] * copies
        cache = []
        for layer in self.decoder.layers:
            attn = layer.self_attn
            shape = (B, attn.num_heads, max_length, self.config.d_model // attn.num_heads)
            cross_k, cross_v = layer.encoder_attn.project_kv(encoder_out)
            k, v = (cross_k.new_zeros(shape) for _ in range(2))
            cache.append(LayerCache(k, v, cross_k, cross_v))
        return cache
