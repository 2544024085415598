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

Module names follow `transformers`' port of Florence-2 (`convs.{s}.conv`, `blocks.{s}.{j}.spatial_block.norm1`,
...); `weights.py` maps them to and from Microsoft's names (`convs.{s}.proj`, `...window_attn.norm`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import attention
from .config import VisionConfig

# Inference runs the blocks in place (`forward_inplace`), a band of windows or a chunk of tokens at a time, so that
# every temporary stays a few MB. Big temporaries are what makes inference slow on CPU: glibc serves each one with
# fresh pages from the OS (page faults, zeroing) and frees them straight back, so that a 75 MB MLP hidden state
# at stage 0 costs more to allocate than to compute, and the matmuls that write it run at half speed. Small ones
# are recycled from malloc's free lists and stay in cache. Sizes below: about 2-4 MB per temporary.
BAND_TOKENS = 2048  # tokens per band of window attention (whole rows of windows, at least one)
CHUNK_FLOATS = 2**20  # floats of the MLP hidden state per chunk of tokens


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

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int, padding: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if pre_norm else dim)

    def forward(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """x: (B, H, W, C_in), or the image (B, 3, H, W) when channels_first -> (B, H', W', C)."""
        if self.pre_norm and not channels_first:  # the original never pre-normalizes the raw image
            x = self.norm(x)
        if channels_first:
            x = self.conv(x).permute(0, 2, 3, 1)
        elif torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad):
            # oneDNN's backward of a strided conv is ~1.6x slower on channels-last input (measured at base, batch
            # 2: 1.10 vs 0.70 s forward + backward for stage 1's); its forward is faster that way, hence inference
            # keeps channels-last. The output goes back to (B, H, W, C) memory for the depth-wise convs.
            x = self.conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).contiguous()
        else:
            x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if not self.pre_norm:
            x = self.norm(x)
        return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled() and type(self.fc2) is nn.Linear and (
                h.requires_grad or self.fc2.weight.requires_grad):
            return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(h))


class _GeluLinear(torch.autograd.Function):
    """fc2(gelu(h)) that keeps h but not gelu(h) for backward, where GELU is recomputed: the hidden state (4 x dim
    per token) of every block is not held twice in training. Base, batch 2: 1.2 GB less of ~11.5 GB at the peak,
    for one extra GELU per block in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # autocast: grad and h may be bf16 while the weight is fp32
            grad_h = torch.ops.aten.gelu_backward(grad @ weight.to(grad.dtype), h)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            a = F.gelu(h).reshape(-1, h.shape[-1])
            grad_weight = (rows.t() @ a.to(rows.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = rows.sum(dim=0).to(weight.dtype)
        return grad_h, grad_weight, grad_bias


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        # (B, Hp, Wp, C) -> (B * nW, ws * ws, C), windows in row-major order
        windows = x.view(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
        qkv = self.qkv(windows).view(windows.shape[0], ws * ws, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, ws * ws, head_dim)
        out = attention(q, k, v, backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(-1, ws * ws, C))
        out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if pad_b or pad_r:
            out = out[:, :H, :W].contiguous()
        return out


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.num_groups = num_groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"  # "eager": inference computes it literally too (see ChannelBlock.forward_inplace)

    def foldable(self, tokens: int) -> bool:
        """Whether inference may fold the attention (see `folded`): not for the eager reference, not through
        wrapped layers (LoRA), and only where it saves work (folding costs about dim^3, it saves tokens * dim^2)."""
        plain = type(self.qkv) is nn.Linear and type(self.proj) is nn.Linear
        return self.backend != "eager" and plain and tokens > 2 * self.proj.in_features

    def folded(self, chunks) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of one image as a single linear map of its normalized tokens: for inference.

        The softmax weights (G, C/G, C/G) depend on the image, but given them, proj(weights @ v) is linear in the
        tokens: y = W_p @ blockdiag(weights) @ (W_v t + b_v) + b_p. `chunks` yields the image's normalized tokens
        (n, C) in pieces; the scores q k^T are summed over them. Returns (weight (C, C), bias (C,))."""
        C, G = self.proj.in_features, self.num_groups
        scores, tokens = 0.0, 0
        for t in chunks:
            qk = F.linear(t, self.qkv.weight[:2 * C], self.qkv.bias[:2 * C]).view(-1, 2, G, C // G)
            q, k = qk.permute(1, 2, 3, 0).unbind(0)  # (G, C/G, n)
            scores = scores + q @ k.transpose(-2, -1)
            tokens += t.shape[0]
        weights = (scores * tokens**-0.5).softmax(dim=-1)
        outer = self.proj.weight @ torch.block_diag(*weights)
        return outer @ self.qkv.weight[2 * C:], outer @ self.qkv.bias[2 * C:] + self.proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N, G = H * W, self.num_groups
        qkv = self.qkv(x.reshape(B, N, C)).view(B, N, 3, G, C // G)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (B, G, C/G, N): channels are the sequence axis
        # Attention among the channels of a group; the "head dim" is the token axis, hence the N^-0.5 scale.
        weights = ((q * N**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, G, C/G, C/G)
        out = (weights @ v).permute(0, 3, 1, 2).reshape(B, N, C)  # (B, G, C/G, N) -> (B, N, G, C/G) -> (B, N, C)
        return self.proj(out).view(B, H, W, C)


class SpatialBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, drop_path: float):
        super().__init__()
        self.conv1 = DepthwiseConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.window_attn = WindowAttention(dim, num_heads, window_size)
        self.conv2 = DepthwiseConv(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv1(x)
        x = x + self.drop_path(self.window_attn(self.norm1(x)))
        x = x + self.conv2(x)
        return x + self.drop_path(self.ffn(self.norm2(x)))

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """forward() for inference (eval mode, no autograd) on a contiguous x that is updated in place. Windows do
        not overlap, so each band of window rows can take its attention output as soon as it is computed."""
        x += self.conv1(x)
        ws = self.window_attn.window_size
        rows = ws * max(1, BAND_TOKENS // (ws * x.shape[2]))
        for b in range(x.shape[0]):
            for top in range(0, x.shape[1], rows):
                band = x[b:b + 1, top:top + rows]
                band += self.window_attn(self.norm1(band))
        x += self.conv2(x)
        for t in _chunks(x.view(-1, x.shape[-1]), self.ffn.fc1.out_features):  # the MLP acts on each token alone
            t += self.ffn(self.norm2(t))
        return x


class ChannelBlock(nn.Module):
    def __init__(self, dim: int, num_groups: int, drop_path: float):
        super().__init__()
        self.conv1 = DepthwiseConv(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.channel_attn = ChannelAttention(dim, num_groups)
        self.conv2 = DepthwiseConv(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv1(x)
        x = x + self.drop_path(self.channel_attn(self.norm1(x)))
        x = x + self.conv2(x)
        return x + self.drop_path(self.ffn(self.norm2(x)))

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """forward() for inference on a contiguous x updated in place; the attention spans all tokens of an image,
        so it goes one image at a time."""
        x += self.conv1(x)
        B, H, W, C = x.shape
        for b in range(B):
            if self.channel_attn.foldable(H * W):  # two passes over chunks: scores, then the folded map
                tokens = x[b].view(H * W, C)
                weight, bias = self.channel_attn.folded(self.norm1(t) for t in _chunks(tokens, 4 * C))
                for t in _chunks(tokens, 4 * C):
                    t += F.linear(self.norm1(t), weight, bias)
            else:
                image = x[b:b + 1]
                image += self.channel_attn(self.norm1(image))
        x += self.conv2(x)
        for t in _chunks(x.view(-1, C), self.ffn.fc1.out_features):  # the MLP acts on each token alone
            t += self.ffn(self.norm2(t))
        return x


def _chunks(tokens: torch.Tensor, width: int):
    """Consecutive row blocks of tokens (N, C) (views), sized for a temporary of `width` floats per token."""
    step = max(1, CHUNK_FLOATS // width)
    return (tokens[start:start + step] for start in range(0, tokens.shape[0], step))


class DualBlock(nn.Module):
    """One depth unit: a spatial (window) block, then a channel block."""

    def __init__(self, dim: int, num_heads: int, num_groups: int, window_size: int, drop_paths: tuple[float, float]):
        super().__init__()
        self.spatial_block = SpatialBlock(dim, num_heads, window_size, drop_paths[0])
        self.channel_block = ChannelBlock(dim, num_groups, drop_paths[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block.forward_inplace(self.spatial_block.forward_inplace(x))


class DaViT(nn.Module):
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
        x = pixel_values
        inplace = not self.training and not (torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in self.parameters())))
        for s, (conv, stage) in enumerate(zip(self.convs, self.blocks)):
            x = conv(x, channels_first=s == 0)
            if inplace:  # x is a new tensor of ours (the conv's output): updating it in place is safe
                x = x.contiguous()
            for block in stage:
                if inplace:
                    x = block.forward_inplace(x)
                elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x
