"""`--format gguf`: one GGUF file of a llama.cpp mix (registered in lowbit.export.registry).

Flags: --type (the mix); --method rtn (lowbit's GGUF quantizers), gptq (the same scale search,
then GPTQ error compensation on each block's grid), awq (AWQ scales searched on the calibration
windows and folded into the float model first) or awq+gptq (both); every method but rtn needs
--calib. --calib TEXT (an imatrix, and
for gptq the Hessians, from calibration windows of TEXT) or --imatrix FILE (llama.cpp's GGUF imatrix
file) to weight the quantizers' scale search; --save-imatrix FILE writes lowbit's imatrix in
llama.cpp's format.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ...errors import LowbitError
from ..registry import ExportReport, Flag, Target
from .mixes import MIXES

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    from ...data.text import read_text
    from ...models.load import load
    from ...methods.awq import apply_awq_plan
    from .awq import awq_gguf_plan
    from .imatrix import calibrate, calibration_windows, read_imatrix, write_imatrix
    from .writer import write_gguf

    type_name = str(options["type"])
    if type_name not in MIXES:
        raise LowbitError(f"unknown --type {type_name}; known: {', '.join(MIXES)}")
    if options["method"] not in METHODS:
        raise LowbitError(f"unknown --method {options['method']} for GGUF; known: {', '.join(METHODS)}")
    if options["calib"] and options["imatrix"]:
        raise LowbitError("give --calib or --imatrix, not both")
    method = str(options["method"])
    if method != "rtn" and not options["calib"]:
        raise LowbitError(f"--method {method} needs --calib TEXT (its statistics come from calibration windows)")
    if method != "rtn" and type_name in ("F32", "F16"):
        raise LowbitError(f"--method {method} needs a quantized --type; {type_name} stores the weights as they are")
    if options["save_imatrix"] and not options["calib"]:
        raise LowbitError("--save-imatrix needs --calib TEXT (the imatrix lowbit computes from it)")
    imatrix = read_imatrix(Path(str(options["imatrix"]))) if options["imatrix"] else None
    text = read_text(str(options["calib"])) if options["calib"] else None  # cheap checks before the slow load
    loaded = load(src)
    hessians = None
    if text is not None:
        samples = calibration_windows(loaded, text)
        if method.startswith("awq"):
            plan = awq_gguf_plan(loaded, type_name, samples)
            apply_awq_plan(loaded.model, loaded.spec, plan)  # function-preserving: x/s into the linears
        # after the fold, so the imatrix and Hessians are those of the scaled inputs
        calibration = calibrate(loaded, samples, hessians=method.endswith("gptq"))
        imatrix, hessians = calibration.imatrix, calibration.hessians
    summary = write_gguf(loaded, type_name, out, imatrix=imatrix, hessians=hessians)
    if options["save_imatrix"]:  # after the GGUF: a failed export leaves neither file
        write_imatrix(Path(str(options["save_imatrix"])), calibration, str(options["calib"]))
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
           Flag("--method", "rtn", {"help": "gguf: rtn (lowbit's scale search), gptq (then GPTQ error "
                                            "compensation on each block's grid), awq (AWQ scales folded in "
                                            "first) or awq+gptq; all but rtn need --calib"}),
           Flag("--calib", None, {"metavar": "TEXT", "help": "gguf: compute an imatrix (mean x^2 per input column) "
                                                             "from 32 x 512 tokens of this calibration text"}),
           Flag("--imatrix", None, {"metavar": "FILE", "help": "gguf: llama.cpp GGUF imatrix file weighting the "
                                                               "quantizers' search"}),
           Flag("--save-imatrix", None, {"metavar": "FILE", "help": "gguf: also write the imatrix computed from "
                                                                    "--calib as a llama.cpp GGUF imatrix file"})),
    output="file",
)
