"""`lowbit import`: a quantized Hugging Face checkpoint (GPTQ, AutoAWQ gemm, compressed-tensors
pack-quantized) as an ordinary lowbit directory, holding the checkpoint's own codes and scales."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import LowbitError
from .table import table


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="import a GPTQ / AWQ / compressed-tensors checkpoint as a lowbit directory",
                       description="Read a quantized Hugging Face checkpoint (config.json with a quantization_config) "
                                   "and write a lowbit directory whose linears hold exactly its codes, scales and "
                                   "zero-points (nothing is re-rounded). OUT is written atomically.")
    p.add_argument("ckpt", metavar="CKPT", help="a Hugging Face directory with a quantization_config")
    p.add_argument("--out", required=True, help="the lowbit directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def summary(quantized: dict) -> list[list]:
    """Rows (linear with its layer index as *, layers, format, bits/weight) plus a total row."""
    rows: dict[tuple[str, str], list[int]] = {}
    for name, q in quantized.items():
        key = (re.sub(r"\.\d+\.", ".*.", name), q.fmt.name)
        row = rows.setdefault(key, [0, 0, 0])
        row[0] += 1
        row[1] += q.fmt.storage_bits(q.shape)
        row[2] += q.shape[0] * q.shape[1]
    out = [[linear, n, fmt, bits / weights] for (linear, fmt), (n, bits, weights) in rows.items()]
    total_bits, total_weights = sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())
    return out + [["all", len(quantized), "-", total_bits / total_weights]]


def run(args: argparse.Namespace) -> int:
    from ..export.lowbit_dir import check_out, save_quantized
    from ..models.imported import load_imported, quantization_config
    from ..models.registry import resolve

    out = Path(args.out)
    check_out(out, args.overwrite)
    source = resolve(args.ckpt)
    qc = quantization_config(source.path) if source.kind == "hf" else None
    if qc is None:
        what = {"hf": "a float Hugging Face model (use `lowbit quantize`)", "gguf": "a GGUF model (use `lowbit "
                "quantize`)", "lowbit": "already a lowbit directory"}[source.kind]
        raise LowbitError(f"lowbit import reads a quantized Hugging Face checkpoint (config.json with a "
                          f"quantization_config); {args.ckpt} is {what}")
    if out.resolve() == source.path:
        raise LowbitError("--out must differ from CKPT")
    loaded, ckpt = load_imported(source)
    method = {"method": "import", "scheme": ckpt.scheme, "quantization_config": qc}
    save_quantized(loaded, method, out, overwrite=args.overwrite)
    print(table(["linear", "layers", "format", "bits/weight"], summary(ckpt.quantized)))
    print(f"imported {ckpt.scheme} from {args.ckpt} into {out}")
    for note in ckpt.notes:
        print(f"note: {note}")
    return 0
