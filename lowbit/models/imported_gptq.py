"""Readers of the GPTQ and AutoAWQ "gemm" checkpoint layouts (see lowbit.models.imported).

GPTQ, per quantized linear NAME [out, in] with b-bit codes and G groups (lowbit/export/gptq.py
writes the same layout):
  NAME.qweight  int32 [ceil(in·b/32), out]  codes packed along the INPUT dim (dense little-endian)
  NAME.qzeros   int32 [G, ceil(out·b/32)]   zero-points packed along the OUTPUT dim; checkpoint_format
                "gptq" (v1) stores z − 1, "gptq_v2" stores z
  NAME.scales   float16 [G, out]
  NAME.g_idx    int32 [in]                  must be column // group_size (static groups)
W[:, i] = scales[g_idx[i]] · (code − z[g_idx[i]]).

AutoAWQ GEMM, 4 bits, per linear [out, in]: qweight int32 [in, out/8] and qzeros int32 [G, out/8],
each word holding 8 output columns in the order 0, 2, 4, 6, 1, 3, 5, 7 from the low nibble up;
scales [G, out]; W = s · (code − z), zero-points stored as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from .imported import (Checkpoint, RawLinear, check_static_groups, fp16_scales, quantized_linears, to_qtensors,
                       unpack_words)

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}     # added to the stored zero-points
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # output column of nibble k within a word (AutoAWQ's pack)


def _gptq_settings(qc: dict, path) -> tuple[int, int, str, bool]:
    """(bits, lowbit group_size, checkpoint_format, sym) of a supported GPTQ config, else LowbitError."""
    qc = dict(qc)
    extra = Path(path) / "quantize_config.json" if path is not None else None
    if extra is not None and extra.is_file():                  # GPTQModel/AutoGPTQ repeat the config here
        try:
            qc = {**json.loads(extra.read_text()), **qc}
        except json.JSONDecodeError:
            pass
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise LowbitError(f"GPTQ checkpoint_format {fmt!r}: lowbit imports {' and '.join(GPTQ_FORMATS)}")
    bits = qc.get("bits")
    if bits not in GPTQ_BITS:
        raise LowbitError(f"GPTQ bits {bits!r}: lowbit imports {'/'.join(map(str, GPTQ_BITS))}-bit GPTQ checkpoints")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise LowbitError(f"GPTQ pack_dtype {qc['pack_dtype']!r}: lowbit imports int32 packing only")
    group = qc.get("group_size", -1)
    if not isinstance(group, int) or group == 0 or group < -1:
        raise LowbitError(f"GPTQ group_size {group!r}: expected a positive width or -1 (per output channel)")
    return bits, max(group, 0), fmt, bool(qc.get("sym", True))


def read_gptq(qc: dict, tensors: dict | None, shapes: dict | None, path) -> Checkpoint | None:
    """GPTQ (v1 or v2) -> Checkpoint, consuming the quantized tensors from `tensors`."""
    bits, group, fmt, sym = _gptq_settings(qc, path)
    if tensors is None:
        return None
    add, top = GPTQ_FORMATS[fmt], (1 << bits) - 1
    raw, biases = {}, {}
    for name, what, out, in_features in quantized_linears(tensors, ".qweight", shapes, "GPTQ"):
        qweight, qzeros = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qzeros")
        scales, g_idx = tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.g_idx", None)
        n_groups = -(-in_features // group) if group else 1
        if tuple(scales.shape) != (n_groups, out):
            raise LowbitError(f"{what}: scales {tuple(scales.shape)}, expected {(n_groups, out)} for group_size "
                              f"{group or -1} on {in_features} columns")
        check_static_groups(g_idx, group, in_features, what)
        try:
            codes = unpack_words(qweight.t().contiguous(), bits, in_features)        # [out, in]
            stored = unpack_words(qzeros, bits, out)                                 # [G, out]
        except ValueError as e:
            raise LowbitError(f"{what}: {e}") from None
        if stored.shape[0] != n_groups:
            raise LowbitError(f"{what}: qzeros has {stored.shape[0]} groups, scales {n_groups}")
        if add and bool((stored == top).any()):
            raise LowbitError(f"{what}: {int((stored == top).sum())} zero-points are stored as {top} in GPTQ v1 "
                              f"(a zero-point 0 or {top + 1} minus one): readers disagree on their value; refused")
        zeros = (stored + add).t().contiguous()                                      # [out, G] unsigned z
        raw[name] = RawLinear(codes, fp16_scales(scales.t(), what), zeros, bits, group, sym)
        if f"{name}.bias" in tensors:
            biases[name] = tensors.pop(f"{name}.bias")
    quantized, notes = to_qtensors(raw)
    scheme = f"gptq {'v1' if add else 'v2'} int{bits} {'group ' + str(group) if group else 'channel'} {'sym' if sym else 'asym'}"
    return Checkpoint(scheme, quantized, biases, tensors, tuple(notes))


def _awq_unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """AutoAWQ GEMM words int32 [rows, n/8] -> uint8 [rows, n] in output-column order."""
    nibbles = unpack_words(words, 4, 8 * words.shape[1])                   # [rows, n/8·8], nibble order
    order = torch.tensor(AWQ_ORDER)
    cols = (torch.arange(words.shape[1]).unsqueeze(1) * 8 + order).flatten()   # output column of each nibble
    out = torch.empty_like(nibbles)
    out[:, cols] = nibbles
    return out[:, :n].contiguous()


def read_awq(qc: dict, tensors: dict | None, shapes: dict | None, path) -> Checkpoint | None:
    """AutoAWQ GEMM (4-bit, zero-points) -> Checkpoint."""
    version = str(qc.get("version") or qc.get("format") or qc.get("checkpoint_format") or "").lower()
    bits = qc.get("bits", qc.get("w_bit"))
    if version != "gemm" or bits != 4 or not qc.get("zero_point", True):
        raise LowbitError(f"AWQ version {version or '?'} {bits}-bit zero_point {qc.get('zero_point', True)}: lowbit "
                          "imports AutoAWQ's gemm layout, 4-bit with zero-points, only")
    group = qc.get("group_size", qc.get("q_group_size", -1))
    group = max(int(group), 0)
    if tensors is None:
        return None
    raw, biases = {}, {}
    for name, what, out, in_features in quantized_linears(tensors, ".qweight", shapes, "AWQ"):
        qweight, qzeros, scales = (tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales"))
        n_groups = -(-in_features // group) if group else 1
        if out % 8 or tuple(qweight.shape) != (in_features, out // 8) or tuple(scales.shape) != (n_groups, out) \
                or tuple(qzeros.shape) != (n_groups, out // 8):
            raise LowbitError(f"{what}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                              f"{tuple(scales.shape)} do not fit [{out}, {in_features}] with group {group or -1}")
        codes = _awq_unpack(qweight, out).t().contiguous()                     # [in, out] -> [out, in]
        zeros = _awq_unpack(qzeros, out).t().contiguous()                      # [G, out] -> [out, G]
        raw[name] = RawLinear(codes, fp16_scales(scales.t(), what), zeros, 4, group, False)
        if f"{name}.bias" in tensors:
            biases[name] = tensors.pop(f"{name}.bias")
    quantized, notes = to_qtensors(raw)
    return Checkpoint(f"awq gemm int4 {'group ' + str(group) if group else 'channel'} asym", quantized, biases,
                      tensors, tuple(notes))
