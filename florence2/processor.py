"""Florence-2's processor: task prompts -> token ids, images -> pixel values, generated ids -> text -> answers.

Reproduces Microsoft's `Florence2Processor` (processing_florence2.py), which wraps transformers' BartTokenizerFast
and CLIPImageProcessor, with the `tokenizers` library and Pillow only:

    "<OD>"       -> "Locate the objects with category name in the image." -> [0, 574, 22486, ..., 4, 2]
    PIL image    -> RGB -> bicubic resize to 768x768 (aspect ratio not kept) -> x / 255 -> (x - mean) / std -> (3, H, W)
    [2, 0, ...]  -> "</s><s>car<loc_53>...</s>" -> {"<OD>": {"bboxes": ..., "labels": ...}}   (postprocess.py)

Notable details:
- The 1024 Florence tokens (<od>, <loc_0>..<loc_999>, <poly>, ...) are added to BART's 50265 as special tokens,
  in the original's order: <od>=50265, <loc_0>=50269, <loc_999>=51268, <and>=51288, 51289 in all. Being special,
  they vanish when decoding with skip_special_tokens=True; decode with False for any task with coordinates.
- A task token is replaced by its prompt only when it is the whole text ("<OD> extra" is an error, an assertion in
  the original); task tokens that take an input keep the input verbatim, spaces included. Anything else (<DocVQA>,
  <VQA>, free text) is tokenized as ordinary text, as in the original: "<DocVQA>" is not a token.
- Decoding cleans up tokenization spaces (" ." -> "."), as BartTokenizerFast did by default in transformers 4.41.
- Pixels follow CLIPImageProcessor: PIL resize of the uint8 image, rescale in float64 then float32, normalize with
  ImageNet mean/std in float32. Every image is first converted with `Image.convert("RGB")`; the original skipped
  that (do_convert_rgb null), leaving grayscale and RGBA images to the caller.
- The image takes `image_seq_length` = (side / 32)^2 + 1 of the encoder's 1024 positions (577 at 768 px), so a
  prompt may have at most 1024 - 577 = 447 tokens.

Deliberate differences: `text=None` means an empty prompt (the original crashes there), a prompt longer than
max_prompt_length raises here rather than reaching the model's position table, and numpy arrays / tensors are
accepted in any of the usual layouts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from . import hub, postprocess
from .config import TextConfig, VisionConfig, read_json

ASSETS = Path(__file__).parent / "assets"
# The tokens Florence-2 adds to BART's vocabulary, in the original's order (their ids follow it).
FLORENCE_TOKENS = (
    "<od>", "</od>", "<ocr>", "</ocr>",
    *(f"<loc_{k}>" for k in range(1000)),
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>",
    "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>",  # (sic)
    "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
)
BART_VOCAB_SIZE = TextConfig.vocab_size - len(FLORENCE_TOKENS)  # 50265: the id of the first Florence token
BOS_ID, PAD_ID, EOS_ID = TextConfig.bos_token_id, TextConfig.pad_token_id, TextConfig.eos_token_id
PATCH = VisionConfig().stride  # 32, DaViT's total stride: a side of 768 px gives 24 x 24 image tokens
MODEL_MAX_LENGTH = 1024  # the encoder positions tokenizer_config.json allows when it does not say


class Florence2Inputs(dict):
    """`input_ids` (B, L) and `attention_mask` (B, L) int64, `pixel_values` (B, 3, H, W) float32.

    `.to(device, dtype)` moves every tensor and casts only the floating ones, so
    `model.generate(**inputs.to("cuda", torch.bfloat16))` keeps the ids integer. Keys read as attributes too.
    """

    def to(self, device=None, dtype: torch.dtype | None = None) -> Florence2Inputs:
        if isinstance(device, torch.dtype):  # inputs.to(torch.float16)
            device, dtype = None, device
        return Florence2Inputs({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                                for k, v in self.items()})

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class ImageSettings:
    """The parts of preprocessor_config.json (CLIPImageProcessor's format) that Florence-2 uses."""

    height: int = 768
    width: int = 768
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, not CLIP's
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0 or self.height % PATCH or self.width % PATCH:
            raise ValueError(f"image size {self.height}x{self.width}: each side must be a positive multiple of {PATCH}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image_mean {self.mean} and image_std {self.std} need one value per RGB channel")

    @property
    def seq_length(self) -> int:
        """Image tokens in front of the prompt: one per 32x32 patch, plus their mean."""
        return (self.height // PATCH) * (self.width // PATCH) + 1

    @classmethod
    def from_config(cls, config: dict) -> ImageSettings:
        # what a Florence-2 checkpoint never changes must be as expected, rather than silently ignored
        for flag, expected in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                               ("do_center_crop", False)):
            if bool(config.get(flag, expected)) != expected:
                raise ValueError(f"preprocessor_config.json: {flag}={config[flag]} is not supported "
                                 f"(Florence-2 uses {expected})")
        size = config.get("size", {"height": cls.height, "width": cls.width})
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"preprocessor_config.json: size must be {{'height': H, 'width': W}}, got {size!r}")
        settings = cls(int(size["height"]), int(size["width"]), int(config.get("resample", cls.resample)),
                       float(config.get("rescale_factor", cls.rescale_factor)),
                       tuple(config.get("image_mean", cls.mean)), tuple(config.get("image_std", cls.std)))
        stored = config.get("image_seq_length")
        if stored is not None and stored != settings.seq_length:
            raise ValueError(f"preprocessor_config.json: image_seq_length {stored} does not match size "
                             f"{settings.height}x{settings.width} ({settings.seq_length} image tokens)")
        return settings

    def to_config(self) -> dict:
        return {
            "processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"height": self.height, "width": self.width},
            "resample": self.resample, "do_center_crop": False, "do_rescale": True,
            "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": list(self.mean),
            "image_std": list(self.std), "image_seq_length": self.seq_length,
        }


class Florence2Processor:
    """Prompts and images in, model inputs out; generated ids in, parsed answers out.

    Florence2Processor() is the standard processor of every Microsoft checkpoint (from the files shipped in
    florence2/assets). `image_size` (a square side, or (height, width); multiples of 32) replaces the 768x768 of the
    configuration, for models trained at another resolution (florence2/image_size.py says what bounds it).
    `max_prompt_length` defaults to model_max_length (1024) minus the image tokens.
    """

    def __init__(self, image_size: int | tuple[int, int] | None = None, max_prompt_length: int | None = None, *,
                 tokenizer: Tokenizer | None = None, tokenizer_config: dict | None = None,
                 preprocessor_config: dict | None = None):
        self.tokenizer = _with_florence_tokens(tokenizer or Tokenizer.from_file(str(ASSETS / "tokenizer.json")))
        if tokenizer_config is None:
            tokenizer_config = read_json(ASSETS / "tokenizer_config.json")
        if preprocessor_config is None:
            preprocessor_config = read_json(ASSETS / "preprocessor_config.json")
        self.model_max_length = int(tokenizer_config.get("model_max_length", MODEL_MAX_LENGTH))
        if image_size is not None:  # the stored image_seq_length belongs to the stored size: drop both
            preprocessor_config = {k: v for k, v in preprocessor_config.items() if k != "image_seq_length"}
            height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
            preprocessor_config["size"] = {"height": height, "width": width}
        self.image_settings = ImageSettings.from_config(preprocessor_config)
        if max_prompt_length is None:
            max_prompt_length = self.model_max_length - self.image_seq_length
        self.max_prompt_length = max_prompt_length
        if self.max_prompt_length < 2:
            raise ValueError(f"max_prompt_length {self.max_prompt_length}: a prompt needs at least <s> and </s>")

    # ------------------------------------------------------------------------------------------- properties
    @property
    def image_seq_length(self) -> int:
        return self.image_settings.seq_length

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of pixel_values."""
        return self.image_settings.height, self.image_settings.width

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    # ------------------------------------------------------------------------------------------- inputs
    def __call__(self, text: str | list[str] | None = None, images=None, padding: bool | str = True,
                 truncation: bool = False, return_tensors: str = "pt") -> Florence2Inputs:
        """Model inputs for one image or a list of images, with one prompt each (a single prompt serves all).

        Images: PIL images of any mode, file paths, numpy arrays (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4
        as uint8 or as floats in [0, 1], torch tensors likewise ((C, H, W) first). A prompt longer than
        max_prompt_length raises ValueError, or with truncation=True is cut (keeping its final </s>) with a warning.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch tensors) is supported")
        if padding not in (True, False, "longest"):
            raise ValueError(f"padding={padding!r}: use True ('longest') or False")
        if images is None:
            raise ValueError("images are required: Florence-2 always reads an image")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("images is an empty list; give at least one image")
        texts = [text] * len(images) if text is None or isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list; give one prompt per image, or a single prompt for all")
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} prompts for {len(images)} images: give one prompt per image, or a "
                             "single prompt (a str) for all of them")

        rows = [self._fit(i, self.prompt_ids(t, index=i), truncation) for i, t in enumerate(texts)]
        longest = max(len(r) for r in rows)
        if not padding and any(len(r) != longest for r in rows):
            raise ValueError(f"prompts have different lengths ({sorted({len(r) for r in rows})}); use padding=True")
        input_ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        # numpy's stack, not torch's: a torch copy this large runs on an OpenMP team of the calling thread, and the
        # server preprocesses in threads beside the model, whose own team then ran ~15% slower (libgomp stops
        # spinning between parallel regions once it has more threads than cores)
        pixel_values = torch.from_numpy(np.stack([self.image_tensor(image, index=i).numpy()
                                                  for i, image in enumerate(images)]))
        return Florence2Inputs(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)

    def construct_prompt(self, text: str | None) -> str:
        """The text the model reads for `text`: a task token becomes its prompt, anything else stays as it is."""
        text = "" if text is None else text
        for token, prompt in postprocess.TASKS_WITHOUT_INPUT.items():
            if token in text:
                if text != token:
                    raise ValueError(f"task token {token} takes no input and must be the whole prompt, got {text!r}")
                text = prompt
                break
        for token, prompt in postprocess.TASKS_WITH_INPUT.items():
            if token in text:
                return prompt.format(input=text.replace(token, ""))
        return text

    def prompt_ids(self, text: str | None, index: int = 0) -> list[int]:
        """<s> + tokens of the constructed prompt + </s>, whatever its length."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"prompt {index} must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(self.construct_prompt(text)).ids

    def text_ids(self, text: str) -> list[int]:
        """<s> + tokens of `text` as it is (an answer, a training target) + </s>."""
        return self.tokenizer.encode(text).ids

    def image_tensor(self, image, index: int = 0) -> torch.Tensor:
        """(3, H, W) float32 pixel values of one image (see __call__ for what an image may be)."""
        s = self.image_settings
        resized = to_pil(image, index).resize((s.width, s.height), resample=Image.Resampling(s.resample),
                                              reducing_gap=None)
        pixels = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(np.stack([self._pixel_table[c][pixels[..., c]] for c in range(3)]))

    @functools.cached_property
    def _pixel_table(self) -> np.ndarray:
        """(3, 256) float32: the normalized value of each uint8 value per channel, computed with CLIPImageProcessor's
        operations (x * rescale in float64, to float32, (x - mean) / std in float32), so looking pixels up gives the
        same bits as computing each one, 5x faster."""
        s = self.image_settings
        rescaled = (np.arange(256, dtype=np.uint8).astype(np.float64) * s.rescale_factor).astype(np.float32)
        mean, std = np.array(s.mean, dtype=np.float32)[:, None], np.array(s.std, dtype=np.float32)[:, None]
        return (rescaled[None, :] - mean) / std

    def _fit(self, index: int, ids: list[int], truncation: bool) -> list[int]:
        if len(ids) <= self.max_prompt_length:
            return ids
        message = (f"prompt {index} has {len(ids)} tokens, more than max_prompt_length {self.max_prompt_length} "
                   f"(model_max_length {self.model_max_length} - {self.image_seq_length} image tokens)")
        if not truncation:
            raise ValueError(message + "; shorten it or pass truncation=True")
        warnings.warn(message + f"; truncated to {self.max_prompt_length}", stacklevel=3)
        return ids[:self.max_prompt_length - 1] + [EOS_ID]

    # ------------------------------------------------------------------------------------------- outputs
    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """Text of each row of (B, L) ids. Keep special tokens (the default) for answers with coordinates."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else [
            row.tolist() if hasattr(row, "tolist") else list(row) for row in sequences]
        texts = self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [_clean_up_tokenization(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        return _clean_up_tokenization(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    @functools.cached_property
    def _special_tokens(self) -> frozenset[str]:
        return frozenset(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)

    def decode_with_spans(self, ids) -> tuple[str, list[tuple[int, int]]]:
        """Text of `ids` token by token (special tokens verbatim, no clean-up, as the original's scoring path) and
        the [start, end) of each token in it."""
        text, spans = "", []
        for i in (ids.tolist() if hasattr(ids, "tolist") else list(ids)):
            token = self.tokenizer.id_to_token(i)
            if token is None:
                raise ValueError(f"token id {i} is not in the vocabulary ({self.vocab_size} tokens)")
            piece = token if token in self._special_tokens else self.tokenizer.decoder.decode([token])
            spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def post_process_generation(self, text: str | None = None, task: str | None = None, image_size=None, *,
                                sequence=None, transition_scores=None) -> dict:
        """{task: answer} for a generated `text` (decoded with special tokens), or for a generated `sequence`
        (1-D ids starting with the decoder start token) with its `transition_scores` (one log-prob per token after
        the start), which adds the confidence "scores" of boxes, quads and polygons to the answer. `image_size` is
        (width, height) of the original image, needed for tasks with coordinates (not for captions, OCR, VQA...).
        See postprocess.post_process_generation for the answers."""
        if task is None:
            raise ValueError("task is required, e.g. task='<OD>'")
        if sequence is None:
            if transition_scores is not None:
                raise ValueError("transition_scores belong to a sequence: pass sequence= as well")
            return postprocess.post_process_generation(text, task, image_size)
        if text is not None:
            raise ValueError("give the generated text or the generated sequence, not both")
        ids = torch.as_tensor(sequence)
        if ids.ndim != 1:
            raise ValueError(f"sequence must be 1-D (one generated sequence), got shape {tuple(ids.shape)}")
        ids = ids.tolist()[1:]  # the decoder start token is not part of the answer
        text, spans = self.decode_with_spans(ids)
        if transition_scores is None:
            return postprocess.post_process_generation(text, task, image_size)
        scores = torch.as_tensor(transition_scores).reshape(-1).tolist()
        if len(scores) != len(ids):
            raise ValueError(f"{len(scores)} transition scores for {len(ids)} generated tokens (the sequence minus "
                             "its start token): they must match")
        return postprocess.post_process_generation(text, task, image_size, token_spans=spans, token_scores=scores)

    # ------------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Florence2Processor:
        """The processor of a checkpoint folder or hub repo: its tokenizer.json (or vocab.json + merges.txt),
        tokenizer_config.json and preprocessor_config.json, only those downloaded (and from the cache offline).

        A file the checkpoint does not have is replaced by the shipped standard one, with a warning: every
        Microsoft checkpoint uses the same tokenizer and preprocessing, so this is right unless the model was trained
        with other settings (another image size, say).
        """
        def file_of(name: str) -> Path | None:
            return hub.fetch(path_or_repo_id, name, revision)

        missing = []
        tokenizer = None
        if (file := file_of("tokenizer.json")) is not None:
            tokenizer = Tokenizer.from_file(str(file))
        elif (vocab := file_of("vocab.json")) is not None and (merges := file_of("merges.txt")) is not None:
            tokenizer = _bart_tokenizer(vocab, merges)
        else:
            missing.append("tokenizer.json (nor vocab.json + merges.txt)")
        configs = {}
        for name in ("tokenizer_config.json", "preprocessor_config.json"):
            file = file_of(name)
            configs[name] = read_json(file) if file is not None else None
            if file is None:
                missing.append(name)
        if missing:
            warnings.warn(f"{path_or_repo_id} has no {', '.join(missing)}; using Florence-2's standard "
                          f"{'file' if len(missing) == 1 else 'files'} instead", stacklevel=2)
        return cls(tokenizer=tokenizer, tokenizer_config=configs["tokenizer_config.json"],
                   preprocessor_config=configs["preprocessor_config.json"])

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json (Florence tokens included), tokenizer_config.json and preprocessor_config.json into
        `folder`, leaving its other files alone."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": self.model_max_length},
                                                                 indent=2) + "\n")
        (folder / "preprocessor_config.json").write_text(json.dumps(self.image_settings.to_config(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------- images
def to_pil(image, index: int = 0) -> Image.Image:
    """An RGB PIL image of `image`, exactly as `Image.convert("RGB")` makes it (alpha is dropped, not composited).

    PIL images of any mode; paths; numpy arrays (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 (channels last
    when both readings fit); torch tensors likewise (channels first when both fit). Arrays are uint8, or floats in
    [0, 1] (scaled by 255 and rounded). Problems raise ValueError/TypeError naming the image's `index`.
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return _convert_rgb(opened, index)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {index}: cannot read {os.fspath(image)!r} as an image: {e}") from None
    if isinstance(image, Image.Image):
        return _convert_rgb(image, index)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()
        return _array_to_pil(image.numpy(), index, channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, index, channels_first=False)
    raise TypeError(f"image {index}: expected a PIL image, a path, a numpy array or a torch tensor, got "
                    f"{type(image).__name__}")


def _convert_rgb(image: Image.Image, index: int) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: empty ({image.width}x{image.height})")
    with warnings.catch_warnings():
        # converting to RGB drops transparency for every mode; Pillow warns only for palette images
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return image.convert("RGB")


def _array_to_pil(array: np.ndarray, index: int, channels_first: bool) -> Image.Image:
    shape = tuple(array.shape)
    if array.ndim not in (2, 3):
        raise ValueError(f"image {index}: expected shape (H, W), (H, W, C) or (C, H, W), got {shape}")
    if array.ndim == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(f"image {index}: shape {shape} has no channel dimension of 1, 3 or 4")
        if first and (channels_first or not last):
            array = array.transpose(1, 2, 0)
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.size == 0:
        raise ValueError(f"image {index}: empty (shape {shape})")
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
            raise ValueError(f"image {index}: float pixels must lie in [0, 1], got values in [{low}, {high}]")
        array = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"image {index}: pixels must be uint8 or floats in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")  # L, RGB or RGBA by the channel count


# ----------------------------------------------------------------------------------------- tokenizer
def _with_florence_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the Florence tokens as special tokens at their ids (a no-op for a tokenizer that has them)."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FLORENCE_TOKENS])
    expected = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID}
    expected.update((token, BART_VOCAB_SIZE + i) for i, token in enumerate(FLORENCE_TOKENS))
    wrong = [f"{token}={tokenizer.token_to_id(token)} (expected {i})" for token, i in expected.items()
             if tokenizer.token_to_id(token) != i]
    if wrong:
        raise ValueError(f"not a Florence-2 tokenizer: {len(wrong)} tokens at unexpected ids, e.g. "
                         f"{', '.join(wrong[:3])}")
    return tokenizer


def _bart_tokenizer(vocab: Path, merges: Path) -> Tokenizer:
    """BART's byte-level BPE from vocab.json + merges.txt, built as transformers converts BartTokenizer."""
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", EOS_ID), ("<s>", BOS_ID), trim_offsets=True,
                                                            add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "<pad>", "</s>", "<unk>")]
                                 + [AddedToken("<mask>", special=True, lstrip=True)])
    return tokenizer


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (on by default for BartTokenizerFast in 4.41), in its order."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text
