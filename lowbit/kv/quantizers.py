"""The KV cache's quantizers as pure functions on the last dimension, reference implementations.

Each returns a `Codes` (packed codes and the float16 side data a cache stores) and has its
de-quantizer. Scales and offsets are rounded to float16 *before* the codes are chosen, so what is
de-quantized from the stored bytes is exactly what the reference computes.

  int:        groups of `group` consecutive values; asymmetric: x ≈ lo + c·s with c in [0, 2^b − 1],
              s = (max − min)/(2^b − 1); symmetric: x ≈ (c − m)·s, m = 2^(b−1) − 1, s = absmax/m.
  turboquant: x = ‖x‖·u; u rotated by an orthogonal Π (a randomized Hadamard), each rotated
              coordinate mapped to the nearest Lloyd–Max level for its distribution (lloyd_max.py);
              with `qjl`, one of the bits goes to QJL: the signs of S·r for the rotated residual r
              (S Gaussian [d, d]) and ‖r‖, from which ‖r‖·√(π/2)/d · Sᵀ sign(S r) estimates r
              without bias, so inner products with the de-quantized vector are unbiased.
              With `norm_correct` (vectors without QJL) the stored norm is ‖x‖·‖u‖²/⟨u, û⟩ instead of
              ‖x‖ (û: the levels chosen): Lloyd–Max levels are conditional means, so the reconstruction
              is shrunk along x by ⟨u, û⟩ ≈ 1 − D(b) (D: the codebook's distortion per unit norm);
              rescaled, ⟨x̂, x⟩ = ‖x‖² for every vector, and the attention scores (K) and outputs (V)
              it feeds lose that systematic shrinkage (a softmax temperature error for K).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .lloyd_max import lloyd_max
from .packing import pack_codes, packed_bytes, unpack_codes


@dataclass
class Codes:
    """One quantized tensor [..., n]: packed codes [..., bytes] and float16 side data."""

    packed: Tensor
    bits: int
    n: int
    side: dict[str, Tensor]             # scale / offset / norm / ... (float16, or packed uint8 "signs")

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + sum(
            t.numel() * t.element_size() for t in self.side.values())


def _f16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (exactness tests), everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def int_quantize(x: Tensor, bits: int, group: int, symmetric: bool = False) -> Codes:
    """x [..., n] (n a multiple of group) -> Codes with side scale (and offset) [..., n/group]."""
    n = x.shape[-1]
    if n % group:
        raise ValueError(f"{n} values do not split into groups of {group}")
    if symmetric and bits < 2:
        raise ValueError("a symmetric integer grid needs at least 2 bits")
    g = x.float().reshape(*x.shape[:-1], n // group, group)            # [..., n] -> [..., groups, group]
    if symmetric:
        m = (1 << (bits - 1)) - 1
        scale = _f16(g.abs().amax(-1) / m).clamp_min(1e-8)              # [..., groups]
        codes = (torch.round(g / scale[..., None]) + m).clamp(0, 2 * m)
        side = {"scale": scale.half()}
    else:
        top = (1 << bits) - 1
        lo, hi = _f16(g.amin(-1)), g.amax(-1)
        scale = _f16((hi - lo) / top).clamp_min(1e-8)
        codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, top)
        side = {"scale": scale.half(), "offset": lo.half()}
    return Codes(pack_codes(codes.reshape(x.shape).to(torch.uint8), bits), bits, n, side)


def int_dequantize(q: Codes, symmetric: bool = False) -> Tensor:
    """float32 [..., n] from int_quantize's Codes."""
    codes = unpack_codes(q.packed, q.bits, q.n).float()
    scale = q.side["scale"].float()
    group = q.n // scale.shape[-1]
    g = codes.reshape(*codes.shape[:-1], -1, group)                    # [..., n] -> [..., groups, group]
    if symmetric:
        out = (g - ((1 << (q.bits - 1)) - 1)) * scale[..., None]
    else:
        out = q.side["offset"].float()[..., None] + g * scale[..., None]
    return out.reshape(codes.shape)


def qjl_matrix(d: int, seed: int) -> Tensor:
    """S [d, d] with i.i.d. N(0, 1) entries (float32), seeded."""
    return torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def turboquant(x: Tensor, rotation: Tensor, bits: int, S: Tensor | None = None, norm_correct: bool = False) -> Codes:
    """x [..., d] -> Codes: codes of Lloyd–Max levels for the rotated unit vector, its norm, and with
    S ([d, d], QJL) the residual's signs and norm (then bits − 1 bits go to the levels); norm_correct
    (without S): the norm stored so that ⟨x̂, x⟩ = ‖x‖² (module docstring)."""
    d = x.shape[-1]
    level_bits = bits - 1 if S is not None else bits
    if level_bits < 1:
        raise ValueError(f"turboquant with QJL needs at least 2 bits, got {bits}")
    dt = compute_dtype(x)
    levels, bounds = (t.to(dt) for t in lloyd_max(d, level_bits))
    x = x.to(dt)
    norm = _f16(x.norm(dim=-1, keepdim=True)).to(dt)                    # [..., 1]
    u = (x / norm.clamp_min(1e-12)) @ rotation.to(dt).T                 # rotated unit vector [..., d]
    codes = torch.bucketize(u, bounds)                                  # nearest level (cells split at midpoints)
    side = {"norm": norm.half()}
    if norm_correct and S is None:
        u_hat = levels[codes]                                           # [..., d] the reconstruction, unit scale
        shrink = (u * u_hat).sum(-1, keepdim=True) / u.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
        side["norm"] = (norm / shrink.clamp_min(1e-6)).half()           # a zero vector stays zero
    if S is not None:
        r = u - levels[codes]                                           # residual in the rotated unit space
        side["signs"] = pack_codes((r @ S.to(dt).T > 0).to(torch.uint8), 1)   # [..., d/8] bytes
        side["residual_norm"] = r.norm(dim=-1, keepdim=True).half()
    return Codes(pack_codes(codes.to(torch.uint8), level_bits), level_bits, d, side)


def turboquant_dequantize(q: Codes, rotation: Tensor, S: Tensor | None = None,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """[..., d] (dtype) from turboquant's Codes (S: the same QJL matrix, when it was used)."""
    d = q.n
    levels, _ = lloyd_max(d, q.bits)
    u = levels.to(dtype)[unpack_codes(q.packed, q.bits, d).long()]      # [..., d] rotated, unit scale
    if S is not None:
        signs = unpack_codes(q.side["signs"], 1, d).to(dtype) * 2 - 1   # [..., d] in {−1, +1}
        u = u + q.side["residual_norm"].to(dtype) * math.sqrt(math.pi / 2) / d * (signs @ S.to(dtype))
    return (u @ rotation.to(dtype)) * q.side["norm"].to(dtype)


def turboquant_bits(d: int, bits: int, qjl: bool) -> float:
    """Stored bits per value of one turboquant part: the codes, the norm, and QJL's residual norm."""
    return bits + 16 / d + (16 / d if qjl else 0.0)


def int_bits(bits: int, group: int, symmetric: bool) -> float:
    """Stored bits per value of int_quantize: codes plus float16 scale (and offset) per group."""
    return bits + (16 if symmetric else 32) / group


def packed_size(shape: tuple[int, ...], bits: int) -> int:
    """Bytes of the packed codes of a [..., n] tensor."""
    rows = math.prod(shape[:-1])
    return rows * packed_bytes(shape[-1], bits)
