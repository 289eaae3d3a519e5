"""Weights and activations (issue 24): every W8A8 / W4A8 / W4A4 recipe of lowbit and the peers'
W8A8 rows, on one model, with the same evaluation.

Each lowbit row is `lowbit quantize MODEL --recipe R` in its own process (wall time = quantize
time; calibration: --samples × --seq-len windows of WikiText-2 *validation*), then all rows are
evaluated in batches sharing one float reference pass per window (WikiText-2 raw test, ctx 2048,
the first --windows windows, GPTQ convention, KLD against the float model). The peer rows come from
bench/peers/w8a8_peers.py (evaluated in their own environments with lowbit's eval code, same tokens,
same reference) and are read from bench/results/peers/w8a8/.
LLM.int8() rows also record, per linear, the share of input columns its split sent to the float
path on the evaluation text (mean over forwards).

    python bench/w8a8.py --model smollm2-135m --windows 20
    python bench/w8a8.py --model gemma3-270m --stage quantize    # resumable: then --stage eval
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO
from recipe_rows import add_args, assemble, evaluate_rows, quantize_rows

HERE = Path(__file__).resolve().parent
ROWS = {  # label -> lowbit quantize flags (in the order they are run: the targets first)
    "w8a8-naive": ["--recipe", "w8a8-naive"],
    "llm-int8": ["--recipe", "llm-int8"],
    "w8a8-static": ["--recipe", "w8a8-static"],
    "w8a8-smoothquant": ["--recipe", "w8a8-smoothquant"],
    "w8a8-smoothquant-static": ["--recipe", "w8a8-smoothquant-static"],
    "w4a8-smoothquant": ["--recipe", "w4a8-smoothquant"],
    "w4a4-naive": ["--recipe", "w4a4-naive"],
    "w8a8-smoothquant-a0.5": ["--recipe", "w8a8-smoothquant", "--alpha", "0.5"],
    "w8a8-smoothquant-o2": ["--recipe", "w8a8-smoothquant-o2"],
    "w4a8-smoothquant-ch": ["--recipe", str(HERE / "recipes" / "w4a8-smoothquant-ch.yaml")],
    "w8a8-smoothquant-static-a0.5": ["--recipe", "w8a8-smoothquant-static", "--alpha", "0.5"],
    "w8a8-smoothquant-search-split": ["--recipe", str(HERE / "recipes" / "w8a8-smoothquant-search-split.yaml")],
    "quarot-w8a8": ["--recipe", "quarot-w8a8"],    # the rotations issue's W8A8 (Llama/Qwen2 only; shared work dir)
}
PEERS = REPO / "bench" / "results" / "peers" / "w8a8"


def act_bits(flags: list[str]) -> int:
    from lowbit.recipes import load_recipe

    return load_recipe(flags[1]).activations.default.bits


def outlier_shares(model) -> dict:
    """{linear: mean share of input columns sent to float per forward} of LLM.int8() linears."""
    from lowbit.nn.qlinear import QuantLinear

    return {name: float(m.outliers.sum()) / max(m.forwards, 1) / m.in_features
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.act is not None and m.act.outlier_threshold is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, ROWS, "w8a8")
    a = p.parse_args()
    path = Path(a.json or REPO / "bench" / "results" / f"w8a8_{a.model}.json")
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    if a.stage in ("quantize", "all"):
        quantize_rows(a, ROWS, work, lambda flags: {"act_bits": act_bits(flags)})
    if a.stage == "quantize":
        return
    start = time.perf_counter()
    labels = evaluate_rows(a, work, extra=lambda m: {"outlier_column_share": s} if (s := outlier_shares(m)) else {})
    peers = [json.loads(f.read_text()) for f in sorted(PEERS.glob(f"*_{a.model}.json"))] if PEERS.is_dir() else []
    assemble(a, "w8a8", work, labels, peers, path, start, {
        "KLD": lambda r: r.get("kld"), "KLD p99": lambda r: r.get("kld_p99"), "top-1": lambda r: r.get("top1_changed"),
        "W bits": lambda r: r.get("weight_bits"), "A bits": lambda r: r.get("act_bits"),
        "seconds": lambda r: r.get("quantize_seconds")})


if __name__ == "__main__":
    main()
