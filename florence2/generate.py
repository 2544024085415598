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
        self.cache = model.language_model.new_cache(encoder_out, max_length, copies)
        self.encoder_mask = encoder_mask  # one row per image, like the cross keys/values

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


NEG = -1.0e9  # the score of what may not be chosen (transformers' beam search uses the same finite value)


@dataclass
class Hypotheses:
    """Hypotheses of every batch row, as (batch, n, ...) tensors."""

    tokens: torch.Tensor  # (batch, n, max_length): the start token, the generated tokens, then pad
    scores: torch.Tensor  # (batch, n): sum of log-probs (finished ones: / generated length ** length_penalty)
    sources: torch.Tensor  # (batch, n, max_length - 1): per step, the decoder row it grew from; -1: no step
    token_scores: torch.Tensor  # (batch, n, max_length - 1): per step, the chosen token's log-prob

    def take(self, index: torch.Tensor) -> Hypotheses:
        """The hypotheses at `index` (batch, k) of each row (new tensors)."""
        return type(self)(**{f.name: _take(getattr(self, f.name), index) for f in dataclasses.fields(self)})

    def extend(self, beam: torch.Tensor, token: torch.Tensor, scores: torch.Tensor, token_scores: torch.Tensor,
               step: int, rows: torch.Tensor) -> Hypotheses:
        """The candidates of a step: for each (batch, k) pick, the hypothesis `beam` plus `token` at `step`, grown
        from decoder row `rows` + beam, with its new total `scores` and the token's log-prob `token_scores`."""
        grown = Hypotheses(_take(self.tokens, beam), scores, _take(self.sources, beam), _take(self.token_scores, beam))
        grown.tokens[:, :, step] = token
        grown.sources[:, :, step - 1] = beam + rows
        grown.token_scores[:, :, step - 1] = token_scores
        return grown


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (batch, n, ...) at index (batch, k) along the hypotheses -> (batch, k, ...)."""
    return t.gather(1, index.view(*index.shape, *[1] * (t.ndim - 2)).expand(*index.shape, *t.shape[2:]))


@dataclass
class Finished(Hypotheses):
    """The best finished hypotheses so far: num_beams slots per row, `done` where a slot holds one."""

    done: torch.Tensor  # (batch, n) bool

    def merge(self, candidates: Hypotheses, ended: torch.Tensor, scores: torch.Tensor) -> Finished:
        """The best of these and the `ended` candidates, ranked by the candidates' final `scores` (NEG for those
        that may not enter): as many as there are slots."""
        pool = [self, Finished(candidates.tokens, scores, candidates.sources, candidates.token_scores, ended)]
        merged = Finished(**{f.name: torch.cat([getattr(h, f.name) for h in pool], dim=1)
                             for f in dataclasses.fields(self)})
        return merged.take(torch.topk(merged.scores, self.scores.shape[1]).indices)


def _beam_search(model, encoder_out, encoder_mask, opts: GenerateOptions):
    """transformers' beam search (the vectorized version of transformers >= 4.50), step for step: each step, the
    2 * num_beams best continuations of the running beams; the best num_beams of them that did not end run on,
    those among the top num_beams that ended (</s>, or the last position) enter the finished set if they beat it."""
    text = model.config.text
    vocab = model.language_model.shared.weight.shape[0]
    batch, beams = encoder_out.shape[0], opts.num_beams
    keep = 2 * beams  # candidates per step: enough to continue num_beams beams even if all others end
    max_length = opts.max_new_tokens + 1
    device = encoder_out.device
    decoder = _Decoder(model, encoder_out, encoder_mask, beams, max_length)
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None
    rows = torch.arange(batch, device=device)[:, None] * beams  # each row's first beam in the flat decoder
    top_beams = torch.arange(keep, device=device) < beams

    start = torch.full((batch, beams, max_length), text.pad_token_id, dtype=torch.long, device=device)
    start[:, :, 0] = text.decoder_start_token_id
    no_steps = torch.zeros(batch, beams, max_length - 1, device=device)
    first_only = torch.zeros(batch, beams, device=device)
    first_only[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    running = Hypotheses(start, first_only, torch.full(no_steps.shape, -1, dtype=torch.long, device=device), no_steps)
    finished = Finished(start.clone(), torch.full((batch, beams), NEG, device=device), running.sources.clone(),
                        no_steps.clone(), torch.zeros(batch, beams, dtype=torch.bool, device=device))
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    cur_len = 1
    while True:
        flat = running.tokens.view(batch * beams, max_length)
        forced = _forced_token(cur_len, max_length, opts)
        logits = decoder.step(flat[:, cur_len - 1], cur_len - 1, logits=forced is None)
        if forced is None:
            log_probs = _process(logits.float().log_softmax(dim=-1), flat, cur_len, opts, text.eos_token_id)
        else:
            log_probs = _forced_scores(forced, batch * beams, vocab, device)
        totals = (log_probs.view(batch, beams, vocab) + running.scores[:, :, None]).view(batch, -1)
        top_scores, picked = _choose(totals, keep, opts, generator)  # (batch, keep) of beam * vocab + token
        tokens = picked % vocab
        candidates = running.extend(picked // vocab, tokens, top_scores, log_probs.view(batch, -1).gather(1, picked),
                                    cur_len, rows)
        ends = (tokens == text.eos_token_id) | (cur_len + 1 >= max_length)  # (batch, keep)

        # The best num_beams candidates that did not end run on.
        still_running = dataclasses.replace(candidates, scores=top_scores + ends.float() * NEG)
        running = still_running.take(torch.topk(still_running.scores, beams).indices)

        # Those among the top num_beams that ended are finished hypotheses, if they beat the finished ones.
        length_normalized = top_scores / (cur_len**opts.length_penalty)  # cur_len + 1 tokens minus the start
        full = finished.done.all(dim=-1, keepdim=True) & (opts.early_stopping is True)
        just_finished = ends & top_beams[None, :]
        scores = length_normalized + full.float() * NEG + (~improvable).float() * NEG + (~just_finished).float() * NEG
        finished = finished.merge(candidates, just_finished, scores)

        decoder.reorder(running.sources[:, :, cur_len - 1].reshape(-1))
        cur_len += 1
        improvable = improvable & _can_improve(running, finished, cur_len, max_length, opts)
        open_beam = not (bool(finished.done.all()) and opts.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(ends.all())):
            break
    return _best(finished, opts)


def _choose(totals: torch.Tensor, keep: int, opts: GenerateOptions, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` best of the (batch, beams * vocab) continuation scores, or with do_sample `keep` drawn from the
    warped distribution, best first: (scores, indices), each (batch, keep)."""
    if not opts.do_sample:
        return torch.topk(totals, keep)
    picked = torch.multinomial(_warp(totals, opts, min_keep=2).softmax(dim=-1), keep, generator=generator)
    scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
    return scores, picked.gather(1, order)


def _can_improve(running: Hypotheses, finished: Finished, cur_len: int, max_length: int,
                 opts: GenerateOptions) -> torch.Tensor:
    """transformers' early-stopping heuristic: can the best running beam still beat the worst finished one?"""
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_length = max_length - 1
    else:
        best_length = cur_len - 1
    best_running = running.scores[:, :1] / (best_length ** opts.length_penalty)
    worst_finished = torch.where(finished.done, finished.scores.min(dim=1, keepdim=True).values, NEG)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)


def _best(finished: Finished, opts: GenerateOptions) -> torch.Tensor | GenerateOutput:
    """The num_return_sequences best finished hypotheses of each row, cut to the longest generation."""
    n = opts.num_return_sequences
    batch, _, max_length = finished.tokens.shape
    sequences = finished.tokens[:, :n].reshape(batch * n, max_length)
    sources = finished.sources[:, :n].reshape(batch * n, -1)
    generated = int((sources >= 0).sum(dim=1).max())
    sequences = sequences[:, :1 + generated]
    if not opts.return_scores:
        return sequences
    token_scores = finished.token_scores[:, :n].reshape(batch * n, -1)[:, :generated]
    token_scores = token_scores.masked_fill(sources[:, :generated] < 0, 0.0)
    return GenerateOutput(sequences, token_scores, finished.scores[:, :n].reshape(-1))
