"""An exported folder under onnxruntime: its four graphs, and greedy decoding with this package's rules.

    model = OnnxFlorence2("exports/base-ft")                    # onnx/*.onnx; variant="int8": *_quantized.onnx
    processor = Florence2Processor.from_pretrained("exports/base-ft")
    ids = model.generate(**processor(text="<OD>", images=image))   # the tokens model.generate(num_beams=1) gives
    processor.batch_decode(ids, skip_special_tokens=False)

The loop is the one transformers.js runs: the image and prompt are encoded once, the first decoder step goes with
an empty past (`use_cache_branch` false), every later step feeds one token per sequence with the past of the
previous step; the encoder keys/values are kept from the first. The token choice is `generate`'s: the same
no-repeat-n-gram ban, minimum length and forced first and last tokens, then argmax.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import read_config
from ..generate import GenerateOptions, _process
from . import VARIANTS, require_export_extra
from .graphs import DECODER, EMBED, ENCODER, GRAPHS, VISION, past_names


class OnnxFlorence2:
    """The graphs of an exported folder as onnxruntime sessions (CPU unless `providers` says otherwise)."""

    def __init__(self, folder: str | os.PathLike, variant: str = "fp32", providers: list | None = None,
                 session_options=None):
        require_export_extra()
        import onnxruntime as ort

        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.folder = Path(folder)
        self.config, _ = read_config(self.folder)
        files = {name: self.folder / "onnx" / f"{name}{VARIANTS[variant]}.onnx" for name in GRAPHS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder} has no {variant} export: missing {', '.join(missing)}")
        self.sessions = {name: ort.InferenceSession(str(f), sess_options=session_options,
                                                    providers=providers or ["CPUExecutionProvider"])
                         for name, f in files.items()}
        self.past_inputs = past_names(self.config.text.decoder_layers)
        self.present_outputs = past_names(self.config.text.decoder_layers, "present")
        shapes = {i.name: i.shape for i in self.sessions[DECODER].get_inputs()}
        self.past_shapes = {name: shapes[name] for name in self.past_inputs}  # [batch_size, heads, length, size]

    def run(self, graph: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """One graph on numpy inputs -> its outputs by name."""
        session = self.sessions[graph]
        values = session.run(None, feeds)
        return {o.name: v for o, v in zip(session.get_outputs(), values)}

    def encode(self, pixel_values, input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Image and prompt -> the encoder output (B, S, d) and its mask (B, S) int64, image tokens first."""
        pixels, ids = _numpy(pixel_values, np.float32), _numpy(input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask, np.int64)
        image = self.run(VISION, pixel_values=pixels)["image_features"]
        prompt = self.run(EMBED, input_ids=ids)["inputs_embeds"]
        embeds = np.concatenate([image, prompt], axis=1)
        mask = np.concatenate([np.ones(image.shape[:2], dtype=np.int64), mask], axis=1)
        return self.run(ENCODER, inputs_embeds=embeds, attention_mask=mask)["last_hidden_state"], mask

    def step(self, tokens: np.ndarray, encoder_out: np.ndarray, encoder_mask: np.ndarray,
             past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Decoder tokens (N, T) after `past` (None: the first step) -> logits (N, T, vocab) and the next past."""
        feeds = {"inputs_embeds": self.run(EMBED, input_ids=tokens)["inputs_embeds"],
                 "encoder_attention_mask": encoder_mask, "encoder_hidden_states": encoder_out}
        if past is None:  # empty, as transformers.js makes it: every symbolic axis but the batch of length 0
            for name, shape in self.past_shapes.items():
                dims = [tokens.shape[0] if d == "batch_size" else d if isinstance(d, int) else 0 for d in shape]
                feeds[name] = np.zeros(dims, dtype=np.float32)
        else:
            feeds.update(past)
        feeds["use_cache_branch"] = np.array([past is not None])
        out = self.run(DECODER, **feeds)
        present = {p: out[o] for p, o in zip(self.past_inputs, self.present_outputs)}
        if past is not None:  # the encoder keys/values of the first step
            present.update({name: past[name] for name in self.past_inputs if ".encoder." in name})
        return out["logits"], present

    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 **options) -> torch.Tensor:
        """Greedy decoding -> a LongTensor (B, L) that starts with the decoder start token and is right-padded, as
        `Florence2.generate(..., num_beams=1)` returns it. Options: no_repeat_ngram_size, min_new_tokens,
        forced_bos_token_id, forced_eos_token_id (defaults: the checkpoint's)."""
        opts = GenerateOptions.from_model(self.config, max_new_tokens=max_new_tokens, **{"num_beams": 1, **options})
        if opts.num_beams != 1 or opts.do_sample or opts.num_return_sequences != 1:
            raise ValueError("OnnxFlorence2.generate decodes greedily: num_beams=1, no sampling, one sequence")
        text = self.config.text
        encoder_out, mask = self.encode(pixel_values, input_ids, attention_mask)
        B, max_length = encoder_out.shape[0], opts.max_new_tokens + 1
        sequences = torch.full((B, max_length), text.pad_token_id, dtype=torch.long)
        sequences[:, 0] = text.decoder_start_token_id
        unfinished = torch.ones(B, dtype=torch.bool)
        past, cur_len = None, 1
        while cur_len < max_length:
            logits, past = self.step(sequences[:, cur_len - 1:cur_len].numpy(), encoder_out, mask, past)
            scores = _process(torch.from_numpy(logits[:, -1]).float(), sequences, torch.tensor([cur_len]), opts,
                              text.eos_token_id, max_length)
            next_tokens = torch.where(unfinished, scores.argmax(dim=-1), text.pad_token_id)
            sequences[:, cur_len] = next_tokens
            cur_len += 1
            unfinished &= next_tokens != text.eos_token_id
            if not unfinished.any():
                break
        return sequences[:, :cur_len]


def _numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=dtype)
