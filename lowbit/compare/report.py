"""`lowbit compare`'s outputs: the Pareto front, results.md (sorted by bits per weight) and compare.html —
one self-contained page (inline SVG and CSS, no script, no network): perplexity or KLD against bits
per weight (a CSS switch), one marker shape per method, the front drawn, each point's command in
its tooltip and in the table."""
from __future__ import annotations

import math
from html import escape

MARKERS = ("circle", "square", "diamond", "triangle", "cross")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def pareto(rows: list[dict], metric: str) -> set[int]:
    """Indices of the rows no other row beats: at most the bits and at most the metric, one of them less."""
    ok = [i for i, r in enumerate(rows) if r.get(metric) is not None and math.isfinite(r[metric])]
    front = set()
    for i in ok:
        a = rows[i]
        if not any(rows[j]["bits_per_weight"] <= a["bits_per_weight"] and rows[j][metric] <= a[metric]
                   and (rows[j]["bits_per_weight"] < a["bits_per_weight"] or rows[j][metric] < a[metric])
                   for j in ok if j != i):
            front.add(i)
    return front


def markdown(rows: list[dict], float_ppl: float) -> str:
    rows = sorted(rows, key=lambda r: (r.get("bits_per_weight") or 99, r["label"]))
    front = pareto(rows, "kld")
    lines = [f"float perplexity {float_ppl:.4f}; ★ = on the Pareto front of KLD against bits per weight", "",
             "| cell | bits/weight | ppl | Δppl | KLD | top-1 changed | quantize s | command |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows):
        if "error" in r:
            lines.append(f"| {r['label']} | | failed: {r['error']} | | | | | `{r['command']}` |")
            continue
        lines.append(f"| {r['label']}{' ★' if i in front else ''} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
                     f"{100 * (r['ppl'] / float_ppl - 1):+.2f}% | {r['kld']:.4g} | {100 * r['top1_changed']:.2f}% | "
                     f"{r['quantize_seconds']:.1f} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def _marker(shape: str, x: float, y: float, color: str, title: str) -> str:
    t = f"<title>{escape(title)}</title>"
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}">{t}</circle>'
    if shape == "square":
        return f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" fill="{color}">{t}</rect>'
    pts = {"diamond": [(0, -6), (6, 0), (0, 6), (-6, 0)], "triangle": [(0, -6), (6, 5), (-6, 5)],
           "cross": [(-2, -6), (2, -6), (2, -2), (6, -2), (6, 2), (2, 2), (2, 6), (-2, 6), (-2, 2), (-6, 2),
                     (-6, -2), (-2, -2)]}[shape]
    return (f'<polygon points="{" ".join(f"{x + a:.1f},{y + b:.1f}" for a, b in pts)}" fill="{color}">{t}'
            "</polygon>")


def _ticks(lo: float, hi: float) -> list[float]:
    """Tick values in [lo, hi] on a log axis: 1-2-5 per decade, or evenly spaced round numbers when the
    range spans less than a few of those."""
    out = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)
           if lo <= m * 10 ** e <= hi]
    if len(out) >= 3:
        return out
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= 6:
            step *= m
            break
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def svg(rows: list[dict], metric: str, label: str, float_value: float | None) -> str:
    """Metric against bits per weight, log y; markers by method, colour by format family; the front as a line."""
    pts = [r for r in rows if r.get(metric) is not None and math.isfinite(r[metric]) and r[metric] > 0]
    if not pts:
        return "<p>No measured point.</p>"
    W, H, L, R, T, B = 760, 440, 70, 20, 20, 50
    xs, ys = [r["bits_per_weight"] for r in pts], [math.log10(r[metric]) for r in pts]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(ys) - 0.1, max(ys) + 0.1
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v: H - B - (math.log10(v) - y0) / (y1 - y0) * (H - T - B)
    methods = sorted({r["method"] for r in pts})
    shape = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    families = sorted({r["family"] for r in pts})
    color = {f: COLORS[i % len(COLORS)] for i, f in enumerate(families)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" aria-label="{escape(label)}">',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#999"/>']
    for b in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(f'<line x1="{X(b):.1f}" y1="{T}" x2="{X(b):.1f}" y2="{H - B}" stroke="#eee"/>'
                   f'<text x="{X(b):.1f}" y="{H - B + 16}" font-size="12" text-anchor="middle">{b}</text>')
    for v in _ticks(10 ** y0, 10 ** y1):
        out.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" font-size="11" text-anchor="end">{v:.4g}</text>')
    if float_value and y0 <= math.log10(float_value) <= y1:
        out.append(f'<line x1="{L}" y1="{Y(float_value):.1f}" x2="{W - R}" y2="{Y(float_value):.1f}" '
                   'stroke="#444" stroke-dasharray="4 3"><title>float model</title></line>')
    front = sorted((rows[i] for i in pareto(rows, metric)), key=lambda r: r["bits_per_weight"])
    if len(front) > 1:
        out.append('<polyline class="front" fill="none" stroke="#f0a500" stroke-width="2" points="'
                   + " ".join(f"{X(r['bits_per_weight']):.1f},{Y(r[metric]):.1f}" for r in front) + '"/>')
    for r in pts:
        title = f"{r['label']}: {r['bits_per_weight']:.3f} bits/weight, {metric} {r[metric]:.4g}\n{r['command']}"
        out.append(_marker(shape[r["method"]], X(r["bits_per_weight"]), Y(r[metric]), color[r["family"]], title))
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" font-size="13" text-anchor="middle">bits per weight</text>'
               f'<text x="16" y="{(T + H - B) / 2}" font-size="13" text-anchor="middle" '
               f'transform="rotate(-90 16 {(T + H - B) / 2})">{escape(label)} (log scale)</text>')
    y = T + 14
    for m in methods:
        out.append(_marker(shape[m], W - R - 150, y - 4, "#555", m) + f'<text x="{W - R - 140}" y="{y}" font-size="12">'
                   f"{escape(m)}</text>")
        y += 18
    for f in families:
        out.append(f'<rect x="{W - R - 155}" y="{y - 9}" width="10" height="10" fill="{color[f]}"/>'
                   f'<text x="{W - R - 140}" y="{y}" font-size="12">{escape(f)}</text>')
        y += 18
    out.append("</svg>")
    return "".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td.l,th.l{text-align:left}th{background:#f0f0f0}code{background:#f3f3f3;padding:0 3px}
#m-kld:checked~.plots .ppl,#m-ppl:checked~.plots .kld{display:none}label{margin-right:16px}"""


def html(model: str, rows: list[dict], float_ppl: float, settings: str) -> str:
    """compare.html: the switchable plot and the table of every cell."""
    ordered = sorted(rows, key=lambda r: (r.get("bits_per_weight") or 99, r["label"]))
    front = pareto(ordered, "kld")
    body = []
    for i, r in enumerate(ordered):
        if "error" in r:
            body.append(f'<tr><td class="l">{escape(r["label"])}</td><td colspan="5" class="l">failed: '
                        f'{escape(r["error"])}</td><td class="l"><code>{escape(r["command"])}</code></td></tr>')
            continue
        body.append(f'<tr><td class="l">{escape(r["label"])}{" ★" if i in front else ""}</td>'
                    f'<td>{r["bits_per_weight"]:.3f}</td><td>{r["ppl"]:.4f}</td><td>{r["kld"]:.4g}</td>'
                    f'<td>{100 * r["top1_changed"]:.2f}%</td><td>{r["quantize_seconds"]:.1f}</td>'
                    f'<td class="l"><code>{escape(r["command"])}</code></td></tr>')
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>lowbit compare: {escape(model)}</title>
<style>{CSS}</style></head><body><h1>lowbit compare: {escape(model)}</h1><p>{escape(settings)}</p>
<input type="radio" name="m" id="m-kld" checked><label for="m-kld">KLD</label>
<input type="radio" name="m" id="m-ppl"><label for="m-ppl">perplexity</label>
<div class="plots"><div class="kld">{svg(rows, "kld", "KLD against the float model", None)}</div>
<div class="ppl">{svg(rows, "ppl", "perplexity", float_ppl)}</div></div>
<p>Hover a point for its command. ★ in the table: on the Pareto front of KLD against bits per weight.</p>
<table><tr><th class="l">cell</th><th>bits/weight</th><th>ppl</th><th>KLD</th><th>top-1 changed</th>
<th>quantize s</th><th class="l">command</th></tr>{"".join(body)}</table></body></html>
"""
