"""OpenAI-compatible routes, for the clients people already run (the `openai` package, LangChain, LiteLLM, n8n):

    GET  /v1/models            the served checkpoint, in OpenAI's list shape (GET /v1/models/{id}: the one)
    POST /v1/chat/completions  one user message of one `image_url` part (a data: URL) and text: a task token,
                               optionally followed by its text ("<CAPTION_TO_PHRASE_GROUNDING>a red car"), or a
                               prompt in words -> a chat completion (or its chunks, with "stream": true)

The text is the prompt exactly as the original's processor reads it (its text parts joined as they are, so a task
token and its text may come as two parts). The task is the token the text starts with, checked as /v1/predict
checks a task and its text; a text that starts with anything else is a prompt in words, answered with the
generated text. `content` is the answer's text for text tasks, and for tasks with coordinates the JSON of the
parsed answer, exactly what /v1/predict returns under the task.

OpenAI's options become generate's (see `chat_options`), the package's own options may be given beside them
(the openai client's `extra_body` merges them into the body) and are checked as /v1/predict checks them; the
requests join the same batches as /v1/predict's. Errors are said in OpenAI's shape, with /v1/predict's statuses.
"""

import asyncio
import re
import sys
import time
import uuid

from ..batch import dumps, task_hint
from ..postprocess import parse_type
from .server import (
    NOT_GIVEN,
    REQUEST_OPTIONS,
    SERVED_TASKS,
    Answer,
    ApiError,
    Server,
    decode_base64_image,
    load_json,
    parse_option,
    read_body,
    short_repr,
)

PATHS = ("/v1/chat/completions", "/v1/models")  # requests under these get their errors in OpenAI's shape
# OpenAI's names of generate's options.
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "n": "num_return_sequences"}
# OpenAI's fields that change nothing here at these values (clients such as n8n send them); other values are
# refused by name, as OpenAI refuses what a model does not support.
NEUTRAL = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "logprobs": (False, None),
           "top_logprobs": (0, None), "stop": (None, [], ""), "logit_bias": (None, {}), "tools": (None, []),
           "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "store": (None, False)}
# `user` identifies the client's end user to OpenAI; it has no effect on the answer, here as there.
CHAT_FIELDS = ("model", "messages", "stream", "stream_options", "user", *RENAMED, *REQUEST_OPTIONS, *NEUTRAL)
INSTRUCTION_ROLES = ("system", "developer")  # read by no Florence-2 checkpoint: accepted and left out
TOKEN_LIKE = re.compile(r"<[A-Za-z_]+>")  # a text starting like a task token
IMAGE_PART = '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'


def speaks_openai(path: str) -> bool:
    return path.startswith(PATHS)


def error_body(e: ApiError) -> dict:
    """OpenAI's error shape, with /v1/predict's message."""
    kind = "server_error" if e.status >= 500 else "invalid_request_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "florence2"}


# ------------------------------------------------------------------------------------------------ the request
def read_messages(messages) -> tuple[bytes, str]:
    """(the image's bytes, the text) of the conversation: one user message, beside any system or developer
    messages (instructions no Florence-2 checkpoint reads: left out, as clients such as LangChain agents and n8n
    always send one). Earlier turns are refused: the model answers one question about one image, and answering
    the last turn alone would answer something else than the conversation asks."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a list with one user message", "messages")
    users = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
        if message["role"] in INSTRUCTION_ROLES:
            continue
        if message["role"] != "user":
            raise ApiError(400, f"messages[{i}] has the role {short_repr(message['role'])}: Florence-2 answers one "
                                "user message, without earlier turns; send each question as a new conversation",
                           f"messages[{i}].role")
        users.append(i)
    if len(users) != 1:
        raise ApiError(400, f"Florence-2 answers one user message (a question about one image), got {len(users)}; "
                            "send each question as a new conversation", "messages")
    i = users[0]
    content = messages[i].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
    images, texts = [], []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text must be a string", f"{where}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # some clients send the URL itself
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.image_url must be {{\"url\": \"data:...\"}}", f"{where}.image_url")
            images.append((url, f"{where}.image_url.url"))
        else:
            raise ApiError(400, f"{where} has the type {short_repr(kind)}: send one part of type 'image_url' and "
                                "text parts", f"{where}.type")
    if not images:
        raise ApiError(400, f"no image: send it in the user message as a part {IMAGE_PART}", f"messages[{i}].content")
    if len(images) > 1:
        raise ApiError(400, f"one image per request, got {len(images)} image_url parts", f"messages[{i}].content")
    return image_bytes(*images[0]), "".join(texts)


def image_bytes(url: str, param: str) -> bytes:
    """The bytes of a data: URL with base64 content; any other URL is refused: the server fetches nothing."""
    if not url.startswith("data:"):
        raise ApiError(400, f"the image must be a data: URL (data:image/png;base64,...), got {short_repr(url, 40)}: "
                            "the server fetches no URLs", param)
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, "the image's data: URL must be base64 (data:image/png;base64,...)", param)
    try:
        return decode_base64_image(data)
    except ApiError as e:
        raise ApiError(e.status, e.message, param) from None


def read_prompt(server: Server, text: str) -> tuple[str, str]:
    """(the prompt as the original's processor reads it, the task whose parsing its answer gets): the task token
    the text starts with, checked with its text as /v1/predict checks them; or the text as a prompt in words."""
    if not text:
        raise ApiError(400, "no text: send a task token (<CAPTION>, <OD>, ...), optionally followed by its text, or "
                            "a prompt", "messages")
    token = TOKEN_LIKE.match(text)
    if token and token.group() in SERVED_TASKS:
        task, rest = server.check_task(token.group(), text[token.end():])
        return task + (rest or ""), task
    if token:  # a misspelt task, or one this server does not know: read as words, it would answer something else
        raise ApiError(400, f"unknown task {short_repr(token.group())} at the start of the text: "
                            f"{task_hint(token.group(), SERVED_TASKS)}the tasks are {', '.join(SERVED_TASKS)}",
                       "messages")
    try:
        server.check_prompt(text)
    except ApiError as e:
        raise ApiError(e.status, e.message, "messages") from None
    return text, text  # a prompt in words: its answer is parsed as text (the original's "pure_text")


def chat_options(server: Server, body: dict) -> dict:
    """generate's options of a chat request, resolved as /v1/predict resolves them.

    max_tokens (or max_completion_tokens) is max_new_tokens. temperature 0 is OpenAI's deterministic decoding: the
    checkpoint's (beam search for Microsoft's). A temperature above 0 or a top_p below 1 samples as OpenAI does, one
    sequence drawn token by token (num_beams 1, unless the request sets num_beams: beam sampling); without either
    the checkpoint's decoding runs, so an answer equals /v1/predict's and Florence2.predict's. seed seeds the draws.
    n answers are the n best beams of one beam search (n <= num_beams) or n draws of one seeded generator; greedy
    decoding has one answer, so n > 1 is refused there. The package's own options (do_sample, num_beams, ...) keep
    /v1/predict's meaning."""
    given = [name for name in ("max_tokens", "max_completion_tokens", "max_new_tokens") if body.get(name) is not None]
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}, not several", given[1])
    fields = {RENAMED[name]: name for name in given if name in RENAMED}
    values = {}
    for field, value in body.items():
        name = RENAMED.get(field, field)
        if name in REQUEST_OPTIONS and value is not None:
            parsed = parse_option(name, value, from_form=False, field=field)
            if parsed is not NOT_GIVEN:
                values[name] = parsed
    n = parse_option("num_return_sequences", body.get("n"), from_form=False, field="n")
    n = 1 if n is NOT_GIVEN else n
    temperature, top_p = values.get("temperature"), values.get("top_p")
    if temperature == 0:
        if values.get("do_sample"):
            raise ApiError(400, "temperature 0 does not sample: give do_sample false, or a temperature above 0",
                           "temperature")
        del values["temperature"]
        values["do_sample"] = False
    elif "do_sample" not in values and (temperature is not None or (top_p is not None and top_p < 1)):
        values["do_sample"] = True
        values.setdefault("num_beams", 1)
    options = server.resolve_options(values, fields)
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", "n")
    if n > 1:
        if n > server.limits.max_num_beams:
            raise ApiError(400, f"n {n} is more than this server's limit of {server.limits.max_num_beams}", "n")
        if options["num_beams"] == 1 and not options["do_sample"]:
            raise ApiError(400, f"n {n}: greedy decoding has one answer; sample (a temperature above 0) or search "
                                f"with num_beams >= {n}", "n")
        if options["num_beams"] > 1 and n > options["num_beams"]:
            raise ApiError(400, f"n {n} is more than num_beams {options['num_beams']}: beam search returns at most "
                                "its beams", "n")
        options["num_return_sequences"] = n  # (only then: a request of n = 1 shares /v1/predict's batches)
    return options


def check_fields(server: Server, body) -> None:
    """ApiError for a body that is no object, an unknown field, an unsupported feature, or another model."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the JSON body must be an object with 'model' and 'messages', not {type(body).__name__}")
    unknown = sorted(set(body) - set(CHAT_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; this server reads {', '.join(CHAT_FIELDS)}",
                       unknown[0], "unknown_parameter")
    for field, neutral in NEUTRAL.items():
        # (equal values, a number for a number: 0.0 is 0, but false is no 0)
        if field in body and not any(body[field] == v and isinstance(body[field], bool) == isinstance(v, bool)
                                     for v in neutral):
            raise ApiError(400, f"{field} {short_repr(body[field])} is not supported by Florence-2 (only "
                                f"{' or '.join(dumps(v) for v in neutral)})", field, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"model is missing: this server serves {server.model_name!r}", "model",
                       "missing_required_parameter")
    if model != server.model_name:
        raise ApiError(404, f"the model {short_repr(model)} does not exist: this server serves {server.model_name!r}",
                       "model", "model_not_found")
    if "messages" not in body:
        raise ApiError(400, "messages is missing: one user message with an image and a text", "messages",
                       "missing_required_parameter")
    if body.get("stream") not in (None, True, False):
        raise ApiError(400, f"stream must be true or false, got {short_repr(body['stream'])}", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not body.get("stream"):
            raise ApiError(400, "stream_options is only allowed with stream true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"} or \
                stream_options.get("include_usage") not in (None, True, False):
            raise ApiError(400, 'stream_options must be {"include_usage": true or false}', "stream_options")


# ------------------------------------------------------------------------------------------------ the answer
def finish_reason(answer: Answer, options: dict, eos: int) -> str:
    """"length" when max_new_tokens cut the answer: its last token was forced (the checkpoint's forced end token at
    the last position) or is no end token; else "stop"."""
    cut = len(answer.tokens) == options["max_new_tokens"] and (
        options["forced_eos_token_id"] is not None or answer.tokens[-1] != eos)
    return "length" if cut else "stop"


def content(answer: Answer, task: str) -> str:
    """The text of a text task's answer; the JSON of the parsed answer for the tasks with coordinates."""
    result = answer.result[task]
    return result if parse_type(task) == "pure_text" else dumps(result)


def usage(prompt_tokens: int, answers: list[Answer]) -> dict:
    completion = sum(len(a.tokens) for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def add_routes(app, server: Server, answer) -> None:
    """The OpenAI-compatible routes on `app`; `answer(body, status)` is the app's JSON response."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    eos = server.model.config.text.eos_token_id

    @app.get("/v1/models")
    async def models():
        return answer({"object": "list", "data": [model_card(server)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.model_name:
            raise ApiError(404, f"the model {short_repr(name)} does not exist: this server serves "
                                f"{server.model_name!r}", "model", "model_not_found")
        return answer(model_card(server))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"send application/json, not {kind or 'no content type'}")
        body = load_json(await read_body(request, server.limits.max_body_bytes))
        check_fields(server, body)
        data, text = read_messages(body["messages"])
        prompt, task = read_prompt(server, text)
        options = chat_options(server, body)
        key = server.batch_key(options)
        server.batcher.expect(key)
        try:
            job = await asyncio.get_running_loop().run_in_executor(server.pool, server.prepare, data, prompt, task,
                                                                    options, key)
        except ApiError as e:
            server.batcher.cancel(key)
            raise ApiError(e.status, e.message, e.param or "messages") from None  # the image: unreadable, too large
        except BaseException:  # the client went away: its batch stops waiting for it
            server.batcher.cancel(key)
            raise
        answers = asyncio.wrap_future(server.batcher.submit(job))
        prompt_tokens = server.processor.image_seq_length + job.inputs["input_ids"].shape[1]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(chunks(head, answers, task, options, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        done = await answers
        return answer({**head, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": content(a, task), "refusal": None},
             "logprobs": None, "finish_reason": finish_reason(a, options, eos)} for i, a in enumerate(done)],
            "usage": usage(prompt_tokens, done)})

    async def chunks(head: dict, answers, task: str, options: dict, prompt_tokens: int, include_usage: bool):
        """Server-sent events in OpenAI's chunk format: each choice's role first (at once), its content and its
        finish_reason when the batch is generated (the batch's rows are generated together, so an answer comes
        whole), the usage if asked, then [DONE]."""
        def event(choices: list, **extra) -> str:
            chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            if include_usage:
                chunk.setdefault("usage", None)
            return f"data: {dumps(chunk)}\n\n"

        def choice(i: int, delta: dict, finish: str | None = None) -> dict:
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        n = options.get("num_return_sequences", 1)
        yield event([choice(i, {"role": "assistant", "content": ""}) for i in range(n)])
        try:
            done = await answers
        except Exception as e:  # said as OpenAI says an error in a stream; the client raises it
            print(f"florence2.serve: {type(e).__name__}: {e}", file=sys.stderr)
            yield f"data: {dumps(error_body(ApiError(500, f'internal error: {type(e).__name__}: {e}')))}\n\n"
            return
        for i, a in enumerate(done):
            yield event([choice(i, {"content": content(a, task)})])
        yield event([choice(i, {}, finish_reason(a, options, eos)) for i, a in enumerate(done)])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, done))
        yield "data: [DONE]\n\n"
