"""Argument pieces shared by several verbs, and the conversion of arguments to typed configs."""
from __future__ import annotations

import argparse

from ..errors import LowbitError
from ..formats import Format, make_format
from ..formats.integer import SCALE_RULES

FORMATS = ("int", "nf4", "nf3", "nf2", "fp8-e4m3", "fp8-e5m2", "mxfp4")


def add_format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("format")
    g.add_argument("--format", default="int", choices=FORMATS,
                   help="weight format (default: int); nfK are NormalFloat with K bits")
    g.add_argument("--bits", type=int, default=4, help="bits per integer code, 2-8 (default: 4; int only)")
    g.add_argument("--group", type=int, default=128,
                   help="group size along the input dimension (default: 128); 0 = per output channel, "
                        "-1 = per tensor; a size that does not divide the row leaves a ragged last group")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=True,
                     help="symmetric: zero at the middle code, the scale per --scale-rule (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false",
                     help="asymmetric: min/max scale and an integer zero-point (int only)")
    g.add_argument("--scale-rule", default="absmax", choices=SCALE_RULES,
                   help="symmetric int grid (default: absmax): 'absmax' s = absmax / qmax, codes in "
                        "[-qmax, qmax], 2^b - 1 levels (qmax = 2^(b-1) - 1); 'signed' s = -m / 2^(b-1) with "
                        "m the group's largest-magnitude weight, sign kept, so m lands on code -2^(b-1) and "
                        "all 2^b codes are used (llama.cpp's Q4_0 rule; 4 levels instead of 3 at 2 bits); "
                        "'absmax_half' s = absmax / (qmax + 1/2), the compressed-tensors rule")


def format_from_args(args: argparse.Namespace) -> Format:
    """The Format the flags describe; conflicting flags are a one-line error."""
    name = args.format
    if name != "int" and not args.symmetric:
        raise LowbitError(f"--asym applies to --format int only, not {name}")
    rule = getattr(args, "scale_rule", "absmax")
    if rule != "absmax" and (name != "int" or not args.symmetric):
        raise LowbitError(f"--scale-rule {rule} applies to symmetric --format int only")
    try:
        if name == "int":
            return make_format("int", bits=args.bits, group_size=args.group, symmetric=args.symmetric,
                               scale_rule=rule)
        if name.startswith("nf"):
            return make_format("nf", bits=int(name[2]), group_size=args.group)
        if name == "mxfp4":
            return make_format("mxfp4", bits=4, group_size=32 if args.group == 128 else args.group)
        return make_format(name, group_size=args.group if args.group <= 0 else 0)
    except ValueError as e:
        raise LowbitError(str(e)) from None
