"""LoRA through `peft`, merged into the weights when saving.

The adapters go on the language model's linear layers by default (q_proj, k_proj, v_proj, out_proj, fc1, fc2 of
the encoder and decoder); with --train-vision also on DaViT's (qkv, proj, fc1, fc2). Checkpoints hold the merged
weights (W + scale * B @ A), so `Florence2.from_pretrained(checkpoint)` loads the fine-tune as an ordinary model,
and the adapter weights alone (`adapter.safetensors`) so that training can resume on the unmerged base.

Note: peft itself imports transformers; only this optional path does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ADAPTER_FILE = "adapter.safetensors"


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
             include_vision: bool) -> torch.nn.Module:
    """Wrap the chosen nn.Linear layers with LoRA adapters, in place; only the adapters are trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError('--lora needs the peft package: pip install -e ".[lora]"') from None
    scope = r".*" if include_vision else r"language_model\..*"
    pattern = scope + r"\.(" + "|".join(targets) + r")"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    model.requires_grad_(False)
    model = inject_adapter_in_model(config, model)
    adapted = [n for n, p in model.named_parameters() if "lora_" in n]
    if not adapted:
        raise ValueError(f"--lora-target-modules {list(targets)} matched no linear layer of the model")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in, under the plain names (no base_layer / lora_ keys)."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            layer, leaf = name.split(".base_layer.")
            if leaf == "weight":
                a = state[f"{layer}.lora_A.default.weight"].float()
                b = state[f"{layer}.lora_B.default.weight"].float()
                tensor = (tensor.float() + scale * (b @ a)).to(tensor.dtype)
            name = f"{layer}.{leaf}"
        merged[name] = tensor
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items() if ".lora_" in k}


def load_adapter(model: torch.nn.Module, checkpoint: Path) -> None:
    saved = load_file(checkpoint / ADAPTER_FILE)
    missing, unexpected = model.load_state_dict(saved, strict=False)
    lora_missing = [k for k in missing if ".lora_" in k]
    if lora_missing or unexpected:
        raise ValueError(f"{checkpoint / ADAPTER_FILE} does not match this LoRA setup: missing {lora_missing[:5]}, "
                         f"unexpected {unexpected[:5]} (use the same --lora-* flags as the run you resume)")
