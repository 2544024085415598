"""Generation for Florence-2: greedy, sampling and beam search over a KV-cached decoder.

Token for token the decoding of the original, whose `generate` is transformers' encoder-decoder generate with the
defaults of `text_config`: 3 beams, no repeated 3-grams, early stopping, `<s>` forced first, `</s>` forced at the
last position, length penalty 1.0. The beam search keeps transformers' bookkeeping exactly (2 * num_beams
candidates per step, finished hypotheses scored by sum of log-probs / generated_length ** length_penalty, the
same early-stopping heuristics), so ties and stopping fall the same way.

The image and the prompt are encoded once per call. Then one step function per decoding (`sample_step` for greedy
and sampling, `beam_step` for beam search) runs once per generated token: it feeds one token per sequence through
the decoder against a cache of fixed size (self-attention keys/values written at explicit positions,
cross-attention keys/values computed once), and updates the decoding state. A step reads nothing back to the host:
the step number is a tensor; forced tokens, min_new_tokens, the n-gram ban, finished rows and beams, and the "can a
beam still improve" test are tensor ops over buffers of the full length; a finished decoding stays as it is when
more steps run. The loop reads whether the decoding ended once every `end_check_every` steps, through the one
function `reached_end`, and the output's length once after the loop (`output_length`). So the step is one graph:
with `compile=True` the same step function runs through `torch.compile(fullgraph=True)` over a static cache
(docs/compiled-decoding.md). Sampling draws its noise outside the step (`_draw_noise`): torch.multinomial draws the
same way (exponential noise, then argmax or top-k), so the tokens are those of the original's multinomial.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


# The loop reads whether every sequence has ended once every this many steps. On the CPU the read costs nothing and
# a step costs much: every step. On a GPU a read waits for the queued steps to finish, so the host cannot queue the
# next ones meanwhile: every 8 steps, at the price of up to 7 steps run after the end (they change nothing).
END_CHECK_EVERY = {"cpu": 1}
END_CHECK_EVERY_ELSEWHERE = 8
# With compile=True the cross-attention keys/values are padded to a multiple of this many encoder positions (masked),
# so that prompts of different lengths share one compiled step: every task prompt at 768 px (577 image tokens) fits
# in 640.
STATIC_ENCODER_MULTIPLE = 64


@torch.no_grad()
def generate(model, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None, *,
             vision_features: torch.Tensor | None = None, kernels: bool | None = None, compile: bool = False,
             **options) -> torch.Tensor | GenerateOutput:
    """Generate for a batch of (image, prompt) pairs.

    Options (defaults from the checkpoint's text_config where it has them): num_beams, no_repeat_ngram_size,
    early_stopping, length_penalty, min_new_tokens, forced_bos_token_id, forced_eos_token_id, num_return_sequences,
    do_sample, temperature, top_k, top_p, seed, return_scores.

    `kernels`: None (default) runs the inference kernels (florence2.kernels.INFERENCE) where the layers allow them
    and the reference math, with one warning naming them, where layers are wrapped (LoRA, FSDP); True asks for them
    (wrapped layers raise KernelError); False runs the reference math alone. The kernels set before the call are
    back after it.

    `compile`: run the decoder step through torch.compile, over a cache of fixed shape; it compiles once per
    (batch, beams, max_new_tokens, padded encoder length) and gives the tokens of the eager step. Where compiling
    fails (no C++ compiler, an unsupported platform, an inductor error) one warning says so and decoding runs eagerly
    (docs/compiled-decoding.md).

    Returns a LongTensor (B * num_return_sequences, L) of sequences that start with the decoder start token and are
    right-padded with the pad token; with return_scores=True a GenerateOutput that also holds per-token scores.
    """
    opts = GenerateOptions.from_model(model.config, max_new_tokens=max_new_tokens, **options)
    if input_ids is None:
        raise ValueError("input_ids is required (the tokenized prompt; Florence2Processor makes it)")
    if kernels not in (None, True, False):
        raise ValueError(f"kernels must be None (the default), True or False, got {kernels!r}")
    if compile not in (True, False):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    was_training = model.training
    model.eval()
    try:
        with using_kernels(model, None if kernels is False else "inference", strict=kernels is True):
            encoder_out, encoder_mask = model.encode(input_ids, attention_mask, pixel_values, vision_features)
            if opts.num_beams > 1:
                return _beam_search(model, encoder_out, encoder_mask, opts, compile)
            return _sample(model, encoder_out, encoder_mask, opts, compile)
    finally:
        model.train(was_training)


def decode_step(model, tokens: torch.Tensor, position: torch.Tensor, cache, encoder_mask) -> torch.Tensor:
    """One decoder step: tokens (N, 1) at `position` (1,) -> next-token logits (N, vocab) float32."""
    lm = model.language_model
    h = lm.decoder(lm.embed(tokens), None, encoder_mask, cache, position)
    return lm.logits(h[:, -1])


def new_cache(model, encoder_out: torch.Tensor, encoder_mask: torch.Tensor | None, copies: int, max_length: int,
              static: bool):
    """The decoder cache for `copies` sequences per image and its encoder mask. `static`: the cross keys/values
    padded with zeros to a multiple of STATIC_ENCODER_MULTIPLE positions, and the mask over them (B, S_padded), so
    the shapes depend on the prompt length only through that multiple."""
    cache = model.language_model.new_cache(encoder_out, max_length, copies)
    if not static:
        return cache, encoder_mask
    B, S = encoder_out.shape[:2]
    pad = -S % STATIC_ENCODER_MULTIPLE
    if encoder_mask is None:
        encoder_mask = torch.ones(B, S, dtype=torch.bool, device=encoder_out.device)
    encoder_mask = F.pad(encoder_mask, (0, pad), value=False)
    for layer in cache:
        layer.cross_k, layer.cross_v = (F.pad(t, (0, 0, 0, pad)) for t in (layer.cross_k, layer.cross_v))
    return cache, encoder_mask


def reorder_cache(cache, source: torch.Tensor) -> None:
    """Beam search: row i of every self-attention buffer becomes row source[i]."""
    for layer in cache:
        layer.k.copy_(layer.k.index_select(0, source))
        layer.v.copy_(layer.v.index_select(0, source))


# ------------------------------------------------------------------------------------------------------ the loop
def reached_end(done: torch.Tensor) -> bool:
    """Whether the decoding has ended: the one read from the device to the host inside the loop, once every
    END_CHECK_EVERY steps."""
    return bool(done)


def output_length(length: torch.Tensor) -> int:
    """The length of the longest output row: read once, after the loop, to cut the buffers."""
    return int(length)


_compiled_steps: dict = {}  # step function -> its torch.compile'd version (compiled per shape on first use)
_compile_failure: list[str] = []  # why compiling failed in this process, if it did: then decoding stays eager


def _run(step, state, args: tuple, max_length: int, compile: bool, noise_shape: tuple | None, generator):
    """Run `step(state, noise, *args)` until the decoding has ended or reached max_length: eagerly, or compiled
    (torch.compile, fullgraph) with one warning and the eager step where compiling fails."""
    device = args[1][0].k.device
    every = END_CHECK_EVERY.get(device.type, END_CHECK_EVERY_ELSEWHERE)
    compiled = _compiled(step) if compile and not _compile_failure else None
    for cur_len in range(1, max_length):
        noise = None if noise_shape is None else _draw_noise(noise_shape, generator, device)
        if compiled is not None and cur_len == 1:  # it compiles here, on its first call for these shapes
            try:
                state = compiled(state, noise, *args)
            except Exception as e:  # no compiler, an unsupported platform, an inductor error
                _compile_failure.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
                warnings.warn(f"torch.compile failed ({_compile_failure[0]}); decoding without compile",
                              stacklevel=4)
                compiled = None
                state = step(state, noise, *args)
        else:
            state = (compiled or step)(state, noise, *args)
        if cur_len % every == 0 and reached_end(state.done):
            break
    return state


def _compiled(step):
    if step not in _compiled_steps:
        _compiled_steps[step] = torch.compile(step, fullgraph=True, dynamic=False)
    return _compiled_steps[step]


def _draw_noise(shape: tuple, generator, device: torch.device) -> torch.Tensor:
    """The exponential noise from which torch.multinomial draws without replacement (or one sample): its samples
    are the top-k of probs / noise, with noise drawn as here, from the same generator (or the global one)."""
    return torch.empty(shape, device=device).exponential_(1, generator=generator)


def _multinomial(probs: torch.Tensor, noise: torch.Tensor, samples: int) -> torch.Tensor:
    """torch.multinomial(probs, samples) without replacement, given its noise: (N, samples) indices."""
    scaled = probs / noise
    return scaled.argmax(dim=-1, keepdim=True) if samples == 1 else torch.topk(scaled, samples).indices


# ------------------------------------------------------------------------------------------ logits processing
def _process(scores: torch.Tensor, sequences: torch.Tensor, cur_len: torch.Tensor, opts: GenerateOptions, eos: int,
             max_length: int) -> torch.Tensor:
    """The logits processors of transformers' generate, in its order, for the options Florence-2 uses. scores (N, V);
    sequences (N, max_length) of which the first cur_len tokens are filled; cur_len (1,), a tensor so that the step
    stays one graph. The forcing processor comes last and overrides the others: at a forced step the scores are 0
    for the forced token and -inf elsewhere."""
    n = opts.no_repeat_ngram_size
    if n:
        scores = _ban_repeated_ngrams(scores, sequences, cur_len, n)
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    if opts.min_new_tokens:
        scores = scores.masked_fill((vocab == eos) & (cur_len[:, None] - 1 < opts.min_new_tokens), -float("inf"))
    for token, at in ((opts.forced_bos_token_id, 1), (opts.forced_eos_token_id, max_length - 1)):
        if token is not None:
            forced = torch.where(vocab == token, 0.0, -float("inf")).to(scores.dtype)
            scores = torch.where(cur_len[:, None] == at, forced, scores)
    return scores


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, cur_len: torch.Tensor,
                         n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already in the first cur_len tokens (vectorized over
    the whole buffer, positions from cur_len on masked out)."""
    L = sequences.shape[1]
    if n == 1:
        filled = (torch.arange(L, device=sequences.device) < cur_len).to(scores.dtype).expand_as(sequences)
        banned = torch.zeros_like(scores).scatter_add_(1, sequences, filled) > 0
        return scores.masked_fill(banned, -float("inf"))
    prefixes = sequences.unfold(1, n - 1, 1)[:, :L - n + 1]  # (N, L - n + 1, n - 1): each (n-1)-gram with a follower
    last = (cur_len - (n - 1) + torch.arange(n - 1, device=sequences.device)).clamp(min=0)
    matches = (prefixes == sequences[:, None, last]).all(dim=-1)  # the ones equal to the last n-1 tokens
    matches &= torch.arange(L - n + 1, device=sequences.device) <= cur_len - n  # their follower is filled
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


def _at(t: torch.Tensor, position: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """t (..., L) with `values` (...) written at `position` (1,) of the last dimension (a new tensor)."""
    index = position.view(*[1] * t.ndim).expand(*t.shape[:-1], 1)
    return t.scatter(-1, index, values[..., None].to(t.dtype))


def _read(t: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """t (..., L) at `position` (1,) of the last dimension -> (...)."""
    return t.index_select(-1, position).squeeze(-1)


# ---------------------------------------------------------------------------------------- greedy and sampling
@dataclass
class Sampling:
    """The state of a greedy or sampling decoding of N rows."""

    sequences: torch.Tensor  # (N, max_length) start token, generated tokens, then pad
    token_scores: torch.Tensor  # (N, max_length - 1) log-prob of each generated token; 0 after a row's end
    unfinished: torch.Tensor  # (N,) bool
    cur_len: torch.Tensor  # (1,) long: tokens in the sequences, start token included
    length: torch.Tensor  # (1,) long: the output's length (cur_len when the last row ended)
    done: torch.Tensor  # (1,) bool: every row has ended


def sample_step(state: Sampling, noise: torch.Tensor | None, model, cache, encoder_mask, opts: GenerateOptions,
                max_length: int) -> Sampling:
    """One token per row, greedy (argmax) or sampled (noise: see _draw_noise). Once every row has ended a step
    leaves the state as it is (it appends pad)."""
    text = model.config.text
    cur = state.cur_len
    tokens = _read(state.sequences, cur - 1)
    logits = decode_step(model, tokens[:, None], cur - 1, cache, encoder_mask)
    scores = _process(logits, state.sequences, cur, opts, text.eos_token_id, max_length)
    if opts.do_sample:
        next_tokens = _multinomial(_warp(scores, opts, min_keep=1).softmax(dim=-1), noise, 1).squeeze(1)
    else:
        next_tokens = scores.argmax(dim=-1)
    next_tokens = torch.where(state.unfinished, next_tokens, text.pad_token_id)
    chosen = scores.log_softmax(dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
    unfinished = state.unfinished & (next_tokens != text.eos_token_id)
    return Sampling(sequences=_at(state.sequences, cur, next_tokens),
                    token_scores=_at(state.token_scores, cur - 1, torch.where(state.unfinished, chosen, 0.0)),
                    unfinished=unfinished, cur_len=cur + 1, length=torch.where(state.done, state.length, cur + 1),
                    done=state.done | ~unfinished.any())


def _sample(model, encoder_out, encoder_mask, opts: GenerateOptions, compile: bool):
    """Greedy (argmax) or sampling, one sequence per row (num_return_sequences copies when sampling)."""
    text = model.config.text
    copies = opts.num_return_sequences
    B = encoder_out.shape[0] * copies
    max_length = opts.max_new_tokens + 1
    device = encoder_out.device
    cache, encoder_mask = new_cache(model, encoder_out, encoder_mask, copies, max_length, static=compile)
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None
    sequences = torch.full((B, max_length), text.pad_token_id, dtype=torch.long, device=device)
    sequences[:, 0] = text.decoder_start_token_id
    one = torch.ones(1, dtype=torch.long, device=device)
    state = Sampling(sequences, torch.zeros(B, max_length - 1, device=device),
                     torch.ones(B, dtype=torch.bool, device=device), one, one, torch.zeros(1, dtype=torch.bool,
                                                                                            device=device))
    vocab = model.language_model.shared.weight.shape[0]
    noise_shape = (B, vocab) if opts.do_sample else None
    state = _run(sample_step, state, (model, cache, encoder_mask, opts, max_length), max_length, compile,
                 noise_shape, generator)
    length = output_length(state.length)
    if not opts.return_scores:
        return state.sequences[:, :length]
    return GenerateOutput(state.sequences[:, :length], state.token_scores[:, :length - 1],
                          state.token_scores.sum(dim=1))


# ------------------------------------------------------------------------------------------------ beam search
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
               step: torch.Tensor, rows: torch.Tensor) -> Hypotheses:
        """The candidates of a step: for each (batch, k) pick, the hypothesis `beam` plus `token` at `step` (1,),
        grown from decoder row `rows` + beam, with its new total `scores` and the token's log-prob `token_scores`."""
        return Hypotheses(_at(_take(self.tokens, beam), step, token), scores,
                          _at(_take(self.sources, beam), step - 1, beam + rows),
                          _at(_take(self.token_scores, beam), step - 1, token_scores))


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


@dataclass
class Beams:
    """The state of a beam search."""

    running: Hypotheses
    finished: Finished
    improvable: torch.Tensor  # (batch, 1) bool: the best running beam can still beat the worst finished one
    length_norm: torch.Tensor  # (max_length,) float: generated_length ** length_penalty, computed on the host as
    # transformers computes it (a Python float) and rounded to float32 as its division by that float does
    cur_len: torch.Tensor  # (1,) long
    done: torch.Tensor  # (1,) bool: the search has ended; then a step leaves `finished` as it is


def beam_step(state: Beams, noise: torch.Tensor | None, model, cache, encoder_mask, opts: GenerateOptions,
              max_length: int) -> Beams:
    """transformers' beam search step (the vectorized version of transformers >= 4.50): the 2 * num_beams best
    continuations of the running beams (or, with do_sample, drawn; noise: see _draw_noise); the best num_beams of
    them that did not end run on, those among the top num_beams that ended (</s>, or the last position) enter the
    finished set if they beat it."""
    text = model.config.text
    running, finished, cur = state.running, state.finished, state.cur_len
    batch, beams = running.scores.shape
    vocab = model.language_model.shared.weight.shape[0]
    keep = 2 * beams  # candidates per step: enough to continue num_beams beams even if all others end
    rows = torch.arange(batch, device=cur.device)[:, None] * beams  # each row's first beam in the flat decoder
    top_beams = torch.arange(keep, device=cur.device) < beams

    flat = running.tokens.view(batch * beams, max_length)
    logits = decode_step(model, _read(flat, cur - 1)[:, None], cur - 1, cache, encoder_mask)
    log_probs = _process(logits.float().log_softmax(dim=-1), flat, cur, opts, text.eos_token_id, max_length)
    totals = (log_probs.view(batch, beams, vocab) + running.scores[:, :, None]).view(batch, -1)
    top_scores, picked = _choose(totals, keep, opts, noise)  # (batch, keep) of beam * vocab + token
    tokens = picked % vocab
    candidates = running.extend(picked // vocab, tokens, top_scores, log_probs.view(batch, -1).gather(1, picked),
                                cur, rows)
    ends = (tokens == text.eos_token_id) | (cur + 1 >= max_length)  # (batch, keep)

    # The best num_beams candidates that did not end run on.
    still_running = dataclasses.replace(candidates, scores=top_scores + ends.float() * NEG)
    running = still_running.take(torch.topk(still_running.scores, beams).indices)

    # Those among the top num_beams that ended are finished hypotheses, if they beat the finished ones.
    length_normalized = top_scores / state.length_norm.index_select(0, cur)  # cur_len + 1 tokens minus the start
    just_finished = ends & top_beams[None, :]
    blocked = ~state.improvable | ~just_finished
    if opts.early_stopping is True:
        blocked = blocked | finished.done.all(dim=-1, keepdim=True)
    merged = finished.merge(candidates, just_finished, length_normalized + blocked.float() * NEG)
    finished = Finished(**{f.name: torch.where(_expand(state.done, getattr(merged, f.name)), getattr(finished, f.name),
                                               getattr(merged, f.name)) for f in dataclasses.fields(finished)})

    reorder_cache(cache, _read(running.sources, cur - 1).reshape(-1))
    improvable = state.improvable & _can_improve(running, finished, state.length_norm, cur + 1, max_length, opts)
    open_beam = ~finished.done.all() if opts.early_stopping is True else torch.ones_like(state.done)
    ended = ~(improvable.any() & open_beam & ~ends.all())
    return Beams(running, finished, torch.where(state.done, state.improvable, improvable), state.length_norm, cur + 1,
                 state.done | ended)


def _expand(flag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (1,) flag broadcastable to `like`."""
    return flag.view(*[1] * like.ndim)


def _beam_search(model, encoder_out, encoder_mask, opts: GenerateOptions, compile: bool = False):
    """Beam search (beam_step) from the encoder output, then the best finished hypotheses."""
    text = model.config.text
    batch, beams = encoder_out.shape[0], opts.num_beams
    max_length = opts.max_new_tokens + 1
    device = encoder_out.device
    cache, encoder_mask = new_cache(model, encoder_out, encoder_mask, beams, max_length, static=compile)
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None

    start = torch.full((batch, beams, max_length), text.pad_token_id, dtype=torch.long, device=device)
    start[:, :, 0] = text.decoder_start_token_id
    no_steps = torch.zeros(batch, beams, max_length - 1, device=device)
    first_only = torch.zeros(batch, beams, device=device)
    first_only[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    running = Hypotheses(start, first_only, torch.full(no_steps.shape, -1, dtype=torch.long, device=device), no_steps)
    finished = Finished(start.clone(), torch.full((batch, beams), NEG, device=device), running.sources.clone(),
                        no_steps.clone(), torch.zeros(batch, beams, dtype=torch.bool, device=device))
    length_norm = torch.tensor([float(n) ** opts.length_penalty for n in range(max_length + 1)]).to(device)
    state = Beams(running, finished, torch.ones(batch, 1, dtype=torch.bool, device=device), length_norm,
                  torch.ones(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.bool, device=device))
    vocab = model.language_model.shared.weight.shape[0]
    noise_shape = (batch, beams * vocab) if opts.do_sample else None
    state = _run(beam_step, state, (model, cache, encoder_mask, opts, max_length), max_length, compile, noise_shape,
                 generator)
    return _best(state.finished, opts)


def _choose(totals: torch.Tensor, keep: int, opts: GenerateOptions,
            noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` best of the (batch, beams * vocab) continuation scores, or with do_sample `keep` drawn from the
    warped distribution, best first: (scores, indices), each (batch, keep)."""
    if not opts.do_sample:
        return torch.topk(totals, keep)
    picked = _multinomial(_warp(totals, opts, min_keep=2).softmax(dim=-1), noise, keep)
    scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
    return scores, picked.gather(1, order)


def _can_improve(running: Hypotheses, finished: Finished, length_norm: torch.Tensor, cur_len: torch.Tensor,
                 max_length: int, opts: GenerateOptions) -> torch.Tensor:
    """transformers' early-stopping heuristic: can the best running beam still beat the worst finished one?"""
    if opts.early_stopping == "never" and opts.length_penalty > 0.0:
        best_norm = length_norm[max_length - 1]
    else:
        best_norm = length_norm.index_select(0, cur_len - 1)
    best_running = running.scores[:, :1] / best_norm
    worst_finished = torch.where(finished.done, finished.scores.min(dim=1, keepdim=True).values, NEG)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)


def _best(finished: Finished, opts: GenerateOptions) -> torch.Tensor | GenerateOutput:
    """The num_return_sequences best finished hypotheses of each row, cut to the longest generation."""
    n = opts.num_return_sequences
    batch, _, max_length = finished.tokens.shape
    sequences = finished.tokens[:, :n].reshape(batch * n, max_length)
    sources = finished.sources[:, :n].reshape(batch * n, -1)
    generated = output_length((sources >= 0).sum(dim=1).max())
    sequences = sequences[:, :1 + generated]
    if not opts.return_scores:
        return sequences
    token_scores = finished.token_scores[:, :n].reshape(batch * n, -1)[:, :generated]
    token_scores = token_scores.masked_fill(sources[:, :generated] < 0, 0.0)
    return GenerateOutput(sequences, token_scores, finished.scores[:, :n].reshape(-1))
