"""The page at ``/`` in a real browser: Debian's Chromium, driven by Selenium through the system
chromedriver, against Libra's real stack (NATS, PostgreSQL, Redis, the local Whisper hearing,
espeak-ng speaking, the OpenAI wire's fake answering).

Chromium's fake microphone plays a WAV of espeak-ng's speech, in a loop. Selenium is
synchronous: it runs in a thread, while Libra serves on the test's event loop.

``LIBRA_SCREENSHOTS=1`` also writes docs/screenshots/chat.png and turn.png (what README shows).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from libra.ops.fakes.llm_wire import Behaviour, FakeLlmWire
from libra.processors.tts.espeak import utterance
from libra.runtime.config import Settings

from .helpers import eventually
from .stack import TEXT_PIPELINE, answering_with, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
QUESTION = "What is the weather like today?"
TYPED = "Is it going to rain?"
REPLY = "It is sunny and warm today. A good day for a walk!"
LONG_REPLY = " ".join(["Here is a long answer that goes on for quite a while."] * 12)
WAV_RATE = 48_000


@pytest.fixture
async def libra(settings: Settings) -> AsyncIterator[tuple[str, FakeLlmWire]]:
    """Libra's page and the fake model behind it (its reply can be changed per test)."""
    async with FakeLlmWire(reply=Behaviour.ok(REPLY)) as wire:
        s = answering_with(settings, wire, ASR_ENGINES="whisper", TTS_ENGINES="espeak")
        base = f"http://127.0.0.1:{s.http_port}/"
        async with running(s, [*TEXT_PIPELINE, "asr", "tts", "http"]):

            async def up() -> bool:
                try:
                    async with httpx.AsyncClient() as http:
                        return (await http.get(f"{base}api/health", timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(up, timeout=15)
            yield base, wire


def _mic_wav(path: Path, text: str, *, after_s: int) -> Path:
    """``text`` spoken after a second of silence, then ``after_s`` of silence: Chromium's
    microphone plays it in a loop."""
    speech = utterance(text, "en", rate=WAV_RATE, channels=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes(bytes(2 * WAV_RATE) + speech + bytes(2 * WAV_RATE * after_s))
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[..., webdriver.Chrome]]:
    """Starts Chromium whose microphone says ``text`` over and over (``pause_s`` apart)."""
    for needed in (CHROMIUM, CHROMEDRIVER):
        if not needed.exists():  # a failure, not a skip: CI must have them
            pytest.fail(f"{needed} is missing: apt-get install chromium chromium-driver")
    drivers: list[webdriver.Chrome] = []

    def start(text: str, pause_s: int = 1) -> webdriver.Chrome:
        wav = _mic_wav(tmp_path / "mic.wav", text, after_s=pause_s)
        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless=new",
            "--no-sandbox",  # (root in containers)
            "--window-size=900,720",
            "--use-fake-ui-for-media-stream",  # the microphone is allowed without a prompt
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # (said on a failure)
        # The driver's path is given: Selenium Manager neither looks for nor downloads one.
        driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER)), options=options
        )
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


# --- reading the page (in Selenium's thread) -----------------------------------------------------


def _page(driver: webdriver.Chrome) -> dict[str, Any]:
    """``window.libra``: state, messages, played, stopped, sent."""
    return json.loads(driver.execute_script("return JSON.stringify(window.libra)"))


def _until(driver: webdriver.Chrome, what: str, check: Callable[[dict], Any], timeout=60) -> Any:
    """Waits until ``check(window.libra)`` is truthy and returns it; says what it saw if not."""
    seen: list[dict] = []

    def ready(d: webdriver.Chrome) -> Any:
        seen[:] = [_page(d)]
        return check(seen[0])

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(ready)
    except Exception as exc:
        console = [entry["message"] for entry in driver.get_log("browser")]
        raise AssertionError(
            f"{what}: not within {timeout}s; the page had {seen}; its console said {console}"
        ) from exc


def _testid(driver: webdriver.Chrome, name: str):
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def _texts(page: dict, who: str) -> list[str]:
    return [m["text"] for m in page["messages"] if m["who"] == who]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def _heard_question(page: dict) -> str | None:
    """The first transcript shown, if it holds the question's words (give or take one)."""
    heard = _texts(page, "you")
    return heard[0] if heard and len(_words(QUESTION) - _words(heard[0])) <= 1 else None


def _open(driver: webdriver.Chrome, base: str) -> None:
    driver.get(base)
    _until(driver, "connected", lambda p: p["state"] == "idle", timeout=20)


def _screenshot(driver: webdriver.Chrome, name: str) -> None:
    if os.environ.get("LIBRA_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / name))


# --- the tests ---------------------------------------------------------------------------------


async def test_the_page_and_its_files_are_served(libra) -> None:
    base, _ = libra
    async with httpx.AsyncClient(base_url=base) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'data-testid="mic"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        script = await http.get("/static/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        for path in ("/static/..%2Fpage.py", "/static/.hidden", "/static/page.py", "/static/x"):
            assert (await http.get(path)).status_code == 404, path


async def test_a_typed_message_gets_a_reply_streamed_into_the_page(libra, browser) -> None:
    base, wire = libra
    wire.reply = Behaviour.ok(REPLY, tokens_per_sec=8)  # slow enough to see it arrive

    def scenario() -> None:
        driver = browser(QUESTION)
        _open(driver, base)
        _testid(driver, "input").send_keys(TYPED)
        _testid(driver, "send").click()
        assert _texts(_page(driver), "you") == [TYPED]
        # part of the reply is shown before the whole of it: it streams
        _until(
            driver,
            "a part of the reply",
            lambda p: any(
                0 < len(t) < len(REPLY) and REPLY.startswith(t) for t in _texts(p, "libra")
            ),
        )
        page = _until(driver, "the whole reply", lambda p: p["state"] == "idle" and p)
        assert _texts(page, "libra") == [REPLY] and _texts(page, "you") == [TYPED]
        assert REPLY in _testid(driver, "log").text
        assert _testid(driver, "state").text == "idle"
        assert page["played"] == 0  # a typed turn is answered in writing only

    await asyncio.to_thread(scenario)


async def test_push_to_talk_is_heard_answered_and_played(libra, browser) -> None:
    base, _ = libra

    def scenario() -> None:
        driver = browser(QUESTION)
        _open(driver, base)
        mic = _testid(driver, "mic")
        mic.click()  # a click (not a hold) starts the recording...
        _until(driver, "recording", lambda p: p["state"] == "listening")
        # ...which holds the whole WAV once (its second of silence, the question, a second)
        whole = 2 * 16_000 + len(utterance(QUESTION, "en", rate=16_000)) // 2
        _until(driver, "the question sent", lambda p: p["sent"] >= whole, timeout=30)
        mic.click()  # and another click sends it
        page = _until(driver, "the transcript", _heard_question)
        assert "weather" in _testid(driver, "log").text.lower()
        page = _until(driver, "the reply, played", lambda p: p["played"] > 0 and p)
        assert page["state"] == "speaking"
        _screenshot(driver, "chat.png")
        page = _until(driver, "the reply's end", lambda p: p["state"] == "idle" and p)
        assert _texts(page, "libra") == [REPLY]
        # the whole reply is played: espeak's sentences at 24 kHz, more than two seconds
        assert page["played"] > 2 * 24_000 and page["stopped"] == 0
        _turn_view_shows_every_stage(driver, base)

    await asyncio.to_thread(scenario)


_STAGES = ("capture", "asr", "admission", "first_token", "first_audio", "delivered")


def _turn_view_shows_every_stage(driver: webdriver.Chrome, base: str) -> None:
    """The operator's list of turns leads to the spoken turn, drawn with each stage timed."""
    driver.get(f"{base}turns")
    link = WebDriverWait(driver, 20).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "a[href^='/turns/']")
    )[0]
    link.click()

    def timed(d: webdriver.Chrome) -> dict[str, str] | None:
        rows = d.find_elements(By.CSS_SELECTOR, "#stages tr")
        cells = {r.find_elements(By.TAG_NAME, "td")[0].text: r.text for r in rows[1:]}
        done = all(re.search(r"\d", cells.get(name, "").replace(name, "")) for name in _STAGES)
        return cells if done else None

    # the delivery is folded into the turns table a moment after the reply ends
    for _ in range(20):
        try:
            cells = WebDriverWait(driver, 3, poll_frequency=0.1).until(timed)
            break
        except Exception:
            driver.refresh()
    else:
        raise AssertionError(f"the turn view lacks a stage: {driver.page_source[:2000]}")
    assert set(_STAGES) <= set(cells)
    events = driver.find_elements(By.CSS_SELECTOR, "#timeline > *")
    assert len(events) >= 6  # captured, transcribed, accepted, deltas, clips, delivered
    _screenshot(driver, "turn.png")


async def test_talking_over_libra_stops_its_voice(libra, browser) -> None:
    base, wire = libra
    wire.reply = Behaviour.ok(LONG_REPLY)

    def scenario() -> None:
        # The microphone says the question again 8 s after it ends: by then Libra is well into
        # its reply to the first (one turn, however slowly the machine hears it).
        driver = browser(QUESTION, pause_s=8)
        _open(driver, base)
        _testid(driver, "handsfree").click()  # the microphone streams; the server's VAD cuts
        _until(driver, "the question heard", _heard_question)
        _until(driver, "Libra speaking", lambda p: p["state"] == "speaking" and p["played"] > 0)
        # the fake microphone says the question again while Libra speaks: barge-in
        page = _until(driver, "playback stopped", lambda p: p["stopped"] > 0 and p)
        assert page["state"] == "listening"
        assert _testid(driver, "state").text == "listening"
        _until(
            driver, "the reply marked", lambda p: any(m.get("interrupted") for m in p["messages"])
        )
        assert driver.find_elements(By.CSS_SELECTOR, '[data-testid="log"] .libra.interrupted')
        whole = len(utterance(LONG_REPLY, "en", rate=24_000)) // 2
        assert page["played"] < whole / 2  # far from all of it was played

    await asyncio.to_thread(scenario)


# Records the page's sockets and their JSON both ways, before the page's own script runs.
_SPY = """
window.__sockets = [];
window.__json = [];
const json = (data, way) => typeof data === "string" && window.__json.push([way, JSON.parse(data)]);
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
    this.addEventListener("message", (e) => json(e.data, "in"));
  }
  send(data) {
    json(data, "out");
    super.send(data);
  }
};
"""


async def test_a_dropped_socket_reconnects_and_the_reply_goes_on(libra, browser) -> None:
    base, wire = libra
    wire.reply = Behaviour.ok(REPLY, tokens_per_sec=4)

    def scenario() -> None:
        driver = browser(QUESTION)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _SPY})
        _open(driver, base)
        _testid(driver, "input").send_keys(TYPED)
        _testid(driver, "send").click()
        _until(driver, "a part of the reply", lambda p: _texts(p, "libra") and p)
        driver.execute_script("window.__sockets[0].close()")  # the connection drops mid-reply
        shown: set[str] = set()

        def over(page: dict) -> dict | None:
            shown.update(_texts(page, "libra"))
            return page if page["state"] == "idle" else None

        page = _until(driver, "the whole reply", over, timeout=30)
        # the reply followed again from the log replaces what came before: never doubled
        assert all(REPLY.startswith(text) for text in shown), shown
        assert _texts(page, "libra") == [REPLY] and _texts(page, "you") == [TYPED]
        assert driver.execute_script("return window.__sockets.length") == 2
        said = driver.execute_script("return window.__json")
        hellos = [m for way, m in said if way == "out" and m["type"] == "hello"]
        [ready, *_] = [m for way, m in said if way == "in" and m["type"] == "ready"]
        assert len(hellos) == 2 and "conversation" not in hellos[0]
        assert hellos[1]["conversation"] == ready["conversation"]  # the same conversation

    await asyncio.to_thread(scenario)
