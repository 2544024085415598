"""The four ONNX graphs of an exported Florence-2, as transformers.js and onnx-community lay them out.

    vision_encoder        pixel_values (B, 3, H, W)                      -> image_features (B, 1 + (H/32)(W/32), d)
    embed_tokens          input_ids (B, L)                               -> inputs_embeds (B, L, d)
    encoder_model         inputs_embeds (B, S, d), attention_mask (B, S) -> last_hidden_state (B, S, d)
    decoder_model_merged  inputs_embeds (B, T, d), encoder_attention_mask (B, S), encoder_hidden_states (B, S, d),
                          past_key_values.{i}.{decoder,encoder}.{key,value} (B, heads, P | S, d/heads),
                          use_cache_branch (1,) bool
                          -> logits (B, T, vocab), present.{i}.{decoder,encoder}.{key,value}

transformers.js (`Florence2ForConditionalGeneration`, `@huggingface/transformers` 4.x) reads exactly these names:
`encode_image` runs `vision_encoder` and takes `image_features`, `encode_text` runs `embed_tokens` and takes
`inputs_embeds`; the image features go in front of the prompt's embeddings and ones in front of its mask; the
encoder (session `model`) gets `inputs_embeds` and `attention_mask`; every decoder step feeds the embedded tokens
as `inputs_embeds`, the encoder mask as `encoder_attention_mask`, and the past named after the config's
`text_config.decoder_layers` (`past_key_values.{i}.decoder.key`, ...). Before the first step it builds an empty
past from the graph's input metadata, resolving the axis named `batch_size` and setting every other symbolic axis
to 0, so the heads and head size must be fixed numbers; `use_cache_branch` is false then. After each step the
`present.*` outputs become the next past, except the encoder ones, which it keeps from the first step.

The decoder is one graph with an If node on `use_cache_branch`, as optimum merges decoders: the else branch
(first step, past empty) computes the cross-attention keys/values from `encoder_hidden_states`, the then branch
takes them from the past. Both branches are our `Decoder` itself: a `LayerCache` per layer whose self-attention
buffer is the past with room for the new tokens, written at positions past_length + 0..T-1. The weights are stored
once, outside the branches.

Tracing uses torch's TorchScript-based exporter (`dynamo=False`), as optimum does: the torch.export-based one took
20-30 s per graph of the tiny test model on this machine, ten times as long. The traced graphs are checked against
the model in tests/test_export.py, at other batch sizes and lengths than the ones traced.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..language import LayerCache

OPSET = 17  # LayerNormalization is an ONNX op from 17 on; onnxruntime-web and -node run it
VISION, EMBED, ENCODER, DECODER = "vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged"
GRAPHS = (VISION, EMBED, ENCODER, DECODER)
# Example sizes of the traces (every axis they set is dynamic in the graphs).
TRACE_BATCH = 2
TRACE_LENGTH = 33


def past_names(layers: int, prefix: str = "past_key_values") -> list[str]:
    """The names of the decoder's past (or, with prefix "present", its outputs), in graph order."""
    return [f"{prefix}.{i}.{side}.{kv}" for i in range(layers) for side in ("decoder", "encoder")
            for kv in ("key", "value")]


# --------------------------------------------------------------------------------------------- the modules
class VisionEncoder(nn.Module):
    """pixel_values -> image tokens: the DaViT tower and the projection of `Florence2.encode_image`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class EmbedTokens(nn.Module):
    """input_ids -> the (scaled) token embeddings the encoder and the decoder read."""

    def __init__(self, model):
        super().__init__()
        self.language_model = model.language_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)


class TextEncoder(nn.Module):
    """[image tokens, prompt embeddings] and their mask -> the encoder output."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.language_model.encoder

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds, attention_mask.bool())


class DecoderStep(nn.Module):
    """T new tokens against the past: logits and the present keys/values, as tensors in and out.

    with_past=False: the first step; the cross-attention keys/values come from `encoder_hidden_states`.
    with_past=True: `past` holds, per layer, the self-attention keys/values of the P tokens so far and the
    cross-attention keys/values of the first step."""

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.language_model = model.language_model
        self.with_past = with_past

    def forward(self, inputs_embeds: torch.Tensor, encoder_attention_mask: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None, *past: torch.Tensor):
        lm = self.language_model
        B, T, _ = inputs_embeds.shape
        cache = []
        for i, layer in enumerate(lm.decoder.layers):
            if self.with_past:
                past_k, past_v, cross_k, cross_v = past[4 * i:4 * i + 4]
            else:
                cross_k, cross_v = layer.encoder_attn.project_kv(encoder_hidden_states)
                past_k = past_v = cross_k.new_zeros(B, cross_k.shape[1], 0, cross_k.shape[3])
            room = past_k.new_zeros(B, past_k.shape[1], T, past_k.shape[3])  # written by the layer
            cache.append(LayerCache(torch.cat([past_k, room], dim=2), torch.cat([past_v, room], dim=2),
                                    cross_k, cross_v))
        positions = torch.arange(T, device=inputs_embeds.device) + (cache[0].k.shape[2] - T)
        h = lm.decoder(inputs_embeds, None, encoder_attention_mask.bool(), cache, positions)
        present = [t for c in cache for t in (c.k, c.v, c.cross_k, c.cross_v)]
        return (lm.logits(h), *present)


# --------------------------------------------------------------------------------------------- tracing
def interface(config, image_size: tuple[int, int]) -> dict[str, dict[str, list[int | str]]]:
    """The inputs and outputs of each graph with their shapes: fixed sizes as numbers, dynamic axes by name."""
    text = config.text
    d, heads, layers = text.d_model, text.decoder_attention_heads, text.decoder_layers
    image_tokens = config.vision.grid_size(image_size[0]) * config.vision.grid_size(image_size[1]) + 1
    enc = ["batch_size", "encoder_sequence_length"]
    decoder = {"inputs_embeds": ["batch_size", "decoder_sequence_length", d], "encoder_attention_mask": enc,
               "encoder_hidden_states": [*enc, d]}
    for prefix, length in (("past_key_values", "past_decoder_sequence_length"),
                           ("present", "present_decoder_sequence_length")):
        for name in past_names(layers, prefix):
            side = "encoder_sequence_length_out" if ".encoder." in name else length
            decoder[name] = ["batch_size", heads, side, d // heads]
        if prefix == "past_key_values":
            decoder["use_cache_branch"] = [1]
            decoder["logits"] = ["batch_size", "decoder_sequence_length", text.vocab_size]
    return {
        VISION: {"pixel_values": ["batch_size", 3, *image_size], "image_features": ["batch_size", image_tokens, d]},
        EMBED: {"input_ids": ["batch_size", "sequence_length"], "inputs_embeds": ["batch_size", "sequence_length", d]},
        ENCODER: {"inputs_embeds": [*enc, d], "attention_mask": enc, "last_hidden_state": [*enc, d]},
        DECODER: decoder,
    }


def export_graphs(model, folder: Path, image_size: tuple[int, int]) -> dict[str, Path]:
    """Trace the four graphs of `model` (fp32, eval) into `folder` -> {name: path of the .onnx file}. The traces
    hold the reference math: every kernel is off while they run (the in-place vision kernel loops over the batch,
    which a trace would bake in for the example's batch size)."""
    with kernels.using(model, None):
        return _export_graphs(model, folder, image_size)


def _export_graphs(model, folder: Path, image_size: tuple[int, int]) -> dict[str, Path]:
    import onnx

    shapes = interface(model.config, image_size)
    text = model.config.text
    layers = text.decoder_layers
    g = torch.Generator().manual_seed(0)

    def example(name: str, graph: str = DECODER, **sizes) -> torch.Tensor:
        dims = [sizes.get(n, n) for n in shapes[graph][name]]
        if "mask" in name:
            return torch.ones(dims, dtype=torch.long)
        if name == "input_ids":
            return torch.randint(0, text.vocab_size, dims, generator=g)
        return torch.randn(dims, generator=g)

    # example sizes only, all of them dynamic axes
    sizes = {"batch_size": TRACE_BATCH, "sequence_length": TRACE_LENGTH, "decoder_sequence_length": TRACE_LENGTH,
             "encoder_sequence_length": shapes[VISION]["image_features"][1] + TRACE_LENGTH,
             "past_decoder_sequence_length": 3}
    sizes["encoder_sequence_length_out"] = sizes["encoder_sequence_length"]
    past = [example(name, **sizes) for name in past_names(layers)]
    decoder_inputs = ["inputs_embeds", "encoder_attention_mask"]
    jobs = [
        (VISION, VisionEncoder(model), ["pixel_values"], ["image_features"]),
        (EMBED, EmbedTokens(model), ["input_ids"], ["inputs_embeds"]),
        (ENCODER, TextEncoder(model), ["inputs_embeds", "attention_mask"], ["last_hidden_state"]),
        ("decoder_no_past", DecoderStep(model, with_past=False), [*decoder_inputs, "encoder_hidden_states"], None),
        ("decoder_with_past", DecoderStep(model, with_past=True), [*decoder_inputs, *past_names(layers)], None),
    ]
    paths = {}
    for name, module, inputs, outputs in jobs:
        graph = name if name in shapes else DECODER
        outputs = outputs or ["logits", *past_names(layers, "present")]
        args = [example(i, graph, **sizes) if not i.startswith("past_") else None for i in inputs]
        if name == "decoder_with_past":
            args = [*args[:2], None, *past]
        axes = {n: {i: a for i, a in enumerate(shapes[graph][n]) if isinstance(a, str)} for n in [*inputs, *outputs]}
        paths[name] = folder / f"{name}.onnx"
        _trace(module, tuple(args), paths[name], inputs, outputs, axes)
    no_past, with_past = paths.pop("decoder_no_past"), paths.pop("decoder_with_past")
    paths[DECODER] = folder / f"{DECODER}.onnx"
    onnx.save(merge_decoders(onnx.load(str(no_past)), onnx.load(str(with_past)), layers), str(paths[DECODER]))
    no_past.unlink()
    with_past.unlink()
    for name, path in paths.items():
        model_proto = onnx.load(str(path))
        set_shapes(model_proto.graph, shapes[name])
        onnx.checker.check_model(model_proto)
        onnx.save(model_proto, str(path))
    return paths


def _trace(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
           axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings on Python conditions over fixed sizes (window padding, head size) and the exporter's
        # deprecation notice: the graphs are checked against the model in the tests, not by these warnings.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def set_shapes(graph, shapes: dict[str, list[int | str]]) -> None:
    """Declare the shapes of the graph's inputs and outputs: numbers fixed, names symbolic."""
    for value in [*graph.input, *graph.output]:
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in shapes[value.name]:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


# ---------------------------------------------------------------------------------------------- merging
def merge_decoders(no_past, with_past, layers: int):
    """One decoder graph: If(use_cache_branch) then `with_past` else `no_past`. Both must have the same outputs.
    Their weights are stored once, in the outer graph (equal tensors become one); their inputs become the outer
    graph's inputs, which the branches read from the outer scope."""
    import onnx
    from onnx import TensorProto, helper

    if [o.name for o in with_past.graph.output] != [o.name for o in no_past.graph.output]:
        raise ValueError("the two decoder graphs must have the same outputs")
    shared, names = {}, set()  # content -> the outer initializer; the names taken
    branches = []
    for model, tag in ((with_past, "with_past"), (no_past, "no_past")):
        graph = model.graph
        if any(a.type == onnx.AttributeProto.GRAPH for n in graph.node for a in n.attribute):
            raise ValueError(f"the {tag} decoder graph has subgraphs, which the merge does not handle")
        outer = {i.name for i in graph.input}
        local = {}
        for tensor in graph.initializer:
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.SerializeToString(
                deterministic=True) if not tensor.raw_data else tensor.raw_data).hexdigest())
            if key not in shared:
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = tensor.name if tensor.name not in names else f"{tag}/{tensor.name}"
                names.add(copy.name)
                shared[key] = copy
            local[tensor.name] = shared[key].name

        def rename(name, local=local, outer=outer, tag=tag):
            if not name or name in outer:
                return name  # an input of the merged graph (or an omitted optional input)
            return local.get(name, f"{tag}/{name}")

        nodes = []
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{tag}/{node.name}"
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            nodes.append(copy)
        outputs = []
        for value in graph.output:  # element types only: the branches' shapes differ, the If output declares them
            outputs.append(helper.make_tensor_value_info(rename(value.name), value.type.tensor_type.elem_type, None))
        branches.append(helper.make_graph(nodes, tag, [], outputs))

    by_name = {i.name: i for model in (no_past, with_past) for i in model.graph.input}
    order = ["inputs_embeds", "encoder_attention_mask", "encoder_hidden_states", *past_names(layers)]
    inputs = [by_name[name] for name in order]
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in no_past.graph.output]
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in outputs], name="use_cache_branch",
                            then_branch=branches[0], else_branch=branches[1])
    graph = helper.make_graph([node], DECODER, inputs, outputs, list(shared.values()))
    merged = helper.make_model(graph, opset_imports=list(no_past.opset_import), producer_name="florence2")
    merged.ir_version = no_past.ir_version
    return merged


# --------------------------------------------------------------------------------------------- variants
def quantize_int8(path: Path, folder: Path) -> Path:
    """`path` with int8 weights (onnxruntime's dynamic quantization): the weights of the matrix products and the
    embedding tables are stored as int8 with a scale, the activations are quantized on the fly. Convolutions (the
    DaViT patch embeddings and depth-wise convs, a few percent of the weights) stay float32: ConvInteger runs only
    on onnxruntime's CPU kernels, not under WebGPU. The graph is first simplified by onnxruntime's basic, provider-
    independent optimizations (constant folding, shared subexpressions), as its quantization guide recommends.
    -> the path of the new file in `folder`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    simplified, target = folder / f"{path.stem}_simplified.onnx", folder / f"{path.stem}_int8.onnx"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer's advice, logged on the root logger for every graph
    try:
        quant_pre_process(str(path), str(simplified), skip_symbolic_shape=True)
        quantize_dynamic(simplified, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                         # MatMulConstBOnly: only products with a weight (not q @ k^T); EnableSubgraph: the branches
                         extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    finally:
        logging.disable(previous)
    simplified.unlink()
    quantized = onnx.load(str(target))
    _drop_value_info(quantized.graph)  # inferred intermediate shapes: redundant, 5-10% of a small graph's file
    used = _domains(quantized.graph)  # the optimizer declares every domain it knows; keep the ones in use
    kept = [o for o in quantized.opset_import if (o.domain or "ai.onnx") in used or not o.domain]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    onnx.save(quantized, str(target))
    return target


def to_fp16(path: Path, folder: Path) -> Path:
    """`path` in float16 (weights and arithmetic), its inputs and outputs kept float32, so that the graphs take
    the processor's pixels and feed each other as the float32 ones do. -> the path of the new file in `folder`."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = folder / f"{path.stem}_fp16.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values clamped to the float16 range: checked against fp32 in the tests
        half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True)
    onnx.save(half, str(target))
    return target


def _domains(graph) -> set[str]:
    used = set()
    for node in graph.node:
        used.add(node.domain or "ai.onnx")
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                used |= _domains(attribute.g)
    return used


def _drop_value_info(graph) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                _drop_value_info(attribute.g)
