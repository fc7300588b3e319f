"""The web page at ``/`` in headless Chromium: a scripted chat streams, colours tokens and fills gauges.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), which needs no extra Python package. Without a
``chromium`` binary the test tries ``apt-get install -y chromium`` when it runs as root (as CI does),
and otherwise skips, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from personavec.monitor.monitoring import calibrate
from personavec.serve.app import ServerSettings, create_app, serve_in_thread
from personavec.serve.engine import Engine
from personavec.serve.registry import VectorRegistry

from .conftest import tiny
from .helpers import random_vector


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no chromium binary, and no root apt-get to install Debian's 'chromium' package")
    done = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True, timeout=600
    )
    if done.returncode != 0 or shutil.which("chromium") is None:
        pytest.skip(f"'apt-get install -y chromium' failed: {done.stderr.decode()[-300:]}")
    return str(shutil.which("chromium"))


class Chromium:
    """Headless Chromium with the DevTools protocol on a pipe."""

    def __init__(self, exe: str) -> None:
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        # The shell moves our pipe ends to the descriptors 3 and 4 that the protocol pipe mode reads.
        script = (
            'exec "$0" --headless --no-sandbox --disable-gpu --no-first-run --remote-debugging-pipe '
            f"about:blank 3<&{cmd_r} 4>&{resp_w}"
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", script, exe],
            pass_fds=(cmd_r, resp_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(resp_w)
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def _next_message(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return dict(json.loads(raw))

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next_message()
            if "method" in reply:
                self.events.append(reply)
            elif reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def wait_event(self, method: str) -> dict[str, Any]:
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            self.events.append(self._next_message())

    def run_page(self, url: str, expression: str) -> Any:
        """Load ``url``, then evaluate ``expression`` (a promise) in it and return its JSON value."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired")  # evaluating earlier could land in about:blank
        result = self.call(
            "Runtime.evaluate",
            session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            timeout=60000,
        )
        return result["result"].get("value")

    def close(self) -> None:
        os.close(self.cmd_w)
        os.close(self.resp_r)
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    chrome = Chromium(find_chromium())
    try:
        yield chrome
    finally:
        chrome.close()


# Waits for the page's own autotest to write its result (it sets the title when done).
WAIT_FOR_AUTOTEST = """new Promise((resolve) => {
  const poll = setInterval(() => {
    if (document.title === "autotest done") {
      clearInterval(poll);
      resolve(document.getElementById("autotest").textContent);
    }
  }, 50);
})"""


def test_page_chats_with_live_gauges_and_coloured_tokens(browser: Chromium) -> None:
    lm = tiny("llama")
    evil = calibrate(lm, random_vector(lm, "evil"), layers=2)
    registry = VectorRegistry(lm, [(evil, None), (random_vector(lm, "kind", seed=1), None)])
    with Engine(lm, registry) as engine, serve_in_thread(create_app(engine, ServerSettings("tiny"))) as url:
        raw = browser.run_page(url + "/?autotest=1&strength=0.25&max=12", WAIT_FOR_AUTOTEST)
        stats = engine.stats
    result = json.loads(raw)
    assert result["ok"], result
    assert result["finish"] in ("stop", "length") and result["tokens"] >= 1
    assert result["coloured"] == result["tokens"]  # every streamed token got its colour
    assert result["steering"] == [{"vector": "evil", "strength": 0.25}]
    assert result["persona"]["steering"][0]["applied"] and "flagged" in result["persona"]
    assert result["gauges"]["evil"].endswith("%") and result["gauges"]["evil"] != "50%"  # a percentile
    assert "th percentile" in result["prompt_labels"]["evil"] and "raw" in result["prompt_labels"]["kind"]
    assert stats.finished == 1 and stats.tokens == result["tokens"]
