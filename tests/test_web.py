"""The web page of `patchcore serve` in headless Chromium, driven as a person would use it.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no extra
package): the test picks a real bottle image in the page's file input, waits for the page to show the
verdict, checks what it shows, moves the threshold slider and takes a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_service import running

# Started by a tiny Python so that Chromium finds the protocol pipe on the descriptors it expects (3 and 4),
# without a preexec_fn (unsafe with the server's threads running in this process).
_EXEC_WITH_PIPES = ("import fcntl, os, sys\n"
                    "a, b = (fcntl.fcntl(int(f), fcntl.F_DUPFD, 10) for f in sys.argv[1:3])\n"
                    "os.dup2(a, 3); os.dup2(b, 4); os.execv(sys.argv[3], sys.argv[3:])\n")


class Chromium:
    """Headless Chromium and the few DevTools protocol calls a test needs."""

    def __init__(self, browser: str, profile: str, width: int = 1200, height: int = 1100) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "about:blank"]
        self.proc = subprocess.Popen([sys.executable, "-c", _EXEC_WITH_PIPES, str(to_chrome_r), str(from_chrome_w),
                                      *args], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        self.width, self.height = width, height

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the protocol pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, timeout: float = 30, session: bool = True, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", url=url)

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > end:
                state = self.js("document.body && document.body.dataset.state")
                error = self.js("document.getElementById('error').textContent")
                raise AssertionError(f"page never satisfied {expression!r} (state {state!r}, error {error!r})")
            time.sleep(0.1)

    def pick_file(self, selector: str, path: Path) -> None:
        """What choosing a file in the dialog does: the input gets the file, and its change event fires."""
        root = self.send("DOM.getDocument", depth=1)["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def test_page_shows_verdict_overlay_and_other_thresholds(small_model, bottle, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "bottle.safetensors")
    image = bottle / "test" / "broken_large" / "000.png"
    with running(folder) as base, tempfile.TemporaryDirectory() as profile:
        chrome = Chromium(browser, profile)
        try:
            chrome.open(base + "/")
            chrome.wait("document.body && document.body.dataset.state === 'ready'")
            assert chrome.js("document.getElementById('model').value") == "bottle"
            assert "threshold" in chrome.js("document.getElementById('model-info').textContent")
            chrome.pick_file("#file", image.resolve())
            state = chrome.wait("['done', 'error'].includes(document.body.dataset.state)"
                                " && document.body.dataset.state")
            assert state == "done", chrome.js("document.getElementById('error').textContent")
            shown = chrome.js("""(() => {
                const c = document.getElementById('view');
                return {verdict: document.getElementById('verdict').textContent,
                        cls: document.getElementById('verdict').className,
                        score: document.getElementById('score-line').textContent,
                        atView: document.getElementById('at-view').textContent,
                        outlined: Number(c.dataset.outlined), w: c.width, h: c.height,
                        original: document.getElementById('original').naturalWidth};
            })()""")
            rect = chrome.js("(() => { const r = document.getElementById('view').getBoundingClientRect(); "
                             "return [r.left, r.top, r.right, r.bottom].map(Math.round); })()")
            shot = chrome.screenshot(tmp_path / "page.png")
            # The slider: a threshold far above the score makes the view good, with nothing outlined ...
            high = chrome.js("""(() => { const s = document.getElementById('threshold'); s.value = s.max;
                s.dispatchEvent(new Event('input')); const c = document.getElementById('view');
                return {v: document.getElementById('at-view').dataset.verdict, o: Number(c.dataset.outlined),
                        top: document.getElementById('verdict').textContent}; })()""")
            # ... a low one outlines more than the model's threshold does.
            low = chrome.js("""(() => { const s = document.getElementById('threshold'); s.value = 0;
                s.dispatchEvent(new Event('input'));
                return Number(document.getElementById('view').dataset.outlined); })()""")
            # The operator's verdict: filed beside the model, said on the page.
            chrome.js("document.getElementById('feedback-defect').click()")
            recorded = chrome.wait("document.getElementById('feedback-done').textContent.startsWith('Recorded') "
                                   "&& document.getElementById('feedback-done').textContent")
            drift_line = chrome.js("document.getElementById('drift').textContent")
        finally:
            chrome.close()
    assert "1 defective" in recorded and len(list((folder / ".feedback" / "bottle" / "defect").iterdir())) == 1
    assert drift_line.startswith("Recent images: not tested yet: 1 of the 30")
    assert shown["verdict"] == "ANOMALOUS" and "anomalous" in shown["cls"]
    assert "score" in shown["score"] and "threshold" in shown["score"]
    assert shown["atView"].startswith("At the model's threshold the image is anomalous")
    assert (shown["w"], shown["h"]) == (256, 256) and shown["original"] == 256 and shown["outlined"] > 0
    assert high == {"v": "good", "o": 0, "top": "ANOMALOUS"}  # the model's verdict stays as it was
    assert low > shown["outlined"]
    # The screenshot shows the heat map drawn on the canvas: turbo's warm colours over the defect, and the
    # white outline around it (the page around the canvas has no pure white: its cards sit on the canvas' sides).
    a = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert a.shape[:2] == (1100, 1200) and a.std() > 20
    left, top, right, bottom = rect
    assert right - left > 200 and bottom - top > 200
    view = a[top + 2:bottom - 2, left + 2:right - 2]
    warm = (view[..., 0] > 150) & (view[..., 0] - view[..., 2] > 60)
    white = (view >= 250).all(axis=-1)
    assert warm.sum() > 1000 and white.sum() > 200, (warm.sum(), white.sum())
