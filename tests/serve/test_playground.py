"""The playground page (GET /) driven in a real headless Chromium against the real server on loopback.

What a user does on the page must reach the API unchanged: the adapters listed are the server's, the mix
built with the checkboxes and sliders is the one the server runs (the streamed text equals a direct API
request with that mix), compare mode runs two mixes side by side, images appear as decodable PNGs, and the
server's OpenAI error messages are shown. Browser: Debian's `chromium` + `chromedriver` (scripts/setup.sh).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

API_KEY = "playground-secret"
PROMPT = "The cat sat on"


# ---- servers and browser ---------------------------------------------------------------------------------


class LiveServer:
    """Runs an ASGI app with uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def api(server, path, body=None, key=API_KEY):
    """A direct request to the server: (status, decoded JSON)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    from loraforge.serve import create_app

    root = tmp_path_factory.mktemp("playground_text")
    base, adapters = make_text_adapters(root)
    server = LiveServer(create_app(base=str(base), adapters=str(adapters), api_key=API_KEY))
    yield server
    server.close()


@pytest.fixture(scope="module")
def image_server():
    from loraforge.serve import create_app

    server = LiveServer(create_app(base="tiny-sd", api_key=API_KEY))
    yield server
    server.close()


def make_text_adapters(root):
    """A tiny text base and two random adapters `style` and `tone` (nonzero B: each visibly changes output)."""
    from tiny_text import make_base
    from transformers import AutoModelForCausalLM

    from loraforge import LoraConfig, get_lora_model

    base = make_base(root / "base")
    for name, targets in (("style", ["q_proj", "v_proj"]), ("tone", ["up_proj", "down_proj"])):
        model = AutoModelForCausalLM.from_pretrained(base)
        lora = get_lora_model(
            model, LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        )
        lora.save_pretrained(root / "adapters" / name)
    return base, root / "adapters"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


# ---- page helpers ----------------------------------------------------------------------------------------


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def open_page(driver, server, key=API_KEY):
    """Opens the playground with the API key already in sessionStorage (as a user who entered it before)."""
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.setItem('loraforge-api-key', arguments[0])", key)
    driver.refresh()
    wait(driver, lambda d: d.find_element(By.ID, "base-kind").text in ("text", "image"))


def content(driver, element_id):
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def set_field(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def generate(driver, columns=("a",)):
    driver.find_element(By.ID, "generate").click()
    for col in columns:
        wait(
            driver,
            lambda d, c=col: (
                d.find_element(By.ID, f"output-{c}").get_attribute("data-state") in ("done", "error")
            ),
        )


def listed_adapters(driver, col="a"):
    rows = driver.find_elements(By.CSS_SELECTOR, f"#adapters-{col} .adapter")
    return [row.get_attribute("data-adapter") for row in rows]


def completion_text(server, path, body):
    status, answer = api(server, path, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# ---- tests -----------------------------------------------------------------------------------------------


def test_api_key_errors_are_shown_and_the_key_lists_the_adapters(browser, text_server):
    browser.get(text_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    # No key: the 401's OpenAI error message is shown, as the API words it.
    status, answer = api(text_server, "/v1/models", key=None)
    assert status == 401
    wait(browser, lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == answer["error"]["message"]
    assert listed_adapters(browser) == []

    status, wrong = api(text_server, "/v1/models", key="wrong")
    assert status == 401
    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys("wrong", Keys.TAB)
    wait(browser, lambda d: d.find_element(By.ID, "error").text == wrong["error"]["message"])

    key_field.clear()
    key_field.send_keys(API_KEY, Keys.TAB)
    wait(browser, lambda d: listed_adapters(d) == ["style", "tone"])
    assert browser.find_element(By.ID, "error").text == ""
    status, models = api(text_server, "/v1/models")
    base = next(m["id"] for m in models["data"] if m["parent"] is None)
    assert browser.find_element(By.ID, "base-id").text == base
    assert browser.find_element(By.ID, "base-kind").text == "text"
    # The key is kept for the tab's session: a reload lists the adapters without typing it again.
    browser.refresh()
    wait(browser, lambda d: listed_adapters(d) == ["style", "tone"])
    # The name filter narrows the list (thousands of adapters may be registered).
    browser.find_element(By.ID, "filter").send_keys("to")
    shown = [
        r.get_attribute("data-adapter")
        for r in browser.find_elements(By.CSS_SELECTOR, "#adapters-a .adapter")
        if r.is_displayed()
    ]
    assert shown == ["tone"]


def test_slider_weights_reach_the_server_and_the_text_streams(browser, text_server):
    open_page(browser, text_server)
    # Keyboard on the slider: six steps of 0.05 down from 1.0; moving it ticks the adapter's checkbox.
    browser.find_element(By.ID, "weight-a-style").send_keys(*[Keys.ARROW_LEFT] * 6)
    assert browser.find_element(By.ID, "weight-a-style-value").text == "0.70"
    assert browser.find_element(By.ID, "use-a-style").is_selected()
    browser.find_element(By.ID, "use-a-tone").click()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 12)
    # Count the pieces appended to the output while it streams.
    browser.execute_script(
        "window.pieces = 0; new MutationObserver(() => window.pieces++)"
        ".observe(document.getElementById('output-a'), {childList: true, characterData: true, subtree: true})"
    )
    generate(browser)
    assert browser.find_element(By.ID, "error-a").text == ""
    shown = content(browser, "output-a")

    request = {"model": base_id(text_server), "messages": [{"role": "user", "content": PROMPT}]}
    request.update(temperature=0, max_tokens=12)
    mixed = completion_text(
        text_server,
        "/v1/chat/completions",
        {**request, "adapters": [{"name": "style", "weight": 0.7}, {"name": "tone", "weight": 1.0}]},
    )
    assert shown == mixed and shown
    assert browser.execute_script("return window.pieces") > 1
    # The weights matter: the base alone and the slider left at 1.0 answer differently.
    assert mixed != completion_text(text_server, "/v1/chat/completions", request)
    assert mixed != completion_text(
        text_server,
        "/v1/chat/completions",
        {**request, "adapters": [{"name": "style", "weight": 1.0}, {"name": "tone", "weight": 1.0}]},
    )


def test_compare_runs_two_mixes_side_by_side(browser, text_server):
    open_page(browser, text_server)
    assert not browser.find_element(By.ID, "col-b").is_displayed()
    browser.find_element(By.ID, "compare").click()
    assert browser.find_element(By.ID, "col-b").is_displayed()
    assert listed_adapters(browser, "b") == ["style", "tone"]
    browser.find_element(By.ID, "use-a-style").click()
    browser.find_element(By.ID, "use-b-tone").click()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.CSS_SELECTOR, "#endpoint option[value='completions']").click()
    set_field(browser, "temperature", 0.9)
    set_field(browser, "seed", 7)
    set_field(browser, "max-tokens", 10)
    generate(browser, ("a", "b"))
    shown_a, shown_b = content(browser, "output-a"), content(browser, "output-b")

    request = {
        "model": base_id(text_server),
        "prompt": PROMPT,
        "temperature": 0.9,
        "seed": 7,
        "max_tokens": 10,
    }
    expect_a = completion_text(
        text_server, "/v1/completions", {**request, "adapters": [{"name": "style", "weight": 1.0}]}
    )
    expect_b = completion_text(
        text_server, "/v1/completions", {**request, "adapters": [{"name": "tone", "weight": 1.0}]}
    )
    assert (shown_a, shown_b) == (expect_a, expect_b)
    assert shown_a != shown_b


def test_server_errors_are_shown(browser, text_server):
    open_page(browser, text_server)
    browser.find_element(By.ID, "use-a-style").click()
    # A crafted state: the row now names an adapter the server does not have.
    browser.execute_script(
        "document.querySelector('#adapters-a .adapter').dataset.adapter = 'no-such-adapter'"
    )
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    generate(browser)
    assert browser.find_element(By.ID, "output-a").get_attribute("data-state") == "error"
    status, answer = api(
        text_server,
        "/v1/chat/completions",
        {
            "model": base_id(text_server),
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4,
            "adapters": [{"name": "no-such-adapter", "weight": 1.0}],
        },
    )
    assert status == 404
    assert browser.find_element(By.ID, "error-a").text == answer["error"]["message"]
    assert "style" in answer["error"]["message"]


def test_image_request_shows_a_png(browser, image_server):
    from PIL import Image

    open_page(browser, image_server)
    assert browser.find_element(By.ID, "base-kind").text == "image"
    assert browser.find_element(By.ID, "image-options").is_displayed()
    assert not browser.find_element(By.ID, "text-options").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("a red square")
    set_field(browser, "steps", 2)
    set_field(browser, "seed", 3)
    generate(browser)
    assert browser.find_element(By.ID, "error-a").text == ""
    images = browser.find_elements(By.CSS_SELECTOR, "#output-a img")
    assert len(images) == 1
    src = images[0].get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert shown.format == "PNG"
    assert browser.execute_script("return arguments[0].naturalWidth", images[0]) == shown.width > 0

    status, answer = api(
        image_server,
        "/v1/images/generations",
        {
            "model": base_id(image_server),
            "prompt": "a red square",
            "steps": 2,
            "seed": 3,
            "n": 1,
            "guidance": 7,
            "adapters": [],
            "response_format": "b64_json",
        },
    )
    assert status == 200, answer
    expected = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.convert("RGB")))


def base_id(server):
    _, models = api(server, "/v1/models")
    return next(m["id"] for m in models["data"] if m["parent"] is None)
