"""LoRA adapters trained elsewhere (peft, on Microsoft's remote code or on transformers' own Florence-2), merged
into the weights on load: `Florence2.from_pretrained(base, adapter=PATH)`.

An adapter folder is what `PeftModel.save_pretrained` writes: `adapter_config.json` and `adapter_model.safetensors`
(or `adapter_model.bin`), with tensors named after the modules of the model it was trained on:

    base_model.model.language_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight   (Microsoft's)
    base_model.model.model.language_model.encoder.layers.0.self_attn.q_proj.lora_B.weight   (transformers')

Each module name is placed through the key table (`weights.KEY_MAP`, either layout, or ours) and merged as peft
merges it: W + scale * B @ A (convolutions: B @ A over the flattened kernel), scale = lora_alpha / r, or
lora_alpha / sqrt(r) with `use_rslora`, r and lora_alpha taken per module from `rank_pattern` / `alpha_pattern` as
peft matches them (the pattern is a suffix of the module name, at a dot). `lora_bias` adds scale * B's bias to the
layer's bias. Whole tensors saved beside the LoRA weights (`bias="all"`, `modules_to_save`) replace the model's.

Refused, with one error that lists every problem: module names the table cannot place, tensors of the wrong
shape, LoRA on the tied token embedding or on the LM head (its weight is that embedding, so no merge into the one
tensor reproduces the adapter), and the variants a merge cannot reproduce (DoRA, activated LoRA, LoRA on raw
parameters, trainable tokens, adapters whose initialization changed the base weights).
"""

from __future__ import annotations

import math
import os
import re

import torch

from . import weights
from .config import read_json
from .hub import fetch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's names
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_UNSUPPORTED_TENSORS = {  # peft tensor names -> what they are
    "lora_embedding_A": "LoRA on an embedding", "lora_embedding_B": "LoRA on an embedding",
    "lora_magnitude_vector": "DoRA (use_dora)",
}
# adapter_config.json keys that change the computation in a way no merge reproduces: key -> (what, is it set?)
_UNSUPPORTED_CONFIG = {
    "use_dora": ("DoRA (weight-decomposed LoRA)", bool),
    "alora_invocation_tokens": ("activated LoRA (alora_invocation_tokens)", lambda v: v is not None),
    "target_parameters": ("LoRA on raw parameters (target_parameters)", bool),
    "trainable_token_indices": ("trainable tokens (trainable_token_indices)", lambda v: v is not None),
    "layer_replication": ("layer replication", bool),
    "use_qalora": ("QA-LoRA", bool),
    "fan_in_fan_out": ("fan_in_fan_out (Conv1D layers, which Florence-2 does not have)", bool),
}
# init_lora_weights values that rewrite the base weights when the adapter is created: the saved adapter only fits
# those rewritten weights unless it was saved converted (peft's path_initial_model_for_weight_conversion)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class AdapterError(weights.CheckpointError):
    """An adapter that cannot be merged as it is."""


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors, from a folder (or a hub repo id, downloaded)."""
    config_file = fetch(path, ADAPTER_CONFIG)
    if config_file is None:
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}: not a peft adapter folder")
    config = read_json(config_file)  # ConfigError naming the file when it is broken
    for name in ADAPTER_WEIGHTS:
        file = fetch(path, name)
        if file is not None:
            return config, weights.read_weights([file])
    raise AdapterError(f"no adapter weights in {path}: expected {' or '.join(ADAPTER_WEIGHTS)}")


def merge_adapter(state: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our state dict (our names) with the adapter at `path` merged in. Merged tensors are float32 (W in float32
    plus the update), for the caller to cast once. Raises AdapterError listing every module or feature it cannot
    merge."""
    config, tensors = read_adapter(path)
    problems = _config_problems(config)
    lora, whole = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA.match(name)
        unsupported = next((what for part, what in _UNSUPPORTED_TENSORS.items() if f".{part}" in name), None)
        if unsupported:
            problems.append(f"{name}: {unsupported} is not supported")
        elif match:
            lora.setdefault(match["module"], {})[f"{match['part']}.{match['param']}"] = tensor
        else:  # a whole tensor; peft names the biases of the layers it wrapped `<layer>.base_layer.bias`
            whole[name.replace(".base_layer.", ".")] = tensor
    layout = _layout([f"{m}.weight" for m in lora] + list(whole))
    merged = dict(state)
    for name, tensor in whole.items():  # first: a LoRA layer's saved bias is the one its update adds to
        target, problem = _place(name, layout, state, whole=True)
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        if layout == "microsoft" and target in weights.TRANSPOSED_IN_MICROSOFT:
            tensor = tensor.t()
        if tensor.shape != state[target].shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, the model's {tuple(state[target].shape)}")
            continue
        merged[target] = tensor
    for module, parts in lora.items():
        target, problem = _place(f"{module}.weight", layout, state)
        if problem:
            problems.append(f"{module}: {problem}")
            continue
        a, b = parts.get("A.weight"), parts.get("B.weight")
        if a is None or b is None:
            problems.append(f"{module}: lora_{'A' if a is None else 'B'} is missing")
            continue
        rank, alpha = _pattern(config, "rank_pattern", module, config.get("r", 8)), _pattern(
            config, "alpha_pattern", module, config.get("lora_alpha", 8))
        weight = merged[target]
        if a.shape[0] != rank or b.shape[1] != rank or b.shape[0] != weight.shape[0] or (
                math.prod(a.shape[1:]) != math.prod(weight.shape[1:])) or math.prod(b.shape[2:]) != 1:
            problems.append(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make a rank-{rank} "
                            f"update of its weight {tuple(weight.shape)}")
            continue
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        merged[target] = weight.float() + (b.flatten(1).float() @ a.flatten(1).float()).view(weight.shape) * scale
        if "B.bias" in parts:
            bias = target.removesuffix(".weight") + ".bias"
            if bias not in merged:
                problems.append(f"{module}: lora_B has a bias (lora_bias) but the layer has none")
                continue
            merged[bias] = merged[bias].float() + scale * parts["B.bias"].float()
    if not lora and not whole:
        problems.append("it holds no tensors")
    if problems:
        more = f"; ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise AdapterError(f"cannot merge the adapter {path}: " + "; ".join(problems[:12]) + more)
    return merged


def _config_problems(config: dict) -> list[str]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config['peft_type']!r}: only LoRA adapters can be merged")
    for key, (what, is_set) in _UNSUPPORTED_CONFIG.items():
        if is_set(config.get(key)):
            problems.append(f"{what} is not supported")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights {config['init_lora_weights']!r} changed the base weights when the adapter "
                        "was made: save it converted to a plain LoRA (peft's path_initial_model_for_weight_conversion)")
    return problems


def _pattern(config: dict, key: str, module: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module name, after a dot."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _layout(names: list[str]) -> str:
    """The layout (ours, Microsoft's, transformers') that places most of the adapter's tensor names."""
    def placed(layout):
        return sum(_known(name, layout) for name in names)

    return max(weights.LAYOUTS, key=placed)


def _known(name: str, layout: str) -> bool:
    if layout != "ours" and name in weights.TIED_ALIASES[layout]:
        return True
    try:
        weights.rename(name, layout, "ours")
    except KeyError:
        return False
    return True


def _place(name: str, layout: str, state: dict[str, torch.Tensor], whole: bool = False) -> tuple[str | None, str]:
    """Our name for the adapter's tensor `name` -> (our name, "") or (None, why it cannot be placed)."""
    tied = name == weights.SHARED or (layout != "ours" and name in weights.TIED_ALIASES[layout])
    try:
        ours = weights.SHARED if tied else weights.rename(name, layout, "ours")
    except KeyError:
        return None, f"no such module in Florence-2 ({layout} names)"
    if ours is None or ours not in state:
        return None, f"no such tensor in the model ({layout} names)"
    if ours == weights.SHARED and not whole:
        return None, ("LoRA on the LM head or the token embedding, which are one tied tensor: merged, it would change "
                      "both, so no merge reproduces the adapter")
    if not whole and state[ours].ndim not in (2, 4):
        return None, "not a linear or convolution weight"
    return ours, ""
