"""report.html in a real browser: headless Chromium loads it, logs no error, and shows the plots.

Chromium is driven over its DevTools pipe (--remote-debugging-pipe, stdlib only). Install it
with `apt-get install chromium chromium-driver`; without /usr/bin/chromium this test skips.
"""
from __future__ import annotations

import io
from pathlib import Path

from browser_support import load_pages as _load_pages
from browser_support import needs_chromium
from planted import planted_dir, planted_report  # noqa: F401  (fixtures)

pytestmark = needs_chromium


def load_pages(urls: list[str], profile: Path):
    return _load_pages(urls, profile, FACTS)


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
