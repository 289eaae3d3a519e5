"""report.html in a real browser: headless Chromium loads it, logs no error, and shows the plots.

Chromium is driven over its DevTools pipe (--remote-debugging-pipe, stdlib only). Install it
with `apt-get install chromium chromium-driver`; without /usr/bin/chromium this test skips.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from planted import planted_dir, planted_report  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                "(apt-get install chromium chromium-driver)")


class DevTools:
    """A minimal Chrome DevTools Protocol client over the pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def fds():
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds, pass_fds=(3, 4))
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, limit: int = 10000) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        for _ in range(limit):
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event
        raise RuntimeError(f"no {method} event")

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        self.proc.wait(timeout=30)


def load_pages(urls: list[str], profile: Path) -> list[tuple[list[dict], dict, bytes]]:
    """For each url, in one browser: (error events, page facts, full-page PNG screenshot)."""
    dt = DevTools(profile)
    results = []
    try:
        for url in urls:
            dt.events = []
            target = dt.send("Target.createTarget", url="about:blank")["targetId"]
            session = dt.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                dt.send(f"{domain}.enable", session)
            dt.send("Page.navigate", session, url=url)
            dt.wait_for("Page.loadEventFired")
            facts = dt.send("Runtime.evaluate", session, returnByValue=True, expression=FACTS)["result"]["value"]
            shot = dt.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                           clip={"x": 0, "y": 0, "width": 1100, "height": facts["height"], "scale": 1})
            errors = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"
                      or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                      or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
            results.append((errors, facts, base64.b64decode(shot["data"])))
            dt.send("Target.closeTarget", targetId=target)
    finally:
        dt.close()
    return results


FACTS = """(() => {
  const top = sel => (document.querySelector(sel) || {getBoundingClientRect: () => ({top: NaN})})
                     .getBoundingClientRect().top;
  return {
    images: document.images.length,
    decoded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 100).length,
    summaryFirst: top('.summary') < top('h2'),
    external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.src || e.href)
                   .filter(u => !u.startsWith('data:')).length,
    height: document.documentElement.scrollHeight};
})()"""


def test_report_in_chromium(planted_report, tmp_path):
    from PIL import Image

    _, out = planted_report
    bad = tmp_path / "bad.html"          # proves the client sees errors: a console.error and an uncaught one
    bad.write_text("<html><body><script>console.error('boom'); undefinedFunction();</script></body></html>")
    (bad_errors, _, _), (errors, facts, png) = load_pages([bad.as_uri(), (out / "report.html").as_uri()],
                                                          tmp_path / "profile")
    assert len(bad_errors) >= 2
    assert errors == []
    assert facts["external"] == 0 and facts["summaryFirst"]
    assert facts["images"] >= 8 and facts["decoded"] == facts["images"]
    shot = out / "screenshot.png"
    shot.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.height >= 3000
    # the plots are drawn: saturated pixels (lines, bars, heat maps) well beyond what text and tables give
    small = image.resize((image.width // 4, image.height // 4))
    colored = sum(1 for r, g, b in small.getdata() if max(r, g, b) - min(r, g, b) > 80)
    assert colored > 2000, colored
