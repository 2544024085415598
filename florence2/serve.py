"""An HTTP server for Florence-2 with dynamic batching and a web page (FastAPI + uvicorn: the `serve` extra).

    python -m florence2.serve --model microsoft/Florence-2-base-ft [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-wait-ms 10]

    POST /v1/predict  multipart/form-data: `image` (the file), `task`, optional `text`, optional generation options
                      named like generate's keyword arguments (max_new_tokens, num_beams, do_sample, seed, ...);
                      or application/json: the same fields, `image` as base64 (a data: URL too)
                      -> {"task": "<OD>", "result": {"<OD>": {...}}}, exactly what Florence2.predict returns
    GET  /health      the model, its device, the tasks and the limits
    GET  /            a page (no external resources) to upload an image and see the result drawn on it

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
from .batch import dumps
from .draw import PALETTE
from .generate import GenerateOptions
from .postprocess import TASKS, TASKS_WITHOUT_INPUT
from .predict import check_prompt, collate, generate_answers

PAGE = Path(__file__).parent / "assets" / "serve.html"
QUESTION_TASKS = ("<DocVQA>", "<VQA>")  # answered as text, like fine-tunes on DocVQA (the blog's prompt)
SERVED_TASKS = TASKS + QUESTION_TASKS
# Options a request may set: generate's, except what predict fixes (one answer; scores where the task has them).
REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerateOptions)
                        if f.name not in ("num_return_sequences", "return_scores"))
OPTION_TYPES = typing.get_type_hints(GenerateOptions)
FORM_FIELDS = ("image", "task", "text", *REQUEST_OPTIONS)
PREPROCESS_THREADS = min(4, os.cpu_count() or 1)  # decoding and resizing beside the model; bounded, so is memory


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


def parse_option(name: str, value, from_form: bool):
    """A generation option from a JSON value, or from the text of a form field, typed as GenerateOptions has it
    (its values are then checked by GenerateOptions itself)."""
    kind = OPTION_TYPES[name]
    types = typing.get_args(kind) or (kind,)
    if from_form:
        value = _from_text(value.strip(), types)
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):
        ok = int in types or float in types
    elif isinstance(value, float):
        ok = float in types and math.isfinite(value)
    else:
        ok = (isinstance(value, str) and str in types) or (value is None and type(None) in types)
    if not ok:
        wanted = " or ".join({int: "an integer", float: "a finite number", bool: "true or false",
                              str: '"never"', type(None): "null"}[t] for t in types)
        raise ApiError(400, f"option {name} must be {wanted}, got {value!r}")
    if name == "seed" and value is not None and not 0 <= value < 2**63:
        raise ApiError(400, f"option seed must be between 0 and 2**63 - 1, got {value}")
    return float(value) if float in types else value


def _from_text(text: str, types: tuple):
    """The typed value of a form field's text: true/false, null, an integer or a number; else the text."""
    lowered = text.lower()
    if bool in types and lowered in ("true", "false"):
        return lowered == "true"
    if type(None) in types and lowered in ("null", "none"):
        return None
    for t in (int, float):
        if t in types:
            try:
                return t(text)
            except ValueError:
                pass
    return text


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
            raise ApiError(400, f"unknown task {task!r}: one of {', '.join(SERVED_TASKS)}")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, f"text must be a string, got {type(text).__name__}")
        text = text or None
        if text is not None and task in TASKS_WITHOUT_INPUT:
            raise ApiError(400, f"task {task} takes no text; drop the text or choose a task that reads one")
        if text is None and task not in TASKS_WITHOUT_INPUT:
            what = "a region as <loc_x1><loc_y1><loc_x2><loc_y2>" if task.startswith("<REGION_TO") else \
                "a question" if task in QUESTION_TASKS else "a phrase"
            raise ApiError(400, f"task {task} needs text: {what}")
        if text is not None:
            try:
                check_prompt(self.model.config, self.processor, task + text)
            except ValueError as e:
                raise ApiError(400, f"the text is too long: {e}") from None
        values = {name: parse_option(name, value, from_form) for name, value in options.items()}
        try:
            resolved = GenerateOptions.from_model(self.model.config, **values)
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"bad generation options: {e}") from None
        if resolved.num_beams > self.limits.max_num_beams:
            raise ApiError(400, f"num_beams {resolved.num_beams} is more than this server's limit of "
                                f"{self.limits.max_num_beams}")
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

    app = FastAPI(title="Florence-2", docs_url=None, redoc_url=None, openapi_url=None)
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
        return answer({"error": str(e.detail)}, e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"florence2.serve: {type(e).__name__}: {e}", file=sys.stderr)
        return answer({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    @app.get("/health")
    async def health():
        return answer(server.health())

    @app.get("/", response_class=HTMLResponse)
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
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=limit)
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
    """(image bytes, the other fields) of a JSON body with a base64 image."""
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the JSON body must be an object with 'image', 'task', ...")
    image = fields.pop("image", None)
    if not isinstance(image, str) or not image:
        raise ApiError(400, "no image: send it base64-encoded in the field 'image'")
    if image.startswith("data:"):  # a data URL, as the browser's FileReader makes it
        image = image.partition(",")[2]
    try:
        return base64.b64decode(image, validate=True), fields
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for the form uploads)
        import uvicorn
    except ImportError as e:
        return cli.report("python -m florence2.serve", ImportError(f"it needs {e.name}: pip install -e \".[serve]\""))
    from .model import Florence2
    from .predict import default_processor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a checkpoint that cannot be found offline, a bad dtype or device: one line, not a traceback
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
