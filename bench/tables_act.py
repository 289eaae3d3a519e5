"""bench/tables.py's pages for issue 24: weights and activations (w8a8_*.json, ct_w8a8_check.json) and
the int8 kernel's speed (int8_speed.json). Standard library only."""
from __future__ import annotations

from tables_format import MODELS, RESULTS, fixed, header_lines, load, model_sections, page, ppl, seconds, sig, table

W8A8_MODELS = ("smollm2-135m", "gemma3-270m")
TARGET_ROWS = ("w8a8-smoothquant", "llm-int8")


def _label(r: dict) -> str:
    if r.get("tool") == "lowbit":
        return f"lowbit {r['row']}"
    if r.get("tool") == "float":
        return "float32"
    return f"{r.get('tool', r.get('peer'))} {r.get('tool_version', '')}: {r.get('method', r.get('peer', ''))}".strip()


def _row(r: dict) -> list[str]:
    if "error" in r:
        return [_label(r), "failed: " + str(r["error"]).replace("|", "/")[:160], "", "", "", "", "", "", "", ""]
    inc = r.get("ppl_increase")
    delta = f"{100 * inc:+.2f}%" if inc is not None else \
        (f"n/a: {r['eval_windows']} windows" if r.get("note") else "")
    return [_label(r), ppl(r.get("ppl")), delta, sig(r.get("kld"), 3),
            sig(r.get("kld_p99"), 3), "" if r.get("top1_changed") is None else f"{100 * r['top1_changed']:.2f}%",
            fixed(r.get("weight_bits"), 2), str(r.get("act_bits", "")), seconds(r.get("quantize_seconds")),
            fixed(r.get("load_average"), 1) if r.get("load_average") is not None else ""]


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, stated against this model's numbers."""
    by = {r.get("row"): r for r in rows if r.get("tool") == "lowbit" and "ppl_increase" in r}
    lines = []
    for name in TARGET_ROWS:
        if name in by:
            inc = by[name]["ppl_increase"]
            lines.append(f"- `{name}` within 1% of float: {100 * inc:+.2f}% — {'met' if inc <= 0.01 else 'missed'}")
    if "w8a8-smoothquant-static" in by and "w8a8-static" in by:
        a, b = by["w8a8-smoothquant-static"]["ppl_increase"], by["w8a8-static"]["ppl_increase"]
        lines.append(f"- `w8a8-smoothquant-static` at most half of `w8a8-static`'s increase: {100 * a:+.2f}% vs "
                     f"{100 * b:+.2f}% — {'met' if a <= b / 2 else 'missed'}")
    w8 = [r for r in by.values() if r.get("weight_bits", 99) > 7.5 and r.get("act_bits") == 8]
    peers = [r for r in rows if r.get("tool") not in ("lowbit", "float") and "ppl_increase" in r
             and r.get("act_bits") == 8]
    if w8 and peers:
        mine, theirs = min(w8, key=lambda r: r["ppl_increase"]), min(peers, key=lambda r: r["ppl_increase"])
        ratio = mine["ppl_increase"] / theirs["ppl_increase"] if theirs["ppl_increase"] > 0 else float("inf")
        lines.append(f"- best lowbit W8A8 (`{mine['row']}`, {100 * mine['ppl_increase']:+.2f}%) at most 0.7× the best "
                     f"peer's increase ({_label(theirs)}, {100 * theirs['ppl_increase']:+.2f}%): {ratio:.2f}× — "
                     f"{'met' if ratio <= 0.7 else 'missed'}")
    return lines


def _shares(rows: list[dict]) -> str:
    r = next((r for r in rows if r.get("row") == "llm-int8" and r.get("outlier_column_share")), None)
    if r is None:
        return ""
    shares = r["outlier_column_share"]
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:8]
    mean = sum(shares.values()) / len(shares)
    return ("LLM.int8(): share of input columns sent to the float path per forward on the evaluation text, mean "
            f"over all {len(shares)} linears {100 * mean:.3f}%; the largest:\n\n" +
            table(["linear", "share"], [[k, f"{100 * v:.3f}%"] for k, v in top], {1}))


def _w8a8_section(model: str, d: dict, name: str) -> str:
    head = ["row", "ppl", "Δppl", "KLD", "KLD p99", "top-1 changed", "W bits", "A bits", "quantize s", "load"]
    return (f"## {MODELS[model]} (`bench/results/{name}`)\n\n" + table(head, [_row(r) for r in d["rows"]],
                                                                     set(range(1, 10)))
            + "\n\nTargets (issue 24):\n" + "\n".join(_targets(d["rows"])) + "\n\n" + _shares(d["rows"])
            + "\n\n" + "\n".join(header_lines(d)))


def w8a8_page() -> str:
    sections = model_sections("w8a8", W8A8_MODELS, _w8a8_section)
    if (RESULTS / "ct_w8a8_check.json").exists():
        c = load("ct_w8a8_check.json")
        body = [[r["src"].split("/")[-1], r["model"], sig(r["lowbit_ppl"], 5), sig(r["plain_env"]["ppl"], 5),
                 f"{100 * (r['ppl_ratio'] - 1):+.3f}%", str(r["plain_env"].get("windows", "")),
                 str(r["plain_env"]["quantizes_inputs"]),
                 f"transformers {r['plain_env']['versions']['transformers']}, compressed-tensors "
                 f"{r['plain_env']['versions']['compressed_tensors']}"] for r in c["rows"]]
        sections.append("## Exported W8A8 checkpoints in an environment without lowbit (`bench/peers/ct_w8a8_check.py`)"
                        "\n\n" + table(["lowbit directory", "model", "lowbit ppl", "plain env ppl", "Δ",
                                        "windows", "forward quantizes inputs", "reader"], body, {2, 3, 4, 5}))
    intro = ("Weights and activations quantized (`python bench/w8a8.py --model M`): WikiText-2 raw test, ctx 2048, "
             "the first 20 windows, GPTQ convention, KLD against the float model; calibration from WikiText-2 "
             "validation. Δppl is against the float32 row of the same run. W bits: bits per weight of the "
             "quantized linears as stored; A bits: the activations' code width. LLM.int8()'s float columns use the "
             "de-quantized int8 weights, so they cost no storage. quantize s: wall time of the `lowbit quantize` "
             "process; load: the machine's 1-minute load average when it ended (rows quantized beside other "
             "benchmarks took several times longer than alone). Peer rows are evaluated in their own environments "
             "with lowbit's evaluation code on the same tokens against the same float reference "
             "(`bench/peers/w8a8_peers.py`); a row a tool could not produce is a failure row with its reason.")
    return page("Weights and activations (`bench/w8a8.py`)", intro, sections)


def int8_speed_page() -> str:
    if not (RESULTS / "int8_speed.json").exists():
        return page("The int8 kernel (`bench/int8_speed.py`)", "Not measured yet (`python bench/int8_speed.py`).", [])
    d = load("int8_speed.json")
    body = [[r["shape"], str(r["tokens"]), sig(r["float32_s"] * 1e3, 3), sig(r["int8_s"] * 1e3, 3),
             f"{r['speedup_int8']:.2f}×", f"{r['speedup_int_mm_only']:.2f}×"] for r in d["rows"]]
    prefill = [[MODELS.get(r["model"], r["model"]), sig(r["float32_s"], 3), sig(r["int8_s"], 3),
                sig(r["simulated_s"], 3), f"{r['speedup_int8']:.2f}×",
                "not measured" if "int8_rotated_s" not in r else "refused (Gemma 3's post-norms)"
                if r["int8_rotated_s"] is None else
                f"{sig(r['int8_rotated_s'], 3)} ({r['speedup_int8_rotated']:.2f}×)"] for r in d["prefill"]]
    online = [[r["transform"], str(r["rows"]), sig(r["hadamard_s"] * 1e3, 3),
               "" if r["linear_float32_s"] is None else sig(r["linear_float32_s"] * 1e3, 3),
               "" if r["cost_vs_linear"] is None else f"{r['cost_vs_linear']:.2f}×"]
              for r in d.get("online_rotations", [])]
    intro = ("lowbit's int8 kernel (per-token int8 activations × per-channel int8 weights through `torch._int_mm`, "
             "int32 accumulation, then the scales; `python bench/int8_speed.py`) against float32 `F.linear` in the "
             "same run on this CPU. Speed-up = float32 time / int8 time, medians of repeated runs; the int8 time "
             "includes quantizing the activations. `_int_mm` alone: the integer product without the activation "
             f"quantization. Load average before/after: {d['load_average_before']:.2f} / {d['load_average_after']:.2f}.")
    return page("The int8 kernel (`bench/int8_speed.py`)", intro, [
        table(["shape", "tokens", "float32 ms", "int8 ms", "speed-up", "_int_mm alone"], body, {1, 2, 3, 4, 5}),
        "## Prefill of one 2048-token window, whole model (W8A8 per-token)\n\n" +
        table(["model", "float32 s", "int8 s", "simulated s", "speed-up", "int8 + QuaRot's online R4 s"], prefill,
              {1, 2, 3, 4, 5}),
        "## Online Hadamards (rotations) at 2048 tokens\n\nThe fast transform (Walsh–Hadamard butterflies and a "
        "small Paley matmul) against the float32 linear it precedes; R3 transforms every q and k head of one "
        "layer.\n\n" + table(["transform", "rows", "hadamard ms", "linear ms", "cost / linear"], online, {1, 2, 3, 4}),
        "\n".join(header_lines(d))])
