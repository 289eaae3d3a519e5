"""bench/tables.py's page for issue 25: rotations (rotations_*.json). Standard library only."""
from __future__ import annotations

import re
import statistics

from tables_format import MODELS, fixed, header_lines, model_sections, page, ppl, seconds, sig, table

ROT_MODELS = ("smollm2-135m", "gemma3-270m")


def _label(r: dict) -> str:
    if r.get("tool") == "float":
        return "float32"
    if r.get("tool") == "lowbit":
        return f"lowbit {r['row']}"
    if r.get("tool") == "lowbit-weight-only":
        return f"lowbit {r['row']}"
    if r.get("peer"):
        return f"{r.get('tool', '')}: {r['peer']} ({r.get('method', '')})"
    return f"{r.get('tool', r.get('peer'))}: {r.get('method', '')}"


def _row(r: dict) -> list[str]:
    if "error" in r:
        return [_label(r), "failed: " + str(r["error"]).replace("|", "/")[:200], "", "", "", "", "", "", ""]
    inc = r.get("ppl_increase")
    return [_label(r), ppl(r.get("ppl")), "" if inc is None else f"{100 * inc:+.2f}%", sig(r.get("kld"), 3),
            "" if r.get("top1_changed") is None else f"{100 * r['top1_changed']:.2f}%",
            fixed(r.get("weight_bits"), 2), str(r.get("act_bits", "")), str(r.get("kv_bits", "")),
            seconds(r.get("quantize_seconds"))]


def _seeds(rows: list[dict]) -> dict[str, list[dict]]:
    """{row family: its rows over seeds} for labels ending in -seedN."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        m = re.fullmatch(r"(.+)-seed\d+", str(r.get("row", "")))
        if m and "ppl" in r:
            out.setdefault(m.group(1), []).append(r)
    return out


def _spread(rows: list[dict]) -> list[str]:
    ppls, klds = [r["ppl"] for r in rows], [r["kld"] for r in rows]
    sd = statistics.stdev(ppls) if len(ppls) > 1 else 0.0
    return [str(len(rows)), f"{statistics.mean(ppls):.3f} ± {sd:.3f}", f"{min(ppls):.3f} – {max(ppls):.3f}",
            sig(statistics.mean(klds), 3)]


def _targets(d: dict) -> list[str]:
    rows = d["rows"]
    fp = next(r for r in rows if r.get("tool") == "float")
    lines = []
    seeds = _seeds(rows)
    for family in ("quarot-w4a4kv4", "quarot-w4a4kv4-asym"):
        if quarot := seeds.get(family, []):
            worst = max(r["ppl"] for r in quarot)
            mean = statistics.mean(r["ppl"] for r in quarot)
            lines.append(f"- QuaRot W4A4KV4 within 1.5× float perplexity ({fp['ppl']:.3f}), `{family}`: mean "
                         f"{mean / fp['ppl']:.2f}×, worst seed {worst / fp['ppl']:.2f}× — "
                         f"{'met' if worst <= 1.5 * fp['ppl'] else 'missed'}")
    spins, quarot = seeds.get("spinquant-w4a4kv4-asym", []), seeds.get("quarot-w4a4kv4-asym", [])
    refused = any("spinquant" in str(r.get("row", "")) and "refused" in str(r.get("error", "")) for r in rows)
    if refused:
        lines.append("- SpinQuant no worse than QuaRot: both refused on this model (their rows say why)")
    elif not spins or not quarot:
        lines.append("- SpinQuant no worse than QuaRot: not measured yet")
    else:
        mean, spin = statistics.mean(r["ppl"] for r in quarot), statistics.mean(r["ppl"] for r in spins)
        lines.append(f"- SpinQuant no worse than QuaRot (same quantizers, same seeds): mean {spin:.3f} over "
                     f"{len(spins)} seeds vs QuaRot's {mean:.3f} over {len(quarot)} — "
                     f"{'met' if spin <= mean else 'missed'}")
    by = {r.get("row"): r for r in rows}
    for bits in (2, 3):
        quip = by.get(f"quip-w{bits}")
        ref = next((r for r in rows if r.get("tool") == "lowbit-weight-only" and f"W{bits} g64" in r["row"]), None)
        if quip and ref and "ppl" in quip:
            lines.append(f"- incoherence improves the best {bits}-bit weight-only row: quip-w{bits} {quip['ppl']:.2f} vs "
                         f"{ref['ppl']:.2f} — {'met' if quip['ppl'] < ref['ppl'] else 'missed'}")
    lines += _peer_targets(rows)
    return lines


def _peer_targets(rows: list[dict]) -> list[str]:
    """lowbit's best W4A4KV4 (and W4A4, KV in float) against the best peer W4A4, as ratios of increases."""
    ok = lambda r: "ppl_increase" in r and r.get("act_bits") == 4
    peers = [r for r in rows if r.get("tool") not in ("lowbit", "float", "lowbit-weight-only") and ok(r)]
    if not peers:
        failed = [r for r in rows if r.get("peer") and "error" in r and "w4a4" in str(r.get("peer"))]
        if failed:
            return ["- best lowbit W4A4KV4 at most 0.7× the best peer's increase: the peer's W4A4 failed on this "
                    f"model ({', '.join(r['peer'] for r in failed)}; its row says why), and lowbit's rotations refuse it"]
        return ["- best lowbit W4A4KV4 at most 0.7× the best peer's increase: no peer W4A4 row yet"]
    peer = min(peers, key=lambda r: r["ppl"])
    out = []
    for what, kv in (("W4A4KV4", 4), ("W4A4 (KV in float, as the peer)", 32)):
        ours = [r for r in rows if r.get("tool") == "lowbit" and ok(r) and r.get("kv_bits") == kv]
        if ours:
            best = min(ours, key=lambda r: r["ppl"])
            ratio = best["ppl_increase"] / peer["ppl_increase"]
            out.append(f"- best lowbit {what} (`{best['row']}`, {100 * best['ppl_increase']:+.1f}%) at most 0.7× the best "
                       f"peer W4A4's increase ({_label(peer)}, {100 * peer['ppl_increase']:+.1f}%): {ratio:.2f}× — "
                       f"{'met' if ratio <= 0.7 else 'missed'}")
    return out


def _section(model: str, d: dict, name: str) -> str:
    head = ["row", "ppl", "Δppl", "KLD", "top-1 changed", "W bits", "A bits", "KV bits", "quantize s"]
    text = f"## {MODELS[model]} (`bench/results/{name}`)\n\n" + table(head, [_row(r) for r in d["rows"]],
                                                                    set(range(1, 9)))
    seeds = _seeds(d["rows"])
    if seeds:
        text += "\n\nOver the seeds of the random signs:\n\n" + table(
            ["rows", "seeds", "ppl mean ± sd", "ppl range", "KLD mean"],
            [[k, *_spread(v)] for k, v in seeds.items()], {1, 2, 3, 4})
    for r in d["rows"]:
        if r.get("spin"):
            losses = r["spin"]["losses"]
            marks = ", ".join(f"{i}: {losses[i]:.3f}" for i in sorted({0, len(losses) // 4, len(losses) // 2,
                                                                         3 * len(losses) // 4, len(losses) - 1}))
            text += (f"\n\nSpinQuant's training (`{r['row']}`): {len(losses)} Cayley SGD steps in "
                     f"{r['spin']['seconds']:.0f} s{' (stopped by its time limit)' if r['spin']['stopped_early'] else ''}; "
                     f"loss by step {marks}.")
    notes = [f"- {_label(r)}: {r['notes']}" for r in d["rows"] if r.get("notes")]
    if notes:
        text += "\n\nNotes on rows:\n" + "\n".join(notes)
    if any(r.get("tool") == "float" for r in d["rows"]):
        text += "\n\nTargets (issue 25):\n" + "\n".join(_targets(d))
    return text + "\n\n" + "\n".join(header_lines(d))


def rotations_page() -> str:
    sections = model_sections("rotations", ROT_MODELS, _section)
    intro = ("QuaRot's rotations fused into the float model before quantization (`python bench/rotations.py --model "
             "M`; docs/rotations.md): WikiText-2 raw test, ctx 2048, the first 20 windows, GPTQ convention, KLD "
             "against the float model; calibration from WikiText-2 validation. Rows share the W8A8 bench's work "
             "directory and float reference, so the unrotated rows are the same measurements as in w8a8.md. "
             "KV bits: the simulated KV quantizer (K after RoPE and V, per head and token in groups of 64, "
             "asymmetric); 32 = float cache. A4 rows clip each token's range at 0.9. Peer rows "
             "(bench/peers/rotation_peers.py) run in their own environment and are scored by lowbit's evaluation "
             "code on the same tokens against the same float model; their W bits are what their compressed "
             "checkpoint stores (compressed-tensors keeps int4 weights of a W4A4 scheme in int8).")
    return page("Rotations (`bench/rotations.py`)", intro, sections)
