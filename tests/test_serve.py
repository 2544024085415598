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


def post(client, image: bytes, task, text=None, options=None, as_json=False):
    fields = {k: v for k, v in (("task", task), ("text", text)) if v is not None} | (options or {})
    if as_json:
        return client.post("/v1/predict", json={"image": base64.b64encode(image).decode(), **fields})
    return client.post("/v1/predict", files={"image": ("image.png", image, "image/png")},
                       data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()})


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
    yield "other content type", client.post("/v1/predict", content=b"x=1",
                                           headers={"content-type": "text/plain"}), 415, ["multipart"]
    yield "bad multipart", client.post("/v1/predict", content=b"--x\r\nbroken",
                                      headers={"content-type": "multipart/form-data; boundary=x"}), 400, []
    yield "unknown path", client.get("/v1/nothing"), 404, []
    yield "wrong method", client.get("/v1/predict"), 405, []


def test_bad_input_gets_a_4xx_and_the_server_keeps_answering(server, client, model_dir, images):
    image = images[0]
    for what, response, status, words in _bad_requests(client, image):
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert all(w in error for w in words), (what, error)
    assert server.process.poll() is None
    model = Florence2.from_pretrained(model_dir)
    expected = model.predict(Image.open(io.BytesIO(image)), "<OD>", max_new_tokens=10)
    response = post(client, image, "<OD>", options={"max_new_tokens": 10})
    assert response.status_code == 200 and response.json() == {"task": "<OD>", "result": json.loads(
        json.dumps(expected))}


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
