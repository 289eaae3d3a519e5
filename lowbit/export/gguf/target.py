"""`--format gguf`: one GGUF file of a llama.cpp mix (registered in lowbit.export.registry).

Flags: --type (the mix), --method rtn (lowbit's GGUF quantizers; calibrated methods come later),
--calib TEXT (an imatrix computed by lowbit from calibration windows of TEXT) or --imatrix FILE
(llama.cpp's GGUF imatrix file) to weight the quantizers' scale search.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ...errors import LowbitError
from ..registry import ExportReport, Flag, Target
from .mixes import MIXES

METHODS = ("rtn",)


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    from ...data.text import read_text
    from ...models.load import load
    from .imatrix import imatrix_from_text, read_imatrix
    from .writer import write_gguf

    type_name = str(options["type"])
    if type_name not in MIXES:
        raise LowbitError(f"unknown --type {type_name}; known: {', '.join(MIXES)}")
    if options["method"] not in METHODS:
        raise LowbitError(f"--method {options['method']} is not available for GGUF yet; known: {', '.join(METHODS)}")
    if options["calib"] and options["imatrix"]:
        raise LowbitError("give --calib or --imatrix, not both")
    imatrix = read_imatrix(Path(str(options["imatrix"]))) if options["imatrix"] else None
    text = read_text(str(options["calib"])) if options["calib"] else None  # cheap checks before the slow load
    loaded = load(src)
    if text is not None:
        imatrix = imatrix_from_text(loaded, text)
    summary = write_gguf(loaded, type_name, out, imatrix=imatrix)
    types = ", ".join(f"{k}×{v}" for k, v in sorted(summary.type_counts().items()))
    return ExportReport({"mix": summary.mix, "tensors": len(summary.tensors), "tensor types": types,
                         "bits per weight": round(summary.bits_per_weight, 4), "metadata": summary.metadata_from},
                        (f"lowbit info {out.name} lists each tensor's type and bits per weight",))


TARGET = Target(
    name="gguf",
    summary="a single GGUF file for llama.cpp, one of its mixes (--type Q4_K_M, Q8_0, F16, F32, ...)",
    source="model",
    write=write,
    flags=(Flag("--type", "Q4_K_M", {"help": f"gguf: llama.cpp mix ({', '.join(MIXES)}; default Q4_K_M)"}),
           Flag("--method", "rtn", {"help": "gguf: how tensors are quantized (rtn)"}),
           Flag("--calib", None, {"metavar": "TEXT", "help": "gguf: compute an imatrix (mean x^2 per input column) "
                                                             "from 32 x 512 tokens of this calibration text"}),
           Flag("--imatrix", None, {"metavar": "FILE", "help": "gguf: llama.cpp GGUF imatrix file weighting the "
                                                               "quantizers' search"})),
    output="file",
)
