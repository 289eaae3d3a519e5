"""K-quants with a scale and a min per sub-block: Q2_K, Q4_K, Q5_K (256-weight super-blocks).

  w = (d * sc_j) * q - (dmin * m_j)       d, dmin: fp16;  sc_j, m_j: unsigned integers

Byte layouts (little-endian):
  Q2_K (84 B, 2.625 bpw)  scales[16] | qs[64] | d | dmin
      16 sub-blocks of 16. scales byte j = sc_j (bits 0-3) | m_j (bits 4-7). q 2-bit: in each
      128-weight half, qs byte l holds weights l, l+32, l+64, l+96 at bits 0-1, 2-3, 4-5, 6-7.
  Q4_K (144 B, 4.5 bpw)   d | dmin | scales[12] | qs[128]
      8 sub-blocks of 32; sc_j, m_j 6-bit, packed in 12 bytes (below). q 4-bit: in each
      64-weight chunk, qs byte l holds weight l (bits 0-3) and weight l + 32 (bits 4-7).
  Q5_K (176 B, 5.5 bpw)   d | dmin | scales[12] | qh[32] | qs[128]
      as Q4_K for the low 4 bits; qh byte l bit k = bit 4 of weight 32k + l.
6-bit scale packing (j = 0..3):  byte j = sc_j | (sc_{j+4} >> 4) << 6;  byte j+4 = m_j | (m_{j+4} >> 4) << 6;
byte j+8 = (sc_{j+4} & 15) | (m_{j+4} & 15) << 4.

Quantizer: search.fit_affine per sub-block (float scale, min), then superblock.finalize_affine.
Default weights without an importance vector, as llama.cpp's reference: Q2_K |x|, Q4_K/Q5_K
rms(sub-block) + |x|.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.gguf import search, superblock
from lowbit.formats.gguf.layout import (QK_K, BlockLayout, Field, fp16_from_bytes, fp16_to_bytes, pack_planes,
                                        unpack_planes)

_D, _DMIN = Field("d", 2, "fp16 super-scale of the sub-block scales"), Field("dmin", 2, "fp16 super-scale of the mins")
_SCALES12 = Field("scales", 12, "8 six-bit scales and 8 six-bit mins, packed")

Q2_K = BlockLayout("Q2_K", QK_K, (Field("scales", 16, "4-bit scale | 4-bit min << 4 per sub-block of 16"),
                                  Field("qs", 64, "2-bit codes, four planes of 32 per 128 weights"), _D, _DMIN))
Q4_K = BlockLayout("Q4_K", QK_K, (_D, _DMIN, _SCALES12, Field("qs", 128, "4-bit codes, two planes of 32 per 64")))
Q5_K = BlockLayout("Q5_K", QK_K, (_D, _DMIN, _SCALES12, Field("qh", 32, "bit 4 of weight 32k + l at byte l bit k"),
                                  Field("qs", 128, "low 4 bits, as Q4_K")))

_SPEC = {  # name -> (sub-block size, max code, max integer scale / min)
    "Q2_K": (16, 3, 15),
    "Q4_K": (32, 15, 63),
    "Q5_K": (32, 31, 63),
}
_STAGE1_DELTAS = search.uniform_deltas(-1.0, 1.0, 0.1)
_STAGE2_DELTAS = search.uniform_deltas(-0.5, 0.5, 0.1)


# ---------------------------------------------------------------------------- scale packing

def pack_scales_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """sc, mn uint8 [n, 8] (0..63) -> uint8 [n, 12]."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return np.concatenate([lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6),
                           (hi_sc & 0xF) | ((hi_m & 0xF) << 4)], axis=1).astype(np.uint8)


def unpack_scales_6bit(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 12] -> (sc, mn) uint8 [n, 8]."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


# ---------------------------------------------------------------------------- quantizer

def default_weights(name: str, blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's weighting without an importance vector, blocks [n, 256] -> [n, 256]."""
    if name == "Q2_K":
        return np.abs(blocks)
    n_sub = _SPEC[name][0]
    sub = blocks.reshape(blocks.shape[0], -1, n_sub)             # [n, J, n_sub]
    rms = np.sqrt((sub * sub).mean(axis=-1, keepdims=True))
    return (rms + np.abs(sub)).reshape(blocks.shape)


def search_affine_superblocks(name: str, blocks: np.ndarray, weights: np.ndarray):
    """blocks, weights [S, 256] -> (d, dmin [S], sc, mq [S, J], q [S, 256]) as numpy arrays."""
    n_sub, nmax, sc_max = _SPEC[name]
    S = blocks.shape[0]
    x = torch.from_numpy(blocks).reshape(S, -1, n_sub)            # [S, J, n_sub]
    w = torch.from_numpy(weights).reshape(S, -1, n_sub)
    J = x.shape[1]
    s, o, q = search.fit_affine(x.reshape(-1, n_sub), w.reshape(-1, n_sub), nmax, _STAGE1_DELTAS)
    s, m, q = s.reshape(S, J), (-o).reshape(S, J), q.reshape(S, J, n_sub)
    # how much an error in a sub-block's scale / min costs: sum w q^2 / sum w
    cost_s, cost_m = (w * q * q).sum(-1), w.sum(-1)
    levels = torch.arange(sc_max + 1, dtype=torch.float32)
    d, _ = search.fit_symmetric(s, cost_s, levels, _STAGE2_DELTAS)
    dmin, _ = search.fit_symmetric(m, cost_m, levels, _STAGE2_DELTAS)
    d, dmin, sc, mq, q = superblock.finalize_affine(x, w, s, m, d, dmin, nmax, sc_max)
    u8 = lambda t: t.numpy().astype(np.uint8)  # noqa: E731
    return d.numpy(), dmin.numpy(), u8(sc), u8(mq), u8(q.reshape(S, QK_K))


CODE_MAX = {name: spec[1] for name, spec in _SPEC.items()}
_LAYOUTS = {"Q2_K": Q2_K, "Q4_K": Q4_K, "Q5_K": Q5_K}


def _code_parts(name: str, q: np.ndarray) -> dict[str, np.ndarray]:
    """codes uint8 [S, 256] -> the layout's code fields."""
    S = q.shape[0]
    if name == "Q2_K":
        return {"qs": pack_planes(q.reshape(S, 2, 4, 32), 2).reshape(S, 64)}        # [S, half, plane, 32]
    parts = {"qs": pack_planes((q & 0xF).reshape(S, 4, 2, 32), 4).reshape(S, 128)}  # [S, chunk, plane, 32]
    if name == "Q5_K":
        parts["qh"] = pack_planes((q >> 4).reshape(S, 8, 32), 1)                    # [S, plane, 32]
    return parts


def quantize_kquant_affine(name: str, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        weights = default_weights(name, blocks)
    d, dmin, sc, mq, q = search_affine_superblocks(name, blocks, weights)
    parts = {"d": fp16_to_bytes(d), "dmin": fp16_to_bytes(dmin), **_code_parts(name, q)}
    parts["scales"] = sc | (mq << 4) if name == "Q2_K" else pack_scales_6bit(sc, mq)
    return _LAYOUTS[name].join(parts)


def set_codes(name: str, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """blocks uint8 [S, bytes] with their codes replaced by `codes` uint8 [S, 256] (scales and mins kept)."""
    layout = _LAYOUTS[name]
    return layout.join({**layout.split(blocks), **_code_parts(name, codes)})


# ---------------------------------------------------------------------------- dequantizers

def _dequantize(d, dmin, sc, mn, q, n_sub):
    """ggml's arithmetic: (d * sc) * q - (dmin * m), float32, per sub-block."""
    S = q.shape[0]
    step = (d * sc.astype(np.float32)).reshape(S, -1, 1)
    off = (dmin * mn.astype(np.float32)).reshape(S, -1, 1)
    return (step * q.reshape(S, -1, n_sub).astype(np.float32) - off).reshape(S, QK_K)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    p = Q2_K.split(blocks)
    q = unpack_planes(p["qs"].reshape(-1, 2, 32), 2).reshape(-1, QK_K)
    return _dequantize(fp16_from_bytes(p["d"]), fp16_from_bytes(p["dmin"]), p["scales"] & 0xF, p["scales"] >> 4, q, 16)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    p = Q4_K.split(blocks)
    sc, mn = unpack_scales_6bit(p["scales"])
    q = unpack_planes(p["qs"].reshape(-1, 4, 32), 4).reshape(-1, QK_K)
    return _dequantize(fp16_from_bytes(p["d"]), fp16_from_bytes(p["dmin"]), sc, mn, q, 32)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    p = Q5_K.split(blocks)
    sc, mn = unpack_scales_6bit(p["scales"])
    low = unpack_planes(p["qs"].reshape(-1, 4, 32), 4).reshape(-1, QK_K)
    high = unpack_planes(p["qh"], 1).reshape(-1, QK_K)
    return _dequantize(fp16_from_bytes(p["d"]), fp16_from_bytes(p["dmin"]), sc, mn, low | (high << 4), 32)
