"""Result tables, generated: bench/results/*.json (and peers/*.json) -> docs/results/*.md and the
README's headline table (between <!-- headline --> and <!-- /headline -->).

    python bench/tables.py            # regenerate
    python bench/tables.py --check    # exit 1, listing every file whose committed text differs

Standard library only; the output depends on nothing but the JSON, so it is byte-identical on
every run. Numbers and the conditions they were measured under (threads, what else ran, commands,
peer versions: "conditions", "notes", a row's "note", its peer result file) all come from the
JSON; a failure row's reason is its "error".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, _HERE)   # tables_format lies beside this file (also when a test loads it by path)
try:
    from tables_act import int8_speed_page, w8a8_page
    from tables_kv import kv_page
    from tables_plan import plan_page
    from tables_scale import scale_page
    from tables_rot import rotations_page
    from tables_format import (DOCS, HEADLINE, MODELS, README, REPO, SETTINGS, Notes, blank, conditions_text,
                               fixed, header_lines, load, page, pct, ppl, seconds, share, sig, table)
finally:
    sys.path.remove(_HERE)


# ---------- RTN ----------

def rtn_section(name: str, title: str, with_clip: bool) -> str:
    d = load(name)
    rows, fp = d["rows"], d["rows"][0]
    head = ["setting", "format"] + (["clip"] if with_clip else []) + \
        ["ppl", "KLD", "KLD p99", "top-1 changed", "bits/w", "quantize s", "peak RSS MiB", "load avg"]
    body = [[r["setting"], r.get("format", "float32")] + ([r["clip"]] if with_clip else []) +
            [ppl(r["ppl"]), sig(r["kld"]), sig(r["kld_p99"]), pct(r["top1_changed"]), sig(r["bits_per_weight"], 4),
             seconds(r["quantize_seconds"]), r["peak_rss_mib"] or "–", fixed(r.get("load_average"), 1)] for r in rows]
    extra = [f"Text: WikiText-2 raw test, ctx {d['ctx']}, first {d['windows']} windows ({fp['tokens']:,} tokens in the "
             f"text); the whole run took {d['seconds'] / 60:.0f} minutes.",
             "KLD: mean KL(P_float ‖ P_quantized) in nats; bits/w counts every stored bit of the quantized linears; "
             "load avg: 1-minute load average after the row's quantization."]
    return f"## {title}\n\n" + table(head, body, set(range(3 if with_clip else 2, len(head)))) + "\n\n" + \
        "\n".join(header_lines(d, extra))


def rtn_page() -> str:
    return page("RTN results (`bench/rtn.py`)",
                "Round-to-nearest for every format lowbit has, with and without `--clip mse`. "
                "Evaluation convention: README.md, \"Evaluation convention\".",
                [rtn_section("rtn_smollm2_acceptance.json", "SmolLM2-135M, 20 windows", False),
                 rtn_section("rtn_smollm2.json", "SmolLM2-135M, every format, 2 windows", True),
                 rtn_section("rtn_gemma3.json", "Gemma 3 270M, every format, 2 windows", True)])


# ---------- calibrated (weight-only) ----------

def peer_file(r: dict) -> dict:
    f = r.get("result_file")
    return json.loads((REPO / f).read_text()) if f and (REPO / f).exists() else {}


def tool_name(r: dict) -> str:
    v = r.get("tool_version")
    return f"{r['tool']} {v}" if v and v not in r["tool"] else r["tool"]


def method_label(r: dict) -> str:
    return r["method"] if r.get("tool") not in ("lowbit", "-") else {"fp": "float32"}.get(r["method"], r["method"])


def wo_row(r: dict, d: dict, notes: Notes) -> list[str]:
    pf = peer_file(r)
    tool = tool_name(r)
    cond = r.get("conditions") or pf.get("conditions") or {}
    threads = cond.get("threads") or r.get("threads") or pf.get("threads") or \
        (d["conditions"]["threads"] if tool == "lowbit" else None)
    load_avg = r.get("load_average") if r.get("load_average") is not None else pf.get("load_average_after")
    if "error" in r:
        reason = re.sub(r"^RuntimeError: ", "", r["error"])
        return [r["setting"], tool, method_label(r), reason] + [""] * 7 + [notes.mark(conditions_text(cond))]
    bits = sig(r.get("bits_per_weight"), 4)
    if pf.get("bits_per_weight_packed") is not None:
        bits += f" ({pf['bits_per_weight_packed']:.2f} packed)"
    versions = ", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or pf.get("versions") or {}).items()))
    return [r["setting"], tool, method_label(r), ppl(r["ppl"]), share(r.get("share_of_rtn_increase")), sig(r["kld"]),
            bits, seconds(r.get("quantize_seconds")), blank(pf.get("quantize_cpu_seconds"), 0),
            r.get("peak_rss_mib") or "–", threads or "", blank(load_avg, 1),
            notes.mark(conditions_text(cond), r.get("note"), versions and f"Peer environment: {versions}.")]


WO_HEAD = ["setting", "tool", "method", "ppl", "Δppl / RTN's", "KLD", "bits/w", "quantize s", "CPU s",
           "peak RSS MiB", "threads", "load avg", "notes"]


def wo_table(d: dict, rows: list[dict]) -> str:
    notes = Notes()
    body = [wo_row(r, d, notes) for r in rows]
    return table(WO_HEAD, body, {3, 4, 5, 6, 7, 8, 9, 10, 11}) + "\n\n" + notes.render()


def wo_rows(d: dict, model: str) -> list[dict]:
    order = {s: i for i, s in enumerate(["FP", *SETTINGS])}
    rows = [r for r in d["rows"] if r.get("model") == model and r.get("setting") in order]
    return sorted(rows, key=lambda r: (order[r["setting"]], "error" in r, r.get("ppl") or 0))


def calibrated_page() -> str:
    d = load("weight_only.json")
    cal = d["calibration"]
    extra = [f"Text: WikiText-2 raw test, ctx {d['ctx']}, first {d['windows']} windows; calibration `{cal}` "
             "(WikiText-2 *validation*, lowbit's seeded sampler, the same windows handed to every peer).",
             "KLD against the float model in nats; Δppl / RTN's: the ppl increase over FP as a share of lowbit RTN's "
             "at the same setting; bits/w counts every stored bit of the quantized linears (peers: as they store them).",
             "quantize s: wall time of the quantization process; CPU s: its CPU time where the peer recorded it; "
             "load avg: 1-minute load average after it; a peer row's method says so when it was calibrated on other windows."]
    sections = ["\n".join(header_lines(d, extra))]
    for model, name in MODELS.items():
        model_notes = d.get("notes", {}).get(model, [])
        sections.append(f"## {name}\n\n" + wo_table(d, wo_rows(d, model)) +
                        ("\n\nNot in the table:\n\n" + "\n".join(f"- {n}" for n in model_notes) if model_notes else ""))
    e = load("weight_only_8x2048.json")
    rows = [r for r in e["rows"] if r["setting"] == "FP" or
            (r["setting"] == "W4 g64" and "(calibration" not in r["method"] and "error" not in r)]
    sections.append(f"## SmolLM2-135M W4 g64, AWQ on {e['calibration']} calibration windows\n\n"
                    "llm-compressor's AWQ could not run on 32 × 2048 windows here (its failure row above); this is "
                    "lowbit's AWQ on the same 8 windows, beside it (`bench/results/weight_only_8x2048.json`).\n\n" +
                    wo_table(e, sorted(rows, key=lambda r: r.get("ppl") or 0)) + "\n\n" +
                    "\n".join(header_lines(e, [f"Calibration: `{e['calibration']}`."])))
    b = load("peers/bitsandbytes_blocks.json")
    body = [["×".join(map(str, r["shape"])), r["blocksize"], f"{r['codes_equal_reference']:.7f}",
             sig(r["rel_error_dequantize_4bit"]), sig(r["rel_error_own_codes_decoded"])] for r in b["rows"]]
    sections.append(f"## {b['tool']}: NF4 blocks that straddle rows (`bench/peers/bitsandbytes_blocks.py`)\n\n"
                    f"Weights: {b['weights']}. Share of codes equal to a flat-block NF4 reference, and the relative "
                    "weight error of `dequantize_4bit` against the same codes decoded with their own blocks.\n\n" +
                    table(["shape", "blocksize", "codes equal", "rel. error dequantize_4bit", "rel. error own codes"],
                          body, {1, 2, 3, 4}))
    return page("Calibrated weight-only results: lowbit and its peers (`bench/weight_only.py`)",
                "Every row: the same float model, the same calibration windows, the same evaluation by `lowbit eval` "
                "(peers on their de-quantized weights, see `bench/peers/`). Rows are sorted by ppl within a setting; "
                "a peer that could not produce a row shows its recorded reason.", sections)


# ---------- headline (README) ----------

def best(rows: list[dict], lowbit: bool) -> dict | None:
    ok = [r for r in rows if r.get("ppl") is not None and "(calibration" not in r["method"]
          and (r["tool"] == "lowbit") == lowbit and r["tool"] != "-"]
    return min(ok, key=lambda r: r["ppl"], default=None)


def headline() -> str:
    d = load("weight_only.json")
    body = []
    for model, name in MODELS.items():
        rows = [r for r in d["rows"] if r.get("model") == model]
        fp = next(r for r in rows if r["method"] == "fp")
        body.append([name, "FP", "float32", ppl(fp["ppl"]), "0", "32", "", "", "", "", ""])
        for s in SETTINGS:
            at = [r for r in rows if r.get("setting") == s]
            lb, pr = best(at, True), best(at, False)
            body.append([name, s, f"lowbit {lb['method']}", f"**{ppl(lb['ppl'])}**", sig(lb["kld"]),
                         sig(lb["bits_per_weight"], 4)] +
                        ([f"{tool_name(pr)} {pr['method']}", ppl(pr["ppl"]), sig(pr["kld"]),
                          sig(pr["bits_per_weight"], 4), share((lb['ppl'] - fp['ppl']) / (pr['ppl'] - fp['ppl'])) + "×"]
                         if pr else ["–", "", "", "", ""]))
    head = ["model", "setting", "best lowbit row", "ppl", "KLD", "bits/w", "best peer row", "ppl", "KLD", "bits/w",
            "lowbit's ppl increase / peer's"]
    return (table(head, body, {3, 4, 5, 7, 8, 9, 10}) +
            f"\n\nWikiText-2 raw test, ctx {d['ctx']}, first {d['windows']} windows; calibration `{d['calibration']}`; "
            "KLD vs the float model in nats. Generated from `bench/results/weight_only.json`; every row, with the "
            "conditions it was measured under: [docs/results/calibrated.md](docs/results/calibrated.md).")


def readme_text(current: str) -> str:
    start, end = HEADLINE
    i, j = current.find(start), current.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"README.md lacks the {start} ... {end} markers")
    return current[:i + len(start)] + "\n" + headline() + "\n" + current[j:]


# ---------- GGUF ----------

def gguf_section(name: str) -> str:
    d = load(name)
    notes = Notes()
    head = ["mix", "row", "MiB", "bits/weight", "ppl", "KLD", "KLD p99", "same top-1 %", "KLD / llama.cpp",
            "KLD / llama.cpp+imatrix", "quantize s", "measured", "notes"]
    lowbit_best = {}
    for r in d["rows"]:
        if r["row"].startswith("lowbit ") and r.get("kld_vs_llama_imatrix") is not None:
            if r["mix"] not in lowbit_best or r["kld"] < lowbit_best[r["mix"]]["kld"]:
                lowbit_best[r["mix"]] = r
    body = []
    for r in d["rows"]:
        bold = lowbit_best.get(r["mix"]) is r
        kld = sig(r["kld"], 3)
        body.append([r["mix"], f"**{r['row']}**" if bold else r["row"], fixed(r["file_mib"], 1), fixed(r["bits_per_weight"], 3),
                     fixed(r["ppl"], 2), f"**{kld}**" if bold else kld, blank(r.get("kld_p99"), 3),
                     blank(r.get("same_top_pct"), 1), blank(r.get("kld_vs_llama"), 2),
                     blank(r.get("kld_vs_llama_imatrix"), 2), f"{r['quantize_s']:.0f}",
                     r.get("measured", ""), notes.mark(conditions_text(r.get("conditions")))])
    mixes = list(dict.fromkeys(r["mix"] for r in d["rows"] if r.get("kld_vs_llama_imatrix") is not None))
    rows_of = {m: {r["row"] for r in d["rows"] if r["mix"] == m} for m in mixes}
    all_rows = sorted(set().union(*rows_of.values()))
    missing = [f"{row}: not measured for {', '.join(m for m in mixes if row not in rows_of[m])}"
               for row in all_rows if any(row not in rows_of[m] for m in mixes)]
    f32 = d["rows"][0]
    extra = [f"Evaluation: {d['convention']}; ctx {d['ctx']}, {d['chunks']} windows ({d['tokens_scored']:,} tokens "
             f"scored) of `{Path(d['eval_text']).name}` (WikiText-2 raw test); the F32 reference's ppl on them: "
             f"{f32['ppl']:.2f}.",
             f"Calibration text: `{Path(d['calib_text']).name}` (WikiText-2 valid), {d['calib_chunks']} windows of "
             f"{d['ctx']} tokens; llama-cpp-python {d['llama_cpp_python']}.",
             "Bold: the lowbit row with the lowest KLD in its K mix."] + [f"Rows {m}." for m in missing] + \
        [f"{r['mix']} `lowbit plan`: its `--tensor-type-file`, given to llama.cpp's own `llama-quantize` on the F32 "
         f"export, reproduced {r['llama_quantize_types']} planned tensor types (read back from both files)."
         for r in d["rows"] if r.get("llama_quantize_types")]
    return (f"## {MODELS[d['model']]} (`bench/results/{name}`)\n\n" + table(head, body, set(range(2, 11))) +
            ("\n\n" + notes.render() if notes.texts else "") + "\n\n" + "\n".join(header_lines(d, extra)))


def gguf_page() -> str:
    return page("GGUF results: lowbit's files against llama.cpp's, judged by llama.cpp (`bench/gguf_vs_llamacpp.py`)",
                "Per mix: llama.cpp's own `llama-quantize` with and without its imatrix, against lowbit's files, all "
                "made from the same F32 export and all read by `llama-perplexity --kl-divergence` on the same windows "
                "(llama.cpp's convention: BOS first, the second half of each window scored; KLD against the F32 file; "
                "ggml's CPU kernels). Export details: [docs/export.md](../export.md).",
                [gguf_section("gguf_smollm2-135m.json"), gguf_section("gguf_gemma3-270m.json")])


# ---------- speed ----------

def speed_page() -> str:
    g = load("gptq_speed.json")
    body = [[f"{r['tool']} {r['method']}", fixed(r["wall_seconds"], 1), r["peak_rss_mib"],
             blank(r.get("quantize_seconds"), 1), blank(r.get("capture_seconds"), 1),
             blank(r.get("solve_seconds"), 1), blank(r.get("forward_seconds"), 1),
             blank(r.get("cpu_seconds"), 0), f"{r['lowbit_over_this']:.2f}"] for r in g["rows"]]
    gptq = (f"## GPTQ quantization time (`bench/gptq_speed.py`)\n\n{g['samples']} × {g['seq_len']} calibration windows "
            f"of `{Path(g['calib_text']).name}` (seed {g['seed']}), W{g['bits']} g{g['group']}, {g['threads']} threads "
            "per process.\n\n" +
            table(["tool", "wall s", "peak RSS MiB", "quantize s", "capture s", "solve s", "rest of layer s", "CPU s",
                   "lowbit's time / this"], body, set(range(1, 9))) + "\n\n" +
            "\n".join(header_lines(g, [f"One plain forward pass over the windows: "
                                       f"{g['rows'][0]['calibration_forward_seconds']:.1f} s; the bound "
                                       "2 × (forward + solves): " +
                                       ", ".join(f"{r['method']} {r['bound_seconds']:.1f} s" for r in g["rows"]
                                                 if "bound_seconds" in r) + "."])))
    sections = [gptq]
    for name in ("eval_speed.json", "eval_speed_gemma3.json"):
        e = load(name)
        loop = table(["loop", "ppl", "seconds", "ratio"],
                     [[r["loop"], fixed(r["ppl"], 4), fixed(r["seconds"], 2), fixed(r["ratio"], 2)] for r in e["rows"]],
                     {1, 2, 3})
        s = e["scoring"]
        score = table(["scoring", "s per model-window", "ratio"],
                      [[r["scoring"], fixed(r["seconds_per_model_window"], 2), fixed(r["ratio"], 2)] for r in s["rows"]],
                      {1, 2})
        sections.append(f"## Evaluation loop, {MODELS[e['model']]} (`bench/results/{name}`)\n\n{loop}\n\n"
                        f"Scoring {s['models']} models against one reference (vocabulary {s['vocabulary']:,}; largest "
                        f"gap to the float64 KL definition: {s['max_kl_gap']:.1e} nats):\n\n{score}\n\n" +
                        "\n".join(header_lines(e, [f"ctx {e['ctx']}, {e['windows']} windows of WikiText-2 raw test "
                                                   f"({e['tokens']:,} tokens in the text)."])))
    return page("Speed results", "Wall time and peak RSS of lowbit's GPTQ against llm-compressor's, and of "
                "`lowbit eval`'s loop against the plain transformers loop.", sections)


# ---------- imported peer checkpoints ----------

def import_page() -> str:
    d = load("import_to_gguf.json")
    head = ["checkpoint", "tool", "imported formats", "W_dq vs the tool's own de-quantization", "GGUF linears",
            "GGUF = W_dq", "llama.cpp F32 file: KL / top-1", "llama.cpp Q4_0 file: KL / top-1"]
    body = []
    for name, r in d["rows"].items():
        tool, imp, gguf, lc = r.get("tool", {}), r.get("import", {}), r.get("gguf", {}), r.get("llama_cpp", {})
        if imp.get("import_exit") != 0:
            body.append([name, f"{tool.get('tool')} {tool.get('tool_version')}", "refused: " +
                         str(imp.get("import_error", "see JSON")).splitlines()[-1].split(": ")[-1], "", "", "", "", ""])
            continue
        exact = imp.get("W_dq_equal_tool_bitwise", 0)
        vs_tool = f"{exact}/{imp['compared_linears']} bit-exact" if exact else \
            f"{imp.get('W_dq_rounded_to_bf16_equal_tool')}/{imp['compared_linears']} equal once rounded to the " \
            f"tool's bfloat16 (max Δ {sig(imp.get('W_dq_max_rel_diff_vs_tool'), 2)} rel.)"
        kl = lambda k: f"{sig(lc[k]['kl_mean'], 2)} / {lc[k]['top1_agreement']:.3f}" if k in lc else ""  # noqa: E731
        body.append([name, f"{tool.get('tool')} {tool.get('tool_version')}", ", ".join(imp.get("formats", [])) or
                     "", vs_tool, f"{gguf.get('decoder_linears_q4_0')}/{gguf.get('decoder_linears')} Q4_0, "
                     f"re-rounded: {'no' if gguf.get('re_rounded_no') else 'yes'}",
                     f"{gguf.get('linears_dequantized_equal_W_dq_bitwise')}/{gguf.get('decoder_linears')} bit-exact",
                     kl("f32"), kl("q4_0")])
    intro = ("A peer tool's quantized checkpoint of the real SmolLM2-135M, imported into lowbit (its codes and "
             "scales kept as QTensors) and exported to GGUF without re-rounding (`python bench/import_to_gguf.py`). "
             "KL and top-1 agreement: llama.cpp's logits against the imported lowbit model's, "
             f"{d['settings']['eval_tokens']} tokens of WikiText-2 raw test. The Q4_0 file's KL is llama.cpp's "
             "CPU kernel rounding activations to 8 bits before each Q4_0 dot product (the F32 file of the same "
             "weights shows the function is the same). Settings: " + d["settings"]["gptq_calibration"] +
             f" for GPTQ; versions {', '.join(f'{k} {v}' for k, v in d['versions'].items() if k != 'lowbit_tree_dirty')}.")
    return page("Imported checkpoints exported to GGUF (`bench/import_to_gguf.py`)", intro,
                [table(head, body), "\n".join(header_lines(d))])


PAGES = {"rtn.md": rtn_page, "calibrated.md": calibrated_page, "gguf.md": gguf_page, "speed.md": speed_page,
         "import.md": import_page, "w8a8.md": w8a8_page, "int8_speed.md": int8_speed_page,
         "rotations.md": rotations_page, "kv_cache.md": kv_page,
         "plan.md": plan_page, "scale.md": scale_page}


def generate() -> dict[Path, str]:
    """Every generated file's path and the text the JSON gives it."""
    out = {DOCS / name: fn() for name, fn in PAGES.items()}
    out[README] = readme_text(README.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing out-of-date files")
    args = p.parse_args(argv)
    stale = []
    for path, text in generate().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
