"""An HTTP server for Florence-2 with dynamic batching and a web page (FastAPI + uvicorn: the `serve` extra).

    python -m florence2.serve --model microsoft/Florence-2-base-ft [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-wait-ms 10]

    POST /v1/predict  multipart/form-data: `image` (the file), `task`, optional `text`, optional generation options
                      named like generate's keyword arguments (max_new_tokens, num_beams, do_sample, seed, ...);
                      or application/json: the same fields, `image` as base64 (a data: URL too)
                      -> {"task": "<OD>", "result": {"<OD>": {...}}}, exactly what Florence2.predict returns
    GET  /health      the model, its device, the tasks and the limits (HEAD too)
    GET  /            a page (no external resources) to upload an image and see the result drawn on it

Options are read as clients send them (`parse_option`): booleans as true/false, 1/0, yes/no or on/off, numbers as
text in JSON too, and an empty field (or a JSON null) is the default.

Requests that arrive together with the same generation settings are gathered into one `generate` call (up to
--max-batch-size, waiting at most --max-wait-ms after the first of them); their prompts are padded and masked, so
each gets exactly what it would get alone (`predict.generate_answers` is the one path from inputs to answers).
Sampling requests run alone: the draws of a seeded generator would otherwise depend on the batch.

Bad input is answered with a 4xx and {"error": "..."} that names the problem (the body or the image too large,
an unreadable image, an unknown task, text for a task that takes none, a prompt too long, a bad option) and never
reaches the model. Images come only as bytes in the request: the server fetches nothing. It keeps no state between
requests, so replicas behind a load balancer need no coordination.
"""

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import cli
from .batch import QUESTION_TASKS, dumps, quiet_hub, task_hint, wanted_text
from .draw import PALETTE
from .generate import GenerateOptions
from .postprocess import TASKS, TASKS_WITHOUT_INPUT
from .predict import check_prompt, collate, generate_answers

PAGE = Path(__file__).parent / "assets" / "serve.html"
SERVED_TASKS = TASKS + QUESTION_TASKS  # the question tasks are answered as text, like fine-tunes on DocVQA
# Options a request may set: generate's, except what predict fixes (one answer; scores where the task has them).
REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerateOptions)
                        if f.name not in ("num_return_sequences", "return_scores"))
OPTION_TYPES = typing.get_type_hints(GenerateOptions)
FORM_FIELDS = ("image", "task", "text", *REQUEST_OPTIONS)
PREPROCESS_THREADS = min(4, os.cpu_count() or 1)  # decoding and resizing beside the model; bounded, so is memory
# Sampling divides the logits by the temperature and beam search divides a hypothesis' score by its length to the
# power length_penalty, in float32: far outside these ranges the results overflow (NaN probabilities, a Python
# OverflowError), inside them they are finite for any length the decoder has (1025 ** 10 < 3.4e38). Beyond 0.01 and
# 100 a temperature gives what greedy search or uniform draws give anyway.
TEMPERATURE_RANGE = (0.01, 100.0)
MAX_LENGTH_PENALTY = 10.0  # in absolute value
BOOLEAN_TEXTS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}  # what forms send for a boolean: curl users, HTML checkboxes ("on"), requests ("True")
ROUTES = "POST /v1/predict, GET /health, GET /"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000  # 40 MP, half of PIL's default warning threshold
    max_num_beams: int = 8  # beams multiply the decoder's cache of every request in a batch


class ApiError(Exception):
    """A request the server refuses: its status (4xx) and the message of the JSON answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------------------ one request
@dataclass
class Job:
    """A prepared request waiting for its batch."""

    task: str
    image_size: tuple[int, int]
    inputs: dict  # processor(text=prompt, images=image): one row
    options: dict  # every generate option, resolved (the checkpoint's defaults filled in)
    key: object  # requests with equal keys may share a generate call
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    arrived: float = dataclasses.field(default_factory=time.monotonic)


NOT_GIVEN = object()  # parse_option's answer for an option left empty: the checkpoint's default applies


def parse_option(name: str, value, from_form: bool):
    """A generation option from a JSON value, or from the text of a form field, typed as GenerateOptions has it
    (its values are then checked by GenerateOptions itself).

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
        raise ApiError(400, f"option {name} must be {wanted}, got {_short(value)}")
    if name == "seed" and value is not None and not 0 <= value < 2**63:
        raise ApiError(400, f"option seed must be between 0 and 2**63 - 1, got {value}")
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


def _short(value, limit: int = 60) -> str:
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
                 limits: Limits = Limits()):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size} and "
                             f"{max_wait_ms}")
        self.model, self.processor, self.limits = model, processor, limits
        self.batcher = Batcher(self.run, max_batch_size, max_wait_ms / 1000)
        self.pool = concurrent.futures.ThreadPoolExecutor(PREPROCESS_THREADS, thread_name_prefix="preprocess")

    def check_request(self, task, text, options: dict, from_form: bool) -> tuple[str, str | None, dict]:
        """The task, its text and the resolved generation options of a request, or ApiError naming the problem."""
        if task is None:
            raise ApiError(400, f"task is missing: one of {', '.join(SERVED_TASKS)}")
        if task not in SERVED_TASKS:
            raise ApiError(400, f"unknown task {_short(task)}: {task_hint(task, SERVED_TASKS)}one of "
                                f"{', '.join(SERVED_TASKS)}")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, f"text must be a string, got {type(text).__name__}")
        text = text or None
        if text is not None and task in TASKS_WITHOUT_INPUT:
            raise ApiError(400, f"task {task} takes no text; drop the text or choose a task that reads one")
        if text is None and task not in TASKS_WITHOUT_INPUT:
            raise ApiError(400, f"task {task} needs text: {wanted_text(task)}")
        if text is not None:
            try:  # a task token inside the text ("<DocVQA>" + "<OD>") is refused by the processor
                self.processor.construct_prompt(task + text)
            except ValueError as e:
                raise ApiError(400, f"bad text: {e}") from None
            try:
                check_prompt(self.model.config, self.processor, task + text)
            except ValueError as e:
                raise ApiError(400, f"the text is too long: {e}") from None
        values = {name: parse_option(name, value, from_form) for name, value in options.items()}
        values = {name: value for name, value in values.items() if value is not NOT_GIVEN}
        try:
            resolved = GenerateOptions.from_model(self.model.config, **values)
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"bad generation options: {e}") from None
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
        return task, text, {k: v for k, v in dataclasses.asdict(resolved).items() if k in REQUEST_OPTIONS}

    @staticmethod
    def batch_key(options: dict):
        """Requests with equal keys may share a generate call: equal settings, and never a sampling one (the draws
        of its generator would depend on the batch)."""
        return object() if options["do_sample"] else tuple(sorted(options.items()))

    def prepare(self, data: bytes, task: str, text: str | None, options: dict, key) -> Job:
        """Decode and preprocess (in a pool thread): the Job the batcher runs."""
        image = read_image(data, self.limits.max_image_pixels)
        inputs = self.processor(text=task + (text or ""), images=image)
        return Job(task, image.size, inputs, options, key)

    def run(self, jobs: list[Job]) -> list[dict]:
        """The answers of jobs that share their options, from one generate call."""
        return generate_answers(self.model, self.processor, collate([j.inputs for j in jobs]),
                                [j.task for j in jobs], [j.image_size for j in jobs], **jobs[0].options)

    def health(self) -> dict:
        weight = self.model.image_projection.weight
        return {"status": "ok", "model": getattr(self.model, "name_or_path", None), "device": str(weight.device),
                "dtype": str(weight.dtype).removeprefix("torch."), "max_batch_size": self.batcher.max_batch_size,
                "max_wait_ms": self.batcher.max_wait * 1000, "tasks": list(SERVED_TASKS),
                "tasks_with_text": [t for t in SERVED_TASKS if t not in TASKS_WITHOUT_INPUT],
                "limits": dataclasses.asdict(self.limits), "served": dict(self.batcher.served)}


# ------------------------------------------------------------------------------------------------ batching
class Batcher:
    """Gathers jobs with equal keys into batches: a batch runs when it is full, or when its oldest job has waited
    `max_wait` seconds (at once, if the model was busy meanwhile) and no request of the same key is still being
    decoded (a burst of requests arrives here one decoding after the other: they belong to one batch, so they are
    waited for, up to DECODING_WAIT). Oldest first; the thread that calls `serve` runs the model, until `stop`.
    The command gives it its main thread, the one that loaded the model: torch runs its kernels on an OpenMP team
    of the calling thread, and a second team (a second thread running the model, or preprocessing threads running
    large torch ops) makes libgomp stop spinning between parallel regions once it has more threads than cores:
    generate then kept 2 cores only 85% busy and took 15% longer (base model, batch 8, 3 beams, 2 cores)."""

    DECODING_WAIT = 0.5  # seconds, at most, that a batch waits for the requests being decoded beyond max_wait

    def __init__(self, run, max_batch_size: int, max_wait: float):
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait
        self._pending: list[Job] = []
        self._decoding: Counter = Counter()  # batch key -> requests accepted and not yet submitted
        self._ready = threading.Condition()
        self.served = {"requests": 0, "batches": 0}  # how the batching went, for /health
        self._stopped = False

    def expect(self, key) -> None:
        """A request of this key is being decoded: submit() or cancel() follows."""
        with self._ready:
            self._decoding[key] += 1

    def cancel(self, key) -> None:
        with self._ready:
            self._forget(key)
            self._ready.notify()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._ready:
            self._forget(job.key)
            self._pending.append(job)
            self._ready.notify()
        return job.future

    def _forget(self, key) -> None:
        self._decoding[key] -= 1
        if self._decoding[key] <= 0:
            del self._decoding[key]

    def stop(self) -> None:
        """`serve` returns once the batch it runs (if any) is answered."""
        with self._ready:
            self._stopped = True
            self._ready.notify()

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._pending:
                if self._stopped:
                    return None
                self._ready.wait()
            first = self._pending[0]
            while True:
                batch = [j for j in self._pending if j.key == first.key][:self.max_batch_size]
                waited = time.monotonic() - first.arrived
                if len(batch) == self.max_batch_size or waited >= self.max_wait + self.DECODING_WAIT:
                    break
                if waited >= self.max_wait and not self._decoding[first.key]:
                    break
                left = self.max_wait - waited
                self._ready.wait(left if left > 0 else self.max_wait + self.DECODING_WAIT - waited)
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._answer(batch)

    def _answer(self, batch: list[Job]) -> None:
        try:
            results = self.run(batch)
        except Exception as e:
            if len(batch) > 1:  # find the job that fails: the others still get their answers
                for job in batch:
                    self._answer([job])
            else:
                batch[0].future.set_exception(e)
            return
        self.served["requests"] += len(batch)
        self.served["batches"] += 1
        for job, result in zip(batch, results):
            job.future.set_result(result)


# ------------------------------------------------------------------------------------------------ the app
def create_app(server: Server):
    """The FastAPI application around `server`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response
    from starlette.exceptions import HTTPException

    # no redirect of /v1/predict/ to /v1/predict: a 307 has no JSON, and httpx does not follow it (a 404 says why)
    app = FastAPI(title="Florence-2", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    health = server.health()
    page = PAGE.read_text(encoding="utf-8").replace("{{CONFIG}}", json.dumps(
        {"tasks": health["tasks"], "tasks_with_text": health["tasks_with_text"], "palette": PALETTE}))

    def answer(body: dict, status: int = 200) -> Response:
        return Response(dumps(body), status_code=status, media_type="application/json")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return answer({"error": e.message}, e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        """Starlette's own refusals, said in JSON like ours; a 405 keeps its Allow header (RFC 9110 asks for it)."""
        message = str(e.detail)
        if e.status_code == 404:
            message = f"no such path {request.url.path}: the server answers {ROUTES}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}: use {allowed}"
        response = answer({"error": message}, e.status_code)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"florence2.serve: {type(e).__name__}: {e}", file=sys.stderr)
        return answer({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    # HEAD too, as Starlette's plain routes allow it: load balancers and uptime checks probe with HEAD
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return answer(server.health())

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = await read_body(request, server.limits.max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data, fields = await form_fields(request, body, server.limits.max_body_bytes)
            from_form = True
        elif kind == "application/json":
            data, fields = json_fields(body)
            from_form = False
        else:
            raise ApiError(415, f"send multipart/form-data or application/json, not {kind or 'no content type'}")
        unknown = sorted(set(fields) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FORM_FIELDS)}")
        options = {k: v for k, v in fields.items() if k in REQUEST_OPTIONS}
        task, text, options = server.check_request(fields.get("task"), fields.get("text"), options, from_form)
        key = server.batch_key(options)
        server.batcher.expect(key)
        try:
            job = await asyncio.get_running_loop().run_in_executor(server.pool, server.prepare, data, task, text,
                                                                    options, key)
        except BaseException:  # refused, or the client went away: its batch stops waiting for it
            server.batcher.cancel(key)
            raise
        result = await asyncio.wrap_future(server.batcher.submit(job))
        return answer({"task": task, "result": result})

    return app


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


async def form_fields(request, body: bytes, limit: int) -> tuple[bytes, dict]:
    """(image bytes, the other fields as text) of a multipart body already read."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    # as many files as fields: a second image, or a text field sent as a file, gets our message below rather than
    # Starlette's "Too many files"; the body's size is already bounded
    try:
        form = await Request(request.scope, replay).form(max_files=len(FORM_FIELDS), max_fields=len(FORM_FIELDS),
                                                         max_part_size=limit)
    except HTTPException as e:
        raise ApiError(e.status_code, f"bad multipart body: {e.detail}") from None
    try:
        fields = {}
        for name, value in form.multi_items():
            if name in fields:
                raise ApiError(400, f"field {name} is given twice")
            fields[name] = value
        image = fields.pop("image", None)
        if image is None:
            raise ApiError(400, "no image: send the file in the field 'image'")
        if not isinstance(image, UploadFile):
            raise ApiError(400, "the field 'image' must be a file (multipart filename=...), not text")
        data = await image.read()
        for name, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(400, f"field {name} must be text, not a file")
        return data, fields
    finally:
        await form.close()


def json_fields(body: bytes) -> tuple[bytes, dict]:
    """(image bytes, the other fields) of a JSON body with a base64 image.

    json.loads raises more than JSONDecodeError on hostile bodies: ValueError for an integer of more than 4300
    digits, RecursionError for arrays nested some thousand deep; each is the client's mistake, a 400."""
    try:
        fields = json.loads(body, object_pairs_hook=_no_duplicates)
    except ApiError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, f"the JSON body must be an object with 'image', 'task', ..., not "
                            f"{type(fields).__name__}")
    image = fields.pop("image", None)
    if image is None or image == "":
        raise ApiError(400, "no image: send it base64-encoded in the field 'image'")
    if not isinstance(image, str):
        raise ApiError(400, f"the field 'image' must be a base64 string, got {type(image).__name__}")
    return decode_base64_image(image), fields


def _no_duplicates(pairs: list) -> dict:
    """A JSON object, refused when it names a field twice (json.loads would keep the last silently; a form field
    given twice is refused too)."""
    fields = {}
    for name, value in pairs:
        if name in fields:
            raise ApiError(400, f"field {name} is given twice")
        fields[name] = value
    return fields


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


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m florence2.serve", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per generate call")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others")
    defaults = Limits()
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    p.add_argument("--max-num-beams", type=int, default=defaults.max_num_beams)
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.max_wait_ms < 0:
        p.error("--max-batch-size must be at least 1 and --max-wait-ms at least 0")
    if args.max_body_mb <= 0 or args.max_image_pixels < 1 or args.max_num_beams < 1:
        p.error("--max-body-mb, --max-image-pixels and --max-num-beams must be positive")
    if not 0 <= args.port <= 65535:  # uvicorn's bind would raise OverflowError, a traceback
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (for the form uploads)
        import uvicorn
    except ImportError as e:
        return cli.report("python -m florence2.serve", ImportError(f"it needs {e.name}: pip install -e \".[serve]\""))
    from .model import Florence2
    from .predict import default_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a checkpoint that cannot be found offline, a bad dtype or device: one line, not a traceback
        with quiet_hub():  # (and not the hub's retries, a line each)
            model = Florence2.from_pretrained(args.model, revision=args.revision, dtype=args.dtype, device=device)
    except cli.USER_ERRORS as e:
        return cli.report("python -m florence2.serve", e)
    limits = Limits(int(args.max_body_mb * 2**20), args.max_image_pixels, args.max_num_beams)
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # PIL's own guard refuses twice as many before decoding
    server = Server(model, default_processor(model), max_batch_size=args.max_batch_size,
                    max_wait_ms=args.max_wait_ms, limits=limits)
    warm_up(server)
    http = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port))

    def answer_http() -> None:
        try:
            http.run()  # (in a thread, uvicorn leaves the signals to us)
        finally:
            server.batcher.stop()

    def shut_down(signum, frame) -> None:  # as uvicorn does: finish what is asked, then stop; twice: at once
        http.force_exit = http.should_exit
        http.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, shut_down)
    thread = threading.Thread(target=answer_http, name="http")
    thread.start()
    server.batcher.serve()  # the model in the main thread (see Batcher)
    thread.join()
    return 0 if http.started else 1  # not started: uvicorn said why (the port is taken, ...)


def warm_up(server: Server) -> None:
    """One short generation before the first request: kernels chosen, lazy imports done."""
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(blank, format="PNG")
    task, text, options = server.check_request("<CAPTION>", None, {"max_new_tokens": 2}, from_form=False)
    server.run([server.prepare(blank.getvalue(), task, text, options, server.batch_key(options))])
    print(f"florence2.serve: {server.health()['model']} ready", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
