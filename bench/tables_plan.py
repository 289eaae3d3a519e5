"""bench/tables.py's page for issue 27: the planner, dense-and-sparse and OWQ columns (plan_*.json).
Standard library only."""
from __future__ import annotations

import math

from tables_format import MODELS, RESULTS, fixed, header_lines, load, model_sections, page, ppl, sig, table

PLAN_MODELS = ("smollm2-135m", "gemma3-270m")


def summary_target(label: str) -> float:
    """plan-2.5+outliers -> 2.5 (older JSON keyed its plans by the bare target)."""
    return float(label.removeprefix("plan-").split("+")[0])


def _targets(d: dict) -> list[str]:
    rows = [r for r in d["rows"] if "kld" in r]
    uniform = [r for r in rows if str(r.get("row", "")).startswith("uniform-")]
    lines = []
    for label, summary in sorted(d.get("plans", {}).items(), key=lambda kv: (summary_target(kv[0]), kv[0])):
        t = summary_target(label)
        planned = next((r for r in rows if r.get("row") == label), None)
        land = summary["bits_per_weight"]
        lines.append(f"- {label} lands at {land:.4f} bits per weight — "
                     f"{'within 0.01, not over' if t - 0.01 <= land <= t else 'missed'}")
        if search := summary.get("search"):
            rows_ = search["rows"]
            lines.append(f"  (the measured search from the knapsack's plan at {search['start_bits_per_weight']:.4f}: "
                         f"assembled-model KLD {sig(search['start_kld'], 4)} → {sig(search['kld'], 4)} on its "
                         f"{rows_['samples']} × {rows_['seq_len']} validation rows ({rows_['positions']} positions "
                         f"each), {search['evals']} evaluations, {search['accepted']} accepted, "
                         f"{search['seconds']:.0f} s" + (f", the library {search['library_seconds']:.0f} s"
                                                        if search.get("library_seconds") else "")
                         + (f"; {search['timing_note']}" if search.get("timing_note") else "") + ")")
            if held := search.get("holdout"):
                lines.append(f"  (on held-out validation rows, seed {held['seed']}, the knapsack's plan "
                             f"{sig(held['start_kld'], 4)}, the refined one {sig(held['kld'], 4)}: `lowbit plan --refine` "
                             f"would keep {'the search' if held['kept'] == 'search' else 'the knapsack'}'s plan)")
        # the uniform row of the same size, or the nearest larger one (a row far larger is not "equal size")
        bigger = [r for r in uniform if r["weight_bits"] >= planned["weight_bits"] - 1e-9] if planned else []
        smaller = [r for r in uniform if r["weight_bits"] < planned["weight_bits"] - 1e-9] if planned else []
        if planned and bigger:
            near = min(bigger, key=lambda r: r["weight_bits"])
            ratio = planned["kld"] / near["kld"]
            lines.append(f"- {label} KLD {sig(planned['kld'], 3)} vs the uniform row of the same or the next larger "
                         f"size (`{near['row']}`, {near['weight_bits']:.3f} bpw, KLD {sig(near['kld'], 3)}): "
                         f"{ratio:.3f}× — {'met' if ratio <= 0.8 else 'missed'} (target 0.8×)")
            # a uniform row a little larger can still beat the plan: say so beside the equal-size verdict
            close = [r for r in bigger if r is not near and r["weight_bits"] <= planned["weight_bits"] + 0.25
                     and r["kld"] < near["kld"]]
            if close:
                best = min(close, key=lambda r: r["kld"])
                lines.append(f"  (a uniform row up to 0.25 bpw larger: `{best['row']}`, {best['weight_bits']:.3f} bpw, "
                             f"KLD {sig(best['kld'], 3)} — the plan {planned['kld'] / best['kld']:.2f}× that)")
        elif planned:
            lines.append(f"- {label}: no uniform row at {planned['weight_bits']:.3f} bits per weight or more")
        equal = bool(bigger) and near["weight_bits"] - planned["weight_bits"] < 0.01
        if planned and smaller and not equal:     # no uniform row of the plan's size: where the curve passes
            below = max(smaller, key=lambda r: r["weight_bits"])
            line = (f"  (the next smaller uniform row, `{below['row']}` at {below['weight_bits']:.3f} bpw: "
                    f"KLD {sig(below['kld'], 3)}")
            if bigger and near["kld"] > 0 and below["kld"] > 0:
                # the uniform rows' curve at the plan's size: log KLD linear in bits per weight between the two
                f = (planned["weight_bits"] - below["weight_bits"]) / (near["weight_bits"] - below["weight_bits"])
                curve = math.exp(math.log(below["kld"]) + f * (math.log(near["kld"]) - math.log(below["kld"])))
                line += (f"; the uniform curve between them, log KLD linear in bits, at {planned['weight_bits']:.3f}: "
                         f"{sig(curve, 3)}, the plan {planned['kld'] / curve:.2f}× that")
            lines.append(line + ")")
    return lines


def _section(model: str, d: dict, name: str) -> str:
    head = ["row", "bits/weight", "ppl", "Δppl", "KLD", "top-1 changed", "quantize s", "load avg"]
    body = []
    for r in sorted(d["rows"], key=lambda r: (r.get("weight_bits") or 0, str(r.get("row")))):
        inc = r.get("ppl_increase")
        body.append([str(r.get("row")), fixed(r.get("weight_bits"), 3), ppl(r.get("ppl")),
                     "" if inc is None else f"{100 * inc:+.2f}%", sig(r.get("kld"), 3),
                     "" if r.get("top1_changed") is None else f"{100 * r['top1_changed']:.2f}%",
                     fixed(r.get("quantize_seconds"), 0), fixed(r.get("load_average"), 1)])
    # the quantize seconds of a row quantized beside another benchmark (load average above 2 on 2 cores) are slower
    text = (f"## {MODELS[model]} (`bench/results/{name}`)\n\n" + table(head, body, set(range(1, 8)))
            + "\n\nQuantize seconds are wall time on the 2-core machine; where the load average (1 min, at the "
              "row's start) is near 4 another benchmark shared the CPU and the time says little (here up to 7× "
              "the unshared one).")
    rank = d.get("proxy_rank")
    if rank:
        text += ("\n\nThe proxy (Hessian-weighted rounding error) against the measured per-tensor KLD, Spearman's "
                 f"rank correlation: {rank['spearman_all']:.3f} over every (tensor, format); by format "
                 + ", ".join(f"{k} {v:.3f}" for k, v in rank["spearman_by_format"].items())
                 + f". Measuring the KLDs took {rank['kld_seconds']:.0f} s, the proxy {rank['proxy_seconds']:.0f} s"
                 + (f" ({rank['timing_note']})" if rank.get("timing_note") else "") + ".")
    if g := d.get("gptq_losses"):
        text += (f" The GPTQ-rounded KLDs ({len(g['formats'])} formats) took {g['kld_seconds']:.0f} s.")
    if fr := d.get("fisher_rank"):
        weighted = fr.get("definition", "").startswith("token-weighted")
        stored = fr.get("definition", "").endswith("quantize's GPTQ")
        what = ("The Fisher loss (`--loss fisher`: "
                + ("½ Σ g_i (E H_g Eᵀ)_ii, H_g the inputs' second moment weighted by each token's squared output "
                   "gradient" if weighted else "½ Σ g_i (E Ĥ Eᵀ)_ii, Ĥ the inputs' plain mean x xᵀ, as before 2026-12-07")
                + ("; E the GPTQ rounding `lowbit quantize` stores (act order, sinks counted 100 times)" if stored
                   else "; E a GPTQ rounding without act order, as until the act-order fix of 2026-12-07")
                + f", from one gradient pass over {fr['rows']['samples']} × {fr['rows']['seq_len']} validation tokens)")
        if "spearman_all" in fr:
            text += (f"\n\n{what}, for the same roundings to nearest, against their measured KLD (the proxy's pairs), "
                     f"Spearman: {fr['spearman_all']:.3f} over every (tensor, format); by format "
                     + ", ".join(f"{k} {v:.3f}" for k, v in fr["spearman_by_format"].items())
                     + f". The Fisher losses of the GPTQ roundings ({len(fr['formats'])} formats) took "
                       f"{fr['seconds']:.0f} s" + (f" (in {fr['runs']} runs, each with its gradient pass)"
                                                     if fr.get("runs", 1) > 1 else "")
                     + (f" ({fr['timing_note']})" if fr.get("timing_note") else "") + ".")
        else:
            shares = ("; int2-g64 and int3-g64 also with " + " or ".join(f"{100 * x:g}%" for x in fr["shares"])
                      + " kept in float16") if fr.get("shares") else ""
            text += (f"\n\n{what} of the GPTQ roundings ({len(fr['formats'])} formats{shares}) took {fr['seconds']:.0f} s"
                     + (f" (in {fr['runs']} runs, each with its gradient pass)" if fr.get("runs", 1) > 1 else "")
                     + (f" ({fr['timing_note']})" if fr.get("timing_note") else "")
                     + "; the per-tensor KLDs were not measured on this model.")
    reused = [r for r in d["rows"] if r.get("reused_from")]
    if reused:
        origins = sorted({f"{r['reused_from']['json']} at {r['reused_from'].get('last_commit')}" for r in reused})
        text += (f"\n\n{len(reused)} rows were measured in an earlier run of this script on the same windows and "
                 f"taken from its JSON (`--reuse`; {'; '.join(origins)}): "
                 + ", ".join(f"`{r['row']}`" for r in reused) + ". The float and uniform rows were measured by "
                 "this script in its own work directory, never taken from a JSON.")
    text += "\n\nTargets (issue 27):\n" + "\n".join(_targets(d))
    return text + "\n\n" + "\n".join(header_lines(d))


def plan_page() -> str:
    intro = ("`lowbit plan`'s per-tensor plans (the knapsack over each decoder linear's measured KLD when it alone "
             "is rounded, on 2 × 256 probe tokens of WikiText-2 validation; `plan-B+outliers`: the 2- and 3-bit "
             "formats also offered with 0.5% or 1% of the tensor kept in float16; `plan-B+gptq-losses`: the same "
             "KLD with the tensor rounded by GPTQ on the Hessian of 16 × 512 other validation tokens, `lowbit plan "
             "--loss kld-gptq`; `+wide`: int3-g128 and int5-g64 among the candidates too; `plan-B+fisher`: that KLD "
             "predicted from one gradient pass instead of measured, `lowbit plan --loss fisher`, the default; "
             "`plan-B+fisher+fine`: with int3-g128, int5-g64, int2-g32, int2-g16 and int3-g32 among the candidates "
             "too) quantized by GPTQ within the plan, beside uniform GPTQ rows (int2-g32, int2-g16 and int3-g32 "
             "store exactly 2.5, 3.0 and 3.5 bits per weight, int4-g64 4.25: the uniform rows of each target's "
             "size) and dense-and-sparse / "
             "OWQ-column rows quantized the same way in the same run (`python bench/plan.py --model M`): "
             "WikiText-2 raw test, ctx 2048, 20 windows, KLD against the float model; calibration and probe rows "
             "from WikiText-2 validation. Bits per weight count every stored bit of the quantized linears "
             "(outliers: 48 bits each; OWQ columns: 16 bits per weight and 32 per column). Against llama.cpp's "
             "mixes at equal file size (`lowbit plan --like MIX`, GPTQ, read by llama.cpp): the `lowbit plan` rows "
             "of [gguf.md](gguf.md). The sections on 4 × 2048-token rows: the `plan-B+fisher` rows with the gradient "
             "pass on 4 rows of 2048 tokens (`--fisher-rows 4 2048`, `lowbit plan`'s default since 2026-12-07) "
             "instead of 16 of 512, beside their uniform rows re-measured in the same run; there `+outliers` on a "
             "`plan-B+fisher` row offers the Fisher loss of int2-g64 and int3-g64 with 0.5% or 1% of the tensor kept "
             "in float16 (GPTQ around them) to the knapsack too, `lowbit plan --outlier-shares 0.5%,1% "
             "--outlier-formats int2-g64-sym-signed,int3-g64-sym-signed`; `+more`: the `+fine` candidates and "
             "int4-g32, int5-g128 and int6-g128 (finer steps above 4 bits); `+refine`: the `plan-B+fisher` plan refined by "
             "the measured search, `lowbit plan --refine EVALS` (trades of bits between tensors kept when the KLD of "
             "the assembled model falls on 2 × 2048 validation rows; every option GPTQ-rounded on the Hessians of "
             "quantize's own walk of the knapsack's plan, so the search starts from the stored model). Which GPTQ the planner's losses round "
             "with: the 4 × 2048 sections' JSON names it (`fisher_rank.definition`); \"quantize's GPTQ\" is the "
             "rounding `lowbit quantize` stores (act order, each row's first token counted 100 times in the Hessian, "
             "since the act-order fix of 2026-12-07), the earlier \"token-weighted\" and the 16 × 512 sections' `+fisher` and "
             "`+gptq-losses` rows predicted a GPTQ without act order or sink weight.")
    return page("Planner, dense-and-sparse (`bench/plan.py`)", intro,
                model_sections("plan", PLAN_MODELS, _section) + _long_rows_sections() + _compare_sections())


def _long_rows_sections() -> list[str]:
    """The Fisher plans with the gradient pass on long rows (plan_<model>_fisher2048.json), where measured."""
    out = []
    for model in PLAN_MODELS:
        path = RESULTS / f"plan_{model}_fisher2048.json"
        if path.exists():
            d = load(path.name)
            rows = d["fisher_rank"]["rows"]                     # the rows this JSON's gradient pass ran on
            out.append(_section(model, d, path.name).replace(
                f"## {MODELS[model]} (",
                f"## {MODELS[model]}, Fisher gradient pass on {rows['samples']} × {rows['seq_len']}-token rows (", 1))
    return out


def _compare_sections() -> list[str]:
    """`lowbit compare`'s default grid, timed (bench/compare_grid.py)."""
    out = []
    for model in PLAN_MODELS:
        path = RESULTS / f"compare_{model}.json"
        if not path.exists():
            continue
        d = load(path.name)
        body = [[c["label"], fixed(c["bits_per_weight"], 3), ppl(c["ppl"]), sig(c["kld"], 3), fixed(c["seconds"], 0)]
                for c in sorted(d["cells"], key=lambda c: (c["bits_per_weight"], c["label"]))]
        s = d["settings"]
        minutes = d["wall_seconds"] / 60
        out.append(f"## `lowbit compare`'s default grid on {MODELS[model]} (`bench/results/{path.name}`)\n\n"
                   f"`{d['command']}` on a fresh --out, in its own process (`python bench/compare_grid.py --model "
                   f"{model}`): {len(d['cells'])} cells, evaluation {s['windows']} × {s['ctx']} tokens, calibration "
                   f"{s['samples']} × {s['seq_len']}; float ppl {ppl(d['float_ppl'])}. **{minutes:.1f} minutes** in all "
                   f"(issue 27's target: about 30 — {'met' if minutes <= 31 else 'missed'}), peak RSS "
                   f"{d['peak_rss_mib']} MiB.\n\n"
                   + table(["cell", "bits/weight", "ppl", "KLD", "seconds"], body, {1, 2, 3, 4})
                   + "\n\n" + "\n".join(header_lines(d)))
    return out
