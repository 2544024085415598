"""Scaled dot-product attention with three interchangeable backends.

- "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`, which picks flash / memory-efficient kernels
  on GPU and a fused kernel on CPU.
- "eager": the plain softmax(q k^T * scale) v, written out as the original does (scale applied to q first); the
  reference path for tests.
- "flash_attention_2": the `flash_attn` package, imported only when this backend is asked for; CUDA, fp16/bf16, and
  no arbitrary masks (padding masks fall back to SDPA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ImportError("attention backend 'flash_attention_2' needs the flash-attn package: "
                              'pip install -e ".[flash]" (CUDA only)') from None
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None, dropout: float = 0.0,
              backend: str = "sdpa") -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D).

    `mask` is boolean, True where attention is allowed, broadcastable to (B, H, Tq, Tk). `causal` aligns the causal
    diagonal to the end of the keys (a query at position i of Tq sees keys up to Tk - Tq + i).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "flash_attention_2" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                              softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    if backend == "eager":
        return _eager_attention(q, k, v, mask, causal, scale, dropout)
    if causal and mask is None and q.shape[-2] == k.shape[-2]:
        # SDPA's own causal flag (its diagonal is the top-left one, the same for as many queries as keys): no mask
        # tensor, so that on a GPU it can take its flash kernel, which takes no mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True)
    if causal:
        causal_mask = _causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = causal_mask if mask is None else mask & causal_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


def _eager_attention(q, k, v, mask, causal, scale, dropout):
    weights = (q * scale) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if causal:
        causal_mask = _causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = causal_mask if mask is None else mask & causal_mask
    if mask is not None:
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    weights = weights.softmax(dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v
