"""`lowbit quantize`: load a model, quantize its linears, save a lowbit directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LowbitError
from ..methods.rtn import RtnConfig
from ..quantize import METHODS, QuantizeConfig, quantize
from .common import add_format_args, format_from_args
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize the linears inside the decoder layers (embeddings and LM head stay "
                                   "float unless --quantize-head) and save packed weights to --out.")
    p.add_argument("model", help="smollm2-135m, gemma3-270m, a .gguf file, an HF directory")
    p.add_argument("--method", default="rtn", help=f"quantization method (default: rtn; known: {', '.join(METHODS)})")
    add_format_args(p)
    p.add_argument("--clip", default="none", choices=("none", "mse"),
                   help="clip search: per group, the shrink factor minimising the weight error (default: none)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head (untied from the embedding)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep linears matching this glob in float (e.g. 'model.layers.0.*'); repeatable")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.size import size_report
    from ..export.lowbit_dir import check_out, save_quantized
    from ..models.load import load

    fmt = format_from_args(args)
    try:
        config = QuantizeConfig(fmt=fmt, method=args.method, rtn=RtnConfig(clip=args.clip),
                                quantize_head=args.quantize_head, skip=tuple(args.skip))
    except ValueError as e:
        raise LowbitError(str(e)) from None
    check_out(args.out, args.overwrite)
    loaded = load(args.model)
    result = quantize(loaded, config)
    if not result.linears:
        raise LowbitError("no linear was quantized (check --skip)")
    out = save_quantized(loaded, config.to_dict(), args.out, overwrite=args.overwrite)
    size = size_report(loaded.model)
    worst = max(result.linears, key=lambda r: r.rel_error)
    print(table(["model", "method", "format", "linears", "bits/weight", "model bits/param", "seconds", "worst rel. error"],
                [[loaded.source.name, config.method + ("+mse-clip" if args.clip == "mse" else ""), fmt.name,
                  len(result.linears), size.bits_per_weight, size.model_bits_per_weight, result.seconds,
                  f"{worst.rel_error:.4f} ({worst.name})"]]))
    print(f"saved to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "method": config.to_dict(), "format": fmt.name, "out": str(out),
            "linears": len(result.linears), "seconds": result.seconds,
            "bits_per_weight": size.bits_per_weight, "model_bits_per_weight": size.model_bits_per_weight,
            "rel_error": {r.name: r.rel_error for r in result.linears}}, indent=1))
    return 0
