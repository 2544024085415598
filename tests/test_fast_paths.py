"""The inference fast paths compute what the plain modules compute: DaViT's in-place blocks (bands of windows,
chunks of tokens, the folded channel attention), the left-multiplied linear of few rows, the GELU+linear that
recomputes GELU in backward, and generation that skips the LM head on forced steps."""

import pytest
import torch
import torch.nn.functional as F

from florence2 import Florence2, davit
from florence2.config import PRESETS, with_changes
from florence2.language import FEW_ROWS, linear


def tiny_tower(window_size: int = 7):
    config = with_changes(PRESETS["tiny"], vision={"window_size": window_size, "drop_path_rate": 0.0})
    model = Florence2.from_config(config, seed=3)
    for p in model.parameters():  # nonzero biases and norms everywhere, unlike the init
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.vision_tower.eval()


@pytest.mark.parametrize("small_pieces", [False, True])
def test_inplace_inference_equals_autograd_path(monkeypatch, small_pieces):
    if small_pieces:  # many bands and chunks, bands not a multiple of the window rows
        monkeypatch.setattr(davit, "BAND_TOKENS", 50)
        monkeypatch.setattr(davit, "CHUNK_FLOATS", 3000)
    tower = tiny_tower()
    pixels = torch.randn(2, 3, 200, 168, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = tower(pixels)
    reference = tower(pixels.clone().requires_grad_(True)).detach()  # autograd: the plain forward()
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)
    assert not torch.equal(fast[0], fast[1])


def test_folded_channel_attention_is_used_and_exact():
    block = davit.ChannelAttention(dim=16, num_groups=4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    tokens = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    assert block.foldable(100) and not block.foldable(32)
    weight, bias = block.folded(iter(tokens.split(30)))
    with torch.no_grad():
        expected = block(tokens.view(1, 10, 10, 16)).view(100, 16)
    torch.testing.assert_close(F.linear(tokens, weight, bias), expected, atol=1e-5, rtol=1e-5)
    block.backend = "eager"  # the reference path computes the attention literally
    assert not block.foldable(100)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
def test_linear_of_few_rows(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    assert linear(x, w, b).shape == (rows, 1, 40)


def test_gelu_linear_gradients():
    mlp = davit.Mlp(dim=6, hidden=12).double()
    x = torch.randn(4, 5, 6, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: davit._GeluLinear.apply(mlp.fc1(x), w, b),
                             (x, mlp.fc2.weight, mlp.fc2.bias))
    out = mlp(x)
    out.sum().backward()
    grads = [x.grad.clone(), mlp.fc2.weight.grad.clone(), mlp.fc1.weight.grad.clone()]
    x.grad = None
    mlp.zero_grad()
    mlp.fc2(F.gelu(mlp.fc1(x))).sum().backward()
    for got, want in zip(grads, [x.grad, mlp.fc2.weight.grad, mlp.fc1.weight.grad]):
        torch.testing.assert_close(got, want)


def test_forced_steps_skip_the_lm_head(monkeypatch):
    from florence2 import generate as generation

    model = Florence2.from_config(PRESETS["tiny"], seed=0).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 100, 200, 2]])
    heads = []
    original = model.language_model.logits
    monkeypatch.setattr(model.language_model, "logits", lambda h: heads.append(1) or original(h))
    out = generation.generate(model, pixel_values=pixels, input_ids=ids, max_new_tokens=6, min_new_tokens=6,
                              num_beams=1, forced_bos_token_id=0, forced_eos_token_id=2)
    assert out.shape == (1, 7) and out[0, 1] == 0 and out[0, -1] == 2
    assert len(heads) == 4  # 6 steps, 2 of them forced
