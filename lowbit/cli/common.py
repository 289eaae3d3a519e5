"""Argument pieces shared by several verbs, and the conversion of arguments to typed configs."""
from __future__ import annotations

import argparse

from ..errors import LowbitError
from ..formats import Format, make_format

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
                     help="symmetric absmax scale, codes in [-qmax, qmax] (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false",
                     help="asymmetric: min/max scale and an integer zero-point (int only)")


def format_from_args(args: argparse.Namespace) -> Format:
    """The Format the flags describe; conflicting flags are a one-line error."""
    name = args.format
    if name != "int" and not args.symmetric:
        raise LowbitError(f"--asym applies to --format int only, not {name}")
    try:
        if name == "int":
            return make_format("int", bits=args.bits, group_size=args.group, symmetric=args.symmetric)
        if name.startswith("nf"):
            return make_format("nf", bits=int(name[2]), group_size=args.group)
        if name == "mxfp4":
            return make_format("mxfp4", bits=4, group_size=32 if args.group == 128 else args.group)
        return make_format(name, group_size=args.group if args.group <= 0 else 0)
    except ValueError as e:
        raise LowbitError(str(e)) from None
