"""Weighted scale searches shared by the GGUF types, vectorised over blocks (torch, float32).

Every search minimises a weighted squared error  sum_i w_i (x_i - xhat_i)^2  over one small group
of weights x (a 32-weight block or a 16/32-weight K-quant sub-block). With w = the importance
(imatrix: per input column the mean of a^2 over calibration tokens) this is the diagonal
approximation of the layer's output error E[(a . (w - what))^2].

The pattern is llama.cpp's (make_qx_quants / make_qkx3_quants / make_qp_quants): try a grid of
inverse scales that put the group's extreme value on or near an end level, round to the levels,
solve the best scale (and offset) for those codes in closed form, keep the best candidate. Here the
grid is wider (both ends, finer steps), every candidate is judged by the exact weighted error, and
the winner is polished by re-rounding with its own least-squares scale until it stops improving.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 19  # candidates x weights at once: small temporaries stay in cache
_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds float32 v to nearest even, |v| < 2**22


def as_tensor(a) -> Tensor:
    return a if isinstance(a, Tensor) else torch.from_numpy(a)


def fp16_round(t: Tensor) -> Tensor:
    """The float32 value an fp16 field will hold (round to nearest even)."""
    return t.to(torch.float16).to(torch.float32)


def safe_inverse(t: Tensor) -> Tensor:
    """1 / t, and 0 where t == 0."""
    nz = t != 0
    return torch.where(nz, 1 / torch.where(nz, t, 1.0), 0.0)


def round_clamp_(v: Tensor, lo: float, hi: float) -> Tensor:
    """In place: v -> nearest integer in [lo, hi] (ties to even), as float. Clamping first is
    the same for integer bounds and keeps the rounding trick in range."""
    return v.clamp_(lo, hi).add_(_MAGIC).sub_(_MAGIC)


def is_uniform(levels: Tensor) -> bool:
    """True for consecutive integer levels (a clamp of round() finds the nearest)."""
    return bool(torch.equal(levels, torch.arange(levels.numel(), dtype=levels.dtype) + levels[0]))


def _half_step_table(levels: Tensor) -> Tensor:
    """Integer levels -> table[k] = index of the nearest level to any v with floor(2 v) = 2 lo + k.

    Midpoints of integer levels are multiples of 1/2, so floor(2 v) decides the nearest level
    (a v exactly on a midpoint goes up: both neighbours are equally near)."""
    lo, hi = int(levels[0]), int(levels[-1])
    half = torch.arange(2 * lo, 2 * hi + 1, dtype=torch.float32) / 2 + 0.25  # one probe per half step
    return torch.bucketize(half, (levels[1:] + levels[:-1]) / 2)


def nearest_level(v: Tensor, levels: Tensor) -> Tensor:
    """v [...] -> index [...] (int64) of the nearest entry of the sorted `levels`."""
    lo, hi = float(levels[0]), float(levels[-1])
    if is_uniform(levels):
        return round_clamp_(v - lo, 0, levels.numel() - 1).long()
    if bool((levels == levels.round()).all()):
        k = v.clamp(lo, hi).mul_(2).floor_().sub_(2 * lo).long()
        return _half_step_table(levels)[k]
    return torch.bucketize(v.contiguous(), (levels[1:] + levels[:-1]) / 2)


def _to_levels_(v: Tensor, levels: Tensor, uniform: bool) -> Tensor:
    """v -> the nearest level's value (in place where the levels are uniform)."""
    if uniform:
        return round_clamp_(v, float(levels[0]), float(levels[-1]))
    return levels[nearest_level(v, levels)]


def _chunks(n_groups: int, per_group: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_group))
    for start in range(0, n_groups, step):
        yield slice(start, min(n_groups, start + step))


def _wsum(v: Tensor, w: Tensor) -> Tensor:
    """sum_n v[g, c, n] * w[g, n] -> [g, c], as a batched matrix-vector product."""
    return torch.bmm(v, w.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------- symmetric: x ~ s * level

def _symmetric_score(x: Tensor, w: Tensor, lv: Tensor) -> tuple[Tensor, Tensor]:
    """Codes' values lv [G, n] -> (least-squares scale, explained energy (sum w x l)^2 / sum w l^2)."""
    sumlx, suml2 = (w * x * lv).sum(-1), (w * lv * lv).sum(-1)
    scale = sumlx * safe_inverse(suml2)
    return scale, scale * sumlx


def fit_symmetric(x: Tensor, w: Tensor, levels: Tensor, deltas: Tensor, polish: int = 3) -> tuple[Tensor, Tensor]:
    """Best scale s for x ~ s * levels[idx] under weights w, per group.

    x, w [G, n] float32; levels [L] sorted; deltas [D] offsets (in level units) around the end
    levels at which the group's largest-magnitude value is placed (both ends are tried: the
    negative end of an asymmetric range like -8..7 has one more level). Returns (scale [G]
    signed, idx [G, n] int64). Minimising sum w (x - s l)^2 over s for fixed codes leaves
    sum w x^2 - (sum w x l)^2 / sum w l^2, so candidates are ranked by the explained part."""
    x, w, levels, deltas = (as_tensor(t).float() for t in (x, w, levels, deltas))
    uniform = is_uniform(levels)
    G, n = x.shape
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed largest magnitude [G]
    targets = torch.cat([levels[0] + deltas, levels[-1] + deltas])      # [C]
    targets = targets[targets != 0]
    wx = w * x
    best_scale, best_score = torch.zeros(G), torch.full((G,), -1.0)
    for sl in _chunks(G, targets.numel() * n):
        iscale = targets[None, :] * safe_inverse(peak[sl])[:, None]       # [g, C]
        lv = _to_levels_(x[sl, None, :] * iscale[:, :, None], levels, uniform)  # [g, C, n]
        sumlx = _wsum(lv, wx[sl])
        suml2 = _wsum(lv.mul_(lv), w[sl])  # two products: lv is not needed afterwards
        scale = sumlx * safe_inverse(suml2)
        score = scale * sumlx
        pick = score.argmax(-1, keepdim=True)                             # [g, 1]
        best_scale[sl] = scale.gather(-1, pick).squeeze(-1)
        best_score[sl] = score.gather(-1, pick).squeeze(-1)
    for _ in range(polish):  # re-round with the fitted scale, refit; keep only improvements
        lv = _to_levels_(x * safe_inverse(best_scale)[:, None], levels, uniform)
        scale, score = _symmetric_score(x, w, lv)
        better = score > best_score
        if not bool(better.any()):
            break
        best_scale = torch.where(better, scale, best_scale)
        best_score = torch.where(better, score, best_score)
    return best_scale, nearest_level(x * safe_inverse(best_scale)[:, None], levels)


# ---------------------------------------------------------------------------- affine: x ~ s * q + o

def _affine_fit(sw, sx, sxx, sl, sll, slx, nonpositive_offset: bool):
    """Weighted sums -> least-squares (scale, offset) and the error they leave.

    Where the normal equations hold (always, for the parameters that are free) the error
    sum w (s q + o - x)^2 reduces to sxx - s * slx - o * sx."""
    det = sw * sll - sl * sl
    ok = det > 0
    inv_det = safe_inverse(torch.where(ok, det, 0.0))
    scale = torch.where(ok, (sw * slx - sx * sl) * inv_det, 0.0)
    offset = torch.where(ok, (sll * sx - sl * slx) * inv_det, sx * safe_inverse(sw))
    if nonpositive_offset:  # K-quants store -dmin*m with m >= 0: the offset cannot be positive
        clip = offset > 0
        offset = torch.where(clip, 0.0, offset)
        scale = torch.where(clip, slx * safe_inverse(sll), scale)
    return scale, offset, (sxx - scale * slx - offset * sx).clamp_min(0)


def _affine_codes(x: Tensor, scale: Tensor, offset: Tensor, nmax: int) -> Tensor:
    return round_clamp_((x - offset[..., None]) * safe_inverse(scale.clamp_min(0))[..., None], 0, nmax)


def fit_affine(x: Tensor, w: Tensor, nmax: int, deltas: Tensor, nonpositive_offset: bool = True,
               polish: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Best (scale s >= 0, offset o) for x ~ s * q + o, q in 0..nmax, under weights w, per group.

    x, w [G, n] float32; deltas [D]: the range [min, max] is mapped onto nmax + delta steps.
    With nonpositive_offset the minimum is taken with 0 included and o <= 0 (ggml's K-quants).
    Returns (scale [G], offset [G], q [G, n] float codes)."""
    x, w, deltas = (as_tensor(t).float() for t in (x, w, deltas))
    G, n = x.shape
    lo, hi = x.amin(-1), x.amax(-1)
    if nonpositive_offset:
        lo = lo.clamp_max(0)
    flat = hi <= lo  # constant group: exact with scale 0 and offset = the value
    inv_span = safe_inverse(torch.where(flat, 0.0, hi - lo))
    wx = w * x
    sw, sx, sxx = w.sum(-1), wx.sum(-1), (wx * x).sum(-1)
    scale, offset, err = torch.zeros(G), lo.clone(), torch.zeros(G)
    for sl in _chunks(G, deltas.numel() * n):
        iscale = (nmax + deltas)[None, :] * inv_span[sl, None]                    # [g, C]
        q = round_clamp_((x[sl] - lo[sl, None])[:, None, :] * iscale[..., None], 0, nmax)  # [g, C, n]
        sums = torch.bmm(q, torch.stack([w[sl], wx[sl]], -1))               # [g, C, 2]
        sl_, slx = sums[..., 0], sums[..., 1]
        sll = _wsum(q.mul_(q), w[sl])
        c = [t[sl, None] for t in (sw, sx, sxx)]
        s_c, o_c, e_c = _affine_fit(*c, sl_, sll, slx, nonpositive_offset)
        pick = e_c.argmin(-1, keepdim=True)
        scale[sl], offset[sl], err[sl] = (t.gather(-1, pick).squeeze(-1) for t in (s_c, o_c, e_c))
    scale, offset, err = torch.where(flat, 0.0, scale), torch.where(flat, lo, offset), torch.where(flat, 0.0, err)
    for _ in range(polish):
        q = _affine_codes(x, scale, offset, nmax)
        wq = w * q
        s2, o2, e2 = _affine_fit(sw, sx, sxx, wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1), nonpositive_offset)
        better = (e2 < err) & ~flat
        if not bool(better.any()):
            break
        scale, offset, err = (torch.where(better, a, b) for a, b in ((s2, scale), (o2, offset), (e2, err)))
    return scale, offset, _affine_codes(x, scale, offset, nmax)


def uniform_deltas(lo: float, hi: float, step: float) -> Tensor:
    """The grid lo, lo + step, ..., hi (inclusive), float32."""
    n = int(round((hi - lo) / step)) + 1
    return torch.linspace(lo, hi, n)
