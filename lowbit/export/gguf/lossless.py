"""Write an integer-quantized lowbit weight into a GGUF legacy block type WITHOUT re-rounding.

A ggml legacy block holds 32 consecutive weights of one row with one fp16 scale (and, for the
affine types, one fp16 minimum). An `IntFormat` QTensor fits one when its codes have the
type's width and every scale group boundary falls on a multiple of 32, so that each block
repeats its group's fp16 scale. lowbit's stored code u is then ggml's code q as is:

  Q4_0 / Q5_0 / Q8_0  symmetric 4 / 5 / 8 bits   ggml d*(q - 8) | d*(q - 16) | d*(q - 128 as int8)
                       = lowbit scale*(u - 2**(bits-1)) with d = scale, q = u      -> bit-exact
  Q4_1 / Q5_1         asymmetric 4 / 5 bits      ggml d*q + m = lowbit scale*(u - z)
                       with d = scale, m = fp16(-scale*z)                          -> off by m's rounding

Why the symmetric types are bit-exact: both sides compute one float32 product of the same fp16
scale and the same small integer. Why the affine error is exactly m's fp16 rounding: with an
11-bit d and |q|, |z| < 2**8 the products d*q, scale*z, scale*(u - z) and the sum d*q + m all fit
float32's 24-bit mantissa, so no other rounding happens; each weight is off by at most half an
fp16 ulp of |scale*z|, and `encode_lossless` returns the largest such error.
"""
from __future__ import annotations

import numpy as np

from lowbit.formats.base import Format, QTensor
from lowbit.formats.gguf.layout import fp16_to_bytes
from lowbit.formats.gguf.registry import GGUF_TYPES
from lowbit.formats.integer import IntFormat

BLOCK = 32  # weights per legacy GGUF block

# (bits, symmetric) -> GGUF type whose grid is lowbit's; the stored code u is ggml's code q unchanged
TYPE_FOR = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0", (4, False): "Q4_1", (5, False): "Q5_1"}
EXACT = frozenset({"Q4_0", "Q5_0", "Q8_0"})

_ADVICE = "re-round with --requantize TYPE"
_NOT_INT = {
    "nf": "NormalFloat codes index a non-uniform table and no GGUF type stores that table (IQ4_NL's differs)",
    "fp8": "FP8 weights are floats, not codes on a uniform grid, and no GGUF type stores them",
    "mxfp4": "E2M1 elements with E8M0 scales, and ggml's MXFP4 is not among the GGUF types lowbit writes",
}


def _refuse(fmt: Format, why: str) -> ValueError:
    return ValueError(f"{fmt.name}: {why}; {_ADVICE}")


def lossless_type(fmt: Format, in_features: int) -> str:
    """The GGUF type that stores `fmt`'s codes and scales as they are, for rows of `in_features`.

    Returns "Q4_0" | "Q5_0" | "Q8_0" | "Q4_1" | "Q5_1"; raises ValueError with a one-line reason
    (the format's name and why no GGUF type holds it) otherwise.
    """
    if not isinstance(fmt, IntFormat):
        family = getattr(fmt, "family", type(fmt).__name__)
        raise _refuse(fmt, _NOT_INT.get(family, f"family {family!r} has no GGUF block type"))
    kind = "symmetric" if fmt.symmetric else "asymmetric"
    name = TYPE_FOR.get((fmt.bits, fmt.symmetric))
    if name is None:
        held = ", ".join(f"{b}-bit {'symmetric' if s else 'asymmetric'} ({t})" for (b, s), t in TYPE_FOR.items())
        raise _refuse(fmt, f"no GGUF type stores {fmt.bits}-bit {kind} codes on 32-weight blocks "
                           f"(the legacy types hold {held})")
    if in_features <= 0 or in_features % BLOCK:
        raise _refuse(fmt, f"rows of {in_features} columns are not a whole number of 32-weight GGUF blocks")
    g = fmt.group_size
    if 0 < g < in_features and g % BLOCK:
        raise _refuse(fmt, f"scale groups of {g} columns split 32-weight GGUF blocks, which hold one scale each "
                           f"(groups must start on multiples of 32)")
    return name


def encode_lossless(q: QTensor) -> tuple[str, np.ndarray, float]:
    """QTensor [out, in] of an IntFormat -> (type name, bytes, max abs error).

    bytes: uint8 [out, in/32 * bytes_per_block], the tensor exactly as GGUF stores it (row after
    row of 32-weight blocks). error: max |dequantize_gguf(bytes) - q.fmt.dequantize(q)| over all
    weights, 0.0 for Q4_0 / Q5_0 / Q8_0 (bit-exact), m's fp16 rounding for Q4_1 / Q5_1.
    ValueError (see lossless_type) when no GGUF type holds the format.
    """
    fmt = q.fmt
    out, cols = q.shape
    name = lossless_type(fmt, cols)
    t = GGUF_TYPES[name]
    nb = cols // BLOCK  # blocks per row

    codes = q.codes.detach().cpu().numpy()
    if int(codes.max(initial=0)) > t.code_max:
        raise ValueError(f"{fmt.name}: codes exceed {t.code_max}, the largest {name} code")
    codes = codes.reshape(out * nb, BLOCK)  # [out, in] -> [out*nb, 32]: row-major, so row after row of blocks

    # the scale group of each block (its first column's group; all of its columns share it)
    g = fmt.group_size
    group = np.arange(nb) * BLOCK // g if 0 < g < cols else np.zeros(nb, dtype=np.int64)  # [nb]

    def per_block(x) -> np.ndarray:
        """scales or zeros [out, G] (per tensor [1, 1]) -> float32 [out*nb], one value per block."""
        x = x.detach().cpu().numpy().astype(np.float32)[:, group]  # [out or 1, G] -> [out or 1, nb]
        return np.broadcast_to(x, (out, nb)).reshape(-1)  # [out, nb] -> [out*nb], the order of `codes`

    d = per_block(q.scales)  # fp16 values, so fp16_to_bytes stores them unchanged
    parts = {"d": fp16_to_bytes(d)}
    error = 0.0
    if name not in EXACT:
        m_exact = -(d * per_block(q.zeros))  # exact in float32: 11-bit scale times an integer < 2**8
        m = m_exact.astype(np.float16)  # ggml stores m in fp16: round to nearest even
        if not np.isfinite(m).all():
            raise ValueError(f"{fmt.name}: scale * zero-point exceeds the float16 range of {name}'s minimum m")
        parts["m"] = fp16_to_bytes(m)
        if m.size:
            error = float(np.abs(m.astype(np.float64) - m_exact.astype(np.float64)).max())
    for f in t.layout.fields:  # code fields start empty; set_codes packs them the way ggml does
        parts.setdefault(f.name, np.zeros((out * nb, f.nbytes), dtype=np.uint8))
    blocks = t.set_codes(t.layout.join(parts), codes)  # uint8 [out*nb, bytes_per_block]
    return name, blocks.reshape(out, nb * t.bytes_per_block), error  # [out*nb, bpb] -> [out, nb*bpb]
