"""python -m florence2.serve in a subprocess on the small reference model: concurrent requests are batched and each
answer equals Florence2.predict on the same input; bad input gets its 4xx and leaves the server working."""

import base64
import io
import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from florence2 import Florence2

from .serving import ServerProcess, pictures, stopping_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MAX_BODY_MB = 1
MAX_PIXELS = 200_000  # PIL's guard then refuses more than twice this before decoding
# Tasks, texts and generation settings of the concurrent requests: requests with equal settings share batches.
CASES = [
    ("<OD>", None, {"max_new_tokens": 10}),
    ("<CAPTION>", None, {"max_new_tokens": 10}),
    ("<DocVQA>", "Who signed the letter at the bottom of the second page?", {"max_new_tokens": 10}),
    ("<CAPTION_TO_PHRASE_GROUNDING>", "a yellow square", {"max_new_tokens": 10}),
    ("<OD>", None, {"max_new_tokens": 6, "num_beams": 1}),
    ("<DocVQA>", "Date?", {"max_new_tokens": 6, "num_beams": 1}),
    ("<REGION_TO_DESCRIPTION>", "<loc_100><loc_100><loc_600><loc_700>", {"max_new_tokens": 6, "num_beams": 1}),
    ("<CAPTION>", None, {"max_new_tokens": 6, "do_sample": True, "seed": 3, "num_beams": 1}),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return stopping_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("serve_log") / "server.log",
                            "--max-batch-size", "8", "--max-wait-ms", "20", "--max-body-mb", str(MAX_BODY_MB),
                            "--max-image-pixels", str(MAX_PIXELS))
    yield process
    process.close()


@pytest.fixture(scope="module")
def client(server):
    """One client for every thread: connections are reused (a new client per request costs more CPU than the
    tiny model's answer)."""
    with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=16)) as c:
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [p.read_bytes() for p in pictures(tmp_path_factory.mktemp("serve_pictures"), 6)]


def post(client, image: bytes, task, text=None, options=None, as_json=False, path="/v1/predict"):
    fields = {k: v for k, v in (("task", task), ("text", text)) if v is not None} | (options or {})
    if as_json:
        return client.post(path, json={"image": base64.b64encode(image).decode(), **fields})
    return client.post(path, files={"image": ("image.png", image, "image/png")},
                       data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()})


def _post_json(client, body: bytes):
    return client.post("/v1/predict", content=body, headers={"content-type": "application/json"})


def test_concurrent_requests_are_batched_and_equal_predict(server, client, model_dir, images, one_thread):
    model = Florence2.from_pretrained(model_dir)
    inputs = list(itertools.product(range(len(images)), range(len(CASES))))  # 48 distinct requests
    expected = {}
    for i, c in inputs:
        task, text, options = CASES[c]
        expected[i, c] = json.loads(json.dumps(
            {"task": task, "result": model.predict(Image.open(io.BytesIO(images[i])), task, text=text, **options)}))
    assert len({json.dumps(v["result"]) for v in expected.values()}) > 24  # the answers differ from input to input

    def request(n: int):
        i, c = inputs[(7 * n) % len(inputs)]
        task, text, options = CASES[c]
        response = post(client, images[i], task, text, options, as_json=n % 3 == 0)
        return (i, c), response.status_code, response.json()

    with ThreadPoolExecutor(16) as clients:
        list(clients.map(request, range(32)))  # warm-up: batches of every size, every path
        warm = server.rss_mb()
        before = client.get("/health").json()["served"]
        answers = list(clients.map(request, range(200)))
        after = client.get("/health").json()["served"]
        loaded = server.rss_mb()
    for key, status, body in answers:
        assert status == 200, body
        assert body == expected[key], (key, body, expected[key])
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 200 and batches < requests / 2, after  # gathered into batches
    assert loaded <= 1.1 * warm, (warm, loaded)


def _png(size, colour="white") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _bad_requests(client, image: bytes):
    """(what, response, expected status, words the error must contain) of each kind of bad input."""
    big = _png((1000, 1000))  # 1 MP: more than twice the limit, refused by PIL's guard before decoding
    large = _png((500, 500))  # 0.25 MP: over the limit, under PIL's error threshold
    yield "body too large", post(client, b"\0" * (MAX_BODY_MB * 2**20 + 1), "<OD>"), 413, ["body", "limit"]
    yield "JSON body too large", client.post("/v1/predict", content=b"{" + b" " * MAX_BODY_MB * 2**20 + b"}",
                                            headers={"content-type": "application/json"}), 413, ["body"]
    yield "decompression bomb", post(client, big, "<OD>"), 413, ["too large"]
    yield "too many pixels", post(client, large, "<OD>"), 413, ["500x500", str(MAX_PIXELS)]
    yield "not an image", post(client, b"this is not an image", "<OD>"), 400, ["unreadable image"]
    yield "truncated image", post(client, image[:len(image) // 2], "<OD>"), 400, ["unreadable image"]
    yield "empty image", post(client, b"", "<OD>"), 400, ["empty"]
    yield "no image", client.post("/v1/predict", data={"task": "<OD>"}, files={"other": ("a", b"b")}), \
        400, ["image"]
    yield "unknown task", post(client, image, "<DETECT>"), 400, ["unknown task", "<DETECT>", "<OD>"]
    yield "no task", post(client, image, None), 400, ["task is missing"]
    yield "text for a task without", post(client, image, "<CAPTION>", "a dog"), 400, ["<CAPTION> takes no text"]
    yield "no text for a task with", post(client, image, "<DocVQA>"), 400, ["needs text", "question"]
    yield "prompt too long", post(client, image, "<DocVQA>", "why " * 300), 400, ["too long", "tokens"]
    yield "bad option type", post(client, image, "<OD>", options={"num_beams": "three"}), 400, ["num_beams", "integer"]
    yield "bad option value", post(client, image, "<OD>", options={"max_new_tokens": 0}), 400, ["max_new_tokens"]
    yield "option too large", post(client, image, "<OD>", options={"max_new_tokens": 10**6}), 400, ["max_new_tokens"]
    yield "too many beams", post(client, image, "<OD>", options={"num_beams": 64}), 400, ["num_beams", "limit"]
    yield "bad float", post(client, image, "<OD>", options={"temperature": "nan", "do_sample": True}), 400, \
        ["temperature"]
    yield "bad bool", post(client, image, "<OD>", options={"do_sample": "maybe"}), 400, ["do_sample", "true or false"]
    yield "unknown option", post(client, image, "<OD>", options={"beams": 2}), 400, ["unknown field", "beams"]
    yield "JSON option type", post(client, image, "<OD>", options={"num_beams": 2.5}, as_json=True), 400, ["num_beams"]
    yield "bad base64", client.post("/v1/predict", json={"image": "not base64!", "task": "<OD>"}), 400, \
        ["base64"]
    yield "bad JSON", client.post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"}), \
        400, ["not JSON"]
    # json.loads raises ValueError (not JSONDecodeError) past 4300 digits and RecursionError when nested deep
    yield "JSON number of 5000 digits", _post_json(client, b'{"task": "<OD>", "max_new_tokens": ' + b"9" * 5000 +
                                                  b"}"), 400, ["not JSON", "digits"]
    beyond_floats = b'{"image": "%s", "task": "<OD>", "length_penalty": 1%s}' % (base64.b64encode(image), b"0" * 400)
    yield "JSON integer past float's range", _post_json(client, beyond_floats), 400, ["length_penalty", "finite number"]
    yield "JSON nested 100000 deep", _post_json(client, b"[" * 100_000 + b"]" * 100_000), 400, ["not JSON"]
    yield "JSON field twice", _post_json(client, b'{"image": "%s", "task": "<OD>", "task": "<CAPTION>"}' %
                                         base64.b64encode(image)), 400, ["task", "twice"]
    yield "JSON image URL", client.post("/v1/predict", json={"image": "https://example.com/a.png", "task": "<OD>"}), \
        400, ["fetches no URLs"]
    yield "other content type", client.post("/v1/predict", content=b"x=1",
                                           headers={"content-type": "text/plain"}), 415, ["multipart"]
    yield "chunked body too large", client.post("/v1/predict", content=iter([b" " * 2**16] * (16 * MAX_BODY_MB + 1)),
                                                headers={"content-type": "application/json"}), 413, ["limit"]
    yield "bad multipart", client.post("/v1/predict", content=b"--x\r\nbroken",
                                      headers={"content-type": "multipart/form-data; boundary=y"}), 400, \
        ["bad multipart body"]
    yield "second image", client.post("/v1/predict", data={"task": "<OD>"}, files=[
        ("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))]), 400, \
        ["image", "given twice"]
    yield "text sent as a file", client.post("/v1/predict", data={"task": "<DocVQA>"}, files=[
        ("image", ("a.png", image, "image/png")), ("text", ("q.txt", b"Date?", "text/plain"))]), 400, \
        ["text", "not a file"]
    yield "lower-case task", post(client, image, "<od>"), 400, ["unknown task", "did you mean <OD>?"]
    yield "task token in the text", post(client, image, "<DocVQA>", "<OD>"), 400, ["bad text", "<OD>"]
    # far outside these, float32 overflows in generate: NaN probabilities, OverflowError (were 500s)
    yield "temperature that overflows", post(client, image, "<CAPTION>", options={
        "do_sample": True, "temperature": 1e-40, "num_beams": 1, "max_new_tokens": 4}), 400, ["temperature", "0.01"]
    yield "length penalty that overflows", post(client, image, "<CAPTION>", options={
        "length_penalty": 1000, "num_beams": 2, "max_new_tokens": 10, "min_new_tokens": 5}), 400, ["length_penalty"]
    yield "unknown path", client.get("/v1/nothing"), 404, ["/v1/nothing", "POST /v1/predict"]
    yield "trailing slash", post(client, image, "<OD>", path="/v1/predict/"), 404, ["/v1/predict/"]
    yield "wrong method", client.get("/v1/predict"), 405, ["GET", "use POST"]


def test_bad_input_gets_a_4xx_and_the_server_keeps_answering(server, client, model_dir, images):
    image = images[0]
    for what, response, status, words in _bad_requests(client, image):
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert all(w in error for w in words), (what, error)
    assert server.process.poll() is None
    assert client.get("/v1/predict").headers["allow"] == "POST"  # a 405 says what is allowed (RFC 9110)
    model = Florence2.from_pretrained(model_dir)
    expected = model.predict(Image.open(io.BytesIO(image)), "<OD>", max_new_tokens=10)
    response = post(client, image, "<OD>", options={"max_new_tokens": 10})
    assert response.status_code == 200 and response.json() == {"task": "<OD>", "result": json.loads(
        json.dumps(expected))}


def _expected(model, image: bytes, task, text=None, **options) -> dict:
    return json.loads(json.dumps({"task": task, "result": model.predict(Image.open(io.BytesIO(image)), task,
                                                                        text=text, **options)}))


def test_fields_as_clients_send_them_are_read_alike(server, client, model_dir, images):
    """Booleans as 1/0 (curl users, HTML forms), empty fields and JSON nulls (httpx sends None as ""), numbers as
    JSON strings, base64 wrapped in lines, URL-safe or unpadded: each answer is Florence2.predict's."""
    model = Florence2.from_pretrained(model_dir)
    image = images[2]
    sampled = _expected(model, image, "<CAPTION>", do_sample=True, seed=3, num_beams=1, max_new_tokens=6)
    greedy = _expected(model, image, "<CAPTION>", do_sample=False, max_new_tokens=6)
    assert sampled != greedy
    form = {"image": ("image.png", image, "image/png")}
    cases = [
        ({"do_sample": "1", "seed": "3", "num_beams": "1", "max_new_tokens": "6"}, None, sampled),
        ({"do_sample": "0", "max_new_tokens": "6", "num_beams": ""}, None, greedy),
        ({"do_sample": "on", "seed": "3", "num_beams": "1", "max_new_tokens": "6"}, None, sampled),
        (None, {"do_sample": 1, "seed": "3", "num_beams": "1", "max_new_tokens": "6"}, sampled),
        (None, {"do_sample": "false", "max_new_tokens": 6, "num_beams": None, "seed": None}, greedy),
    ]
    for data, body, expected in cases:
        if data is not None:
            response = client.post("/v1/predict", files=form, data={"task": "<CAPTION>", **data})
        else:
            response = client.post("/v1/predict", json={"image": base64.b64encode(image).decode(),
                                                        "task": "<CAPTION>", **body})
        assert response.status_code == 200 and response.json() == expected, (data or body, response.text)
    encoded = base64.b64encode(image).decode()
    urlsafe = base64.urlsafe_b64encode(image).decode().rstrip("=")
    assert urlsafe != encoded.rstrip("=") and len(encoded) != len(urlsafe)  # other letters, padding left out
    od = _expected(model, image, "<OD>", max_new_tokens=6)
    for text in (base64.encodebytes(image).decode(), urlsafe, "data:image/png;base64," + encoded):
        response = client.post("/v1/predict", json={"image": text, "task": "<OD>", "max_new_tokens": 6})
        assert response.status_code == 200 and response.json() == od, (text[:30], response.text)
    assert client.head("/health").status_code == 200  # load balancers probe with HEAD


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _image_kinds(base: Image.Image) -> dict[str, bytes]:
    """`base` as clients upload pictures: alpha, palette with transparency, 16-bit and 8-bit grayscale PNGs, a CMYK
    JPEG, a JPEG whose EXIF says to turn it, an animated GIF (its first frame is read)."""
    translucent = base.convert("RGBA")
    translucent.putalpha(90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn it 90 degrees to show it
    return {"alpha.png": _encoded(translucent, "PNG"), "palette.png": _encoded(base.convert("P"), "PNG",
                                                                               transparency=0),
            "gray.png": _encoded(base.convert("L"), "PNG"), "gray16.png": _encoded(base.convert("I;16"), "PNG"),
            "cmyk.jpg": _encoded(base.convert("CMYK"), "JPEG"), "exif-rotated.jpg": _encoded(base, "JPEG", exif=exif),
            "animated.gif": _encoded(base, "GIF", save_all=True,
                                     append_images=[base.rotate(180), Image.new("RGB", base.size)])}


def test_images_of_every_kind_are_read_as_predict_reads_them(client, model_dir, images, tmp_path):
    """Florence2.predict converts any mode with Image.convert("RGB"), ignores EXIF orientation (the page draws the
    stored pixels too) and reads a GIF's first frame: the server answers exactly the same."""
    from PIL import ImageOps

    model = Florence2.from_pretrained(model_dir)
    answers = {}
    for name, data in _image_kinds(Image.open(io.BytesIO(images[2])).convert("RGB")).items():
        (tmp_path / name).write_bytes(data)
        answers[name] = model.predict(str(tmp_path / name), "<CAPTION>", max_new_tokens=8)
        response = post(client, data, "<CAPTION>", options={"max_new_tokens": 8})
        assert response.status_code == 200, (name, response.text)
        assert response.json() == {"task": "<CAPTION>", "result": answers[name]}, name
    # the answers tell the readings apart: turned as its EXIF says, the JPEG gets another caption
    turned = ImageOps.exif_transpose(Image.open(tmp_path / "exif-rotated.jpg"))
    assert model.predict(turned, "<CAPTION>", max_new_tokens=8) != answers["exif-rotated.jpg"]


def test_health_and_the_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and "<OD>" in health["tasks"] and "<DocVQA>" in health["tasks_with_text"]
    assert health["limits"]["max_image_pixels"] == MAX_PIXELS and health["max_batch_size"] == 8
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # nothing from elsewhere: no scripts, styles, fonts or images by URL
    assert "http:" not in page.text and "https:" not in page.text and "src=" not in page.text
    assert "{{CONFIG}}" not in page.text and '"<OD>"' in page.text


def test_the_server_binds_localhost_by_default():
    from florence2.serve import parse_args

    assert parse_args(["--model", "m"]).host == "127.0.0.1"


def test_command_line_mistakes_are_one_line(monkeypatch, capfd):
    """A port out of range (uvicorn's bind raised OverflowError: a traceback) and a checkpoint on a hub that cannot
    be reached (huggingface_hub logged each of its retries first) end in one line."""
    from huggingface_hub.utils import logging as hub_logging

    from florence2.serve import main

    with pytest.raises(SystemExit) as error:
        main(["--model", "m", "--port", "99999"])
    assert error.value.code == 2 and "--port must be between 0 and 65535" in capfd.readouterr().err

    def unreachable(name, **options):
        for _ in range(3):  # huggingface_hub retries five times
            hub_logging.get_logger("huggingface_hub.utils._http").warning(
                f"'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/{name}")
        raise OSError(f"cannot download config.json of {name} (no connection to the hub)")

    monkeypatch.setattr(Florence2, "from_pretrained", unreachable)
    assert main(["--model", "someone/florence", "--device", "cpu"]) == 1
    err = capfd.readouterr().err
    assert err == "python -m florence2.serve: error: cannot download config.json of someone/florence (no connection " \
                  "to the hub)\n", err




def test_the_batcher_gathers_a_burst_and_keeps_settings_apart():
    import threading
    import time

    from florence2.serve import Batcher, Job

    batches = []
    release = threading.Event()

    def run(jobs):
        release.wait(5)
        batches.append([job.task for job in jobs])
        return [job.task for job in jobs]

    batcher = Batcher(run, max_batch_size=4, max_wait=0.01)
    serving = threading.Thread(target=batcher.serve)
    serving.start()
    # a burst: six requests accepted at once, decoded one after the other (30 ms each, longer than the wait)
    for _ in range(6):
        batcher.expect("greedy")
    batcher.expect("beams")
    futures = []
    for i in range(6):
        time.sleep(0.03)
        futures.append(batcher.submit(Job(f"g{i}", (1, 1), {}, {}, "greedy")))
    futures.append(batcher.submit(Job("b", (1, 1), {}, {}, "beams")))
    release.set()
    assert [f.result(5) for f in futures] == ["g0", "g1", "g2", "g3", "g4", "g5", "b"]
    assert batches == [["g0", "g1", "g2", "g3"], ["g4", "g5"], ["b"]]  # full, then the rest; settings apart
    # a lone request runs after the wait; one that is refused while decoding does not hold its batch
    batcher.expect("greedy")
    batcher.expect("greedy")
    lone = batcher.submit(Job("alone", (1, 1), {}, {}, "greedy"))
    batcher.cancel("greedy")
    assert lone.result(5) == "alone" and batches[-1] == ["alone"]
    batcher.stop()  # serve returns
    serving.join(5)
    assert not serving.is_alive()


def test_sigterm_stops_the_server_cleanly_and_a_taken_port_is_one_error(model_dir, images, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from .conftest import ROOT

    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert post(c, images[0], "<OD>", options={"max_new_tokens": 4}).status_code == 200
        # a second server on the same port: uvicorn's one-line reason and a non-zero exit, no traceback
        taken = subprocess.run([sys.executable, "-m", "florence2.serve", "--model", str(model_dir), "--port",
                                str(server.port), "--device", "cpu"], capture_output=True, text=True, timeout=120,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert taken.returncode == 1
        assert "address already in use" in taken.stderr and "Traceback" not in taken.stderr
        server.process.send_signal(signal.SIGTERM)  # the model runs in the main thread: the handler is ours
        assert server.process.wait(timeout=20) == 0
        assert "Shutting down" in server.log.read_text()
    finally:
        server.close()
