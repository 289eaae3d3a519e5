"""`--format gguf`: one GGUF file for llama.cpp (registered in lowbit.export.registry).

The writer only writes (writer.py): a lowbit directory quantized to GGUF types (`lowbit quantize
--format gguf --type Q4_K_M`) is copied block for block; an integer directory whose grid a GGUF
type holds (Q4_0, Q8_0, Q4_1, ...) is re-expressed without re-rounding; float tensors are F32.
Anything else is refused with the reason, unless --requantize MIX asks to re-round it.

--type/--method/--calib/--samples/--seq-len are the one-step shortcut: `lowbit export MODEL
--format gguf --type Q4_K_M --method gptq --calib TEXT` runs `lowbit quantize` with those flags
(cli/export.py does, into a temporary lowbit directory) and then this writer.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ...errors import LowbitError
from ..registry import ExportReport, Flag, Target
from ...plans.gguf_mixes import MIXES

SHORTCUT = ("type", "method", "calib", "samples", "seq_len")  # consumed by `lowbit export` before the writer


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    from ...models.load import load
    from .writer import write_gguf

    given = [k for k in SHORTCUT if options.get(k) is not None]
    if given:
        raise LowbitError(f"--{given[0].replace('_', '-')} quantizes first: run it through `lowbit export` "
                          "(or `lowbit quantize --format gguf`)")
    requantize = options.get("requantize")
    if requantize is not None and requantize not in MIXES:
        raise LowbitError(f"unknown --requantize {requantize}; known: {', '.join(MIXES)}")
    summary = write_gguf(load(src), out, requantize=requantize)
    types = ", ".join(f"{k}×{v}" for k, v in sorted(summary.type_counts().items()))
    notes = [f"lowbit info {out.name} lists each tensor's type and bits per weight"]
    if summary.max_error:
        notes.append(f"Q4_1/Q5_1 minima rounded to fp16: weights differ from lowbit's by at most "
                     f"{summary.max_error:.3g}")
    return ExportReport({"mix": summary.mix, "tensors": len(summary.tensors), "tensor types": types,
                         "bits per weight": round(summary.bits_per_weight, 4), "metadata": summary.metadata_from,
                         "re-rounded": f"yes (--requantize {requantize})" if requantize else "no"}, tuple(notes))


TARGET = Target(
    name="gguf",
    summary="a single GGUF file for llama.cpp: the stored GGUF blocks as they are, integer grids a GGUF type "
            "holds re-expressed exactly (Q4_0, Q8_0, Q4_1), floats as F32",
    source="model",
    write=write,
    flags=(Flag("--requantize", None, {"metavar": "MIX", "help": f"gguf: re-round every tensor to this llama.cpp "
                                                                  f"mix ({', '.join(MIXES)}) instead of refusing a "
                                                                  "format no GGUF type holds (lossy)"}),
           Flag("--type", None, {"help": "gguf shortcut: quantize SRC to this llama.cpp mix or block type first "
                                         "(as `lowbit quantize --format gguf --type`), then write"}),
           Flag("--method", None, {"help": "gguf shortcut: rtn, imatrix, gptq, awq or awq+gptq (all but rtn need "
                                           "--calib; default rtn, or imatrix with --calib)"}),
           Flag("--calib", None, {"metavar": "TEXT", "help": "gguf shortcut: calibration text"}),
           Flag("--samples", None, {"type": int, "help": "gguf shortcut: calibration windows (default: quantize's)"}),
           Flag("--seq-len", None, {"type": int, "help": "gguf shortcut: tokens per window (default: quantize's)"})),
    output="file",
)
