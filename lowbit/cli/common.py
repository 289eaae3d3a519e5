"""Argument pieces shared by several verbs, and the conversion of arguments to typed configs."""
from __future__ import annotations

import argparse

from ..errors import LowbitError
from ..formats import Format, make_format
from ..formats.integer import SCALE_RULES

FORMATS = ("int", "nf4", "nf3", "nf2", "fp8-e4m3", "fp8-e5m2", "mxfp4", "gguf")


def add_format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("format")
    g.add_argument("--format", default="int", choices=FORMATS,
                   help="weight format (default: int); nfK are NormalFloat with K bits; gguf: llama.cpp's "
                        "types, chosen by --type")
    g.add_argument("--type", default=None, metavar="TYPE",
                   help="gguf: a llama.cpp mix (Q4_K_M, Q4_K_S, Q3_K_M, Q2_K, Q5_K_M, Q8_0: per-tensor types as "
                        "llama-quantize picks them) or one block type for every linear (Q4_0, Q6_K, ...)")
    g.add_argument("--plan", default=None, metavar="FILE",
                   help="a per-tensor format plan (JSON or YAML: {\"default\": FORMAT, \"tensors\": {PATTERN: "
                        "FORMAT | \"float\"}}, first matching pattern wins); replaces the format flags")
    g.add_argument("--bits", type=int, default=4, help="bits per integer code, 2-8 (default: 4; int only)")
    g.add_argument("--group", type=int, default=128,
                   help="group size along the input dimension (default: 128); 0 = per output channel, "
                        "-1 = per tensor; a size that does not divide the row leaves a ragged last group")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=True,
                     help="symmetric: zero at the middle code, the scale per --scale-rule (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false",
                     help="asymmetric: min/max scale and an integer zero-point (int only)")
    g.add_argument("--scale-rule", default=None, choices=SCALE_RULES,
                   help="symmetric int grid (default: signed, the best benchmarked rule for RTN and GPTQ on both "
                        "models, decoded exactly by every export target): 'absmax' s = absmax / qmax, codes in "
                        "[-qmax, qmax], 2^b - 1 levels (qmax = 2^(b-1) - 1); 'signed' s = -m / 2^(b-1) with "
                        "m the group's largest-magnitude weight, sign kept, so m lands on code -2^(b-1) and "
                        "all 2^b codes are used (llama.cpp's Q4_0 rule; 4 levels instead of 3 at 2 bits); "
                        "'absmax_half' s = absmax / (qmax + 1/2), the compressed-tensors rule")


def plan_from_args(args: argparse.Namespace, model_config=None, spec=None):
    """The FormatPlan of --plan or --format gguf --type (a mix needs the model's config and spec;
    without them only the arguments are checked and None is returned), or None for the format flags."""
    from ..plans import FormatPlan
    from ..plans.gguf_mixes import MIXES, mix_plan

    if getattr(args, "plan", None):
        if args.format != "int" or getattr(args, "type", None):
            raise LowbitError("--plan replaces --format/--type: give one or the other")
        try:
            return FormatPlan.load(args.plan)
        except ValueError as e:
            raise LowbitError(str(e)) from None
    if args.format != "gguf":
        if getattr(args, "type", None):
            raise LowbitError("--type applies to --format gguf only")
        return None
    type_name = getattr(args, "type", None)
    if not type_name:
        raise LowbitError(f"--format gguf needs --type (a mix: {', '.join(MIXES)}; or a block type such as Q4_0)")
    if type_name in ("F16", "F32"):
        raise LowbitError(f"--type {type_name} stores the weights unquantized: write it with "
                          f"`lowbit export MODEL --format gguf --type {type_name}`")
    if type_name in MIXES:
        return None if model_config is None else mix_plan(model_config, spec, type_name)
    from ..formats import GGUFFormat

    try:
        return FormatPlan.uniform(GGUFFormat(type_name))
    except ValueError as e:
        raise LowbitError(f"--type {type_name}: {e}; or a mix: {', '.join(MIXES)}") from None


def format_from_args(args: argparse.Namespace) -> Format | None:
    """The Format the flags describe (None for --format gguf and --plan: see plan_from_args);
    conflicting flags are a one-line error."""
    name = args.format
    if name == "gguf" or getattr(args, "plan", None):
        return None
    if name != "int" and not args.symmetric:
        raise LowbitError(f"--asym applies to --format int only, not {name}")
    rule = getattr(args, "scale_rule", None)
    if rule is not None and rule != "absmax" and (name != "int" or not args.symmetric):
        raise LowbitError(f"--scale-rule {rule} applies to symmetric --format int only")
    if rule is None:  # the default: signed where it applies
        rule = "signed" if name == "int" and args.symmetric else "absmax"
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


def without_flag(argv, flag: str) -> list[str]:
    """argv less `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in map(str, argv):
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def recorded_command(argv) -> str:
    """The command as a manifest records it: run-control flags that do not change the output left out, so
    the same quantization gives the same bytes however it was started (--overwrite, --resume, --workers N)."""
    import shlex

    return "lowbit " + " ".join(shlex.quote(a) for a in without_flag(argv, "--workers")
                                if a not in ("--overwrite", "--resume", "-q", "--quiet"))


def parse_share(text: str | None, flag: str) -> float:
    """An outlier share given on the command line as "0.5%" or "0.005" (None: 0)."""
    if text is None:
        return 0.0
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise LowbitError(f"{flag} {text!r}: a share such as 0.5% or 0.005") from None
