"""The fast kernels, all in one place, and the one switch that turns them on.

Every block's `forward` is the plain reference math: valid under autograd, under ONNX tracing, with peft LoRA or
FSDP wrapping its layers. The kernels below compute the same (up to float rounding) faster or in less memory, and
run only where they are switched on:

    kernels.use(model, "training")           # from now on, in `model` or any part of it (e.g. model.vision_tower)
    with kernels.using(model, "inference"):  # for a block of code, then back to what was on before
        ...
    model.generate(..., kernels=None)        # the default: the inference kernels (see below); False: the reference

"inference" (`INFERENCE`; generate and predict use it by default), for eval mode without autograd:
- inplace_vision: DaViT's blocks update the tokens in place, a band of window rows or a chunk of tokens at a time.
  Big temporaries are what makes inference slow on CPU: glibc serves each one with fresh pages from the OS (page
  faults, zeroing) and frees them straight back, so that a 75 MB MLP hidden state at stage 0 costs more to
  allocate than to compute, and the matmuls that write it run at half speed. Small ones are recycled from malloc's
  free lists and stay in cache. It refuses to run in training mode or when autograd would record the tower.
- folded_channel_attention: the channel attention of one image as a single linear map of its tokens (see `fold`).
- few_rows_linear: see below.
"training" (`TRAINING`; the trainer and tools/benchmark.py switch it on):
- recompute_gelu: fc2(gelu(h)) keeps h but not gelu(h) for backward (see `GeluLinear`).
- recompute_norm: DaViT's LayerNorm before each attention and MLP is recomputed in backward instead of kept (see
  `NormLinear`).
- recompute_conv_residual: each block's residual depth-wise conv and the norm after it, x1 = x + dwconv(x) and
  LN(x1), are recomputed from x in backward: x1 is not kept beside x (see `ConvNormLinear`; where it is on, it
  replaces recompute_norm, whose saving it contains).
- channels_first_conv: the strided patch convolutions of stages 1-3 on channels-first copies (see
  `channels_first_conv`).
- fused_cross_entropy: the LM head's loss without its logits kept twice, the gradient of the logits computed in
  forward (see `LinearCrossEntropy`); for callers that want the loss alone (`Florence2(..., return_logits=False)`,
  what the trainer asks for).
- few_rows_linear (in both): the text model's linear layers and LM head multiply few rows as W @ x^T (see
  `FEW_ROWS`); a decoding step, or a short teacher-forced batch.

A kernel that reads a layer's weights itself, or runs the math of a module without calling its forward, cannot run
through a wrapper (a peft LoRA layer, an FSDP unit, a parametrization, a forward hook): the wrapper would be
skipped. The switch checks once, when it is called: asked for explicitly, it raises KernelError naming the layers;
with strict=False (what generate and predict do by default) those kernels stay off and one warning names the
layers. Wrap first, then switch: the check does not see wrappers added after it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

INFERENCE = frozenset({"inplace_vision", "folded_channel_attention", "few_rows_linear"})
TRAINING = frozenset({"recompute_gelu", "recompute_norm", "recompute_conv_residual", "channels_first_conv",
                      "fused_cross_entropy", "few_rows_linear"})
PRESETS = {"inference": INFERENCE, "training": TRAINING}
KERNELS = INFERENCE | TRAINING


class KernelError(RuntimeError):
    """Kernels asked for where they cannot run: through wrapped layers, or under autograd for inference kernels."""


# ------------------------------------------------------------------------------------------------------ the switch
# A module that can run kernels (a "site") names them in the class attribute KERNELS; `active_kernels` holds the ones
# switched on, and `kernel_targets(kernel)` (optional) the modules a kernel reaches into, which must be plain.
def _sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if getattr(type(module), "KERNELS", None):  # the class, not the instance: wrappers forward getattr
            yield name, module


def _requested(kernels: str | Iterable[str] | None) -> frozenset[str]:
    if kernels is None:
        return frozenset()
    if isinstance(kernels, str):
        kernels = PRESETS.get(kernels, (kernels,))
    names = frozenset(kernels)
    if names - KERNELS:
        raise ValueError(f"unknown kernels {sorted(names - KERNELS)}; choose from {sorted(KERNELS)} or a preset: "
                         f"{', '.join(repr(p) for p in PRESETS)}")
    return names


def _wrapped(module: nn.Module) -> bool:
    """Not a plain module of this package or of torch.nn: a LoRA layer, an FSDP unit, a parametrization, a hook."""
    own = type(module).__module__.startswith(("florence2.", "torch.nn.modules."))
    return not own or bool(module._forward_hooks or module._forward_pre_hooks)


def use(model: nn.Module, kernels: str | Iterable[str] | None, *, strict: bool = True) -> dict[str, list[str]]:
    """Switch `kernels` on in `model` (a Florence2 or any part of it) and every other kernel off.

    `kernels`: "inference", "training", None (the reference everywhere), or an iterable of kernel names (KERNELS).
    A kernel that would reach into wrapped layers raises KernelError naming them (strict), or stays off where they
    are, with one warning naming them (strict=False). Returns {kernel: [wrapped layers]} of what stayed off.
    """
    requested = _requested(kernels)
    plan, refused = {}, {}
    for name, site in _sites(model):
        on = set()
        for kernel in requested.intersection(type(site).KERNELS):
            targets = site.kernel_targets(kernel) if hasattr(site, "kernel_targets") else {}
            wrapped = [f"{name}.{n}".strip(".") + f" ({type(m).__module__}.{type(m).__name__})"
                       for n, m in targets.items() if _wrapped(m)]
            if wrapped:
                refused.setdefault(kernel, []).extend(wrapped)
            else:
                on.add(kernel)
        plan[site] = frozenset(on)
    if refused:
        listing = "; ".join(f"{kernel}: {_listing(layers)}" for kernel, layers in sorted(refused.items()))
        advice = ("merge the adapters into the weights (or unwrap the layers) first, or leave these kernels off")
        if strict:
            raise KernelError(f"kernels cannot run through wrapped layers: {listing}. To use them, {advice}")
        _warn_once(f"kernels stay off (the reference math runs instead) where layers are wrapped: {listing}. To use "
                   f"them, {advice}")
    for site, on in plan.items():
        site.active_kernels = on
    return refused


@contextlib.contextmanager
def using(model: nn.Module, kernels: str | Iterable[str] | None, *, strict: bool = True):
    """`use` for the duration of a `with` block; then every site gets back the kernels it had."""
    before = {site: site.active_kernels for _, site in _sites(model)}
    refused = use(model, kernels, strict=strict)
    try:
        yield refused
    finally:
        for site, on in before.items():
            site.active_kernels = on


def active(model: nn.Module) -> dict[str, frozenset[str]]:
    """{site name: kernels on}, for the sites that run any."""
    return {name: site.active_kernels for name, site in _sites(model) if site.active_kernels}


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:  # once per process and message, whatever the warning filters say
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------- inplace_vision
BAND_TOKENS = 2048  # tokens per band of window attention (whole rows of windows, at least one): ~2-4 MB temporaries
CHUNK_FLOATS = 2**20  # floats of the MLP hidden state per chunk of tokens


def davit_inplace(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """DaViT.forward for inference, each block updating the tokens in place (see the module docstring)."""
    if tower.training or (torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in tower.parameters()))):
        raise KernelError("the inplace_vision kernel is for inference: eval mode, and no autograd through the vision "
                          "tower (torch.no_grad(), or a frozen tower). Switch to the training kernels or to none "
                          "first: kernels.use(model, 'training') or kernels.use(model, None)")
    x = pixel_values
    for s, (conv, stage) in enumerate(zip(tower.convs, tower.blocks)):
        x = conv(x, channels_first=s == 0).contiguous()  # a new tensor of ours: safe to update in place
        for block in stage:
            _spatial_block_inplace(block.spatial_block, x)
            _channel_block_inplace(block.channel_block, x)
    return x


def _spatial_block_inplace(block, x: torch.Tensor) -> None:
    """SpatialBlock.forward on a contiguous x, in place. Windows do not overlap, so each band of window rows can
    take its attention output as soon as it is computed."""
    _add_conv(block.conv1, x)
    ws = block.attn.window_size
    rows = ws * max(1, BAND_TOKENS // (ws * x.shape[2]))
    for b in range(x.shape[0]):
        for top in range(0, x.shape[1], rows):
            band = x[b:b + 1, top:top + rows]
            band += block.attn(block.norm1(band))
    _add_conv(block.conv2, x)
    for t in _chunks(x.view(-1, x.shape[-1]), block.ffn.fc1.out_features):  # the MLP acts on each token alone
        t += block.ffn(block.norm2(t))


def _channel_block_inplace(block, x: torch.Tensor) -> None:
    """ChannelBlock.forward on a contiguous x, in place; the attention spans all tokens of an image, so it goes one
    image at a time (folded in two passes over chunks when that kernel is on: the scores, then the map)."""
    _add_conv(block.conv1, x)
    B, H, W, C = x.shape
    attn = block.attn
    for b in range(B):
        if "folded_channel_attention" in attn.active_kernels and worth_folding(attn, H * W):
            tokens = x[b].view(H * W, C)
            weight, bias = fold(attn, (block.norm1(t) for t in _chunks(tokens, 4 * C)))
            for t in _chunks(tokens, 4 * C):
                t += F.linear(block.norm1(t), weight, bias)
        else:
            image = x[b:b + 1]
            image += attn(block.norm1(image))
    _add_conv(block.conv2, x)
    for t in _chunks(x.view(-1, C), block.ffn.fc1.out_features):
        t += block.ffn(block.norm2(t))


def _add_conv(conv, x: torch.Tensor) -> None:
    """x += conv(x), one image at a time: the conv's output is a temporary of one image, not of the batch (8 images
    of stage 2: 5 instead of 18 ms a conv and its add, most of it the fresh pages of a 38 MB output)."""
    for b in range(x.shape[0]):
        image = x[b:b + 1]
        image += conv(image)


def _chunks(tokens: torch.Tensor, width: int):
    """Consecutive row blocks of tokens (N, C) (views), sized for a temporary of `width` floats per token."""
    step = max(1, CHUNK_FLOATS // width)
    return (tokens[start:start + step] for start in range(0, tokens.shape[0], step))


# --------------------------------------------------------------------------------------- folded_channel_attention
def worth_folding(attn, tokens: int) -> bool:
    """Folding costs about dim^3 and saves tokens * dim^2. The "eager" attention backend means the literal math
    everywhere (the parity tests' reference), so it is never folded."""
    return attn.backend != "eager" and tokens > 2 * attn.proj.in_features


def fold(attn, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel attention of one image as a single linear map of its normalized tokens.

    The softmax weights (G, C/G, C/G) depend on the image, but given them, proj(weights @ v) is linear in the
    tokens: y = W_p @ blockdiag(weights) @ (W_v t + b_v) + b_p. `chunks` yields the image's normalized tokens
    (n, C) in pieces; the scores q k^T are summed over them. Returns (weight (C, C), bias (C,))."""
    C, G = attn.proj.in_features, attn.num_groups
    scores, tokens = 0.0, 0
    for t in chunks:
        qk = F.linear(t, attn.qkv.weight[:2 * C], attn.qkv.bias[:2 * C]).view(-1, 2, G, C // G)
        q, k = qk.permute(1, 2, 3, 0).unbind(0)  # (G, C/G, n)
        scores = scores + q @ k.transpose(-2, -1)
        tokens += t.shape[0]
    weights = (scores * tokens**-0.5).softmax(dim=-1)
    outer = attn.proj.weight @ torch.block_diag(*weights)
    return outer @ attn.qkv.weight[2 * C:], outer @ attn.qkv.bias[2 * C:] + attn.proj.bias


def folded_channel_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """ChannelAttention.forward through `fold`, image by image: (B, H, W, C) -> (B, H, W, C)."""
    B, H, W, C = x.shape
    out = []
    for image in x.reshape(B, H * W, C):
        weight, bias = fold(attn, [image])
        out.append(F.linear(image, weight, bias))
    return torch.stack(out).view(B, H, W, C)


# -------------------------------------------------------------------------------------------------- few_rows_linear
FEW_ROWS = 64  # up to this many rows (a decoding step, a short teacher-forced batch), weights are multiplied from
# the left: such products are bound by reading the weight, and MKL streams an (out, in) weight up to 2-3x faster
# as W @ x^T than as x @ W^T (3 beams: 14 instead of 46 ms for base's 158 MB embedding in the LM head, 41 instead
# of 60 ms for 40 decoder weights of 768x3072).


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (W @ x^T)^T when x has few rows."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > FEW_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, rows.t()) if bias is None else torch.addmm(bias[:, None], weight, rows.t())
    return out.t().contiguous().view(*x.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------- recompute_gelu
class GeluLinear(torch.autograd.Function):
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


# --------------------------------------------------------------------------------------------------- recompute_norm
class NormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) that keeps x (and the norm's per-token mean and 1/std) but not layer_norm(x) for
    backward, where the norm is recomputed: every DaViT block feeds a normalized copy of its tokens to the qkv
    projection and to fc1, and autograd would hold it beside x, which the norm keeps anyway. Base, batch 2 at 384 px:
    140 MB less of the 1.25 GB kept for backward, for one extra LayerNorm per block in backward."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps = eps
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs_x, needs_norm_weight, needs_norm_bias, _, needs_weight, needs_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if needs_weight:  # the one use of layer_norm(x): recomputed, the very kernel and input of forward
            y = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)[0]
            grad_weight = (rows.t() @ y.reshape(-1, y.shape[-1]).to(rows.dtype)).to(weight.dtype)
            del y
        if needs_bias:
            grad_bias = rows.sum(dim=0).to(weight.dtype)
        grad_x = grad_norm_weight = grad_norm_bias = None
        if needs_x or needs_norm_weight or needs_norm_bias:  # autocast: grad may be bf16 while x is fp32
            grad_y = (grad @ weight.to(grad.dtype)).to(x.dtype)
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, x.shape[-1:], mean, rstd, norm_weight, norm_bias,
                [needs_x, needs_norm_weight, needs_norm_bias])
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def norm_linear(norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)) through `NormLinear`."""
    return NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


# ------------------------------------------------------------------------------------------ recompute_conv_residual
class ConvNormLinear(torch.autograd.Function):
    """x1 = x + dwconv(x) and linear(tokens(layer_norm(x1))), keeping x (and the norm's per-token mean and 1/std)
    but neither x1 nor layer_norm(x1) for backward, where both are recomputed: each DaViT block's depth-wise convs
    are residual and come right before a norm (x + conv1(x) before the attention's, x + conv2(x) before the MLP's),
    and the conv keeps its input x for its own backward anyway, so x1 need not be kept beside it (`NormLinear` kept
    x1). x1 is returned too, as a graph node for the residual path (x1 + attn(...)) but not saved; backward adds its
    gradient to the norm's, then runs the conv's backward. x is (B, H, W, C) (channels-last memory for the conv, as
    `davit.DepthwiseConv` takes it); `tokens` (default: as they are) puts the normalized tokens in the order the
    linear layer takes them (the attention's windows, zero-padded, or (B, N, C)), a pure rearrangement whose
    backward is taken through autograd. Recomputed with the very kernels and input of forward, x1 and the norm are
    bit-identical to forward's; forward is the reference's math, op for op: conv, add, norm, rearrangement, linear.
    Under autocast, the conv and the linear layer run in its dtype as in the reference (x1 stays in x's), and
    backward casts as autocast's ops would. Base, batch 2 at 384 px: about 145 MB less of the 1.11 GB kept for
    backward, for one extra depth-wise conv per norm in backward. It contains `NormLinear`'s saving: a block with
    both kernels on runs this one."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, norm_weight, norm_bias, weight, bias, conv_args, eps, tokens):
        conv = F.conv2d(x.permute(0, 3, 1, 2), conv_weight, conv_bias, *conv_args).permute(0, 2, 3, 1)
        x1 = x + conv
        y, mean, rstd = torch.native_layer_norm(x1, x1.shape[-1:], norm_weight, norm_bias, eps)
        out = F.linear(y if tokens is None else tokens(y), weight, bias)
        ctx.save_for_backward(x, conv_weight, conv_bias, mean, rstd, norm_weight, norm_bias, weight)
        ctx.conv_dtype, ctx.conv_args, ctx.eps, ctx.tokens = conv.dtype, conv_args, eps, tokens
        return x1, out

    @staticmethod
    def backward(ctx, grad_x1, grad):
        x, conv_weight, conv_bias, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs_x, needs_conv_weight, needs_conv_bias, needs_norm_weight, needs_norm_bias, needs_weight, needs_bias = (
            ctx.needs_input_grad[:7])
        dtype = ctx.conv_dtype  # autocast's: the conv's operands were cast to it
        image = x.permute(0, 3, 1, 2).to(dtype)
        conv_bias_ = None if conv_bias is None else conv_bias.to(dtype)
        x1 = x + F.conv2d(image, conv_weight.to(dtype), conv_bias_, *ctx.conv_args).permute(0, 2, 3, 1)
        needs_g1 = needs_x or needs_conv_weight or needs_conv_bias
        needs_norm = needs_g1 or needs_norm_weight or needs_norm_bias
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if needs_weight or (needs_norm and ctx.tokens is not None):
            y = torch.native_layer_norm(x1, x1.shape[-1:], norm_weight, norm_bias, ctx.eps)[0]
            tokens = y
            if ctx.tokens is not None:  # the rearrangement, recorded to take its backward
                y = y.detach().requires_grad_()
                with torch.enable_grad():
                    tokens = ctx.tokens(y)
            if needs_weight:
                a = tokens.detach().reshape(-1, tokens.shape[-1])
                grad_weight = (rows.t() @ a.to(rows.dtype)).to(weight.dtype)
                del a
        if needs_bias:
            grad_bias = rows.sum(dim=0).to(weight.dtype)
        grad_x = grad_conv_weight = grad_conv_bias = grad_norm_weight = grad_norm_bias = None
        if needs_norm:
            grad_y = (grad @ weight.to(grad.dtype)).to(x1.dtype)  # autocast: grad may be bf16 while x1 is fp32
            if ctx.tokens is not None:
                grad_y = torch.autograd.grad(tokens, y, grad_y)[0].contiguous()
            tokens = y = None
            grad_x1_norm, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_y, x1, x1.shape[-1:], mean, rstd, norm_weight, norm_bias,
                [needs_g1, needs_norm_weight, needs_norm_bias])
            del grad_y, x1
            if needs_g1:  # x1 = x + conv(x): its gradient g1 goes to x directly and through the conv
                g1 = grad_x1 + grad_x1_norm
                del grad_x1_norm
                stride, padding, dilation, groups = ctx.conv_args
                grad_image, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
                    g1.permute(0, 3, 1, 2).to(dtype), image, conv_weight.to(dtype),
                    None if conv_bias is None else [conv_bias.shape[0]], stride, padding, dilation, False, [0, 0],
                    groups, [needs_x, needs_conv_weight, needs_conv_bias])
                if needs_x:
                    grad_x = g1 + grad_image.permute(0, 2, 3, 1).to(x.dtype)
                if needs_conv_weight:
                    grad_conv_weight = grad_conv_weight.to(conv_weight.dtype)
                if needs_conv_bias:
                    grad_conv_bias = grad_conv_bias.to(conv_bias.dtype)
        return (grad_x, grad_conv_weight, grad_conv_bias, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias,
                None, None, None)


def conv_norm_linear(conv: nn.Conv2d, norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor,
                     tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, linear(tokens(norm(x1)))) with x1 = x + conv(x), through `ConvNormLinear`; x (B, H, W, C), conv a
    `davit.DepthwiseConv` (any Conv2d of zero padding that keeps the shape)."""
    return ConvNormLinear.apply(x, conv.weight, conv.bias, norm.weight, norm.bias, linear.weight, linear.bias,
                                (conv.stride, conv.padding, conv.dilation, conv.groups), norm.eps, tokens)


# ---------------------------------------------------------------------------------------------- fused_cross_entropy
TARGET_ROWS_ONLY = {"cpu"}  # devices where LinearCrossEntropy multiplies the target rows alone (see there)


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of logits = linear(h, weight) + bias at the targets != ignore_index, whose backward
    is two matmuls. Forward computes the product of all rows at once (one pass over the weight), then, CHUNK_FLOATS
    at a time, the chunk's log-softmax, its loss and its gradient (softmax minus the one-hot target, zero on ignored
    rows), written back over the product: backward keeps that one (N, vocab) tensor. Autograd's cross_entropy keeps
    the logits and their log-softmax, whole-size temporaries whose fresh pages cost more than their math on the
    CPU, and runs three passes over them in backward. The demo model (vocabulary 51289, width 192), batch 16 of 29
    target positions: see docs/examples/detection.md. The logits are the LM head's (`LanguageModel.logits`: the
    product in the autocast dtype, then the float32 bias), so the loss is the reference's up to the order of the
    sums, and the gradient goes back in the product's dtype, as autograd's does. On the CPU only the target rows are
    multiplied (a quarter of the demo's are padding); elsewhere every row is, and the ignored ones get a zero
    gradient, since finding the target rows would be a host sync."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index):
        rows, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        taken = None
        if rows.device.type in TARGET_ROWS_ONLY:
            taken = (targets != ignore_index).nonzero().squeeze(1)
            rows, targets = rows.index_select(0, taken), targets.index_select(0, taken)
        product = F.linear(rows, weight)  # (N, vocab); under autocast in its dtype, as the reference's
        wide = torch.promote_types(product.dtype, torch.float32)
        valid = (targets != ignore_index)[:, None]
        index = torch.where(valid, targets[:, None], 0)
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=wide, device=h.device)
        step = max(1, CHUNK_FLOATS // product.shape[1])
        for start in range(0, product.shape[0], step):
            chunk, at, keep = (t[start:start + step] for t in (product, index, valid))
            log_probs = (chunk.to(wide) + bias).log_softmax(dim=-1)
            loss = loss - (log_probs.gather(1, at) * keep).sum()
            if wants_grad:
                probs = log_probs.exp_()
                chunk.copy_(probs.scatter_add_(1, at, -keep.to(wide)).mul_(keep))
        if wants_grad:
            ctx.save_for_backward(product, rows, weight, taken)
            ctx.shape = h.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, rows, weight, taken = ctx.saved_tensors
        grad_h = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_h = ((grad @ weight.to(grad.dtype)) * grad_loss).to(rows.dtype)
            if taken is not None:
                grad_h = grad_h.new_zeros(ctx.shape.numel() // ctx.shape[-1], grad_h.shape[1]).index_copy_(
                    0, taken, grad_h)
            grad_h = grad_h.view(ctx.shape)
        if ctx.needs_input_grad[1]:  # the scalar on the (N, dim) side, not on the (vocab, dim) product
            grad_weight = (grad.t() @ (rows * grad_loss).to(grad.dtype)).to(weight.dtype)
        return grad_h, grad_weight, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    """sum of F.cross_entropy(linear(h, weight) + bias, targets, ignore_index) through `LinearCrossEntropy`; h
    (..., dim), targets (...). The bias gets no gradient (Florence-2's final_logits_bias is a buffer)."""
    return LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index)


# ---------------------------------------------------------------------------------------------- channels_first_conv
def channels_first_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv of (B, H, W, C) tokens -> (B, H', W', C'), through channels-first copies: oneDNN's backward of a strided
    conv is ~1.6x slower on channels-last input (measured at base, batch 2: 1.10 vs 0.70 s forward + backward for
    stage 1's); its forward is faster channels-last, hence the reference (and inference) keeps that. The output
    goes back to (B, H, W, C) memory for the depth-wise convs."""
    return conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).contiguous()
