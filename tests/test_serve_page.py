"""The server's page in headless Chromium (Debian's chromium and chromedriver, through selenium): upload an image,
run <OD>, and read the canvas back: the boxes are drawn where the JSON says."""

import base64
import io
import shutil
import tempfile

import pytest
from PIL import Image

from .serving import ServerProcess, answering_model

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
ANSWER = "car<loc_100><loc_200><loc_500><loc_700>"
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    process = ServerProcess(answering_model(folder / "model", ANSWER), folder / "server.log")
    yield process
    process.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # without network the browser otherwise stalls on its background requests
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def run_task(browser, url, image_path, task, shown=True):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    browser.get(url + "/")
    browser.find_element(By.ID, "image").send_keys(str(image_path))
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    if shown:  # the browser shows the upload before the answer comes
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return document.getElementById('canvas').width > 0"))
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.body.dataset.state === 'done'"))
    response = browser.execute_script("return window.lastResponse")
    if not shown:
        return response, None
    data = browser.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    return response, Image.open(io.BytesIO(base64.b64decode(data.partition(",")[2]))).convert("RGB")


def test_the_page_draws_the_boxes_where_the_json_says(server, browser, tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (640, 480), "white").save(path)
    response, canvas = run_task(browser, server.url, path, "<OD>")
    answer = response["result"]["<OD>"]
    assert response["task"] == "<OD>" and answer["labels"] == ["car"] and canvas.size == (640, 480)
    x1, y1, x2, y2 = answer["bboxes"][0]
    assert (x1, y1) == pytest.approx((64.32, 96.24), abs=1e-3)  # (100 + 0.5) * 640 / 1000, (200 + 0.5) * 480 / 1000
    mid_x, mid_y = int((x1 + x2) / 2), int((y1 + y2) / 2)
    for x, y in ((int(x1), mid_y), (int(x2), mid_y), (mid_x, int(y2)), (mid_x, int(y1))):  # on the outline
        assert canvas.getpixel((x, y)) != WHITE, (x, y)
    for x, y in ((int(x1) - 12, mid_y), (int(x2) + 12, mid_y), (mid_x, int(y2) + 12), (mid_x, mid_y)):  # off it
        assert canvas.getpixel((x, y)) == WHITE, (x, y)
    tag = [canvas.getpixel((int(x1) + dx, int(y1) - 8)) for dx in range(2, 20)]  # the label above the corner
    assert any(p != WHITE for p in tag)


def test_the_page_shows_errors(server, browser, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from selenium.webdriver.common.by import By

    response, _ = run_task(browser, server.url, path, "<OD>", shown=False)
    assert "unreadable image" in response["error"]
    assert "unreadable image" in browser.find_element(By.ID, "status").text
