"""The FastAPI application: the native routes (POST /v1/predict, GET /health), the page (GET /) and the OpenAI
compatible routes (openai_routes)."""

import asyncio
import json
import sys
from pathlib import Path

from ..batch import dumps
from ..draw import PALETTE
from . import openai_routes
from .server import REQUEST_OPTIONS, ApiError, Server, decode_base64_image, load_json, read_body

PAGE = Path(__file__).parent.parent / "assets" / "serve.html"
FORM_FIELDS = ("image", "task", "text", *REQUEST_OPTIONS)
ROUTES = "POST /v1/predict, POST /v1/chat/completions, GET /v1/models, GET /health, GET /"


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

    def refuse(request, e: ApiError) -> Response:
        """The error in the shape of the route's API: OpenAI's under its paths, {"error": message} elsewhere."""
        body = openai_routes.error_body(e) if openai_routes.speaks_openai(request.url.path) else {"error": e.message}
        return answer(body, e.status)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return refuse(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        """Starlette's own refusals, said in JSON like ours; a 405 keeps its Allow header (RFC 9110 asks for it)."""
        message = str(e.detail)
        if e.status_code == 404:
            message = f"no such path {request.url.path}: the server answers {ROUTES}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}: use {allowed}"
        response = refuse(request, ApiError(e.status_code, message))
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"florence2.serve: {type(e).__name__}: {e}", file=sys.stderr)
        return refuse(request, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

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
            job = await asyncio.get_running_loop().run_in_executor(server.pool, server.prepare, data,
                                                                    task + (text or ""), task, options, key)
        except BaseException:  # refused, or the client went away: its batch stops waiting for it
            server.batcher.cancel(key)
            raise
        answers = await asyncio.wrap_future(server.batcher.submit(job))
        return answer({"task": task, "result": answers[0].result})

    openai_routes.add_routes(app, server, answer)
    return app


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
    """(image bytes, the other fields) of a JSON body with a base64 image."""
    fields = load_json(body)
    if not isinstance(fields, dict):
        raise ApiError(400, f"the JSON body must be an object with 'image', 'task', ..., not "
                            f"{type(fields).__name__}")
    image = fields.pop("image", None)
    if image is None or image == "":
        raise ApiError(400, "no image: send it base64-encoded in the field 'image'")
    if not isinstance(image, str):
        raise ApiError(400, f"the field 'image' must be a base64 string, got {type(image).__name__}")
    return decode_base64_image(image), fields
