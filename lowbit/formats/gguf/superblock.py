"""The K-quant super-block search shared by Q2_K..Q6_K (torch, vectorised over super-blocks).

A super-block of 256 weights is J sub-blocks of n weights. Each sub-block j has a float scale
s_j (and, for the affine types, a min m_j >= 0) found by `search.fit_*`; the file stores them as
small integers times one fp16 super-scale: s_j ~ d * sc_j, m_j ~ dmin * mq_j. Then

  symmetric (Q3_K, Q6_K):  x ~ (d * sc_j) * q                  q, sc_j signed
  affine (Q2_K/Q4_K/Q5_K): x ~ (d * sc_j) * q - (dmin * mq_j)   q, sc_j, mq_j unsigned

llama.cpp picks d (dmin) by a weighted fit of the float scales (make_qp_quants / make_qx_quants
on the scales), rounds each sc_j to nearest and re-rounds the codes. Here the fit of the scales
is the same kind of search (weights: how much each sub-block's scale error costs), then each
sub-block chooses floor or ceil of its scale ratio (and of its min ratio) by the exact weighted
error after re-rounding its codes, and d (dmin) are refit by least squares on the final codes
and kept only where the whole super-block's error drops. Arithmetic follows ggml's dequantizer
(float32 d*sc first, then times q), so the error judged here is the error of the stored bytes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.gguf.search import fp16_round, round_clamp_
from lowbit.formats.gguf.search import safe_inverse as _safe_inv

REFIT_ROUNDS = 2


def _ratio_options(value: Tensor, unit: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """value [S, J] / unit [S] -> (floor, floor + 1) of the ratio, clamped to [lo, hi]."""
    r = torch.floor(value * _safe_inv(unit)[:, None])
    return r.clamp(lo, hi), (r + 1).clamp(lo, hi)


# ---------------------------------------------------------------------------- symmetric

def _sym_codes_err(x, w, d, sc, qlo, qhi):
    step = d[:, None] * sc                                             # [S, J], as ggml: d * sc
    q = round_clamp_(x * _safe_inv(step)[..., None], qlo, qhi)
    err = (w * (step[..., None] * q - x) ** 2).sum(-1)
    return q, err


def _sym_pick(x, w, s, d, qlo, qhi, sc_lo, sc_hi, keep_sc=None):
    """Per sub-block integer scale (floor/ceil of s/d, or keep_sc) with the lowest error."""
    options = _ratio_options(s, d, sc_lo, sc_hi) if keep_sc is None else (keep_sc,)
    best = None
    for sc in options:
        q, err = _sym_codes_err(x, w, d, sc, qlo, qhi)
        if best is None:
            best = [sc, q, err]
            continue
        better = err < best[2]
        best = [torch.where(better, sc, best[0]), torch.where(better[..., None], q, best[1]),
                torch.minimum(err, best[2])]
    return best


def finalize_symmetric(x: Tensor, w: Tensor, s: Tensor, d: Tensor, q_range: tuple[int, int],
                       sc_range: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """x, w [S, J, n]; float sub-block scales s [S, J]; a first super-scale d [S].

    Returns (d [S] fp16-exact, sc [S, J] integer-valued, q [S, J, n] integer-valued)."""
    qlo, qhi = q_range
    d16 = fp16_round(d)
    sc, q, err = _sym_pick(x, w, s, d16, qlo, qhi, *sc_range)
    total = err.sum(-1)
    for _ in range(REFIT_ROUNDS):
        A = sc[..., None] * q                                          # [S, J, n] integer products
        num, den = (w * x * A).sum((1, 2)), (w * A * A).sum((1, 2))
        d_new = fp16_round(torch.where(den > 0, num * _safe_inv(den), d16))
        improved = False
        for keep in (sc, None):  # the same integer scales, or re-chosen ones, under the new d
            sc2, q2, err2 = _sym_pick(x, w, s, d_new, qlo, qhi, *sc_range, keep_sc=keep)
            t2 = err2.sum(-1)
            better = t2 < total
            if bool(better.any()):
                improved = True
                d16 = torch.where(better, d_new, d16)
                sc = torch.where(better[:, None], sc2, sc)
                q = torch.where(better[:, None, None], q2, q)
                total = torch.where(better, t2, total)
        if not improved:
            break
    return d16, sc, q


# ---------------------------------------------------------------------------- affine

def _aff_codes_err(x, w, d, sc, dmin, mq, nmax):
    step = d[:, None] * sc                                             # [S, J]
    off = dmin[:, None] * mq                                           # [S, J], subtracted
    q = round_clamp_((x + off[..., None]) * _safe_inv(step)[..., None], 0, nmax)
    err = (w * (step[..., None] * q - off[..., None] - x) ** 2).sum(-1)
    return q, err


def _aff_pick(x, w, s, m, d, dmin, nmax, sc_max, keep=None):
    """Per sub-block (sc, mq) among floor/ceil of s/d and m/dmin (or `keep`), lowest error."""
    if keep is None:
        sc_opts, m_opts = _ratio_options(s, d, 0, sc_max), _ratio_options(m, dmin, 0, sc_max)
        options = [(a, b) for a in sc_opts for b in m_opts]
    else:
        options = [keep]
    best = None
    for sc, mq in options:
        q, err = _aff_codes_err(x, w, d, sc, dmin, mq, nmax)
        if best is None:
            best = [sc, mq, q, err]
            continue
        better = err < best[3]
        best = [torch.where(better, sc, best[0]), torch.where(better, mq, best[1]),
                torch.where(better[..., None], q, best[2]), torch.minimum(err, best[3])]
    return best


def _affine_refit(x, w, sc, mq, q, d, dmin):
    """Weighted least squares for (d, dmin) in x ~ d * (sc q) - dmin * mq, dmin >= 0, per super-block."""
    A, B = sc[..., None] * q, mq[..., None].expand_as(q)
    saa, sbb, sab = (w * A * A).sum((1, 2)), (w * B * B).sum((1, 2)), (w * A * B).sum((1, 2))
    sxa, sxb = (w * x * A).sum((1, 2)), (w * x * B).sum((1, 2))
    det = sab * sab - saa * sbb
    d_new = torch.where(det != 0, (sab * sxb - sxa * sbb) * _safe_inv(det), sxa * _safe_inv(saa))
    e_new = torch.where(det != 0, (saa * sxb - sab * sxa) * _safe_inv(det), torch.zeros_like(d))
    clip = e_new < 0
    d_new = torch.where(clip, sxa * _safe_inv(saa), d_new)
    e_new = torch.where(clip, 0.0, e_new)
    usable = (saa > 0) & (d_new > 0)
    return torch.where(usable, d_new, d), torch.where(usable, e_new, dmin)


def finalize_affine(x: Tensor, w: Tensor, s: Tensor, m: Tensor, d: Tensor, dmin: Tensor, nmax: int,
                    sc_max: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x, w [S, J, n]; float scales s and mins m >= 0 [S, J]; first d, dmin [S].

    Returns (d, dmin [S] fp16-exact, sc, mq [S, J], q [S, J, n]), all integer-valued floats."""
    d16, m16 = fp16_round(d), fp16_round(dmin)
    sc, mq, q, err = _aff_pick(x, w, s, m, d16, m16, nmax, sc_max)
    total = err.sum(-1)
    for _ in range(REFIT_ROUNDS):
        d_ls, m_ls = _affine_refit(x, w, sc, mq, q, d16, m16)
        d_new, m_new = fp16_round(d_ls), fp16_round(m_ls)
        improved = False
        for keep in ((sc, mq), None):
            sc2, mq2, q2, err2 = _aff_pick(x, w, s, m, d_new, m_new, nmax, sc_max, keep=keep)
            t2 = err2.sum(-1)
            better = t2 < total
            if bool(better.any()):
                improved = True
                d16, m16 = torch.where(better, d_new, d16), torch.where(better, m_new, m16)
                sc, mq = torch.where(better[:, None], sc2, sc), torch.where(better[:, None], mq2, mq)
                q = torch.where(better[:, None, None], q2, q)
                total = torch.where(better, t2, total)
        if not improved:
            break
    return d16, m16, sc, mq, q
