"""The OpenAI-compatible routes of python -m florence2.serve, driven by the official `openai` client (offline, on
localhost) against the small reference model: answers equal Florence2.predict's and /v1/predict's, token counts
equal what generate generated, streams reassemble to the answer, bad requests raise the client's error classes with
a message that names the problem, and chat requests share batches with /v1/predict's."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from florence2 import Florence2
from florence2.processor import EOS_ID

from .serving import ServerProcess, pictures, stopping_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MAX_PIXELS = 200_000
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return stopping_model(tmp_path_factory.mktemp("openai") / "model")


@pytest.fixture(scope="module")
def model(model_dir, one_thread):
    return Florence2.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("openai_log") / "server.log", "--max-wait-ms", "20",
                            "--max-image-pixels", str(MAX_PIXELS), "--max-body-mb", str(MAX_BODY_MB))
    yield process
    process.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="not needed", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [p.read_bytes() for p in pictures(tmp_path_factory.mktemp("openai_pictures"), 4)]


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def user(image: bytes | None, *texts: str) -> list[dict]:
    """One user message: the image part, then the text parts."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": t} for t in texts]}]


def generated_tokens(model, image: bytes, prompt: str, **options) -> list[list[int]]:
    """What generate generates for the prompt (num_return_sequences rows): the start token left out, through the
    first end token."""
    from florence2.predict import default_processor

    inputs = default_processor(model)(text=prompt, images=Image.open(io.BytesIO(image)))
    rows = []
    for sequence in model.generate(**inputs, **options).tolist():
        tokens = sequence[1:]
        rows.append(tokens[:tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens)
    return rows


def prompt_tokens(model, prompt: str) -> int:
    """What the encoder reads: the image's tokens and the prompt's."""
    from florence2.predict import default_processor

    processor = default_processor(model)
    return processor.image_seq_length + len(processor.prompt_ids(prompt))


def test_the_served_model_is_listed(client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [str(model_dir)] and models.data[0].object == "model"
    assert client.models.retrieve(str(model_dir)).id == str(model_dir)
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o")
    assert "gpt-4o" in error.value.body["message"] and error.value.body["code"] == "model_not_found"


def test_text_and_box_tasks_equal_predict_and_v1_predict(client, server, model, model_dir, images):
    """The text of a caption; the JSON of <OD>'s and of a grounding's parsed answer, equal to Florence2.predict's
    and to /v1/predict's; usage counts the image's and the prompt's tokens and the generated ones."""
    image = images[1]
    pil = Image.open(io.BytesIO(image))
    cases = [  # (text parts, task, the task's text)
        (["<CAPTION>"], "<CAPTION>", None),
        (["<OD>"], "<OD>", None),
        (["<CAPTION_TO_PHRASE_GROUNDING>a yellow square"], "<CAPTION_TO_PHRASE_GROUNDING>", "a yellow square"),
        (["<CAPTION_TO_PHRASE_GROUNDING>", "a yellow square"], "<CAPTION_TO_PHRASE_GROUNDING>", "a yellow square"),
        (["<DocVQA>", "What is the date?"], "<DocVQA>", "What is the date?"),
    ]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for texts, task, text in cases:
            completion = client.chat.completions.create(model=str(model_dir), messages=user(image, *texts),
                                                        max_tokens=12)
            expected = model.predict(pil, task, text=text, max_new_tokens=12)[task]
            native = http.post("/v1/predict", json={"image": base64.b64encode(image).decode(), "task": task,
                                                    "text": text, "max_new_tokens": 12}).json()["result"][task]
            (choice,) = completion.choices
            assert choice.message.role == "assistant" and completion.object == "chat.completion"
            answer = choice.message.content if isinstance(expected, str) else json.loads(choice.message.content)
            assert answer == json.loads(json.dumps(expected)) == native, (texts, answer, expected)
            tokens = generated_tokens(model, image, task + (text or ""), max_new_tokens=12)[0]
            assert completion.usage.prompt_tokens == prompt_tokens(model, task + (text or ""))
            assert completion.usage.completion_tokens == len(tokens)
            assert completion.usage.total_tokens == completion.usage.prompt_tokens + len(tokens)
            assert choice.finish_reason == ("stop" if len(tokens) < 12 else "length")


def test_a_prompt_in_words_is_read_as_the_original_reads_it(client, model, model_dir, images):
    """No task token: the text is the prompt, the answer its generated text (as predict with the prompt as task)."""
    image = images[2]
    prompt = "What is in the picture?"
    completion = client.chat.completions.create(model=str(model_dir), messages=user(image, prompt), max_tokens=8)
    expected = model.predict(Image.open(io.BytesIO(image)), prompt, max_new_tokens=8)[prompt]
    assert completion.choices[0].message.content == expected
    assert completion.usage.prompt_tokens == prompt_tokens(model, prompt)


def test_finish_reason_says_whether_max_tokens_cut_the_answer(client, model, model_dir, images):
    """"length" when the answer has max_tokens tokens (its last forced), "stop" when it ended before."""
    found = set()
    for image in images:
        natural = generated_tokens(model, image, "<DocVQA>Date?", max_new_tokens=40, num_beams=1)[0]
        if len(natural) >= 40:
            continue
        for limit in (len(natural), len(natural) + 1, len(natural) - 1):
            completion = client.chat.completions.create(
                model=str(model_dir), messages=user(image, "<DocVQA>Date?"), max_completion_tokens=limit,
                extra_body={"num_beams": 1})
            expected = generated_tokens(model, image, "<DocVQA>Date?", max_new_tokens=limit, num_beams=1)[0]
            reason = "length" if len(expected) == limit else "stop"
            assert completion.choices[0].finish_reason == reason and \
                completion.usage.completion_tokens == len(expected), (limit, natural, expected)
            found.add(reason)
    assert found == {"stop", "length"}


def test_a_system_message_is_accepted_and_left_out(client, model_dir, images):
    """Clients (LangChain agents, n8n) send a system prompt first: no Florence-2 checkpoint reads one."""
    messages = user(images[0], "<OD>")
    alone = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=10)
    for role in ("system", "developer"):
        instructed = client.chat.completions.create(
            model=str(model_dir), messages=[{"role": role, "content": "You are a helpful assistant."}, *messages],
            max_tokens=10)
        assert instructed.choices[0].message.content == alone.choices[0].message.content
    # the content as one text ("content": "...") with the image part, and the image_url given as a bare string
    bare = [{"role": "user", "content": [{"type": "image_url", "image_url": data_url(images[0])},
                                         {"type": "text", "text": "<OD>"}]}]
    assert client.chat.completions.create(model=str(model_dir), messages=bare, max_tokens=10).choices[0] \
        .message.content == alone.choices[0].message.content


def _stream(client, model_dir, messages, **options):
    return list(client.chat.completions.create(model=str(model_dir), messages=messages, stream=True, **options))


def test_streaming_reassembles_to_the_answer(client, server, model_dir, images):
    for texts in (["<CAPTION>"], ["<OD>"]):
        messages = user(images[3], *texts)
        whole = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=10)
        chunks = _stream(client, model_dir, messages, max_tokens=10, stream_options={"include_usage": True})
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0] for c in chunks if c.choices]
        assert "".join(d.delta.content or "" for d in deltas) == whole.choices[0].message.content
        assert [d.finish_reason for d in deltas if d.finish_reason] == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
        assert all(c.usage is None for c in _stream(client, model_dir, messages, max_tokens=10))  # not asked
    # the events themselves: the role, the content, the finish_reason, [DONE]
    body = {"model": str(model_dir), "messages": user(images[3], "<CAPTION>"), "max_tokens": 6}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        response = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert all(e.startswith("data: ") for e in events[:-1]) and events[-2:] == ["data: [DONE]", ""]
    choices = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events[:-2]]
    assert [c["delta"] for c in choices] == [{"role": "assistant", "content": ""},
                                            {"content": whole["message"]["content"]}, {}]
    assert [c["finish_reason"] for c in choices] == [None, None, whole["finish_reason"]]


def test_sampling_seed_and_n(client, model, model_dir, images):
    """temperature samples (num_beams 1) as predict(do_sample=True) does, the same for the same seed; n answers are
    generate's num_return_sequences: n draws, or the n best beams."""
    image = images[0]
    pil = Image.open(io.BytesIO(image))

    def ask(**options):
        return client.chat.completions.create(model=str(model_dir), messages=user(image, "<CAPTION>"), max_tokens=10,
                                              **options)

    sampled = ask(temperature=0.9, seed=5)
    assert sampled.choices[0].message.content == model.predict(
        pil, "<CAPTION>", do_sample=True, num_beams=1, temperature=0.9, seed=5, max_new_tokens=10)["<CAPTION>"]
    assert ask(temperature=0.9, seed=5).choices[0].message.content == sampled.choices[0].message.content
    others = {ask(temperature=0.9, seed=seed).choices[0].message.content for seed in (6, 7, 8)}
    assert others - {sampled.choices[0].message.content}  # other seeds, other draws
    nucleus = ask(top_p=0.5, seed=5).choices[0].message.content
    assert nucleus == model.predict(pil, "<CAPTION>", do_sample=True, num_beams=1, top_p=0.5, seed=5,
                                    max_new_tokens=10)["<CAPTION>"]
    # temperature 0: the checkpoint's deterministic decoding (3 beams), as without temperature
    assert ask(temperature=0).choices[0].message.content == ask().choices[0].message.content == model.predict(
        pil, "<CAPTION>", max_new_tokens=10)["<CAPTION>"]

    from florence2.predict import default_processor

    processor = default_processor(model)
    for options, generate_options in (
            ({"temperature": 0.9, "seed": 5, "n": 3}, {"do_sample": True, "num_beams": 1, "temperature": 0.9,
                                                       "seed": 5}),
            ({"n": 2}, {}),  # the 2 best of the checkpoint's 3 beams
            ({"n": 4, "extra_body": {"num_beams": 4}}, {"num_beams": 4})):
        n = options["n"]
        completion = ask(**options)
        rows = generated_tokens(model, image, "<CAPTION>", max_new_tokens=10, num_return_sequences=n,
                                **generate_options)
        expected = [processor.post_process_generation(processor.decode(row), task="<CAPTION>")["<CAPTION>"]
                    for row in rows]
        assert [c.message.content for c in completion.choices] == expected, options
        assert [c.index for c in completion.choices] == list(range(n))
        assert completion.usage.completion_tokens == sum(len(r) for r in rows)
        chunks = _stream(client, model_dir, user(image, "<CAPTION>"), max_tokens=10, **options)
        for i, text in enumerate(expected):
            assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i) == text


def test_package_options_through_extra_body(client, model, model_dir, images):
    """extra_body's fields are /v1/predict's options (merged into the body by the client)."""
    image = images[1]
    completion = client.chat.completions.create(
        model=str(model_dir), messages=user(image, "<OD>"),
        extra_body={"max_new_tokens": 9, "num_beams": 2, "no_repeat_ngram_size": 0})
    expected = model.predict(Image.open(io.BytesIO(image)), "<OD>", max_new_tokens=9, num_beams=2,
                             no_repeat_ngram_size=0)["<OD>"]
    assert json.loads(completion.choices[0].message.content) == json.loads(json.dumps(expected))


def _png(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, format="PNG")
    return out.getvalue()


def _bad_requests(model_dir, image: bytes):
    """(what, the create() arguments, the error class, words the message must contain)."""
    ok = user(image, "<OD>")
    image_part = {"type": "image_url", "image_url": {"url": data_url(image)}}

    def with_url(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "<OD>"}]}]

    bad = openai.BadRequestError
    yield "no image", {"messages": [{"role": "user", "content": "<OD>"}]}, bad, ["no image", "image_url"]
    yield "two images", {"messages": [{"role": "user", "content": [image_part, image_part,
                                                                   {"type": "text", "text": "<OD>"}]}]}, bad, \
        ["one image", "2"]
    yield "a URL", {"messages": with_url("https://example.com/a.png")}, bad, ["data: URL", "fetches no URLs"]
    yield "a file URL", {"messages": with_url("file:///etc/passwd")}, bad, ["fetches no URLs"]
    yield "a data: URL not in base64", {"messages": with_url("data:image/png,abc")}, bad, ["base64"]
    yield "bad base64", {"messages": with_url("data:image/png;base64,not base64!")}, bad, ["not valid base64"]
    yield "not an image", {"messages": with_url("data:image/png;base64," + base64.b64encode(b"text").decode())}, \
        bad, ["unreadable image"]
    yield "an audio part", {"messages": [{"role": "user", "content": [
        image_part, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, bad, ["input_audio"]
    yield "no text", {"messages": user(image)}, bad, ["no text", "task token"]
    yield "unknown task", {"messages": user(image, "<DETECT> cars")}, bad, ["unknown task", "<DETECT>"]
    yield "misspelt task", {"messages": user(image, "<od>")}, bad, ["did you mean <OD>?"]
    yield "text for a task without", {"messages": user(image, "<CAPTION> a dog")}, bad, ["<CAPTION> takes no text"]
    yield "no text for a task with", {"messages": user(image, "<DocVQA>")}, bad, ["needs text", "question"]
    yield "a task token inside the text", {"messages": user(image, "find it <OD>")}, bad, ["bad text", "<OD>"]
    yield "prompt too long", {"messages": user(image, "<DocVQA>" + "why " * 300)}, bad, ["too long", "tokens"]
    yield "an earlier turn", {"messages": [*ok, {"role": "assistant", "content": "a box"}, *user(None, "<OD>")]}, \
        bad, ["role 'assistant'", "new conversation"]
    yield "two user messages", {"messages": [*ok, *ok]}, bad, ["one user message", "got 2"]
    yield "max_tokens 0", {"messages": ok, "max_tokens": 0}, bad, ["max_new_tokens", "max_tokens"]
    yield "max_tokens as words", {"messages": ok, "max_tokens": "ten"}, bad, ["max_tokens", "integer"]
    yield "max_tokens past the decoder", {"messages": ok, "max_completion_tokens": 10**6}, bad, \
        ["max_completion_tokens", "position table"]
    yield "two max tokens", {"messages": ok, "max_tokens": 5, "extra_body": {"max_new_tokens": 6}}, bad, \
        ["max_tokens", "max_new_tokens", "not several"]
    yield "temperature that overflows", {"messages": ok, "temperature": 1e-5}, bad, ["temperature", "0.01"]
    yield "top_p 0", {"messages": ok, "top_p": 0}, bad, ["top_p"]
    yield "negative seed", {"messages": ok, "seed": -1, "temperature": 1}, bad, ["seed"]
    yield "n 0", {"messages": ok, "n": 0}, bad, ["n must be at least 1"]
    yield "n beyond the beams", {"messages": ok, "n": 5}, bad, ["n 5", "num_beams 3"]
    yield "n with greedy decoding", {"messages": ok, "n": 2, "extra_body": {"num_beams": 1}}, bad, ["greedy"]
    yield "n beyond the limit", {"messages": ok, "n": 9, "temperature": 1}, bad, ["n 9", "limit"]
    yield "too many beams", {"messages": ok, "extra_body": {"num_beams": 64}}, bad, ["num_beams", "limit"]
    yield "bad package option", {"messages": ok, "extra_body": {"num_beams": "three"}}, bad, ["num_beams", "integer"]
    yield "unknown field", {"messages": ok, "extra_body": {"beams": 2}}, bad, ["unknown field", "beams"]
    yield "temperature 0 with do_sample", {"messages": ok, "temperature": 0, "extra_body": {"do_sample": True}}, \
        bad, ["temperature 0"]
    yield "stop sequences", {"messages": ok, "stop": ["\n"]}, bad, ["stop", "not supported"]
    yield "tools", {"messages": ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, bad, ["tools"]
    yield "a JSON answer format", {"messages": ok, "response_format": {"type": "json_object"}}, bad, \
        ["response_format"]
    yield "stream_options without stream", {"messages": ok, "stream_options": {"include_usage": True}}, bad, \
        ["stream_options"]
    yield "another model", {"messages": ok, "model": "gpt-4o"}, openai.NotFoundError, ["gpt-4o", str(model_dir)]
    yield "too many pixels", {"messages": user(_png((500, 500)), "<OD>")}, openai.APIStatusError, \
        ["500x500", str(MAX_PIXELS)]


def test_bad_requests_raise_the_clients_errors_naming_the_problem(client, server, model_dir, images):
    for what, arguments, error_class, words in _bad_requests(model_dir, images[0]):
        with pytest.raises(error_class) as error:
            client.chat.completions.create(**{"model": str(model_dir), **arguments})
        body = error.value.body
        assert all(w in body["message"] for w in words), (what, body)
        assert body["type"] == "invalid_request_error" and set(body) == {"message", "type", "param", "code"}
    assert error.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as error:  # streaming: refused before the stream starts
        client.chat.completions.create(model=str(model_dir), messages=user(images[0], "<DETECT>"), stream=True)
    assert "<DETECT>" in error.value.body["message"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert "use POST" in wrong_method.json()["error"]["message"]
        plain = http.post("/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
        not_json = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
        large = http.post("/v1/chat/completions", content=b" " * (MAX_BODY_MB * 2**20 + 1),
                          headers={"content-type": "application/json"})
        assert large.status_code == 413 and "limit" in large.json()["error"]["message"]
        assert isinstance(http.get("/v1/nothing").json()["error"], str)  # other paths keep /v1/predict's shape
    ok = client.chat.completions.create(model=str(model_dir), messages=user(images[0], "<OD>"), max_tokens=8)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_chat_and_predict_requests_share_a_batch(model_dir, model, images, tmp_path):
    """A chat request and a /v1/predict request with the same settings, arriving together, are one generate call:
    a batch of two (the batch runs when full; the wait is long enough for both to arrive on a busy machine)."""
    server = ServerProcess(model_dir, tmp_path / "server.log", "--max-batch-size", "2", "--max-wait-ms", "30000")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http, \
                openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120) as chat:
            before = http.get("/health").json()["served"]

            def native():
                return http.post("/v1/predict", json={"image": base64.b64encode(images[1]).decode(), "task": "<OD>",
                                                      "max_new_tokens": 10}).json()["result"]["<OD>"]

            def completion():
                return json.loads(chat.chat.completions.create(model=str(model_dir), messages=user(images[2], "<OD>"),
                                                               max_tokens=10).choices[0].message.content)

            with ThreadPoolExecutor(2) as pool:
                answers = [f.result() for f in [pool.submit(native), pool.submit(completion)]]
            after = http.get("/health").json()["served"]
    finally:
        server.close()
    assert after["requests"] - before["requests"] == 2 and after["batches"] - before["batches"] == 1
    expected = [model.predict(Image.open(io.BytesIO(images[i])), "<OD>", max_new_tokens=10)["<OD>"] for i in (1, 2)]
    assert answers == json.loads(json.dumps(expected))


def test_the_prompt_tokens_count_the_image(model):
    """(what usage's prompt_tokens counts: the encoder's input, image tokens first)"""
    from florence2.predict import default_processor

    processor = default_processor(model)
    inputs = processor(text="<OD>", images=Image.new("RGB", (40, 30)))
    features = model.encode(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])[0]
    assert features.shape[1] == prompt_tokens(model, "<OD>")
