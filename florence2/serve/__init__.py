"""An HTTP server for Florence-2 with dynamic batching and a web page (FastAPI + uvicorn: the `serve` extra).

    python -m florence2.serve --model microsoft/Florence-2-base-ft [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--max-wait-ms 10]

    POST /v1/predict  multipart/form-data: `image` (the file), `task`, optional `text`, optional generation options
                      named like generate's keyword arguments (max_new_tokens, num_beams, do_sample, seed, ...);
                      or application/json: the same fields, `image` as base64 (a data: URL too)
                      -> {"task": "<OD>", "result": {"<OD>": {...}}}, exactly what Florence2.predict returns
    GET  /health      the model, its device, the tasks and the limits (HEAD too)
    GET  /            a page (no external resources) to upload an image and see the result drawn on it
    POST /v1/chat/completions, GET /v1/models
                      OpenAI-compatible (the openai client, LangChain, LiteLLM, ...): one user message with one
                      image_url part (a data: URL) and the task token, optionally followed by its text; see
                      openai_routes and docs/openai.md

Options are read as clients send them (`parse_option`): booleans as true/false, 1/0, yes/no or on/off, numbers as
text in JSON too, and an empty field (or a JSON null) is the default.

Requests that arrive together with the same generation settings are gathered into one `generate` call (up to
--max-batch-size, waiting at most --max-wait-ms after the first of them); their prompts are padded and masked, so
each gets exactly what it would get alone (`predict.generate_answers` is the one path from inputs to answers).
Sampling requests run alone: the draws of a seeded generator would otherwise depend on the batch.

Bad input is answered with a 4xx and {"error": "..."} (OpenAI's error shape on its routes) that names the problem
(the body or the image too large, an unreadable image, an unknown task, text for a task that takes none, a prompt
too long, a bad option) and never reaches the model. Images come only as bytes in the request: the server fetches
nothing. It keeps no state between requests, so replicas behind a load balancer need no coordination.
"""

from .app import create_app, json_fields
from .batcher import Batcher, Job
from .command import main, parse_args, warm_up
from .server import (
    NOT_GIVEN,
    REQUEST_OPTIONS,
    SERVED_TASKS,
    ApiError,
    Limits,
    Server,
    decode_base64_image,
    parse_option,
    read_body,
    read_image,
)

__all__ = ["NOT_GIVEN", "REQUEST_OPTIONS", "SERVED_TASKS", "ApiError", "Batcher", "Job", "Limits", "Server",
           "create_app", "decode_base64_image", "json_fields", "main", "parse_args", "parse_option", "read_body",
           "read_image", "warm_up"]
