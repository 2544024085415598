"""DaViT, the vision tower of Florence-2 (Ding et al., "DaViT: Dual Attention Vision Transformers", 2022).

Only the path Florence-2 uses: four stages, each a convolutional patch embedding followed by `depths[s]` pairs of
(spatial block, channel block); no classifier head, no final norm, no pooling.

Notable details of the original that matter for exact parity:
- Every block is `x + dwconv3x3(x)`, `x + attn(LN(x))`, `x + dwconv3x3(x)`, `x + mlp(LN(x))`: the depth-wise convs
  ("conv1"/"conv2", a convolutional position encoding) are residual and come before attention and before the MLP.
- Window attention: non-overlapping, unshifted windows of 12x12, no relative position bias, no mask. Inputs that are
  not a multiple of the window are zero-padded right/bottom *after* the norm, and the padded tokens take part as
  keys (their keys and values are just the qkv bias).
- Channel attention: "group" attention whose sequence axis is the channels of each group; the softmax scale is
  N^-0.5 with N the number of *tokens*, not the head dim.
- Patch embedding: stage 0 is conv -> LayerNorm(dim0); stages 1-3 are LayerNorm(previous dim) -> conv.

Tokens are kept as (B, H, W, C) between blocks: LayerNorm and Linear act on the last axis, and the same memory
seen as (B, C, H, W) is channels-last, which the depth-wise convs take without a copy.

Each `forward` is the reference math. The fast kernels (in-place blocks for inference, the folded channel attention,
GELU, the norms and the residual convs recomputed in backward, channels-first strided convs in backward) are in
kernels.py; a module runs one only when `kernels.use` switched it on (its `active_kernels`).

Module names follow `transformers`' port of Florence-2 (`convs.{s}.conv`, `blocks.{s}.{j}.spatial_block.norm1`,
...); `weights.py` maps them to and from Microsoft's names (`convs.{s}.proj`, `...window_attn.norm`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import kernels
from .attention import attention
from .config import VisionConfig


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p` (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class DepthwiseConv(nn.Conv2d):
    """3x3 depth-wise convolution on (B, H, W, C) tokens."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Strided conv from one stage to the next, with a LayerNorm before (pre_norm) or after it."""

    KERNELS = ("channels_first_conv",)
    active_kernels = frozenset()

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int, padding: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if pre_norm else dim)

    def forward(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """x: (B, H, W, C_in), or the image (B, 3, H, W) when channels_first -> (B, H', W', C)."""
        if channels_first:  # the image; the original never pre-normalizes it
            x = self.conv(x).permute(0, 2, 3, 1)
        else:
            if self.pre_norm:
                x = self.norm(x)
            if "channels_first_conv" in self.active_kernels:
                x = kernels.channels_first_conv(self.conv, x)
            else:
                x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if not self.pre_norm:
            x = self.norm(x)
        return x


class Mlp(nn.Module):
    KERNELS = ("recompute_gelu",)
    active_kernels = frozenset()

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim); `norm`: x is not normalized yet, fc1 applies it (Block's recompute_norm kernel); `h`: fc1's
        output, computed by the caller (Block's recompute_conv_residual kernel)."""
        if h is None:
            h = self.fc1(x) if norm is None else kernels.norm_linear(norm, self.fc1, x)
        if "recompute_gelu" in self.active_kernels:
            return kernels.GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(h))

    def kernel_targets(self, kernel: str) -> dict[str, nn.Module]:
        return {"fc2": self.fc2}  # recompute_gelu reads its weights


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def qkv_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * nW, ws * ws, C), the windows in row-major order, zero-padded right and bottom."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        return x.view(B, (H + pad_b) // ws, ws, (W + pad_r) // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None, qkv: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, H, W, C); `norm`: x is not normalized yet, the qkv projection applies it to the windows (Block's
        recompute_norm kernel; a per-token norm does not mind the token order); `qkv`: the projection of
        qkv_tokens(norm(x)), computed by the caller (Block's recompute_conv_residual kernel)."""
        B, H, W, C = x.shape
        ws = self.window_size
        pad_b, pad_r = (-H) % ws, (-W) % ws
        Hp, Wp = H + pad_b, W + pad_r
        if qkv is None:
            if (pad_b or pad_r) and norm is not None:  # the original pads the normalized tokens with zeros
                x, norm = norm(x), None
            windows = self.qkv_tokens(x)
            qkv = self.qkv(windows) if norm is None else kernels.norm_linear(norm, self.qkv, windows)
        qkv = qkv.view(-1, ws * ws, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, ws * ws, head_dim)
        out = attention(q, k, v, backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(-1, ws * ws, C))
        out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            out = out[:, :H, :W].contiguous()
        return out


class ChannelAttention(nn.Module):
    KERNELS = ("folded_channel_attention",)
    active_kernels = frozenset()

    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.num_groups = num_groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"  # "eager": never folded (kernels.worth_folding)

    @staticmethod
    def qkv_tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, N, C)."""
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None, qkv: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, H, W, C); `norm`: x is not normalized yet, the qkv projection applies it (Block's recompute_norm
        kernel); `qkv`: the projection of qkv_tokens(norm(x)), computed by the caller (Block's
        recompute_conv_residual kernel; nothing is left for the fold to save then, so it does not run)."""
        B, H, W, C = x.shape
        N, G = H * W, self.num_groups
        if qkv is None:
            if "folded_channel_attention" in self.active_kernels and kernels.worth_folding(self, N):
                return kernels.folded_channel_attention(self, x if norm is None else norm(x))
            tokens = self.qkv_tokens(x)
            qkv = self.qkv(tokens) if norm is None else kernels.norm_linear(norm, self.qkv, tokens)
        qkv = qkv.view(B, N, 3, G, C // G)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (B, G, C/G, N): channels are the sequence axis
        # Attention among the channels of a group; the "head dim" is the token axis, hence the N^-0.5 scale.
        weights = ((q * N**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, G, C/G, C/G)
        out = (weights @ v).permute(0, 3, 1, 2).reshape(B, N, C)  # (B, G, C/G, N) -> (B, N, G, C/G) -> (B, N, C)
        return self.proj(out).view(B, H, W, C)

    def kernel_targets(self, kernel: str) -> dict[str, nn.Module]:
        # the fold reads the weights; the in-place channel block runs it without calling this module
        return {"": self, "qkv": self.qkv, "proj": self.proj}


class Block(nn.Module):
    """x + dwconv(x), x + attn(LN(x)), x + dwconv(x), x + mlp(LN(x)), with stochastic depth on the two branches.
    The attention is registered under its checkpoint name (`window_attn`, `channel_attn`) and reached as `attn`.
    With the recompute_norm kernel, the attention's qkv projection and the MLP's fc1 apply norm1 and norm2 (see
    kernels.NormLinear); with recompute_conv_residual (which replaces it where both are on), each conv's residual,
    its norm and the projection after it are one kernels.ConvNormLinear."""

    KERNELS = ("recompute_norm", "recompute_conv_residual")
    active_kernels = frozenset()

    def __init__(self, dim: int, attn_name: str, attn: nn.Module, drop_path: float):
        super().__init__()
        self.conv1 = DepthwiseConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn_name = attn_name
        self.add_module(attn_name, attn)
        self.conv2 = DepthwiseConv(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    @property
    def attn(self) -> nn.Module:
        return getattr(self, self.attn_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "recompute_conv_residual" in self.active_kernels:
            x, qkv = kernels.conv_norm_linear(self.conv1, self.norm1, self.attn.qkv, x, self.attn.qkv_tokens)
            x = x + self.drop_path(self.attn(x, qkv=qkv))
            x, h = kernels.conv_norm_linear(self.conv2, self.norm2, self.ffn.fc1, x)
            return x + self.drop_path(self.ffn(x, h=h))
        x = x + self.conv1(x)
        if "recompute_norm" in self.active_kernels:
            x = x + self.drop_path(self.attn(x, norm=self.norm1))
            x = x + self.conv2(x)
            return x + self.drop_path(self.ffn(x, norm=self.norm2))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.conv2(x)
        return x + self.drop_path(self.ffn(self.norm2(x)))

    def kernel_targets(self, kernel: str) -> dict[str, nn.Module]:
        # the norms' and input projections' weights are read, and the attention and MLP called with the norm (or
        # the projection); recompute_conv_residual reads the convs' weights too
        targets = {"norm1": self.norm1, "norm2": self.norm2, self.attn_name: self.attn,
                   f"{self.attn_name}.qkv": self.attn.qkv, "ffn": self.ffn, "ffn.fc1": self.ffn.fc1}
        if kernel == "recompute_conv_residual":
            targets.update(conv1=self.conv1, conv2=self.conv2)
        return targets


class SpatialBlock(Block):
    def __init__(self, dim: int, num_heads: int, window_size: int, drop_path: float):
        super().__init__(dim, "window_attn", WindowAttention(dim, num_heads, window_size), drop_path)


class ChannelBlock(Block):
    def __init__(self, dim: int, num_groups: int, drop_path: float):
        super().__init__(dim, "channel_attn", ChannelAttention(dim, num_groups), drop_path)


class DualBlock(nn.Module):
    """One depth unit: a spatial (window) block, then a channel block."""

    def __init__(self, dim: int, num_heads: int, num_groups: int, window_size: int, drop_paths: tuple[float, float]):
        super().__init__()
        self.spatial_block = SpatialBlock(dim, num_heads, window_size, drop_paths[0])
        self.channel_block = ChannelBlock(dim, num_groups, drop_paths[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))


class DaViT(nn.Module):
    KERNELS = ("inplace_vision",)
    active_kernels = frozenset()

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        drop_paths = torch.linspace(0, c.drop_path_rate, 2 * sum(c.depths), device="cpu").tolist()
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for s, dim in enumerate(c.dim_embed):
            in_dim = 3 if s == 0 else c.dim_embed[s - 1]
            self.convs.append(PatchEmbed(in_dim, dim, c.patch_size[s], c.patch_stride[s], c.patch_padding[s],
                                         c.patch_prenorm[s]))
            first = 2 * sum(c.depths[:s])
            self.blocks.append(nn.ModuleList(
                DualBlock(dim, c.num_heads[s], c.num_groups[s], c.window_size,
                          (drop_paths[first + 2 * j], drop_paths[first + 2 * j + 1]))
                for j in range(c.depths[s])
            ))
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> tokens of the last stage (B, H/32, W/32, C_last), before any pooling or norm."""
        if "inplace_vision" in self.active_kernels:
            return kernels.davit_inplace(self, pixel_values)
        x = pixel_values
        for s, (conv, stage) in enumerate(zip(self.convs, self.blocks)):
            x = conv(x, channels_first=s == 0)
            for block in stage:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def kernel_targets(self, kernel: str) -> dict[str, nn.Module]:
        """inplace_vision runs the math of the stages and blocks without calling their forward."""
        targets = {}
        for s, stage in enumerate(self.blocks):
            targets[f"blocks.{s}"] = stage
            for j, block in enumerate(stage):
                targets[f"blocks.{s}.{j}"] = block
                targets[f"blocks.{s}.{j}.spatial_block"] = block.spatial_block
                targets[f"blocks.{s}.{j}.channel_block"] = block.channel_block
        return targets
