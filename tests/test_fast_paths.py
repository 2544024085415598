"""The kernels of florence2/kernels.py compute what the reference forward computes (DaViT's in-place blocks in bands
and chunks, the folded channel attention, the left-multiplied linear of few rows, GELU recomputed in backward, the
channels-first strided conv, the residual convs and norms recomputed in backward, the cross-entropy fused with the
LM head), run only where they are switched on, and refuse wrapped layers clearly."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from florence2 import Florence2, davit, kernels
from florence2.config import PRESETS, with_changes
from florence2.kernels import FEW_ROWS, KernelError, few_rows_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(window_size: int = 7, seed: int = 3) -> Florence2:
    config = with_changes(PRESETS["tiny"], vision={"window_size": window_size, "drop_path_rate": 0.0},
                          text={"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0})
    model = Florence2.from_config(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # nonzero biases and norms everywhere, unlike the init
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def pixels(batch=2, height=200, width=168, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("small_pieces", [False, True])
def test_inplace_vision_equals_the_reference(monkeypatch, small_pieces):
    if small_pieces:  # many bands and chunks, bands not a multiple of the window rows
        monkeypatch.setattr(kernels, "BAND_TOKENS", 50)
        monkeypatch.setattr(kernels, "CHUNK_FLOATS", 3000)
    tower = tiny_model().vision_tower
    x = pixels()
    with torch.no_grad():
        reference = tower(x)
        with kernels.using(tower, "inference"):
            assert kernels.active(tower)[""] == {"inplace_vision"}
            fast = tower(x)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)
    assert not torch.equal(fast, reference)  # the kernels did run: other float rounding
    assert not torch.equal(fast[0], fast[1])


def test_inplace_vision_refuses_autograd_and_training_mode():
    tower = tiny_model().vision_tower
    kernels.use(tower, "inference")
    with pytest.raises(KernelError, match="inplace_vision kernel is for inference"):
        tower(pixels(1, 64, 64))  # autograd on: the tower's weights require grad
    with torch.no_grad():
        tower.train()
        with pytest.raises(KernelError, match="eval mode"):
            tower(pixels(1, 64, 64))
        tower.eval()
        tower.requires_grad_(False)
    frozen = tower(pixels(1, 64, 64))  # a frozen tower in a training step: no graph, in place is safe
    assert not frozen.requires_grad


def test_folded_channel_attention_equals_the_reference():
    attn = davit.ChannelAttention(dim=16, num_groups=4)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 10, 10, 16, generator=torch.Generator().manual_seed(1))
    assert kernels.worth_folding(attn, 100) and not kernels.worth_folding(attn, 32)
    with torch.no_grad():
        reference = attn(x)
        weight, bias = kernels.fold(attn, iter(x[0].reshape(100, 16).split(30)))  # in pieces, as the in-place block
        kernels.use(attn, ["folded_channel_attention"])
        folded = attn(x)
    torch.testing.assert_close(F.linear(x[0].reshape(100, 16), weight, bias), reference[0].reshape(100, 16),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, reference, atol=1e-5, rtol=1e-5)
    assert not torch.equal(folded, reference)
    attn.backend = "eager"  # the literal attention everywhere: never folded
    assert not kernels.worth_folding(attn, 100)


def test_folded_channel_attention_alone_in_a_tower():
    tower = tiny_model().vision_tower
    x = pixels(1, 128, 128)
    with torch.no_grad():
        reference = tower(x)
        kernels.use(tower, ["folded_channel_attention"])
        folded = tower(x)
    torch.testing.assert_close(folded, reference, atol=2e-5, rtol=1e-4)
    assert not torch.equal(folded, reference)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
def test_linear_of_few_rows(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(few_rows_linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(few_rows_linear(x, w), F.linear(x, w))
    assert few_rows_linear(x, w, b).shape == (rows, 1, 40)


def test_gelu_recomputed_in_backward():
    mlp = davit.Mlp(dim=6, hidden=12).double()
    x = torch.randn(4, 5, 6, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: kernels.GeluLinear.apply(mlp.fc1(x), w, b),
                             (x, mlp.fc2.weight, mlp.fc2.bias))
    grads = []
    for on in (None, "training"):
        kernels.use(mlp, on)
        mlp(x).sum().backward()
        grads.append([x.grad.clone(), mlp.fc2.weight.grad.clone(), mlp.fc2.bias.grad.clone(),
                      mlp.fc1.weight.grad.clone()])
        x.grad = None
        mlp.zero_grad()
    for reference, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, reference)


def test_norm_recomputed_in_backward():
    norm, linear = nn.LayerNorm(6).double(), nn.Linear(6, 9).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(6, dtype=torch.double))
        norm.bias.add_(torch.randn(6, dtype=torch.double))
    x = torch.randn(4, 5, 6, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(lambda x, nw, nb, w, b: kernels.NormLinear.apply(x, nw, nb, norm.eps, w, b),
                             (x, norm.weight, norm.bias, linear.weight, linear.bias))
    out = kernels.norm_linear(norm, linear, x)
    torch.testing.assert_close(out, linear(norm(x)), rtol=0, atol=0)  # the same kernels on the same input
    saved = []  # what backward keeps: x and the norm's per-token statistics, not the normalized tokens
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.norm_linear(norm, linear, x)
    assert sum(t.numel() for t in saved if t.shape[:-1] == x.shape[:-1]) == x.numel() + 2 * 4 * 5


@pytest.mark.parametrize("window_size", [7, 8])  # 7: windows padded at the bottom and right; 8: none padded
def test_recompute_norm_gives_the_reference_block_gradients(window_size):
    stage = tiny_model(window_size).vision_tower.train().blocks[0]
    x = torch.randn(2, 16, 16 if window_size == 8 else 12, stage[0].spatial_block.norm1.normalized_shape[0],
                    requires_grad=True)
    results = []
    for on in (None, ["recompute_norm"]):
        kernels.use(stage, on)
        out = stage[0](x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in stage.named_parameters()}))
        x.grad = None
        stage.zero_grad()
    (reference, reference_x, reference_grads), (out, grad_x, grads) = results
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, reference_x)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


@pytest.mark.parametrize("window_size", [None, 3, 2])  # None: the tokens as they are; 3: windows padded; 2: not
def test_conv_residual_recomputed_in_backward(window_size):
    conv, norm, linear = davit.DepthwiseConv(6).double(), nn.LayerNorm(6).double(), nn.Linear(6, 9).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(6, dtype=torch.double))
        norm.bias.add_(torch.randn(6, dtype=torch.double))
    tokens = None if window_size is None else davit.WindowAttention(6, 2, window_size).qkv_tokens
    x = torch.randn(2, 4, 6, 6, dtype=torch.double, requires_grad=True)
    args = ((conv.stride, conv.padding, conv.dilation, conv.groups), norm.eps, tokens)
    torch.autograd.gradcheck(lambda x, cw, cb, nw, nb, w, b: kernels.ConvNormLinear.apply(x, cw, cb, nw, nb, w, b,
                                                                                           *args),
                             (x, conv.weight, conv.bias, norm.weight, norm.bias, linear.weight, linear.bias))
    x1, out = kernels.conv_norm_linear(conv, norm, linear, x, tokens)
    reference = x + conv(x)
    torch.testing.assert_close(x1, reference, rtol=0, atol=0)  # the same kernels on the same input
    normalized = norm(reference)
    torch.testing.assert_close(out, linear(normalized if tokens is None else tokens(normalized)), rtol=0, atol=0)
    saved = []  # what backward keeps: x and the norm's per-token statistics, not x1 nor the normalized tokens
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.conv_norm_linear(conv, norm, linear, x, tokens)
    assert sum(t.numel() for t in saved if t.shape[:-1] == x.shape[:-1]) == x.numel() + 2 * 2 * 4 * 6
    assert not any(t.numel() == x.numel() and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
                   for t in saved)


def kept_activations(module, x) -> int:
    """Storages of x's size that a forward of `module` keeps for backward (each once)."""
    kept = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.setdefault(t.untyped_storage().data_ptr(), t.numel()) and t, lambda t: t):
        module(x)
    return sum(n == x.numel() for n in kept.values())


@pytest.mark.parametrize("window_size", [7, 8])  # 7: windows padded at the bottom and right; 8: none padded
def test_recompute_conv_residual_gives_the_reference_block_gradients(window_size):
    stage = tiny_model(window_size).vision_tower.train().blocks[0]
    for block in (stage[0].spatial_block, stage[0].channel_block):
        block.drop_path.p = 0.4  # stochastic depth, the same draws on both paths
    x = torch.randn(2, 16, 16 if window_size == 8 else 12, stage[0].spatial_block.norm1.normalized_shape[0],
                    requires_grad=True)
    results = []
    for on in (None, ["recompute_conv_residual"], "training"):
        kernels.use(stage, on)
        torch.manual_seed(0)
        out = stage[0](x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in stage.named_parameters()}))
        x.grad = None
        stage.zero_grad()
    (reference, reference_x, reference_grads), *fast = results
    assert not torch.equal(reference[0], reference[1])
    for out, grad_x, grads in fast:
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        torch.testing.assert_close(grad_x, reference_x)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], msg=name)
    kept = []  # x1 and x3 of each block are no longer kept beside x and x2, the convs' inputs
    for on in (["recompute_norm"], ["recompute_conv_residual"]):
        kernels.use(stage, on)
        kept.append(kept_activations(stage[0], x))
    assert kept[0] - kept[1] == 4


def test_recompute_conv_residual_under_bf16_autocast():
    # the convs and projections in bf16, the residual stream and the norms in float32: as autocast runs the reference
    stage = tiny_model(7).vision_tower.train().blocks[0]
    x = torch.randn(2, 16, 12, stage[0].spatial_block.norm1.normalized_shape[0], requires_grad=True)
    results = []
    for on in (None, ["recompute_conv_residual"]):
        kernels.use(stage, on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stage[0](x)
        out.float().square().sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in stage.named_parameters()}))
        x.grad = None
        stage.zero_grad()
    (reference, reference_x, reference_grads), (out, grad_x, grads) = results
    assert out.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, reference_x, rtol=2e-2, atol=1e-3)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference_grads[name], rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("chunk_floats", [kernels.CHUNK_FLOATS, 40])  # 40: a chunk of one row at a time
@pytest.mark.parametrize("target_rows_only", [True, False])  # the CPU's way, and the GPU's (every row multiplied)
def test_cross_entropy_fused_with_the_lm_head(monkeypatch, chunk_floats, target_rows_only):
    monkeypatch.setattr(kernels, "CHUNK_FLOATS", chunk_floats)
    monkeypatch.setattr(kernels, "TARGET_ROWS_ONLY", {"cpu"} if target_rows_only else set())
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 5, 8, dtype=torch.double, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.double, generator=g, requires_grad=True)
    bias = torch.randn(1, 11, dtype=torch.double, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, 3:] = targets[2, 0] = -100
    torch.autograd.gradcheck(lambda h, w: kernels.linear_cross_entropy(h, w, bias, targets, -100), (h, weight))
    reference = F.cross_entropy((F.linear(h, weight) + bias).flatten(0, 1), targets.flatten(), ignore_index=-100,
                                reduction="sum")
    torch.testing.assert_close(kernels.linear_cross_entropy(h, weight, bias, targets, -100), reference)
    saved = []  # backward keeps one (rows, vocab) tensor, the logits' gradient, not the logits and log-softmax
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.linear_cross_entropy(h, weight, bias, targets, -100)
    rows = 12 if target_rows_only else 15  # of the 15 rows, 12 have a target
    assert [t.shape for t in saved if t.shape[-1] == 11] == [(rows, 11)]
    with torch.no_grad():  # no gradient asked for: the loss alone
        torch.testing.assert_close(kernels.linear_cross_entropy(h, weight, bias, targets, -100), reference)


def test_fused_cross_entropy_under_bf16_autocast():
    # the product in bf16, the float32 bias, the gradients back through bf16: as autograd does for the reference
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    bias = torch.randn(1, 300, generator=g)
    targets = torch.randint(0, 300, (2, 7), generator=g)
    targets[1, 4:] = -100
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = kernels.linear_cross_entropy(h, weight, bias, targets, -100)
            else:
                logits = (F.linear(h, weight) + bias).float()
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        loss.backward()
        results.append((loss.detach(), h.grad, weight.grad))
        h.grad = weight.grad = None
    (reference_loss, *reference), (loss, *grads) = results
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(loss, reference_loss)
    for grad, expected in zip(grads, reference):
        torch.testing.assert_close(grad, expected, rtol=1e-2, atol=1e-2)


def test_return_logits():
    model = tiny_model()
    x, ids, labels = pixels(1, 64, 64), torch.tensor([[0, 100, 2]]), torch.tensor([[5, 7, -100, 2]])
    kernels.use(model, "training")
    with torch.no_grad():
        full = model(pixel_values=x, input_ids=ids, labels=labels)
        alone = model(pixel_values=x, input_ids=ids, labels=labels, return_logits=False)
    assert alone.logits is None and full.logits.shape == (1, 4, model.config.text.vocab_size)
    torch.testing.assert_close(alone.loss, full.loss)
    expected_sum = F.cross_entropy(full.logits[0], labels[0], ignore_index=-100, reduction="sum")
    ignored = torch.full_like(labels, -100)  # no target left (evaluate's repeated examples): a sum of 0, not nan
    for return_logits in (True, False):
        with torch.no_grad():
            summed = model(pixel_values=x, input_ids=ids, labels=labels, return_logits=return_logits,
                           loss_reduction="sum").loss
            empty = model(pixel_values=x, input_ids=ids, labels=ignored, return_logits=return_logits,
                          loss_reduction="sum").loss
        torch.testing.assert_close(summed, expected_sum)
        assert float(empty) == 0.0
    with pytest.raises(ValueError, match="loss_reduction"):
        model(pixel_values=x, input_ids=ids, labels=labels, loss_reduction="none")
    with pytest.raises(ValueError, match="give labels"):
        model(pixel_values=x, input_ids=ids, decoder_input_ids=torch.tensor([[2, 0]]), return_logits=False)


def test_training_kernels_give_the_reference_loss_and_gradients():
    # the whole model in a training step, as the trainer asks for it (the loss alone): recompute_gelu,
    # recompute_norm, recompute_conv_residual, channels_first_conv, fused_cross_entropy and few_rows_linear (32 label
    # rows)
    model = tiny_model().train()
    x, ids = pixels(2, 64, 64), torch.tensor([[0, 100, 200, 2], [0, 300, 400, 2]])
    labels = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(4))
    labels[0, 12:] = -100
    results = []
    for on in (None, "training"):
        kernels.use(model, on)
        loss = model(pixel_values=x, input_ids=ids, labels=labels, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (reference_loss, reference), (loss, grads) = results
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)  # float32 rounding of a ~11 loss
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_channels_first_conv():
    embed = davit.PatchEmbed(8, 16, kernel=3, stride=2, padding=1, pre_norm=True)
    x = torch.randn(2, 9, 11, 8, requires_grad=True)
    outputs = []
    for on in (None, "training"):
        kernels.use(embed, on)
        out = embed(x)
        out.square().sum().backward()
        outputs.append((out.detach(), x.grad.clone(), embed.conv.weight.grad.clone()))
        x.grad = None
        embed.zero_grad()
    for reference, fast in zip(*outputs):
        torch.testing.assert_close(fast, reference)
    assert outputs[1][0].is_contiguous()  # (B, H, W, C) memory again, for the depth-wise convs


# ------------------------------------------------------------------------------------------------- the switch
def test_a_plain_call_runs_the_reference(monkeypatch):
    model = tiny_model()

    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran without being switched on")
    for name in ("davit_inplace", "folded_channel_attention", "few_rows_linear", "channels_first_conv"):
        monkeypatch.setattr(kernels, name, fail)
    monkeypatch.setattr(kernels.GeluLinear, "apply", fail)
    monkeypatch.setattr(kernels.NormLinear, "apply", fail)
    monkeypatch.setattr(kernels.ConvNormLinear, "apply", fail)
    monkeypatch.setattr(kernels.LinearCrossEntropy, "apply", fail)
    assert kernels.active(model) == {}
    with torch.no_grad():
        model(pixel_values=pixels(1, 64, 64), input_ids=torch.tensor([[0, 100, 2]]), labels=torch.tensor([[5, 2]]))
    model.train()
    for return_logits in (True, False):
        model(pixel_values=pixels(1, 64, 64), input_ids=torch.tensor([[0, 100, 2]]), labels=torch.tensor([[5, 2]]),
              return_logits=return_logits)


def test_generate_runs_the_inference_kernels_by_default(monkeypatch):
    model = tiny_model()
    kernels.use(model, "training")
    seen = []
    original = kernels.davit_inplace
    monkeypatch.setattr(kernels, "davit_inplace", lambda *a: seen.append(kernels.active(model)) or original(*a))
    inputs = {"pixel_values": pixels(1, 64, 64), "input_ids": torch.tensor([[0, 100, 200, 2]]), "max_new_tokens": 5}
    fast = model.generate(**inputs)
    assert {k for on in seen[0].values() for k in on} == kernels.INFERENCE
    assert {k for on in kernels.active(model).values() for k in on} == kernels.TRAINING  # back as it was
    reference = model.generate(**inputs, kernels=False)
    assert len(seen) == 1 and torch.equal(fast, reference)
    with pytest.raises(ValueError, match="kernels must be None"):
        model.generate(**inputs, kernels="inference")


def test_unknown_kernel():
    with pytest.raises(ValueError, match=r"unknown kernels \['fast'\]; choose from"):
        kernels.use(tiny_model(), ["fast"])


class Wrapper(nn.Module):
    """Stands for any wrapper the kernels cannot see through (an FSDP unit, a quantized layer, ...)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.weight, self.bias = inner.weight, inner.bias

    def forward(self, x):
        return self.inner(x) * 2


def test_wrapped_layers_are_refused_by_name():
    model = tiny_model()
    block = model.vision_tower.blocks[1][0].channel_block
    block.channel_attn.qkv = Wrapper(block.channel_attn.qkv)
    block.ffn.fc2 = Wrapper(block.ffn.fc2)
    with pytest.raises(KernelError) as error:
        kernels.use(model, "inference")
    message = str(error.value)
    assert "folded_channel_attention: vision_tower.blocks.1.0.channel_block.channel_attn.qkv (" in message
    assert "merge the adapters" in message and "inplace_vision" not in message
    assert kernels.active(model) == {}  # nothing switched on
    with pytest.raises(KernelError, match=r"recompute_gelu: vision_tower\.blocks\.1\.0\.channel_block\.ffn\.fc2"):
        kernels.use(model, "training")
    spatial = model.vision_tower.blocks[0][0].spatial_block
    spatial.conv2 = Wrapper(spatial.conv2)  # the residual conv's weights are read by recompute_conv_residual alone
    with pytest.raises(KernelError,
                       match=r"recompute_conv_residual: vision_tower\.blocks\.0\.0\.spatial_block\.conv2 \("):
        kernels.use(model, ["recompute_conv_residual"])
    assert kernels.use(spatial, ["recompute_norm"]) == {}  # its convs are not recompute_norm's concern
    model.vision_tower.blocks[0][0].register_forward_hook(lambda *args: None)  # a hook would be skipped too
    with pytest.raises(KernelError, match=r"inplace_vision: vision_tower\.blocks\.0\.0 \("):
        kernels.use(model, ["inplace_vision"])


def test_generate_falls_back_with_one_warning_and_refuses_when_asked():
    model = tiny_model()
    attn = model.vision_tower.blocks[0][0].channel_block.channel_attn
    attn.proj = Wrapper(attn.proj)
    inputs = {"pixel_values": pixels(1, 64, 64), "input_ids": torch.tensor([[0, 100, 200, 2]]), "max_new_tokens": 5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = model.generate(**inputs)
        again = model.generate(**inputs)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "vision_tower.blocks.0.0.channel_block.channel_attn.proj" in messages[0]
    assert "folded_channel_attention" in messages[0] and "stay off" in messages[0]
    with torch.no_grad():  # what stayed on still ran; the wrapper was not skipped
        reference = model.generate(**inputs, kernels=False)
    assert torch.equal(fast, again) and torch.equal(fast, reference)
    with pytest.raises(KernelError, match=r"channel_attn\.proj"):
        model.generate(**inputs, kernels=True)


def test_lora_layers():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    config = peft.LoraConfig(r=2, target_modules=r".*\.(qkv|fc2|q_proj)", init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, model)
    with pytest.raises(KernelError, match=r"folded_channel_attention: vision_tower\.blocks\.0\.0\.channel_block"
                                          r"\.channel_attn\.qkv \(peft\.tuners\.lora\.layer\.Linear\)"):
        kernels.use(model, "inference")
    with pytest.warns(UserWarning, match="kernels stay off"):
        refused = kernels.use(model, "inference", strict=False)
    assert set(refused) == {"folded_channel_attention"}  # the text layers' base Linear still multiplies few rows
    inputs = {"pixel_values": pixels(1, 64, 64), "input_ids": torch.tensor([[0, 100, 200, 2]]),
              "labels": torch.tensor([[7, 8, 2]])}
    with torch.no_grad():
        fast = model(**inputs).logits
        kernels.use(model, None)
        reference = model(**inputs).logits
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)  # the adapters took part on both paths


def test_forced_steps_force_their_tokens():
    """A forced step still runs the LM head (the step is one graph, the same at every position: generate.py); the
    forcing replaces its scores."""
    from florence2 import generate as generation

    model = Florence2.from_config(PRESETS["tiny"], seed=0).eval()
    ids = torch.tensor([[0, 100, 200, 2]])
    out = generation.generate(model, pixel_values=pixels(1, 64, 64, seed=2), input_ids=ids, max_new_tokens=6,
                              min_new_tokens=6, num_beams=1, forced_bos_token_id=0, forced_eos_token_id=2)
    assert out.shape == (1, 7) and out[0, 1] == 0 and out[0, -1] == 2
