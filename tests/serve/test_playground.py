"""The playground page (GET /) driven in a real headless Chromium against the real server on loopback.

What a user does on the page must reach the API unchanged: the adapters listed are the server's, the mix
built with the checkboxes and sliders is the one the server runs (the text streamed into the page equals
a direct API request with that mix), compare mode runs two mixes side by side, images appear as
decodable PNGs made with the chosen mix, and the server's OpenAI error messages are shown.
Browser: Debian's `chromium` and `chromedriver` (installed by scripts/setup.sh), driven by Selenium.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from server_fixtures import get, post, text_adapters

from loraforge.serve.app import ServerThread, create_app

API_KEY = "playground-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The cat sat on"


# -- servers and browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: spare PyTorch threads only spin, and on a busy machine make each decoding step many
    times slower (as `load_pipeline` does for tiny pipelines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """tiny-llama with two random adapters, `style` and `tone`, from an adapters directory; a token set."""
    root = tmp_path_factory.mktemp("playground_text")
    text_adapters(root, {"style": {}, "tone": {"target_modules": ["up_proj", "down_proj"]}})
    with ServerThread(create_app(base="tiny-llama", adapters_dir=str(root), api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """tiny-sd with one random image LoRA, `pixel`, loaded at run time; a token set."""
    from image_adapters import random_lora, write_adapter

    root = tmp_path_factory.mktemp("playground_image")
    app = create_app(base="tiny-sd", api_key=API_KEY, max_image_size=64)
    with ServerThread(app) as url:
        write_adapter(root / "pixel", random_lora(app.state.service.engine.pipe, seed=5))
        body = {"lora_name": "pixel", "lora_path": str(root / "pixel")}
        status, answer = post(url, "/v1/load_lora_adapter", body, headers=AUTH)
        assert status == 200, answer
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


# -- helpers ---------------------------------------------------------------------------------------


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver, url, key=API_KEY):
    """Opens the playground with the key already in sessionStorage (a user who entered it before)."""
    driver.get(url + "/")
    driver.execute_script("sessionStorage.setItem('loraforge-api-key', arguments[0])", key)
    driver.refresh()
    wait(driver, lambda d: d.find_element(By.ID, "base-kind").text in ("text", "image"))


def content(driver, element_id):
    """An element's exact text (WebElement.text would fold its whitespace)."""
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def set_field(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def generate(driver, columns=("a",)):
    """Presses Generate and waits until every column has finished (done or error)."""
    driver.find_element(By.ID, "generate").click()
    for col in columns:
        output = driver.find_element(By.ID, f"output-{col}")
        wait(driver, lambda d, o=output: o.get_attribute("data-state") in ("done", "error"))


def listed_adapters(driver, col="a", visible_only=False):
    rows = driver.find_elements(By.CSS_SELECTOR, f"#adapters-{col} .adapter")
    return [r.get_attribute("data-adapter") for r in rows if r.is_displayed() or not visible_only]


def base_id(url):
    status, models = get(url, "/v1/models", headers=AUTH)
    assert status == 200, models
    return next(m["id"] for m in models["data"] if m["parent"] is None)


def completion_text(url, path, body):
    """The text of a direct (non-streamed) request."""
    status, answer = post(url, path, body, headers=AUTH)
    assert status == 200, answer
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def png(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


# -- tests -----------------------------------------------------------------------------------------


def test_api_key_errors_are_shown_and_the_key_lists_the_adapters(browser, text_server):
    browser.get(text_server + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    # No key: the 401's OpenAI error message is shown as the API words it, and nothing is listed.
    status, missing = get(text_server, "/v1/models")
    assert status == 401
    wait(browser, lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == missing["error"]["message"]
    assert listed_adapters(browser) == []

    status, wrong = get(text_server, "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys("wrong", Keys.TAB)
    wait(browser, lambda d: d.find_element(By.ID, "error").text == wrong["error"]["message"])

    key_field.clear()
    key_field.send_keys(API_KEY, Keys.TAB)
    wait(browser, lambda d: listed_adapters(d) == ["style", "tone"])
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.ID, "base-id").text == base_id(text_server)
    assert browser.find_element(By.ID, "base-kind").text == "text"
    # The key is kept for the tab's session: a reload lists the adapters without typing it again.
    browser.refresh()
    wait(browser, lambda d: listed_adapters(d) == ["style", "tone"])
    # The name filter narrows the lists (thousands of adapters may be registered).
    browser.find_element(By.ID, "filter").send_keys("to")
    assert listed_adapters(browser, visible_only=True) == ["tone"]


def test_slider_weights_reach_the_server_and_the_text_streams(browser, text_server):
    open_page(browser, text_server)
    # The keyboard on the slider: six steps of 0.05 down from 1; moving it ticks the adapter's box.
    browser.find_element(By.ID, "weight-a-style").send_keys(*[Keys.ARROW_LEFT] * 6)
    assert browser.find_element(By.ID, "weight-a-style-value").text == "0.70"
    assert browser.find_element(By.ID, "use-a-style").is_selected()
    browser.find_element(By.ID, "use-a-tone").click()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 12)
    # Counts the pieces appended to the output while the answer streams in.
    browser.execute_script(
        "window.pieces = 0; new MutationObserver(() => window.pieces++).observe("
        "document.getElementById('output-a'), {childList: true, characterData: true, subtree: true})"
    )
    generate(browser)
    assert browser.find_element(By.ID, "error-a").text == ""
    shown = content(browser, "output-a")

    request = {
        "model": base_id(text_server),
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 12,
    }
    mix = [{"name": "style", "weight": 0.7}, {"name": "tone", "weight": 1.0}]
    expected = completion_text(text_server, "/v1/chat/completions", {**request, "adapters": mix})
    assert shown == expected and shown
    assert browser.execute_script("return window.pieces") > 1
    # The weights matter: the bare base, and the slider left at 1, give other text.
    assert expected != completion_text(text_server, "/v1/chat/completions", request)
    full = [{"name": "style", "weight": 1.0}, {"name": "tone", "weight": 1.0}]
    assert expected != completion_text(text_server, "/v1/chat/completions", {**request, "adapters": full})


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
    shown = content(browser, "output-a"), content(browser, "output-b")

    # The same prompt and seed, each column with its own mix (seeded sampling is reproducible).
    request = {
        "model": base_id(text_server),
        "prompt": PROMPT,
        "temperature": 0.9,
        "seed": 7,
        "max_tokens": 10,
    }
    expected = tuple(
        completion_text(
            text_server, "/v1/completions", {**request, "adapters": [{"name": name, "weight": 1.0}]}
        )
        for name in ("style", "tone")
    )
    assert shown == expected
    assert shown[0] != shown[1]


def test_server_errors_are_shown(browser, text_server):
    open_page(browser, text_server)
    browser.find_element(By.ID, "use-a-style").click()
    # A crafted state: the ticked row now names an adapter the server does not have.
    browser.execute_script(
        "document.querySelector('#adapters-a .adapter').dataset.adapter = 'no-such-adapter'"
    )
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    generate(browser)
    assert browser.find_element(By.ID, "output-a").get_attribute("data-state") == "error"
    body = {
        "model": base_id(text_server),
        "messages": [{"role": "user", "content": PROMPT}],
        "adapters": [{"name": "no-such-adapter", "weight": 1.0}],
    }
    status, answer = post(text_server, "/v1/chat/completions", body, headers=AUTH)
    assert status == 404
    assert browser.find_element(By.ID, "error-a").text == answer["error"]["message"]
    assert "style" in answer["error"]["message"]  # the message lists the server's adapters


def test_image_request_shows_a_png_made_with_the_mix(browser, image_server):
    open_page(browser, image_server)
    assert browser.find_element(By.ID, "base-kind").text == "image"
    assert browser.find_element(By.ID, "image-options").is_displayed()
    assert not browser.find_element(By.ID, "text-options").is_displayed()
    assert listed_adapters(browser) == ["pixel"]
    browser.find_element(By.ID, "weight-a-pixel").send_keys(*[Keys.ARROW_LEFT] * 10)  # 0.5
    browser.find_element(By.ID, "prompt").send_keys("a red square")
    set_field(browser, "steps", 2)
    set_field(browser, "seed", 3)
    set_field(browser, "size", "32x32")
    generate(browser)
    assert browser.find_element(By.ID, "error-a").text == ""
    images = browser.find_elements(By.CSS_SELECTOR, "#output-a img")
    assert len(images) == 1
    src = images[0].get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    shown = png(src.split(",", 1)[1])
    assert shown.format == "PNG" and shown.size == (32, 32)
    assert browser.execute_script("return arguments[0].naturalWidth", images[0]) == 32
    # The PNG records what made it: the page's prompt, seed and mix.
    info = json.loads(shown.text["loraforge"])
    assert (info["prompt"], info["seed"], info["adapters"]) == (
        "a red square",
        3,
        [{"path": "pixel", "weight": 0.5}],
    )

    request = {
        "model": base_id(image_server),
        "prompt": "a red square",
        "steps": 2,
        "seed": 3,
        "size": "32x32",
        "guidance": 7,
    }
    expected, bare = (
        post(image_server, "/v1/images/generations", {**request, **extra}, headers=AUTH)
        for extra in ({"adapters": [{"name": "pixel", "weight": 0.5}]}, {})
    )
    assert expected[0] == 200 and bare[0] == 200
    pixels = np.asarray(shown.convert("RGB"), dtype=np.int16)
    assert np.array_equal(pixels, np.asarray(png(expected[1]["data"][0]["b64_json"]).convert("RGB")))
    assert np.abs(pixels - np.asarray(png(bare[1]["data"][0]["b64_json"]).convert("RGB"))).max() > 10
