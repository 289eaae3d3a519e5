"""`--format gptq`: the GPTQ checkpoint layout (checkpoint_format "gptq", v1 zero-points).

Tensors per quantized linear NAME of shape [out, in], b-bit codes, G groups per row:
  NAME.qweight  int32 [ceil(in·b/32), out]   codes packed along the INPUT dim, dense little-endian
                (b = 4: input rows 8k..8k+7 in word k, row 8k in the low nibble; b = 3: 32 rows
                in 3 words with rows 10 and 21 split across words)
  NAME.qzeros   int32 [G, ceil(out·b/32)]    zero-points minus one ("v1"), packed along the OUTPUT dim
  NAME.scales   float16 [G, out]
  NAME.g_idx    int32 [in]                   group of each input column (column // group: no act-order)
  NAME.bias     float16 [out], when the linear has one
Readers compute W[:, i] = scales[g_idx[i]] · (code − (qzeros[g_idx[i]] + 1)). config.json gets
`quantization_config` {quant_method gptq, bits, group_size, desc_act false, sym, checkpoint_format
gptq, pack_dtype int32, lm_head}; quantize_config.json repeats it for GPTQModel-style readers.

Mapping of lowbit's integer conventions (exact in float32):
  * lowbit's unsigned code u is the stored code; W_dq = s·(u − z) with z = 2^(b−1) when
    symmetric (qzeros then hold 2^(b−1) − 1: 0x77777777 for 4 bits) and lowbit's integer
    zero-point z when asymmetric. The v1 "minus one" cannot store z = 0 (it wraps to 2^b − 1 and
    readers add one back), so an asymmetric weight with any zero-point 0 is refused.
  * scales are lowbit's float16 scales, transposed; group widths that do not divide every row
    (SmolLM2's 576 with group 128) are written as gcd(g, in…) with each scale repeated, per
    channel as group_size −1, per tensor as per channel with the scale repeated per row.
  * 2, 3, 4 and 8 bits only (the widths GPTQ readers share); every decoder linear must be
    quantized (GPTQ has no per-module ignore list; the LM head may be either).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import LowbitError
from .registry import ExportReport, Target

BITS = (2, 3, 4, 8)


def quantization_config(bits: int, symmetric: bool, group_size: int, lm_head: bool) -> dict:
    """config.json's `quantization_config` (and quantize_config.json)."""
    from .. import __version__

    return {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": False,
            "sym": symmetric, "static_groups": False, "true_sequential": True, "lm_head": lm_head,
            "checkpoint_format": "gptq", "pack_dtype": "int32", "meta": {"quantizer": [f"lowbit:{__version__}"]}}


def grid_tensors(grid) -> dict:
    """The GPTQ tensors of one IntGrid (keys without the module prefix)."""
    import torch

    from .int_layout import pack_int32

    if not grid.symmetric and bool((grid.zeros == 0).any()):
        n = int((grid.zeros == 0).sum())
        raise ValueError(f"{n} groups have zero-point 0, which GPTQ's v1 'zero minus one' storage cannot hold")
    qweight = pack_int32(grid.codes, grid.bits).t().contiguous()            # [out, words] -> [words, out]
    zeros_v1 = (grid.zeros.to(torch.int16) - 1).to(torch.uint8)            # z − 1 >= 0 (checked above)
    qzeros = pack_int32(zeros_v1.t().contiguous(), grid.bits)              # [G, out] packed along out
    return {"qweight": qweight, "qzeros": qzeros, "scales": grid.scales.t().contiguous(),
            "g_idx": grid.group_index}


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    import json

    from safetensors.torch import save_file

    from ..models.specs import spec_for
    from .int_layout import regrid, to_grid
    from .quantized_source import copy_tokenizer, linear_names, read_quantized, single_int_format, write_config

    source = read_quantized(src, TARGET.name)
    fmt = single_int_format(source, TARGET.name, BITS)
    head = spec_for(source.config["model_type"]).head
    floats = [n for n in linear_names(source.config) if n not in source.quantized and n != head]
    if floats:
        raise LowbitError(f"--format gptq quantizes every decoder linear, but {len(floats)} stayed float "
                          f"({floats[0]}, ...); use --format compressed-tensors, which has an ignore list")
    group, notes = regrid(fmt, sorted({q.shape[1] for q in source.quantized.values()}))
    tensors = {}
    for name, q in source.quantized.items():
        try:
            parts = grid_tensors(to_grid(q, group))
        except ValueError as e:
            raise LowbitError(f"--format gptq cannot hold {name}: {e}; use --format compressed-tensors") from None
        tensors.update({f"{name}.{k}": t for k, t in parts.items()})
        if name in source.biases:
            tensors[f"{name}.bias"] = source.biases[name].half().contiguous()
    if source.biases:
        notes.append("biases stored in float16, as GPTQ readers hold them (not bit-exact)")
    tensors.update({k: v.contiguous() for k, v in source.floats.items()})
    qconfig = quantization_config(fmt.bits, fmt.symmetric, group, head in source.quantized)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_config(out, source.config, qconfig)
    (out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    copy_tokenizer(source.path, out, source.config)
    return ExportReport({"scheme": f"int{fmt.bits} {'sym' if fmt.symmetric else 'asym'} group {group or -1}",
                         "linears": len(source.quantized), "lm_head quantized": head in source.quantized},
                        tuple(notes))


TARGET = Target(
    name="gptq",
    summary="GPTQ checkpoint (v1 zero-points; GPTQModel, vLLM, transformers with a GPTQ backend), "
            "from a lowbit directory with a 2/3/4/8-bit integer format",
    source="quantized",
    write=write,
)
