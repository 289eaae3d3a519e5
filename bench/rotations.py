"""Rotations (issue 25): QuaRot's fused rotations against the unrotated rows, on one model, with the
same evaluation as the W8A8 bench (bench/recipe_rows.py: each row quantized in its own process,
then all evaluated against one float reference pass per window; WikiText-2 raw test, ctx 2048).

Rows: W4A4KV4 naive and QuaRot (over five seeds of the random signs: mean ± spread in
docs/results/rotations.md); W4A4 with the KV cache in float, naive (the activations issue's floor)
and QuaRot; W4A8 and W8A8 with and without rotation. KV quantization is simulated inside attention
(lowbit.nn.kv_attention: K after RoPE, every query reads de-quantized K/V).
Gemma 3 cannot take a fused R1 (its post-norms): its rotated rows are failure rows with lowbit's
own one-line refusal.

    python bench/rotations.py --model smollm2-135m [--rows ...] [--stage quantize|eval|all]
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from common import REPO
from recipe_rows import add_args, assemble, evaluate_rows, quantize_rows

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2, 3, 4)
ROWS = {  # label -> lowbit quantize flags, in the order they run
    "w4a4kv4-naive": ["--recipe", "w4a4kv4-naive"],
    **{f"quarot-w4a4kv4-seed{s}": ["--recipe", "quarot-w4a4kv4", "--rotate-seed", str(s)] for s in SEEDS},
    "quarot-w4a4kv4-g128": ["--recipe", str(HERE / "recipes" / "quarot-w4a4kv4-g128.yaml")],
    "w4a4-naive": ["--recipe", "w4a4-naive"],
    "quarot-w4a4": ["--recipe", "quarot-w4a4"],
    "w4a8-smoothquant": ["--recipe", "w4a8-smoothquant"],
    "quarot-w4a8": ["--recipe", "quarot-w4a8"],
    "w8a8-naive": ["--recipe", "w8a8-naive"],
    "quarot-w8a8": ["--recipe", "quarot-w8a8"],
    # weight-only 2-3 bits, calibrated as weight_only.json's best rows (32 x 2048) to compare with them
    "quip-w2": ["--recipe", "quip-w2", "--samples", "32", "--seq-len", "2048"],
    "quip-w3": ["--recipe", "quip-w3", "--samples", "32", "--seq-len", "2048"],
    # lowbit's W4A4KV4: asymmetric 4-bit activations (the grid and clip chosen on WikiText-2 valid windows)
    **{f"quarot-w4a4kv4-asym-seed{s}": ["--recipe", "quarot-w4a4kv4-asym", "--rotate-seed", str(s)] for s in SEEDS},
    "quarot-w4a4-asym": ["--recipe", "quarot-w4a4-asym"],
    # SpinQuant (bounded Cayley step, weights in the training loop) with the same quantizers, same seeds
    **{f"spinquant-w4a4kv4-asym-seed{s}": ["--recipe", str(HERE / "recipes" / "spinquant-w4a4kv4-asym-4min.yaml"),
                                           "--rotate-seed", str(s)] for s in SEEDS},
}
WEIGHT_ONLY = REPO / "bench" / "results" / "weight_only.json"
PEERS = REPO / "bench" / "results" / "peers" / "rotations"      # bench/peers/rotation_peers.py


def peer_rows(model: str) -> list[dict]:
    """The rotation peers' rows of this model (their cache is float: KV 32 bits)."""
    files = sorted(PEERS.glob(f"*_{model}.json")) + sorted(PEERS.glob(f"*_{model}_g*.json")) if PEERS.is_dir() else []
    return [{"kv_bits": 32, "row": f.stem, **json.loads(f.read_text())} for f in files]


def weight_only_rows(model: str) -> list[dict]:
    """The best 2- and 3-bit weight-only rows of bench/weight_only.py (same text, windows and float), for
    the QuIP rows to be read against."""
    if not WEIGHT_ONLY.exists():
        return []
    import json

    best = {}
    for r in json.loads(WEIGHT_ONLY.read_text())["rows"]:
        if r.get("model") == model and r.get("tool") == "lowbit" and r.get("setting") in ("W2 g64", "W3 g64") \
                and r.get("ppl") is not None and (r["setting"] not in best or r["ppl"] < best[r["setting"]]["ppl"]):
            best[r["setting"]] = r
    return [{"model": model, "row": f"best weight-only {k} ({r['method']}, bench/results/weight_only.json)",
             "tool": "lowbit-weight-only", "ppl": r["ppl"], "kld": r["kld"], "top1_changed": r.get("top1_changed"),
             "weight_bits": r.get("bits_per_weight"), "act_bits": 32, "kv_bits": 32, "eval_windows": r.get("windows"),
             "quantize_seconds": r.get("quantize_seconds"), "calibration": r.get("calibration")}
            for k, r in sorted(best.items())]


def bits(flags: list[str]) -> dict:
    from lowbit.recipes import load_recipe

    r = load_recipe(flags[1])
    kv = r.kv.k.bits if r.kv is not None and r.kv.k is not None else 32
    rotation = r.rotation.kind if r.rotation is not None else ("incoherence" if r.incoherence is not None else None)
    return {"act_bits": r.activations.default.bits if r.activations else 32, "kv_bits": kv,
            "rotation": rotation}


def refusal(model: str, flags: list[str]) -> str | None:
    """lowbit's own one-line refusal of a rotating row on this model (None: it runs)."""
    from lowbit.models.load import load
    from lowbit.rotations.fuse import check_rotatable

    if "--rotate-seed" not in flags and "quarot" not in flags[1] and "spinquant" not in flags[1]:
        return None
    try:
        check_rotatable(load(model).spec)
    except ValueError as e:
        return str(e)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, ROWS, "w8a8")        # the W8A8 bench's work directory: its float and unrotated rows are reused
    a = p.parse_args()
    path = Path(a.json or REPO / "bench" / "results" / f"rotations_{a.model}.json")
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    refused = {r: why for r in a.rows if (why := refusal(a.model, ROWS[r]))}
    a.rows = [r for r in a.rows if r not in refused]
    refused = {r: why for r, why in refused.items() if not re.search(r"-seed[1-9]\d*$", r)}   # one row per family
    if a.stage in ("quantize", "all"):
        quantize_rows(a, ROWS, work, bits)
    if a.stage == "quantize":
        return
    start = time.perf_counter()
    labels = evaluate_rows(a, work)
    for label in labels[1:]:          # SpinQuant's loss curve, from the saved directory's manifest
        manifest = work / label / "lowbit.json"
        record = work / f"{label}.quantize.json"
        if manifest.exists() and record.exists():
            spin = json.loads(manifest.read_text())["method"].get("rotation", {}).get("spin_result")
            if spin:
                rec = json.loads(record.read_text())
                rec["spin"] = spin
                record.write_text(json.dumps(rec))
    failures = [{"model": a.model, "row": r, "tool": "lowbit", "flags": ROWS[r], "error": why}
                for r, why in refused.items()]
    assemble(a, "rotations", work, labels, failures + weight_only_rows(a.model) + peer_rows(a.model), path, start, {
        "KLD": lambda r: r.get("kld"), "top-1": lambda r: r.get("top1_changed"),
        "W bits": lambda r: r.get("weight_bits"), "A bits": lambda r: r.get("act_bits"),
        "KV bits": lambda r: r.get("kv_bits"), "seconds": lambda r: r.get("quantize_seconds")})


if __name__ == "__main__":
    main()
