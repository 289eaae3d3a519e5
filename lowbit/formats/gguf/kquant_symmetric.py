"""K-quants with one signed scale per sub-block of 16: Q3_K, Q6_K (256-weight super-blocks).

  w = (d * sc_j) * q          d: fp16;  sc_j, q: signed integers

Byte layouts (little-endian):
  Q3_K (110 B, 3.4375 bpw)  hmask[32] | qs[64] | scales[12] | d
      q in -4..3 stored as L = q + 4 (3 bits). Bits 0-1 of L in qs as Q2_K (in each 128-weight
      half, byte l holds weights l, l+32, l+64, l+96); bit 2 in hmask: byte j % 32, bit j // 32.
      sc_j in -32..31 stored as sc_j + 32 (6 bits): low 4 bits in the low nibble of byte j
      (j < 8) or the high nibble of byte j - 8; high 2 bits in byte 8 + j % 4 at bit 2 * (j // 4).
  Q6_K (210 B, 6.5625 bpw)  ql[128] | qh[64] | scales[16] int8 | d
      q in -32..31 stored as L = q + 32 (6 bits). Per 128-weight half: ql byte l (0..63) holds the
      low 4 bits of weights l (bits 0-3) and l + 64 (bits 4-7); qh byte l (0..31) holds the high 2
      bits of weights l, l+32, l+64, l+96 at bits 0-1, 2-3, 4-5, 6-7.

Quantizer: search.fit_symmetric per sub-block (the codes' range is asymmetric, -4..3 and
-32..31: both ends are tried), the same search on the 16 float scales for d, then
superblock.finalize_symmetric. Default weights without an importance vector: x^2, as llama.cpp.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.gguf import search, superblock
from lowbit.formats.gguf.layout import QK_K, BlockLayout, Field, fp16_from_bytes, fp16_to_bytes, pack_planes, unpack_planes

_D = Field("d", 2, "fp16 super-scale")
Q3_K = BlockLayout("Q3_K", QK_K, (Field("hmask", 32, "bit 2 of the codes, weight j at byte j%32 bit j//32"),
                                  Field("qs", 64, "bits 0-1 of the codes, as Q2_K"),
                                  Field("scales", 12, "16 six-bit signed scales (+32), packed"), _D))
Q6_K = BlockLayout("Q6_K", QK_K, (Field("ql", 128, "low 4 bits, two planes of 64 per 128 weights"),
                                  Field("qh", 64, "high 2 bits, four planes of 32 per 128 weights"),
                                  Field("scales", 16, "int8 scale per sub-block of 16"), _D))

_SPEC = {  # name -> (code range, integer scale range); sub-blocks of 16 for both
    "Q3_K": ((-4, 3), (-32, 31)),
    "Q6_K": ((-32, 31), (-128, 127)),
}
_STAGE1_DELTAS = search.uniform_deltas(-1.0, 1.0, 0.1)
_STAGE2_DELTAS = search.uniform_deltas(-0.5, 0.5, 0.1)


# ---------------------------------------------------------------------------- Q3_K scale packing

def pack_scales_q3(stored: np.ndarray) -> np.ndarray:
    """stored = sc + 32, uint8 [n, 16] (0..63) -> uint8 [n, 12]."""
    n = stored.shape[0]
    low = pack_planes((stored & 0xF).reshape(n, 2, 8), 4)        # [n, 2 planes, 8] -> [n, 8]
    high = pack_planes((stored >> 4).reshape(n, 4, 4), 2)        # [n, 4 planes, 4] -> [n, 4]
    return np.concatenate([low, high], axis=1)


def unpack_scales_q3(packed: np.ndarray) -> np.ndarray:
    """uint8 [n, 12] -> stored = sc + 32, uint8 [n, 16]."""
    n = packed.shape[0]
    low = unpack_planes(packed[:, :8], 4).reshape(n, 16)
    high = unpack_planes(packed[:, 8:], 2).reshape(n, 16)
    return low | (high << 4)


# ---------------------------------------------------------------------------- quantizer

def default_weights(blocks: np.ndarray) -> np.ndarray:
    return blocks * blocks


def search_symmetric_superblocks(name: str, blocks: np.ndarray, weights: np.ndarray):
    """blocks, weights [S, 256] -> (d [S], sc [S, 16] int, q [S, 256] int) as numpy arrays."""
    (qlo, qhi), (sclo, schi) = _SPEC[name]
    S = blocks.shape[0]
    x = torch.from_numpy(blocks).reshape(S, 16, 16)              # [S, sub-block, weight]
    w = torch.from_numpy(weights).reshape(S, 16, 16)
    q_levels = torch.arange(qlo, qhi + 1, dtype=torch.float32)
    s, idx = search.fit_symmetric(x.reshape(-1, 16), w.reshape(-1, 16), q_levels, _STAGE1_DELTAS)
    s, lv = s.reshape(S, 16), q_levels[idx].reshape(S, 16, 16)
    cost_s = (w * lv * lv).sum(-1)  # what an error in a sub-block's scale costs
    d, _ = search.fit_symmetric(s, cost_s, torch.arange(sclo, schi + 1, dtype=torch.float32), _STAGE2_DELTAS)
    d, sc, q = superblock.finalize_symmetric(x, w, s, d, (qlo, qhi), (sclo, schi))
    return d.numpy(), sc.numpy().astype(np.int32), q.reshape(S, QK_K).numpy().astype(np.int32)


CODE_MAX = {"Q3_K": 7, "Q6_K": 63}  # unsigned codes L = q + 4 (Q3_K), q + 32 (Q6_K)
_LAYOUTS = {"Q3_K": Q3_K, "Q6_K": Q6_K}


def _code_parts(name: str, L: np.ndarray) -> dict[str, np.ndarray]:
    """unsigned codes uint8 [S, 256] -> the layout's code fields."""
    S = L.shape[0]
    if name == "Q3_K":
        return {"hmask": pack_planes((L >> 2).reshape(S, 8, 32), 1),                   # [S, plane, 32]
                "qs": pack_planes((L & 3).reshape(S, 2, 4, 32), 2).reshape(S, 64)}     # [S, half, plane, 32]
    return {"ql": pack_planes((L & 0xF).reshape(S, 2, 2, 64), 4).reshape(S, 128),      # [S, half, plane, 64]
            "qh": pack_planes((L >> 4).reshape(S, 2, 4, 32), 2).reshape(S, 64)}        # [S, half, plane, 32]


def quantize_kquant_symmetric(name: str, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        weights = default_weights(blocks)
    d, sc, q = search_symmetric_superblocks(name, blocks, weights)
    L = (q + (4 if name == "Q3_K" else 32)).astype(np.uint8)
    scales = pack_scales_q3((sc + 32).astype(np.uint8)) if name == "Q3_K" else sc.astype(np.int8).view(np.uint8)
    return _LAYOUTS[name].join({**_code_parts(name, L), "scales": scales, "d": fp16_to_bytes(d)})


def set_codes(name: str, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """blocks uint8 [S, bytes] with their codes replaced by unsigned `codes` uint8 [S, 256] (scales kept)."""
    layout = _LAYOUTS[name]
    return layout.join({**layout.split(blocks), **_code_parts(name, codes)})


# ---------------------------------------------------------------------------- dequantizers

def _dequantize(d, sc, q):
    """ggml's arithmetic: (d * sc) * q in float32, sub-blocks of 16."""
    S = q.shape[0]
    step = (d * sc.astype(np.float32)).reshape(S, 16, 1)
    return (step * q.reshape(S, 16, 16).astype(np.float32)).reshape(S, QK_K)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    p = Q3_K.split(blocks)
    S = blocks.shape[0]
    low = unpack_planes(p["qs"].reshape(S, 2, 32), 2).reshape(S, QK_K)
    high = unpack_planes(p["hmask"], 1).reshape(S, QK_K)
    sc = unpack_scales_q3(p["scales"]).astype(np.int16) - 32
    return _dequantize(fp16_from_bytes(p["d"]), sc, (low | (high << 2)).astype(np.int16) - 4)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    p = Q6_K.split(blocks)
    S = blocks.shape[0]
    low = unpack_planes(p["ql"].reshape(S, 2, 64), 4).reshape(S, QK_K)
    high = unpack_planes(p["qh"].reshape(S, 2, 32), 2).reshape(S, QK_K)
    sc = np.ascontiguousarray(p["scales"]).view(np.int8)
    return _dequantize(fp16_from_bytes(p["d"]), sc, (low | (high << 4)).astype(np.int16) - 32)
