"""compare.html in headless Chromium: loads with no error and nothing external, both plots draw their
points with the command in each tooltip, and the KLD/perplexity switch shows one plot at a time."""
from __future__ import annotations

import io

from browser_support import load_pages, needs_chromium
from test_compare_cli import _compare, text  # noqa: F401  (fixture)

pytestmark = needs_chromium

FACTS = """(() => {
  const shown = sel => getComputedStyle(document.querySelector(sel)).display !== 'none';
  const before = {kld: shown('.plots .kld'), ppl: shown('.plots .ppl')};
  document.getElementById('m-ppl').click();
  const after = {kld: shown('.plots .kld'), ppl: shown('.plots .ppl')};
  return {before, after,
    points: document.querySelectorAll('.plots .kld svg title').length,
    commands: Array.from(document.querySelectorAll('.plots svg title')).filter(t => t.textContent.includes('lowbit quantize')).length,
    fronts: document.querySelectorAll('polyline.front').length,
    external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.src || e.href).length,
    height: document.documentElement.scrollHeight};
})()"""


def test_compare_page_in_chromium(tiny_llama_dir, calib, text, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cmp"
    assert _compare(capsys, tiny_llama_dir, calib, text, out, "--methods", "rtn,gptq",
                    "--formats", "int4-g32-sym,int2-g32-sym,int8-g32-sym")[0] == 0
    (errors, facts, png), = load_pages([(out / "compare.html").as_uri()], tmp_path / "profile", FACTS)
    assert errors == [] and facts["external"] == 0
    assert facts["before"] == {"kld": True, "ppl": False} and facts["after"] == {"kld": False, "ppl": True}
    assert facts["points"] >= 6 and facts["commands"] >= 12 and facts["fronts"] >= 1
    (out / "screenshot.png").write_bytes(png)
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colored = sum(1 for r, g, b in image.getdata() if max(r, g, b) - min(r, g, b) > 80)
    assert colored > 200                                    # markers and the front are drawn
