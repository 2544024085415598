"""The server's request checks and its model: options read as clients send them, images decoded, prompts checked,
jobs prepared for the batcher and run on the model."""

import base64
import binascii
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass

from PIL import Image

from ..batch import QUESTION_TASKS, task_hint, wanted_text
from ..generate import GenerateOptions
from ..postprocess import TASKS, TASKS_WITHOUT_INPUT
from ..predict import check_prompt, collate, generate_answers_and_tokens
from .batcher import Batcher, Job

SERVED_TASKS = TASKS + QUESTION_TASKS  # the question tasks are answered as text, like fine-tunes on DocVQA
# Options a request may set: generate's, except what predict fixes (one answer; scores where the task has them).
REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerateOptions)
                        if f.name not in ("num_return_sequences", "return_scores"))
OPTION_TYPES = typing.get_type_hints(GenerateOptions)
PREPROCESS_THREADS = min(4, os.cpu_count() or 1)  # decoding and resizing beside the model; bounded, so is memory
# Sampling divides the logits by the temperature and beam search divides a hypothesis' score by its length to the
# power length_penalty, in float32: far outside these ranges the results overflow (NaN probabilities, a Python
# OverflowError), inside them they are finite for any length the decoder has (1025 ** 10 < 3.4e38). Beyond 0.01 and
# 100 a temperature gives what greedy search or uniform draws give anyway.
TEMPERATURE_RANGE = (0.01, 100.0)
MAX_LENGTH_PENALTY = 10.0  # in absolute value
BOOLEAN_TEXTS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}  # what forms send for a boolean: curl users, HTML checkboxes ("on"), requests ("True")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000  # 40 MP, half of PIL's default warning threshold
    max_num_beams: int = 8  # beams multiply the decoder's cache of every request in a batch


class ApiError(Exception):
    """A request the server refuses: its status (4xx), the message of the JSON answer, and the request's field it
    is about (`param` of the OpenAI routes' errors) with OpenAI's code for the problem, where there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Answer:
    """One generated answer of a job."""

    result: dict  # {task: parsed answer}, what Florence2.predict returns
    tokens: list[int]  # the generated ids: the start token left out, through the first end token


NOT_GIVEN = object()  # parse_option's answer for an option left empty: the checkpoint's default applies


def parse_option(name: str, value, from_form: bool, field: str | None = None):
    """A generation option from a JSON value, or from the text of a form field, typed as GenerateOptions has it
    (its values are then checked by GenerateOptions itself); errors name it `field` (default: `name`), the name
    the request gave it.

    Clients send the same option in several ways, all read alike: a JSON string is read as a form field's text is
    ("20", "true"; form-encoders and JavaScript often send numbers as strings), a boolean may be true/false, 1/0,
    yes/no or on/off (in any case; JSON's 1 and 0 too), and an empty field or a JSON null for an option that
    cannot be null (httpx sends None as "") leaves the option at its default: NOT_GIVEN."""
    kind = OPTION_TYPES[name]
    types = typing.get_args(kind) or (kind,)
    if from_form or isinstance(value, str):
        if not value.strip():
            return NOT_GIVEN
        value = _from_text(value.strip(), types)
    elif value is None and type(None) not in types:
        return NOT_GIVEN
    if bool in types and not isinstance(value, bool) and isinstance(value, int) and value in (0, 1):
        value = bool(value)
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):  # (a JSON integer of 400 digits is no float: float() would raise OverflowError)
        ok = int in types or (float in types and abs(value) <= sys.float_info.max)
    elif isinstance(value, float):
        ok = float in types and math.isfinite(value)
    else:
        ok = (isinstance(value, str) and str in types) or (value is None and type(None) in types)
    if not ok:
        wanted = " or ".join({int: "an integer", float: "a finite number", bool: "true or false",
                              str: '"never"', type(None): "null"}[t] for t in types)
        raise ApiError(400, f"option {field or name} must be {wanted}, got {short_repr(value)}", field or name)
    if name == "seed" and value is not None and not 0 <= value < 2**63:
        raise ApiError(400, f"option seed must be between 0 and 2**63 - 1, got {value}", "seed")
    return float(value) if float in types else value


def _from_text(text: str, types: tuple):
    """The typed value of a form field's text: a boolean (BOOLEAN_TEXTS), null, an integer or a number; else the
    text."""
    lowered = text.lower()
    if bool in types and lowered in BOOLEAN_TEXTS:
        return BOOLEAN_TEXTS[lowered]
    if type(None) in types and lowered in ("null", "none"):
        return None
    for t in (int, float):
        if t in types:
            try:
                return t(text)
            except ValueError:
                pass
    return text


def short_repr(value, limit: int = 60) -> str:
    """repr(value), cut: an error message quotes what it refuses without echoing a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def read_image(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded image, decoded, after PIL's decompression-bomb guard and the server's pixel limit."""
    if not data:
        raise ApiError(400, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"the image is too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, "unreadable image: not in a format PIL reads (JPEG, PNG, WebP, ...)") from None
    except Exception as e:  # PIL raises many kinds on broken files
        raise ApiError(400, f"unreadable image: {e}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ApiError(413, f"the image is too large: {image.width}x{image.height} = {pixels} pixels, more than "
                            f"the limit of {max_pixels}")
    try:
        image.load()
    except Exception as e:
        raise ApiError(400, f"unreadable image: {e}") from None
    return image


class Server:
    """The model, its processor and the batcher; `prepare` turns a request's fields into a Job."""

    def __init__(self, model, processor, *, max_batch_size: int = 8, max_wait_ms: float = 10.0,
                 limits: Limits = Limits(), compile: bool = False):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size} and "
                             f"{max_wait_ms}")
        self.model, self.processor, self.limits = model, processor, limits
        self.compile = compile  # every batch's decoder step through torch.compile (generate's compile=True)
        self.model_name = getattr(model, "name_or_path", None) or "florence2"  # the checkpoint as it was given
        self.started = int(time.time())
        self.batcher = Batcher(self.run, max_batch_size, max_wait_ms / 1000)
        self.pool = concurrent.futures.ThreadPoolExecutor(PREPROCESS_THREADS, thread_name_prefix="preprocess")

    def check_request(self, task, text, options: dict, from_form: bool) -> tuple[str, str | None, dict]:
        """The task, its text and the resolved generation options of a request, or ApiError naming the problem."""
        task, text = self.check_task(task, text)
        return task, text, self.check_options(options, from_form)

    def check_task(self, task, text) -> tuple[str, str | None]:
        """The task and its text (None: no text), or ApiError naming the problem."""
        if task is None:
            raise ApiError(400, f"task is missing: one of {', '.join(SERVED_TASKS)}")
        if task not in SERVED_TASKS:
            raise ApiError(400, f"unknown task {short_repr(task)}: {task_hint(task, SERVED_TASKS)}one of "
                                f"{', '.join(SERVED_TASKS)}")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, f"text must be a string, got {type(text).__name__}")
        text = text or None
        if text is not None and task in TASKS_WITHOUT_INPUT:
            raise ApiError(400, f"task {task} takes no text; drop the text or choose a task that reads one")
        if text is None and task not in TASKS_WITHOUT_INPUT:
            raise ApiError(400, f"task {task} needs text: {wanted_text(task)}")
        if text is not None:
            self.check_prompt(task + text)
        return task, text

    def check_prompt(self, prompt: str) -> None:
        """ApiError for a prompt the processor refuses (a task token inside the text: "<DocVQA>" + "<OD>") or
        longer than the model reads."""
        try:
            self.processor.construct_prompt(prompt)
        except ValueError as e:
            raise ApiError(400, f"bad text: {e}") from None
        try:
            check_prompt(self.model.config, self.processor, prompt)
        except ValueError as e:
            raise ApiError(400, f"the text is too long: {e}") from None

    def check_options(self, options: dict, from_form: bool, fields: dict | None = None) -> dict:
        """Every generation option of a request (the given ones, the checkpoint's defaults for the others), or
        ApiError naming the problem; `fields` names the options the request gave other names (max_tokens is
        max_new_tokens)."""
        fields = fields or {}
        values = {name: parse_option(name, value, from_form, fields.get(name)) for name, value in options.items()}
        values = {name: value for name, value in values.items() if value is not NOT_GIVEN}
        return self.resolve_options(values, fields)

    def resolve_options(self, values: dict, fields: dict | None = None) -> dict:
        """check_options of options already typed (by parse_option)."""
        fields = fields or {}
        try:
            resolved = GenerateOptions.from_model(self.model.config, **values)
        except (TypeError, ValueError) as e:
            renamed = "".join(f" ({field} is generate's {name})" for name, field in fields.items() if name in str(e))
            raise ApiError(400, f"bad generation options: {e}{renamed}") from None
        if resolved.num_beams > self.limits.max_num_beams:
            raise ApiError(400, f"num_beams {resolved.num_beams} is more than this server's limit of "
                                f"{self.limits.max_num_beams}")
        low, high = TEMPERATURE_RANGE  # (the request's values: a checkpoint's own defaults are its business)
        if "temperature" in values and not low <= resolved.temperature <= high:
            raise ApiError(400, f"temperature {resolved.temperature} is outside [{low}, {high}], where sampling "
                                "stays finite")
        if "length_penalty" in values and abs(resolved.length_penalty) > MAX_LENGTH_PENALTY:
            raise ApiError(400, f"length_penalty {resolved.length_penalty} is outside [-{MAX_LENGTH_PENALTY}, "
                                f"{MAX_LENGTH_PENALTY}], where beam scores stay finite")
        return {k: v for k, v in dataclasses.asdict(resolved).items() if k in REQUEST_OPTIONS}

    @staticmethod
    def batch_key(options: dict):
        """Requests with equal keys may share a generate call: equal settings, and never a sampling one (the draws
        of its generator would depend on the batch)."""
        return object() if options["do_sample"] else tuple(sorted(options.items()))

    def prepare(self, data: bytes, prompt: str, task: str, options: dict, key) -> Job:
        """Decode and preprocess (in a pool thread): the Job the batcher runs, whose answer is parsed as `task`'s."""
        image = read_image(data, self.limits.max_image_pixels)
        inputs = self.processor(text=prompt, images=image)
        return Job(task, image.size, inputs, options, key)

    def run(self, jobs: list[Job]) -> list[list[Answer]]:
        """The answers of jobs that share their options (num_return_sequences of them each), from one generate
        call."""
        answers = [Answer(result, tokens) for result, tokens in generate_answers_and_tokens(
            self.model, self.processor, collate([j.inputs for j in jobs]), [j.task for j in jobs],
            [j.image_size for j in jobs], compile=self.compile, **jobs[0].options)]
        copies = jobs[0].options.get("num_return_sequences", 1)
        return [answers[i * copies:(i + 1) * copies] for i in range(len(jobs))]

    def health(self) -> dict:
        weight = self.model.image_projection.weight
        return {"status": "ok", "model": self.model_name, "device": str(weight.device),
                "dtype": str(weight.dtype).removeprefix("torch."), "max_batch_size": self.batcher.max_batch_size,
                "max_wait_ms": self.batcher.max_wait * 1000, "tasks": list(SERVED_TASKS),
                "tasks_with_text": [t for t in SERVED_TASKS if t not in TASKS_WITHOUT_INPUT],
                "limits": dataclasses.asdict(self.limits), "served": dict(self.batcher.served)}


def decode_base64_image(text: str) -> bytes:
    """The bytes of a base64 image as clients encode it: a data: URL (the browser's FileReader), lines wrapped
    every 76 characters (MIME: `base64` without -w0, Python's encodebytes, Java's MIME encoder), the URL-safe
    alphabet (- and _), or the padding left out. A URL is refused by name: the server fetches nothing."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    elif text.startswith(("http://", "https://", "file:")):
        raise ApiError(400, "the image must be the image's bytes, base64-encoded: the server fetches no URLs")
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image is not valid base64: {e}") from None


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be larger than `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_json(body: bytes):
    """The JSON value of a request body, or ApiError.

    json.loads raises more than JSONDecodeError on hostile bodies: ValueError for an integer of more than 4300
    digits, RecursionError for arrays nested some thousand deep; each is the client's mistake, a 400."""
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except ApiError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None


def _no_duplicates(pairs: list) -> dict:
    """A JSON object, refused when it names a field twice (json.loads would keep the last silently; a form field
    given twice is refused too)."""
    fields = {}
    for name, value in pairs:
        if name in fields:
            raise ApiError(400, f"field {name} is given twice")
        fields[name] = value
    return fields
