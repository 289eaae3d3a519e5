"""report.html: one self-contained page (inline CSS, base64 PNG figures, no script, no network)."""
from __future__ import annotations

from html import escape

from . import plots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em}h2{margin-top:2em;border-bottom:2px solid #eee;padding-bottom:4px}
.meta{color:#666;font-size:0.9em}.summary{background:#fff8e6;border-left:5px solid #f0a500;padding:10px 18px}
.summary li{margin:6px 0}.def{background:#f5f7fa;border-left:4px solid #8aa;padding:8px 12px;font-size:0.92em}
table{border-collapse:collapse;margin:10px 0;font-size:0.85em}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:10px 0}
.ok{color:#1a7f37;font-weight:bold}.no{color:#888}code{background:#f3f3f3;padding:0 3px}
"""


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def table(headers: list[str], rows: list[list], left: int = 0) -> str:
    """An HTML table; the first `left` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""
    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_fmt(v)}</td>" for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(b64: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def _super_weights(sw: dict) -> str:
    checks = {c["weights"]: c for c in sw["verification"]["checks"]}
    rows = []
    for c in sw["found"]:
        chk = checks[f"{c['layer']}:{c['row']},{c['col']}"]
        z, k = chk["zeroed"], chk["control"]
        rows.append([c["layer"], c["row"], c["col"], f"{c['position']} {c['token']!r}", c["x"], c["weight"],
                     c["weight_over_std"], c["y"], f"{c['share']:.0%}", c["residual"], c["round"],
                     f"{z['ppl']:.4g} ({z['kld']:.2g})", f"{k['ppl']:.4g} ({k['kld']:.2g})", chk["confirmed"]])
    out = [f'<p class="def">{escape(sw["definition"])}</p>', img(plots.down_plot(sw), "down projection spikes")]
    if not rows:
        return "".join(out) + "<p>No down-projection weight creates a massive activation: no super weight.</p>"
    v = sw["verification"]
    out.append(table(["layer", "row j", "col k", "token", "x_k", "W[j,k]", "|W|/std", "y_j", "share", "h_j after",
                      "round", "zeroed: ppl (KLD)", "control: ppl (KLD)", "confirmed"], rows, left=0))
    if "all" in checks:
        a = checks["all"]
        out.append(f"<p>All {len(sw['found'])} zeroed together: ppl {a['zeroed']['ppl']:g} (KLD "
                   f"{a['zeroed']['kld']:.3g}) against {a['control']['ppl']:g} (KLD {a['control']['kld']:.2g}) "
                   f"for as many random weights of the same layers; float model {v['float_ppl']:g}.</p>")
    out.append(img(plots.verify_plot(v), "perplexity with super weights zeroed"))
    out.append(f"<p class=\"meta\">Perplexity and KLD on the probe: {v['predictions']} next-token predictions "
               "(the first analysis sequence(s), BOS first).</p>")
    return "".join(out)


def _massive(ma: dict) -> str:
    rows = [[d["dim"], d["layer_ranges"], ", ".join(f"{t['position']} {t['text']!r}" for t in d["tokens"][:4]),
             d["max_value"], d["max_at"]["layer"], d["max_at"]["ratio_to_median"], d["occurrences"]] for d in ma["dims"]]
    body = table(["dim", "layers", "positions (token)", "max value", "at layer", "x median", "occurrences"], rows, 3) \
        if rows else "<p>None at these thresholds.</p>"
    return f'<p class="def">{escape(ma["definition"])}</p>{img(plots.residual_plot(ma), "residual stream")}{body}'


def _features(of: dict, activations: dict, massive_dims: set) -> str:
    rows = [[f["dim"], f["layer_ranges"], f"{f['share_of_layers']:.0%}", f"{f['mean_positions_share']:.0%}",
             f["max_abs"], f["max_abs_layer"]] for f in of["features"]]
    body = table(["dim", "layers", "share of layers", "positions (mean)", "max |x|", "at layer"], rows, 2) \
        if rows else "<p>None at these thresholds.</p>"
    out = [f'<p class="def">{escape(of["definition"])}</p>', img(plots.feature_plot(of), "outlier features"), body]
    feats = [f["dim"] for f in of["features"]]
    for name in activations["hidden_inputs"]:
        values = [r["per_channel"]["absmax"] for r in activations["inputs"] if r["input_of"][0] == name]
        out.append(img(plots.heatmap(values, f"max |x| per channel and layer: input of {name}", feats,
                                     sorted(massive_dims)), name))
    return "".join(out)


def _activations(act: dict, bits: list[str]) -> str:
    top = sorted(act["inputs"], key=lambda r: -r["absmax_over_median"])[:12]
    b = bits[0]
    rows = [[r["layer"], "/".join(p.split(".")[-1] for p in r["input_of"]), r["absmax"], r["absmax_channel"],
             r["median_absmax"], r["absmax_over_median"], r["kurtosis_max"], r["kurtosis_max_channel"],
             r["levels"][b]["per_tensor"]["median"], r["levels"][b]["per_token"]["median"]] for r in top]
    out = [f'<p class="def">{escape(act["definition_levels"])} A channel that uses fewer than about 4 levels is '
           "rounded to almost nothing: the outliers elsewhere took the range.</p>"]
    out += [img(plots.levels_plot(act, b), f"effective int{b} levels") for b in bits]
    out.append("<p>The linear inputs with the largest outliers (absmax over the median channel's absmax):</p>")
    out.append(table(["layer", "input of", "absmax", "channel", "median absmax", "ratio", "max kurtosis", "channel",
                      f"int{b} levels/tensor", f"int{b} levels/token"], rows, 2))
    return "".join(out)


def _int8(section: dict | None) -> str:
    if not section or not section["inputs"]:
        return "<p>No calibration rows were kept.</p>"
    top = sorted(section["inputs"], key=lambda r: -r["per_token"])[:12]
    rows = [[r["layer"], "/".join(p.split(".")[-1] for p in r["input_of"]), r["per_tensor"], r["per_token"],
             r["per_tensor_smoothed"], r["per_token_smoothed"]] for r in top]
    return (f'<p class="def">{escape(section["definition"])}</p><p>The inputs with the largest per-token error:</p>'
            + table(["layer", "input of", "per tensor", "per token", "per tensor, smoothed", "per token, smoothed"],
                    rows, 2))


def _weights(w: dict) -> str:
    rows = [[r["layer"], r["linear"], r["absmax_over_std"], r["absmax_at"]["row"], r["absmax_at"]["col"]]
            for r in w["most_outlying"]]
    kinds = list(dict.fromkeys(r["linear"] for r in w["linears"]))
    err = [[k] + [sum(r["rtn_rel_error"][f] for r in w["linears"] if r["linear"] == k) /
                  max(1, sum(r["linear"] == k for r in w["linears"])) for f in w["formats"]] for k in kinds]
    return (f'<p class="def">{escape(w["definition"])}</p>{img(plots.weights_plot(w), "weight outliers")}'
            + table(["layer", "linear", "absmax/std", "row", "col"], rows, 2)
            + "<p>Mean relative RTN error per linear kind:</p>" + table(["linear"] + w["formats"], err, 1))


def _sensitivity(s: dict) -> str:
    if s["mode"] == "none":
        return "<p>Skipped (<code>--sensitivity none</code>).</p>"
    rows = {(r["layer"], r["linear"]): r for r in s["rows"]}
    body = [[r["layer"], r["linear"]] + [v for f in s["formats"] for v in (rows[(r["layer"], r["linear"])][f]["ppl"],
                                                                            rows[(r["layer"], r["linear"])][f]["kld"])]
            for r in s["ranking"][:15]]
    heads = ["layer", "linear"] + [h for f in s["formats"] for h in (f"ppl {f}", f"KLD {f}")]
    return (f'<p class="def">{escape(s["definition"])} Float perplexity on the probe: {s["float_ppl"]:.4g} '
            f'({s["predictions"]} predictions). The ranking is what a planner needs: give the top of it more '
            f'bits.</p>{img(plots.sensitivity_plot(s), "sensitivity ranking")}' + table(heads, body, 2))


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif k != "definition":
            yield [f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v]


def render(report: dict) -> str:
    m, t = report["model"], report["text"]
    massive_dims = {d["dim"] for d in report["massive_activations"]["dims"]}
    bits = list(report["activations"]["inputs"][0]["levels"]) if report["activations"]["inputs"] else []
    summary = "".join(f"<li>{escape(s)}</li>" for s in report["summary"])
    bos = f", BOS {t['bos']['text']!r} first" if t["bos"] else ""
    sections = [
        ("Super weights", "Single weights whose removal breaks the model.", _super_weights(report["super_weights"])),
        ("Massive activations", "A few huge values in the residual stream, on a few tokens.",
         _massive(report["massive_activations"])),
        ("Outlier features (LLM.int8())", "Hidden dimensions that are large on many tokens in many layers.",
         _features(report["outlier_features"], report["activations"], massive_dims)),
        ("Activation statistics and effective levels", "How much of the quantization grid each channel gets.",
         _activations(report["activations"], bits)),
        ("Int8 activations", "The error each linear's input would take at 8 bits, and what smoothing does to it.",
         _int8(report.get("int8_inputs"))),
        ("Weight statistics", "Outliers in the weights themselves, and plain rounding error.", _weights(report["weights"])),
        ("Layer sensitivity", "Which layer hurts most when quantized alone.", _sensitivity(report["sensitivity"])),
    ]
    body = "".join(f"<h2>{escape(title)}</h2><p><i>{escape(lead)}</i></p>{content}" for title, lead, content in sections)
    settings = table(["setting", "value"], list(_flatten(report["config"])), left=1)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowbit analyze: {escape(m['source'])}</title>
<style>{CSS}</style></head><body>
<h1>Where the outliers are: {escape(m['source'])}</h1>
<p class="meta">{escape(m['family'])}, {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']};
text {escape(t['origin'])} ({t['samples']} x {t['seq_len']} = {t['tokens']} tokens{escape(bos)}, seed {t['seed']});
lowbit {escape(report['lowbit_version'])}.</p>
<div class="summary"><b>Summary</b><ul>{summary}</ul></div>
<p>Low-bit formats share one scale among many numbers, so a few huge numbers (outliers) decide the scale and the
ordinary numbers fall between the few remaining steps. This page shows where this model's outliers live, whether
the model depends on them, and which layers suffer most from rounding.</p>
{body}
<h2>Settings</h2>{settings}<p class="meta">Seconds: {escape(str(report.get('seconds', {})))}</p>
</body></html>
"""
