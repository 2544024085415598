"""Generation for Florence-2: greedy, sampling and beam search over a KV-cached decoder.

Token for token the decoding of the original, whose `generate` is transformers' encoder-decoder generate with the
defaults of `text_config`: 3 beams, no repeated 3-grams, early stopping, `<s>` forced first, `</s>` forced at the
last position, length penalty 1.0. The beam search keeps transformers' bookkeeping exactly (2 * num_beams
candidates per step, finished hypotheses scored by sum of log-probs / generated_length ** length_penalty, the
same early-stopping heuristics), so ties and stopping fall the same way.

The image and the prompt are encoded once per call. The decoder step (`decode_step`) feeds one token per sequence
against a cache of fixed size (self-attention keys/values written at explicit positions, cross-attention keys/values
computed once), so its shapes do not change from step to step and it can be compiled with `torch.compile`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import GENERATION_KEYS, TextConfig, check_decoding
from .kernels import using as using_kernels


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 1024  # the original silently stops at 20 tokens when this is not given
    # (a model with a smaller decoder position table defaults to the size of its table)
    min_new_tokens: int = 0
    # The decoding settings (GENERATION_KEYS): a model's generate takes them from its text_config.
    num_beams: int = TextConfig.num_beams
    no_repeat_ngram_size: int = TextConfig.no_repeat_ngram_size  # 0 disables
    early_stopping: bool | str = TextConfig.early_stopping  # True, False or "never", as in transformers
    length_penalty: float = TextConfig.length_penalty
    forced_bos_token_id: int | None = TextConfig.forced_bos_token_id  # forced first; None disables
    forced_eos_token_id: int | None = TextConfig.forced_eos_token_id  # forced at the last position; None disables
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # sampling only; 0 disables
    top_p: float = 1.0  # sampling only
    seed: int | None = None  # sampling only: a private generator, so the global RNG is left alone
    return_scores: bool = False  # also return per-token log-probs (detection confidences use them)

    @classmethod
    def from_model(cls, config, **overrides) -> GenerateOptions:
        """The checkpoint's defaults (text_config), then the caller's options."""
        text = config.text
        defaults = cls(**{key: getattr(text, key) for key in GENERATION_KEYS})
        if overrides.get("max_new_tokens", None) is None:
            overrides["max_new_tokens"] = min(cls.max_new_tokens, text.max_position_embeddings)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown generate option(s) {unknown}; known options: {sorted(known)}")
        options = dataclasses.replace(defaults, **overrides)
        options.validate(text)
        return options

    def validate(self, text) -> None:
        check_decoding(self, text.vocab_size)  # what text_config checks of the same settings
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens > text.max_position_embeddings:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} exceeds the decoder's position table "
                             f"({text.max_position_embeddings} positions)")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens, got {self.min_new_tokens!r}")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams "
                             f"({self.num_beams})")
        if self.num_beams == 1 and self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError("greedy decoding returns one sequence per prompt: use num_beams >= "
                             "num_return_sequences or do_sample=True")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (N, L) start token 2 first, right-padded with pad 1
    scores: torch.Tensor  # (N, L - 1) log-prob of each generated token under the processed distribution; 0 on padding
    sequence_scores: torch.Tensor  # (N,) beam score (sum of log-probs / length ** length_penalty); greedy: sum


@torch.no_grad()
def generate(model, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None, *,
             vision_features: torch.Tensor | None = None, kernels: bool | None = None,
             **options) -> torch.Tensor | GenerateOutput:
    """Generate for a batch of (image, prompt) pairs.

    Options (defaults from the checkpoint's text_config where it has them): num_beams, no_repeat_ngram_size,
    early_stopping, length_penalty, min_new_tokens, forced_bos_token_id, forced_eos_token_id, num_return_sequences,
    do_sample, temperature, top_k, top_p, seed, return_scores.

    `kernels`: None (default) runs the inference kernels (florence2.kernels.INFERENCE) where the layers allow them
    and the reference math, with one warning naming them, where layers are wrapped (LoRA, FSDP); True asks for them
    (wrapped layers raise KernelError); False runs the reference math alone. The kernels set before the call are
    back after it.

    Returns a LongTensor (B * num_return_sequences, L) of sequences that start with the decoder start token and are
    right-padded with the pad token; with return_scores=True a GenerateOutput that also holds per-token scores.
    """
    opts = GenerateOptions.from_model(model.config, max_new_tokens=max_new_tokens, **options)
    if input_ids is None:
        raise ValueError("input_ids is required (the tokenized prompt; Florence2Processor makes it)")
    if kernels not in (None, True, False):
        raise ValueError(f"kernels must be None (the default), True or False, got {kernels!r}")
    was_training = model.training
    model.eval()
    try:
        with using_kernels(model, None if kernels is False else "inference", strict=kernels is True):
            encoder_out, encoder_mask = model.encode(input_ids, attention_mask, pixel_values, vision_features)
            if opts.num_beams > 1:
                return _beam_search(model, encoder_out, encoder_mask, opts)
            return _sample(model, encoder_out, encoder_mask, opts)
    finally:
        model.train(was_training)


def decode_step(model, tokens: torch.Tensor, position: torch.Tensor, cache, encoder_mask,
                logits: bool = True) -> torch.Tensor | None:
    """One decoder step: tokens (N, 1) at `position` (1,) -> next-token logits (N, vocab) float32. With
    logits=False only the cache is written (the LM head, a third of a step, is skipped)."""
    lm = model.language_model
    h = lm.decoder(lm.embed(tokens), None, encoder_mask, cache, position)
    return lm.logits(h[:, -1]) if logits else None


class _Decoder:
    """The cached decoder for N = batch * beams sequences: step(), and reorder() for beam search."""

    def __init__(self, model, encoder_out, encoder_mask, copies: int, max_length: int):
        self.model = model
        self.cache = model.language_model.new_cache(encoder_out, max_length)
        for layer in self.cache:  # cross keys/values are per image: computed once, shared by the copies
            layer.cross_k = layer.cross_k.repeat_interleave(copies, dim=0)
            layer.cross_v = layer.cross_v.repeat_interleave(copies, dim=0)
            layer.k = layer.k.repeat_interleave(copies, dim=0)
            layer.v = layer.v.repeat_interleave(copies, dim=0)
        self.encoder_mask = None if encoder_mask is None else encoder_mask.repeat_interleave(copies, dim=0)

    def step(self, tokens: torch.Tensor, position: int, logits: bool = True) -> torch.Tensor | None:
        pos = torch.tensor([position], device=tokens.device)
        return decode_step(self.model, tokens[:, None], pos, self.cache, self.encoder_mask, logits)

    def reorder(self, source: torch.Tensor) -> None:
        for layer in self.cache:
            layer.k.copy_(layer.k.index_select(0, source))
            layer.v.copy_(layer.v.index_select(0, source))


def _forced_token(cur_len: int, max_length: int, opts: GenerateOptions) -> int | None:
    """The token forced at this step (<s> first, </s> last), if any: the model's scores do not matter then."""
    for token, at in ((opts.forced_bos_token_id, 1), (opts.forced_eos_token_id, max_length - 1)):
        if token is not None and cur_len == at:
            return token
    return None


def _forced_scores(token: int, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """What the forcing processor leaves of any scores: 0 for the forced token, -inf elsewhere."""
    forced = torch.full((rows, vocab), -float("inf"), device=device)
    forced[:, token] = 0.0
    return forced


def _process(scores: torch.Tensor, sequences: torch.Tensor, cur_len: int, opts: GenerateOptions,
             eos: int) -> torch.Tensor:
    """The logits processors of transformers' generate, in its order, for the options Florence-2 uses, at a step
    that forces no token (the forcing processor comes last and overrides the others: see `_forced_scores`).
    scores (N, V), sequences (N, >= cur_len) of which the first cur_len tokens are filled."""
    n = opts.no_repeat_ngram_size
    if n and cur_len + 1 >= n:
        scores = _ban_repeated_ngrams(scores, sequences[:, :cur_len], n)
    if cur_len - 1 < opts.min_new_tokens:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already in the sequence (vectorized; no Python loop
    over the sequence)."""
    if n == 1:
        banned = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, sequences, True)
        return scores.masked_fill(banned, -float("inf"))
    prefixes = sequences.unfold(1, n - 1, 1)[:, :-1]  # (N, L - n + 1, n - 1): every earlier (n-1)-gram
    matches = (prefixes == sequences[:, None, -(n - 1):]).all(dim=-1)  # followed by a token: the ban candidates
    followers = sequences[:, n - 1:]  # (N, L - n + 1) the token after each prefix
    # accumulate: with duplicate followers a plain scatter_ could let a False overwrite a True
    banned = torch.zeros_like(scores).scatter_add_(1, followers, matches.to(scores.dtype)) > 0
    return scores.masked_fill(banned, -float("inf"))


def _warp(scores: torch.Tensor, opts: GenerateOptions, min_keep: int) -> torch.Tensor:
    """Temperature, top-k, top-p, as transformers' sampling warpers."""
    if opts.temperature != 1.0:
        scores = scores / opts.temperature
    if opts.top_k:
        k = min(max(opts.top_k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if opts.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - opts.top_p
        remove[..., -min_keep:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def _sample(model, encoder_out, encoder_mask, opts: GenerateOptions):
    """Greedy (argmax) or sampling, one sequence per row (num_return_sequences copies when sampling)."""
    text = model.config.text
    eos, pad = text.eos_token_id, text.pad_token_id
    vocab = model.language_model.shared.weight.shape[0]
    copies = opts.num_return_sequences
    B = encoder_out.shape[0] * copies
    max_length = opts.max_new_tokens + 1
    decoder = _Decoder(model, encoder_out, encoder_mask, copies, max_length)
    device = encoder_out.device
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None
    sequences = torch.full((B, max_length), pad, dtype=torch.long, device=device)
    sequences[:, 0] = text.decoder_start_token_id
    token_scores = torch.zeros(B, max_length - 1, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    cur_len = 1
    while cur_len < max_length:
        forced = _forced_token(cur_len, max_length, opts)
        logits = decoder.step(sequences[:, cur_len - 1], cur_len - 1, logits=forced is None)
        if forced is None:
            scores = _process(logits, sequences, cur_len, opts, eos)
        else:
            scores = _forced_scores(forced, B, vocab, device)
        if opts.do_sample:
            probs = _warp(scores, opts, min_keep=1).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, pad)
        chosen = scores.log_softmax(dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
        token_scores[:, cur_len - 1] = torch.where(unfinished, chosen, 0.0)
        sequences[:, cur_len] = next_tokens
        cur_len += 1
        unfinished &= next_tokens != eos
        if not unfinished.any():
            break
    if not opts.return_scores:
        return sequences[:, :cur_len]
    return GenerateOutput(sequences[:, :cur_len], token_scores[:, :cur_len - 1], token_scores.sum(dim=1))


def _beam_search(model, encoder_out, encoder_mask, opts: GenerateOptions):
    """transformers' beam search (the vectorized version of transformers >= 4.50), step for step."""
    text = model.config.text
    eos, pad = text.eos_token_id, text.pad_token_id
    vocab = model.language_model.shared.weight.shape[0]
    batch, beams = encoder_out.shape[0], opts.num_beams
    keep = 2 * beams  # candidates per step: enough to continue num_beams beams even if all others end
    max_length = opts.max_new_tokens + 1
    device = encoder_out.device
    decoder = _Decoder(model, encoder_out, encoder_mask, beams, max_length)
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None
    neg = -1.0e9

    running = torch.full((batch, beams, max_length), pad, dtype=torch.long, device=device)
    running[:, :, 0] = text.decoder_start_token_id
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = neg  # all beams start identical: only the first may expand at step one
    running_sources = torch.full((batch, beams, max_length - 1), -1, dtype=torch.long, device=device)
    running_token_scores = torch.zeros(batch, beams, max_length - 1, device=device)
    finished = running.clone()
    finished_scores = torch.full((batch, beams), neg, device=device)
    finished_sources = running_sources.clone()
    finished_token_scores = running_token_scores.clone()
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    batch_offset = torch.arange(batch, device=device)[:, None] * beams

    cur_len = 1
    while True:
        flat = running.view(batch * beams, max_length)
        forced = _forced_token(cur_len, max_length, opts)
        logits = decoder.step(flat[:, cur_len - 1], cur_len - 1, logits=forced is None)
        if forced is None:
            log_probs = _process(logits.float().log_softmax(dim=-1), flat, cur_len, opts, eos)
        else:
            log_probs = _forced_scores(forced, batch * beams, vocab, device)
        processed = log_probs.view(batch, beams * vocab)
        accumulated = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if opts.do_sample:
            probs = _warp(accumulated, opts, min_keep=2).softmax(dim=-1)
            top_idx = torch.multinomial(probs, keep, generator=generator)
            top_scores, order = accumulated.gather(1, top_idx).sort(dim=-1, descending=True)
            top_idx = top_idx.gather(1, order)
        else:
            top_scores, top_idx = torch.topk(accumulated, keep)  # (batch, keep)
        source_beam = top_idx // vocab
        tokens = top_idx % vocab
        cand = running.gather(1, source_beam[:, :, None].expand(-1, -1, max_length)).clone()
        cand[:, :, cur_len] = tokens
        cand_sources = running_sources.gather(1, source_beam[:, :, None].expand(-1, -1, max_length - 1)).clone()
        cand_sources[:, :, cur_len - 1] = source_beam + batch_offset
        cand_token_scores = running_token_scores.gather(1, source_beam[:, :, None].expand(-1, -1, max_length - 1))
        cand_token_scores = cand_token_scores.clone()
        cand_token_scores[:, :, cur_len - 1] = processed.gather(1, top_idx)
        ends = (tokens == eos) | (cur_len + 1 >= max_length)  # (batch, keep)

        # Continue with the best num_beams candidates that did not end.
        still_running = top_scores + ends.float() * neg
        next_idx = torch.topk(still_running, beams).indices
        running = cand.gather(1, next_idx[:, :, None].expand(-1, -1, max_length))
        running_scores = still_running.gather(1, next_idx)
        running_sources = cand_sources.gather(1, next_idx[:, :, None].expand(-1, -1, max_length - 1))
        running_token_scores = cand_token_scores.gather(1, next_idx[:, :, None].expand(-1, -1, max_length - 1))

        # Candidates among the top num_beams that ended become hypotheses if they beat the finished ones.
        just_finished = ends & top_beams[None, :]
        hyp_scores = top_scores / (cur_len**opts.length_penalty)  # cur_len + 1 tokens minus the start token
        full = is_finished.all(dim=-1, keepdim=True) & (opts.early_stopping is True)
        hyp_scores = hyp_scores + full.float() * neg + (~improvable).float() * neg + (~just_finished).float() * neg
        merged_scores = torch.cat([finished_scores, hyp_scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = torch.cat([finished, cand], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        finished_scores = merged_scores.gather(1, best)
        finished_sources = torch.cat([finished_sources, cand_sources], dim=1).gather(
            1, best[:, :, None].expand(-1, -1, max_length - 1))
        finished_token_scores = torch.cat([finished_token_scores, cand_token_scores], dim=1).gather(
            1, best[:, :, None].expand(-1, -1, max_length - 1))
        is_finished = torch.cat([is_finished, just_finished], dim=1).gather(1, best)

        decoder.reorder(running_sources[:, :, cur_len - 1].reshape(-1))
        cur_len += 1
        improvable = improvable & _can_improve(running_scores, finished_scores, is_finished, cur_len, max_length,
                                               opts)
        open_beam = not (bool(is_finished.all()) and opts.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(ends.all())):
            break

    n = opts.num_return_sequences
    sequences = finished[:, :n].reshape(batch * n, max_length)
    sources = finished_sources[:, :n].reshape(batch * n, -1)
    generated = int((sources >= 0).sum(dim=1).max())
    sequences = sequences[:, :1 + generated]
    if not opts.return_scores:
        return sequences
    token_scores = finished_token_scores[:, :n].reshape(batch * n, -1)[:, :generated]
    token_scores = token_scores.masked_fill(sources[:, :generated] < 0, 0.0)
    return GenerateOutput(sequences, token_scores, finished_scores[:, :n].reshape(-1))


def _can_improve(running_scores, finished_scores, is_finished, cur_len, max_length, opts) -> torch.Tensor:
    """transformers' early-stopping heuristic: can the best running beam still beat the worst finished one?"""
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_length = max_length - 1
    else:
        best_length = cur_len - 1
    best_running = running_scores[:, :1] / (best_length ** opts.length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)
