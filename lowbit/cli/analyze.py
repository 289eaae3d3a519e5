"""`lowbit analyze`: where a model's outliers live, whether they matter, and a report that shows them."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import LowbitError
from ..log import logger
from .table import table


def _bits(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 4,3, got {value!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="find a model's outliers (super weights, massive activations, outlier features)",
        description="Runs the float model over a few sequences (BOS first, the way the model sees text in use) "
                    "and writes OUT/report.json and a self-contained OUT/report.html: activation statistics and "
                    "effective quantization levels, LLM.int8() outlier features, massive activations, super "
                    "weights (verified by zeroing them against a random control), weight statistics, and the "
                    "KLD of quantizing one layer at a time. Every threshold below is stated in the report.")
    p.add_argument("model", help="smollm2-135m, gemma3-270m, a .gguf file or an HF directory (a float model)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.json and report.html")
    p.add_argument("--text", default=None,
                   help="text to run (a UTF-8 file); default: lowbit's built-in sample text (~1,250 tokens of "
                        "plain English)")
    p.add_argument("--samples", type=int, default=4, help="sequences analysed (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, BOS included (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sequence positions in the text (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a shared CPU more threads mostly wait on each other: "
                        "measured 6-7x slower with 2 threads on a busy 2-core machine; raise it on an idle one)")
    p.add_argument("--eval-samples", type=int, default=1,
                   help="sequences (the first ones) for the perplexity / KLD checks (default: 1)")
    p.add_argument("--eval-tokens", type=int, default=128,
                   help="tokens of each of those sequences, BOS included (default: 128)")
    f = p.add_argument_group("LLM.int8() outlier features")
    f.add_argument("--feature-magnitude", type=float, default=6.0, help="|x| threshold (default: 6)")
    f.add_argument("--feature-layers", type=float, default=0.25, help="share of layers (default: 0.25)")
    f.add_argument("--feature-positions", type=float, default=0.06, help="share of positions (default: 0.06)")
    m = p.add_argument_group("massive activations")
    m.add_argument("--massive-value", type=float, default=100.0, help="|h| threshold (default: 100)")
    m.add_argument("--massive-ratio", type=float, default=1000.0,
                   help="times the median |h| of the hidden state (default: 1000)")
    s = p.add_argument_group("super weights")
    s.add_argument("--sw-share", type=float, default=0.5,
                   help="share of y_j that x_k * W[j, k] must explain (default: 0.5)")
    s.add_argument("--sw-growth", type=float, default=0.5,
                   help="share of the massive value the layer must add (default: 0.5)")
    s.add_argument("--sw-rounds", type=int, default=3, help="search rounds: zero, re-run, look again (default: 3)")
    s.add_argument("--sw-max", type=int, default=8, help="candidates kept per round (default: 8)")
    s.add_argument("--sw-confirm", type=float, default=10.0,
                   help="confirmed when KLD >= this x the random control's (default: 10) ...")
    s.add_argument("--sw-min-kld", type=float, default=0.01, help="... and >= this many nats (default: 0.01)")
    o = p.add_argument_group("levels, weights and sensitivity")
    o.add_argument("--levels-bits", type=_bits, default=(8, 4), help="bits for effective levels (default: 8,4)")
    o.add_argument("--sensitivity", choices=("layer", "linear", "none"), default="layer",
                   help="quantize one layer (default), one linear (7x slower) or nothing at a time")
    o.add_argument("--sens-bits", type=_bits, default=(4, 3), help="RTN bit widths (default: 4,3)")
    o.add_argument("--sens-group", type=int, default=64, help="RTN group size (default: 64)")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from ..analysis import (AnalyzeConfig, FeatureConfig, LevelsConfig, MassiveConfig, SensitivityConfig,
                            SuperWeightConfig)

    try:
        return AnalyzeConfig(
            samples=args.samples, seq_len=args.seq_len, seed=args.seed, eval_samples=args.eval_samples,
            eval_tokens=args.eval_tokens,
            features=FeatureConfig(args.feature_magnitude, args.feature_layers, args.feature_positions),
            massive=MassiveConfig(args.massive_value, args.massive_ratio),
            super_weights=SuperWeightConfig(min_share=args.sw_share, min_growth=args.sw_growth, rounds=args.sw_rounds,
                                            max_per_round=args.sw_max, confirm_ratio=args.sw_confirm,
                                            min_kld=args.sw_min_kld),
            levels=LevelsConfig(args.levels_bits),
            sensitivity=SensitivityConfig(args.sensitivity, args.sens_bits, args.sens_group))
    except ValueError as e:
        raise LowbitError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.report import check_out

    start = time.perf_counter()
    check_out(args.out)                                   # cheap checks before the slow load
    config = config_from_args(args)
    if args.threads < 1:
        raise LowbitError(f"--threads {args.threads} must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, config, start)
    finally:
        torch.set_num_threads(threads)                    # callers in the same process keep theirs


def _run(args: argparse.Namespace, config, start: float) -> int:
    from ..analysis.default_text import default_text
    from ..analysis.report import analyze, write_report
    from ..data.text import read_text
    from ..models.load import load

    text = read_text(args.text) if args.text else default_text()
    loaded = load(args.model)
    if loaded.source.kind == "lowbit":
        raise LowbitError(f"{args.model} is a quantized lowbit directory: analyze its float source instead")
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise LowbitError(f"--seq-len {args.seq_len} is longer than the model's context ({limit} positions)")
    report = analyze(loaded, text, config, model_arg=args.model)
    report["seconds"]["total"] = round(time.perf_counter() - start, 2)
    report["threads"] = args.threads
    json_path, html_path = write_report(report, args.out)
    for line in report["summary"]:
        print(f"- {line}")
    sw = report["super_weights"]
    if sw["found"]:
        checks = {c["weights"]: c for c in sw["verification"]["checks"]}
        rows = []
        for c in sw["found"]:
            chk = checks[f"{c['layer']}:{c['row']},{c['col']}"]
            rows.append([c["layer"], c["row"], c["col"], c["weight"], c["x"], c["residual"], chk["zeroed"]["ppl"],
                         chk["zeroed"]["kld"], chk["control"]["ppl"], chk["control"]["kld"],
                         "yes" if chk["confirmed"] else "no"])
        print(table(["layer", "row", "col", "W", "x_k", "h_j", "ppl zeroed", "KLD", "ppl control", "KLD control",
                     "confirmed"], rows))
    logger.info("analysis took %.1f s", report["seconds"]["total"])
    print(f"wrote {json_path} and {html_path}")
    return 0
