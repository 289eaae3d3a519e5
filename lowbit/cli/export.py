"""`lowbit export`: write a model or a lowbit directory in a format other engines load.

The formats and their own flags come from lowbit.export.registry; every format-specific flag is
accepted by the parser and refused (one line) when the chosen --format does not take it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LowbitError
from .table import table


def add_parser(sub) -> None:
    from ..export.registry import all_flags, targets

    registered = targets()
    lines = "\n".join(f"  {t.name:<20} {t.summary}" for t in registered.values())
    p = sub.add_parser("export", help="export a model for transformers, vLLM or GPTQ readers",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write SRC in another engine's checkpoint layout; OUT is written atomically.\n\n"
                                   f"formats:\n{lines}")
    p.add_argument("src", metavar="SRC", help="a lowbit directory, a model name, a .gguf file or an HF directory")
    p.add_argument("--format", required=True, choices=tuple(registered), help="target layout")
    p.add_argument("--out", required=True, help="output directory, or file for --format gguf (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("format-specific flags (each taken only by the formats named in its help)")
    for option, (flag, _owners) in all_flags(registered).items():
        # SUPPRESS: a flag left out is absent from the namespace, so a given flag can be told apart
        g.add_argument(option, dest=flag.dest, default=argparse.SUPPRESS, **dict(flag.kwargs))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export.registry import all_flags, check_flags, export, targets

    registered = targets()
    target = registered[args.format]
    dests = {flag.dest for flag, _ in all_flags(registered).values()}
    given = {k: v for k, v in vars(args).items() if k in dests}
    check_flags(target, given, registered)
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise LowbitError("--out must differ from SRC")
    options = target.options(given)
    if target.name == "gguf" and any(options.get(k) is not None for k in ("type", "method", "calib")):
        report = _gguf_shortcut(target, args, options)
    else:
        report = export(target, args.src, Path(args.out), args.overwrite, options)
    print(table(["field", "value"], [[k, v] for k, v in report.facts.items()]))
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _gguf_shortcut(target, args: argparse.Namespace, options: dict):
    """`lowbit export MODEL --format gguf --type T [--method M --calib C]`: `lowbit quantize` into a
    temporary lowbit directory beside OUT, then the writer; the directory is removed either way."""
    import shutil
    import tempfile

    from ..export.registry import check_out_file, export
    from .main import build_parser

    if not options.get("type"):
        raise LowbitError("--method/--calib quantize first: give --type (a llama.cpp mix such as Q4_K_M)")
    if options.get("requantize"):
        raise LowbitError("--requantize re-rounds a quantized source; with --type the source is quantized here")
    out = Path(args.out)
    check_out_file(out, args.overwrite)
    if options["type"] in ("F16", "F32"):  # storage, not quantization: the writer alone
        if options.get("method") or options.get("calib"):
            raise LowbitError(f"--type {options['type']} stores the weights unquantized: no --method or --calib")
        rest = {k: None for k in options} | {"requantize": options["type"]}
        return export(target, args.src, out, args.overwrite, rest)
    method = options.get("method") or ("imatrix" if options.get("calib") else "rtn")
    argv = ["quantize", args.src, "--format", "gguf", "--type", str(options["type"]), "--method", method]
    for flag, key in (("--calib", "calib"), ("--samples", "samples"), ("--seq-len", "seq_len")):
        if options.get(key) is not None:
            argv += [flag, str(options[key])]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.quantized"))
    try:
        quantize_args = build_parser().parse_args(argv + ["--out", str(tmp / "q")])
        quantize_args.run(quantize_args)
        rest = {k: v for k, v in options.items() if k not in ("type", "method", "calib", "samples", "seq_len")}
        return export(target, str(tmp / "q"), out, args.overwrite, {**rest, **{k: None for k in options if k not in rest}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
