"""ggml's legacy 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Byte layouts (little-endian, fp16 = IEEE half):
  Q4_0  d:fp16 | qs[16]            w = d * (q - 8),   q 4-bit
  Q4_1  d:fp16 | m:fp16 | qs[16]   w = d * q + m,     q 4-bit
  Q5_0  d:fp16 | qh[4] | qs[16]    w = d * (q - 16),  q 5-bit
  Q5_1  d:fp16 | m:fp16 | qh[4] | qs[16]  w = d * q + m, q 5-bit
  Q8_0  d:fp16 | qs[32] int8       w = d * q
qs byte j holds the low nibble of weight j (bits 0-3) and of weight j + 16 (bits 4-7); qh is
one little-endian 32-bit word whose bit j is bit 4 of weight j.

Without an importance vector the quantizers are ggml's reference ones (quantize_row_*_ref),
byte for byte: absmax for the symmetric types (the largest-magnitude value lands on code 0),
min/max for Q4_1/Q5_1, truncation of x/d + 0.5 (+ offset) and, for Q8_0, round-half-away. With
one, they run the weighted search of search.py (codes re-rounded under the stored fp16 scale).
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.gguf import search, superblock
from lowbit.formats.gguf.layout import (BlockLayout, Field, fp16_from_bytes, fp16_to_bytes, pack_bits_le,
                                        pack_planes, unpack_bits_le, unpack_planes)

_D = Field("d", 2, "fp16 scale")
_M = Field("m", 2, "fp16 minimum, added")
_QS4 = Field("qs", 16, "low 4 bits of the codes, weight j and j + 16 per byte")
_QH = Field("qh", 4, "bit 4 of the codes, bit j of a little-endian uint32 = weight j")

Q4_0 = BlockLayout("Q4_0", 32, (_D, _QS4))
Q4_1 = BlockLayout("Q4_1", 32, (_D, _M, _QS4))
Q5_0 = BlockLayout("Q5_0", 32, (_D, _QH, _QS4))
Q5_1 = BlockLayout("Q5_1", 32, (_D, _M, _QH, _QS4))
Q8_0 = BlockLayout("Q8_0", 32, (_D, Field("qs", 32, "int8 codes")))

SYMMETRIC_DELTAS = search.uniform_deltas(-1.0, 1.0, 0.1)
AFFINE_DELTAS = search.uniform_deltas(-1.0, 1.0, 0.1)


# ---------------------------------------------------------------------------- code packing

def _pack_codes(codes: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """codes uint8 [n, 32] (4 or 5 bits) -> {"qs": [n, 16]} (+ {"qh": [n, 4]} for 5 bits)."""
    n = codes.shape[0]
    parts = {"qs": pack_planes((codes & 0xF).reshape(n, 2, 16), 4)}  # [n, 2 planes, 16] -> [n, 16]
    if bits == 5:
        parts["qh"] = pack_bits_le(codes >> 4)
    return parts


def _unpack_codes(parts: dict[str, np.ndarray]) -> np.ndarray:
    """{"qs"[, "qh"]} -> codes uint8 [n, 32]."""
    n = parts["qs"].shape[0]
    codes = unpack_planes(parts["qs"], 4).reshape(n, 32)
    if "qh" in parts:
        codes = codes | (unpack_bits_le(parts["qh"]) << np.uint8(4))
    return codes


LAYOUTS = {layout.name: layout for layout in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)}
CODE_MAX = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 255}  # unsigned codes; Q8_0's are q + 128


def set_codes(name: str, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """blocks uint8 [n, bytes] with their codes replaced by unsigned `codes` uint8 [n, 32] (scales kept)."""
    layout = LAYOUTS[name]
    parts = dict(layout.split(blocks))
    if name == "Q8_0":
        parts["qs"] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        parts.update(_pack_codes(codes, 5 if "qh" in parts else 4))
    return layout.join(parts)


# ---------------------------------------------------------------------------- reference quantizers

def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d == 0 (ggml: id = d ? 1/d : 0)."""
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: to nearest, halves away from zero (exact for |v| < 2**23)."""
    a = np.abs(v)
    r = np.floor(a)
    r += (a - r >= np.float32(0.5))
    return np.copysign(r, v)


def _ref_symmetric(blocks: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (half 8) / Q5_0 (half 16): d = peak / -half, code = trunc(x/d + half + 0.5) clipped."""
    at = np.abs(blocks).argmax(axis=-1)[:, None]            # first largest magnitude, as ggml
    d = np.take_along_axis(blocks, at, axis=-1) / np.float32(-half)
    codes = np.trunc(blocks * _inverse(d) + np.float32(half + 0.5)).clip(0, 2 * half - 1)
    return d, codes.astype(np.uint8)


def _ref_affine(blocks: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 (top 15) / Q5_1 (top 31): d = (max - min) / top, code = trunc((x - min)/d + 0.5)."""
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(top)
    codes = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).clip(0, top)
    return d, lo, codes.astype(np.uint8)


# ---------------------------------------------------------------------------- weighted quantizers

def _weighted_symmetric(blocks: np.ndarray, weights: np.ndarray, qlo: int, qhi: int):
    """-> (d float32 [n, 1] fp16-exact, signed codes int [n, 32]) minimising sum w (x - d q)^2."""
    x, w = torch.from_numpy(blocks), torch.from_numpy(weights)
    levels = torch.arange(qlo, qhi + 1, dtype=torch.float32)
    scale, _ = search.fit_symmetric(x, w, levels, SYMMETRIC_DELTAS)
    # one sub-block per block whose integer scale is pinned to 1: only d is refit
    d, _, q = superblock.finalize_symmetric(x[:, None], w[:, None], scale[:, None], scale, (qlo, qhi), (1, 1))
    return d.numpy()[:, None], q[:, 0].numpy().astype(np.int32)


def _weighted_affine(blocks: np.ndarray, weights: np.ndarray, top: int):
    """-> (d, m float32 [n, 1] fp16-exact, codes uint8 [n, 32]) minimising sum w (x - d q - m)^2."""
    x, w = torch.from_numpy(blocks), torch.from_numpy(weights)
    scale, offset, _ = search.fit_affine(x, w, top, AFFINE_DELTAS)
    # pinned integer scale / min in {0, 1}: stored d = d*sc, m = -dmin*mq stay fp16-exact
    d, dmin, sc, mq, q = superblock.finalize_affine(x[:, None], w[:, None], scale[:, None], -offset[:, None],
                                                    scale, -offset, top, 1)
    d_stored = (d * sc[:, 0]).numpy()[:, None]
    m_stored = (-(dmin * mq[:, 0])).numpy()[:, None]
    return d_stored, m_stored, q[:, 0].numpy().astype(np.uint8)


# ---------------------------------------------------------------------------- per-type entry points

def quantize_q4_0(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        d, codes = _ref_symmetric(blocks, 8)
    else:
        d, q = _weighted_symmetric(blocks, weights, -8, 7)
        codes = (q + 8).astype(np.uint8)
    return Q4_0.join({"d": fp16_to_bytes(d), **_pack_codes(codes, 4)})


def quantize_q5_0(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        d, codes = _ref_symmetric(blocks, 16)
    else:
        d, q = _weighted_symmetric(blocks, weights, -16, 15)
        codes = (q + 16).astype(np.uint8)
    return Q5_0.join({"d": fp16_to_bytes(d), **_pack_codes(codes, 5)})


def quantize_q4_1(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    d, m, codes = _ref_affine(blocks, 15) if weights is None else _weighted_affine(blocks, weights, 15)
    return Q4_1.join({"d": fp16_to_bytes(d), "m": fp16_to_bytes(m), **_pack_codes(codes, 4)})


def quantize_q5_1(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    d, m, codes = _ref_affine(blocks, 31) if weights is None else _weighted_affine(blocks, weights, 31)
    return Q5_1.join({"d": fp16_to_bytes(d), "m": fp16_to_bytes(m), **_pack_codes(codes, 5)})


def quantize_q8_0(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        q = _round_half_away(blocks * _inverse(d)).astype(np.int8)
    else:
        d, q = _weighted_symmetric(blocks, weights, -128, 127)
        q = q.astype(np.int8)
    return Q8_0.join({"d": fp16_to_bytes(d), "qs": q.view(np.uint8)})


# Dequantizers: float32 arithmetic in ggml's order (d * q, then + m), hence bit-exact.

def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    p = Q4_0.split(blocks)
    return fp16_from_bytes(p["d"]) * (_unpack_codes(p).astype(np.float32) - np.float32(8))


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    p = Q5_0.split(blocks)
    return fp16_from_bytes(p["d"]) * (_unpack_codes(p).astype(np.float32) - np.float32(16))


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    p = Q4_1.split(blocks)
    return fp16_from_bytes(p["d"]) * _unpack_codes(p).astype(np.float32) + fp16_from_bytes(p["m"])


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    p = Q5_1.split(blocks)
    return fp16_from_bytes(p["d"]) * _unpack_codes(p).astype(np.float32) + fp16_from_bytes(p["m"])


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    p = Q8_0.split(blocks)
    return np.ascontiguousarray(p["qs"]).view(np.int8).astype(np.float32) * fp16_from_bytes(p["d"])
