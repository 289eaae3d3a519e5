"""bench/tables.py's page for issue 26: the KV cache (kv_cache_*.json and the peers' rows under
bench/results/peers/kv_cache/). Standard library only."""
from __future__ import annotations

import json
import re

from tables_format import MODELS, RESULTS, fixed, header_lines, model_sections, page, ppl, sig, table

KV_MODELS = ("smollm2-135m", "gemma3-270m")
PEER_DIR = RESULTS / "peers" / "kv_cache"
NOMINAL = {"int8": 8, "int4": 4, "int4-kscale": 4, "int4-kcenter-kscale": 4, "int4-kscale-sink1": 4,
           "int4-kcenter-kscale-sink1": 4, "int2": 2, "int4-kchannel": 4, "int2-kchannel": 2, "kivi4-r128": 4,
           "kivi2-r128": 2, "kivi2-sink1-r128": 2, "turboquant4": 4, "turboquant2": 2, "kivi2-prerope-sink1-r128": 2,
           "int4-prerope-kcenter-kscale-sink1": 4}
PRE_ROPE = ("turboquant3.5-prerope-kcenter-kscale-sink1", "turboquant2.5-prerope-kcenter-kscale-sink1",
            "turboquant3.5-prerope-kcenter-kscale-sink1-r128", "turboquant2.5-prerope-kcenter-kscale-sink1-r128",
            "turboquant3.5-prerope-kcenter-kscale-sink16", "kivi2-prerope-sink1-r128", "int4-prerope-kcenter-kscale-sink1",
            "turboquant3.5-ncorr-prerope-kcenter-kscale-sink1", "turboquant3.5-ncorrv-prerope-kcenter-kscale-sink1",
            "turboquant2.5-ncorr-prerope-kcenter-kscale-sink1", "turboquant3.5-ncorr-prerope-kcenter-kscale-sink1-r128",
            "turboquant2.5-ncorr-prerope-kcenter-kscale-sink1-r128", "turboquant2.5-ncorrv-prerope-kcenter-kscale-sink1-r128")
ORDER = ("float", "int8", "int4", "int2", "int4-kchannel", "int2-kchannel", "kivi4-r128", "kivi2-r128", "turboquant4",
         "turboquant3.5", "turboquant3", "turboquant2.5", "turboquant2", "turboquant3.5-kcenter", "turboquant2.5-kcenter",
         "turboquant3.5-kscale", "turboquant3.5-kcenter-kscale", "turboquant2.5-kcenter-kscale",
         "turboquant3.5-kcenter-kscale-sink1", "turboquant2.5-kcenter-kscale-sink1",
         "turboquant3.5-kcenter-kscale-r128", "turboquant3.5-kcenter-kscale-sink1-r128",
         "turboquant2.5-kcenter-kscale-sink1-r128", "kivi2-sink1-r128", "int4-kscale", "int4-kcenter-kscale",
         "int4-kscale-sink1", "int4-kcenter-kscale-sink1", *PRE_ROPE,
         "turboquant3.5-ncorr", "turboquant3.5-qjl", "turboquant2.5-qjl")
TARGETS = (("turboquant3.5", 0.01), ("turboquant3.5-kcenter", 0.01), ("turboquant3.5-kscale", 0.01),
           ("turboquant3.5-kcenter-kscale", 0.01), ("turboquant2.5", 0.03), ("turboquant2.5-kcenter", 0.03),
           ("turboquant2.5-kcenter-kscale", 0.03), ("turboquant3.5-kcenter-kscale-sink1", 0.01),
           ("turboquant2.5-kcenter-kscale-sink1", 0.03), ("turboquant3.5-kcenter-kscale-r128", 0.01),
           ("turboquant3.5-kcenter-kscale-sink1-r128", 0.01),
           ("turboquant2.5-kcenter-kscale-sink1-r128", 0.03),
           ("kivi2-r128", 0.05), ("kivi2-sink1-r128", 0.05), ("turboquant3.5-ncorr", 0.01),
           *((n, 0.01 if n.startswith("turboquant3.5") else 0.03 if n.startswith("turboquant2.5") else 0.05)
             for n in PRE_ROPE if not n.startswith("int4")))


def _ordered(rows: dict) -> dict:
    """bench/kv_cache.py's rows in its own order (rows re-run later sit at the JSON's end)."""
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(rows.items(), key=lambda kv: rank.get(kv[0], len(ORDER))))


def _peers(model: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(PEER_DIR.glob(f"*_{model}.json"))]


def _peer_bits(r: dict) -> float | None:
    if "cache_type" in r:
        return {"f32": 32, "f16": 16, "q8_0": 8, "q4_0": 4, "q4_1": 4}[r["cache_type"]]
    return (r.get("settings") or {}).get("nbits")


def _peer_increase(r: dict, fp: float | None) -> float | None:
    """Against the peer's own float cache (llama.cpp) or lowbit's float row (same evaluation, transformers)."""
    base = r.get("float_ppl_llamacpp", fp)
    return r["ppl"] / base - 1 if "ppl" in r and base else None


def _passkey(p: dict | None) -> str:
    return "" if not p else f"{round(p['accuracy'] * len(p['trials']))}/{len(p['trials'])}"


def _gen(g: dict | None, f: dict | None) -> list[str]:
    if not g:
        return ["", "", ""]
    ratio = lambda k, fk: f" ({g[k] / f[fk]:.2f}×)" if f and f.get(fk) else ""
    return [f"{g['decode_tokens_per_second']:.1f}{ratio('decode_tokens_per_second', 'decode_tokens_per_second')}",
            f"{g['bytes_per_token']:.0f}{ratio('bytes_per_token', 'bytes_per_token')}",
            f"{g['generation_peak_rss_mib']:.0f}{ratio('generation_peak_rss_mib', 'generation_peak_rss_mib')}"
            if g.get("generation_peak_rss_mib") else ""]


def _rows(model: str, d: dict) -> tuple[list[list[str]], dict]:
    st = d.get("stages", {})
    ppl_rows = _ordered(st.get("ppl", {}).get("rows", {}))
    pk, gen = st.get("passkey", {}).get("rows", {}), st.get("generate", {}).get("rows", {})
    fp = ppl_rows.get("float", {}).get("ppl")
    body = []
    for name, r in ppl_rows.items():
        inc = r.get("ppl_increase")
        body.append([f"lowbit {name}", ppl(r["ppl"]), "" if inc is None else f"{100 * inc:+.2f}%", sig(r["kld"], 3),
                     f"{100 * r['top1_changed']:.2f}%", fixed(r["bits_per_value"], 2), _passkey(pk.get(name)),
                     *_gen(gen.get(name), gen.get("float"))])
    peers = _peers(model)
    f_llama = next((p.get("generation") for p in peers if p.get("cache_type") == "f16" and "error" not in p), None)
    for r in peers:
        label = f"{r.get('tool', '')}: {r['peer']}"
        if "error" in r:
            body.append([label, "failed: " + str(r["error"]).replace("|", "/")[:200], *[""] * 8])
            continue
        inc = _peer_increase(r, fp)
        g = r.get("generation") or {}
        bits = r.get("bits_per_value") or (8 * g["bytes_per_token"] / _values(d) if g.get("bytes_per_token") and _values(d)
                                           else None)
        body.append([label, ppl(r["ppl"]), "" if inc is None else f"{100 * inc:+.2f}%", sig(r["kld"], 3),
                     f"{100 * r['top1_changed']:.2f}%", fixed(bits, 2), _passkey(r.get("passkey")),
                     *_gen(g, f_llama if r.get("cache_type") else gen.get("float"))])
    return body, {"fp": fp, "ppl": ppl_rows, "passkey": pk, "peers": peers}


def _values(d: dict) -> int | None:
    return d.get("values_per_token")


def _targets(facts: dict) -> list[str]:
    rows, pk, lines = facts["ppl"], facts["passkey"], []
    for name, limit in TARGETS:
        if name in rows and "ppl_increase" in rows[name]:
            inc = rows[name]["ppl_increase"]
            floats = _float_tokens(name, 2048)
            kept = (f" (its {floats} float tokens counted: {_effective_bits(rows[name], floats, 2048):.2f} bits/value "
                    f"at ctx 2048, {_effective_bits(rows[name], _float_tokens(name, 8192), 8192):.2f} at 8192)"
                    if floats > 1 and "bits_per_value" in rows[name] else "")
            lines.append(f"- `{name}` within {100 * limit:.0f}% of the float cache's perplexity: {100 * inc:+.2f}% — "
                         f"{'met' if inc <= limit else 'missed'}{kept}")
    for peer in facts["peers"]:
        bits, inc = _peer_bits(peer), _peer_increase(peer, facts["fp"])
        ours = {n: r["ppl_increase"] for n, r in rows.items() if NOMINAL.get(n) == bits and "ppl_increase" in r}
        if inc is None or not ours or "error" in peer:
            continue
        worse = [n for n, v in ours.items() if v > inc]
        lines.append(f"- lowbit's {bits}-bit rows at most the increase of {peer['peer']} ({100 * inc:+.2f}%): "
                     + ", ".join(f"`{n}` {100 * v:+.2f}%" for n, v in ours.items())
                     + f" — {'met' if not worse else 'missed by ' + ', '.join(worse)}")
    for name in ("turboquant3.5", "turboquant3.5-kcenter", "turboquant3.5-kscale", "turboquant3.5-kcenter-kscale",
                 "turboquant3.5-kcenter-kscale-sink1", "turboquant3.5-kcenter-kscale-r128",
                 "turboquant3.5-kcenter-kscale-sink1-r128", "turboquant3.5-prerope-kcenter-kscale-sink1",
                 "turboquant3.5-prerope-kcenter-kscale-sink1-r128", "turboquant3.5-ncorr-prerope-kcenter-kscale-sink1"):
        if "float" in pk and name in pk:
            a, b = pk["float"]["accuracy"], pk[name]["accuracy"]
            lines.append(f"- passkey at 3.5 bits (`{name}`) equal to float's: {_passkey(pk[name])} vs "
                         f"{_passkey(pk['float'])} — {'met' if b >= a else 'missed'}")
    return lines


def _diagnosis(dg: dict | None) -> str:
    """The diagnose stage: K quantized alone, attention KL averaged over the layers, plain and centered."""
    if not dg:
        return ""
    worst = max(dg["layers"], key=lambda r: r["attention_kl"]["turboquant3.5"]["plain"])
    return (f"\n\nWhy K resists per-token quantizers (`--stage diagnose`: one window of {dg['tokens']} tokens from token "
            f"{dg['window_start']}; K quantized alone, the model's own queries; attention KL averaged over the layers, "
            "on K as it is and on K with its per-channel mean taken out before quantization and added back; scaled: "
            "over `--kv-scale-k`'s per-channel scales, multiplied back after):\n\n"
            + (table(["K quantizer", "attention KL", "K centered", "K scaled", "K centered, scaled"],
                     [[n, *(sig(v[h], 3) for h in ("plain", "centered", "scaled", "centered_scaled"))]
                      for n, v in dg["mean"].items()], {1, 2, 3, 4}) if "scaled" in next(iter(dg["mean"].values()))
               else table(["K quantizer", "attention KL", "K centered"],
                          [[n, sig(v["plain"], 3), sig(v["centered"], 3)] for n, v in dg["mean"].items()], {1, 2}))
            + f"\n\nK's energy in its per-channel means: {100 * dg['bias_share']:.0f}% (layer mean); a channel's "
              f"variance inside 32-token groups over its variance across the window: {dg['within_group_var']:.2f}; "
              f"the layer where turboquant3.5 costs most: {worst['layer']} "
              f"({sig(worst['attention_kl']['turboquant3.5']['plain'], 3)}).")


def _float_tokens(label: str, T: int) -> int:
    """Tokens a row's cache holds in float after a T-token window: its sink and residual (`-sinkS`, `-rR` in
    bench/kv_cache.py's labels; kivi flushes K in groups of 32 tokens), as lowbit.kv.attention.flushed counts."""
    sink = int(m.group(1)) if (m := re.search(r"-sink(\d+)", label)) else 0
    residual = int(m.group(1)) if (m := re.search(r"-r(\d+)$", label)) else 0
    group = 32 if label.startswith("kivi") else 1
    return T - max(0, (T - sink - residual) // group * group)          # all but the tokens flushed after the sink


def _effective_bits(row: dict, floats: int, T: int) -> float:
    """bits/value over a T-token cache whose `floats` tokens are float32."""
    return (row["bits_per_value"] * (T - floats) + 32 * floats) / T


def _with_float_tokens(rows: dict) -> str:
    """bits/value leaves out the float sink and residual: what they add at the end of a 2048- and an 8192-token
    context."""
    parts = []
    for n, r in rows.items():
        if "bits_per_value" not in r or not (_float_tokens(n, 2048) or _float_tokens(n, 8192)):
            continue
        eff = [_effective_bits(r, _float_tokens(n, T), T) for T in (2048, 8192)]
        parts.append(f"`{n}` {eff[0]:.2f} ({eff[1]:.2f})")
    return ("\n\nbits/value with the float tokens (sink, residual) counted, at the end of a 2048-token context "
            "(8192): " + ", ".join(parts) + ".") if parts else ""


def _section(model: str, d: dict, name: str) -> str:
    head = ["row", "ppl", "Δppl", "KLD", "top-1 changed", "bits/value", "passkey", "decode tok/s", "cache B/token",
            "generation peak RSS MiB"]
    body, facts = _rows(model, d)
    ppl_stage = d.get("stages", {}).get("ppl", {}).get("rows", {})
    first = next(iter(ppl_stage.values()), {})
    text = (f"## {MODELS[model]} (`bench/results/{name}`)\n\nctx {first.get('ctx', '?')}, {first.get('windows', '?')} "
            "windows.\n\n" + table(head, body, set(range(1, 10))))
    text += _with_float_tokens(_ordered(ppl_stage))
    gen_rows = d.get("stages", {}).get("generate", {}).get("rows", {})
    if gen_rows:
        pinned = all(g.get("mmap_threshold_pinned") for g in gen_rows.values())
        text += ("\n\nlowbit's generation peaks: " + (
            "`lowbit generate` pins glibc's mmap threshold at 1 MiB through the prefill, so its freed temporaries go "
            "back to the system, and at 32 MiB for the decode steps, whose same-sized temporaries the heap reuses; "
            "the peers' processes keep glibc's defaults." if pinned else
            "measured before `lowbit generate` pinned glibc's mmap threshold (glibc's defaults, as the peers') and "
            "before the packed cache stopped keeping the float prompt alive behind its residual's views, so a packed "
            "cache peaked above the float cache."))
    long_rows = _ordered(d.get("stages", {}).get("long", {}).get("rows", {}))
    if long_rows:
        r0 = next(iter(long_rows.values()))
        text += (f"\n\nAt ctx {r0['ctx']} ({r0['windows']} windows):\n\n" + table(
            ["row", "ppl", "Δppl", "KLD", "top-1 changed"],
            [[f"lowbit {n}", ppl(r["ppl"]), f"{100 * r.get('ppl_increase', 0):+.2f}%", sig(r["kld"], 3),
              f"{100 * r['top1_changed']:.2f}%"] for n, r in long_rows.items()], {1, 2, 3, 4}))
    pk = facts["passkey"]
    if pk:
        depths = sorted({t["depth"] for p in pk.values() for t in p["trials"]})
        lengths = sorted({t["length"] for p in pk.values() for t in p["trials"]})
        text += ("\n\nPasskey retrieval, correct answers by prompt length (tokens) and depth of the key:\n\n" + table(
            ["row", *[f"{n} @ {dd}" for n in lengths for dd in depths]],
            [[n, *["✓" if t["correct"] else "✗" for t in sorted(p["trials"], key=lambda t: (t["length"], t["depth"]))]]
             for n, p in pk.items()] +
            [[f"{p['peer']}", *["✓" if t["correct"] else "✗" for t in sorted(p["passkey"]["trials"],
                                                                             key=lambda t: (t["length"], t["depth"]))]]
             for p in facts["peers"] if p.get("passkey")]))
    text += _diagnosis(d.get("stages", {}).get("diagnose"))
    if facts["fp"] is not None:
        text += "\n\nTargets (issue 26):\n" + "\n".join(_targets(facts))
    return text + "\n\n" + "\n".join(header_lines(d))


def kv_page() -> str:
    intro = ("The KV cache quantized as generation stores it (`python bench/kv_cache.py --model M --stage ppl "
             "--stage long --stage passkey --stage generate`; docs/kv_cache.md): WikiText-2 raw test, GPTQ "
             "convention, KLD against the float cache. A window's tokens read the quantized K/V of every earlier "
             "token of that window (KIVI rows: the newest 128 to 159 in float). bits/value: the packed codes and "
             "their side data per cached value. Passkey: a 5-digit key hidden at 25% and 75% depth in prompts of "
             "1k to 8k tokens of the evaluation text, 8 greedy tokens. kscale rows: K over per-channel scales "
             "(E[k²]/E[q²])^¼ from the model's own q and K on 4 × 1024 tokens of the calibration text (WikiText-2 "
             "validation), `--kv-scale-k`. sink1 rows: the sequence's first token kept in float (`--kv-sink 1`; "
             "the float sink and residual are not in bits/value, they are in the generation's cache B/token). "
             "prerope rows: K quantized before RoPE (`--kv-pre-rope`: turned back by its position's angle when "
             "written, turned again on read; the K statistics and scales taken before RoPE too). ncorr rows "
             "(`--kv-norm-correct`; ncorrv: V only): each TurboQuant vector's norm stored so that its de-quantized "
             "vector keeps its projection, ⟨x̂, x⟩ = ‖x‖² (no Lloyd–Max shrinkage; the same bytes). "
             "decode tok/s, cache B/token, generation peak "
             "RSS: `lowbit generate` after an 8128-token prompt, 64 new tokens, one process per row (ratios against "
             "the float cache of the same run); the peak is the process's from the end of the model's load to the "
             "end of the generation (the load's own peak reset through /proc/self/clear_refs). Peers (`bench/peers/kv_peers.py`): transformers' QuantizedCache "
             "(quanto, HQQ; fed 64 tokens per call, the newest 64 to 192 tokens in float) scored by lowbit's "
             "evaluation against the same float model; llama.cpp's cache types by its own llama-perplexity on "
             "lowbit's F32 GGUF export (its convention: BOS per chunk, second half scored; its Δppl and KLD against "
             "its F32 cache, its float row the f16 cache).")
    return page("KV cache (`bench/kv_cache.py`)", intro, model_sections("kv_cache", KV_MODELS, _section))
