"""The weighted scale searches behind the GGUF quantizers.

Per group, the searches are never worse than plain rounding (their candidate grid contains the
round-to-nearest scale and the least-squares fit can only lower the error). Per tensor, with a
random positive importance vector, lowbit's weighted error sum imp * (w - what)^2 is at most
that of gguf's reference quantizer where gguf has one (legacy types) and of a round-to-nearest
baseline with absmax scales in the same byte format otherwise (K-quants, IQ4_NL). The
comparison against llama.cpp's own K-quant search (through llama-cpp-python) is made later in
bench/gguf_vs_llamacpp.py.
"""
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf, quantize_gguf
from lowbit.formats.gguf import iq4_nl, kquant_affine, kquant_symmetric, search

LEGACY_WITH_GGUF_QUANTIZER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
AFFINE_K = {"Q2_K": (16, 3, 15), "Q4_K": (32, 15, 63), "Q5_K": (32, 31, 63)}   # sub-block, max code, max scale
SYMMETRIC_K = {"Q3_K": ((-4, 3), (-32, 31)), "Q6_K": ((-32, 31), (-128, 127))}  # code range, scale range


def _fp16(a):
    return a.astype(np.float16).astype(np.float32)


def _inv(a):
    out = np.zeros_like(a)
    np.divide(1.0, a, out=out, where=a != 0)
    return out


def _peak(a, axis=-1):
    """Signed value of largest magnitude along axis (keepdims)."""
    return np.take_along_axis(a, np.abs(a).argmax(axis=axis)[..., None], axis=axis)


def rtn_affine_k(W, n_sub, nmax, sc_max):
    """Round-to-nearest baseline for Q2_K/Q4_K/Q5_K: min/max sub-block scales, max-scaled integers."""
    x = W.reshape(-1, 256 // n_sub, n_sub)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    s, m = (hi - lo) / nmax, -lo
    d, dmin = _fp16(s.max(-1, keepdims=True) / sc_max), _fp16(m.max(-1, keepdims=True) / sc_max)
    sc, mq = np.clip(np.rint(s * _inv(d)), 0, sc_max), np.clip(np.rint(m * _inv(dmin)), 0, sc_max)
    step, off = (d * sc)[..., None], (dmin * mq)[..., None]
    q = np.clip(np.rint((x + off) * _inv(step)), 0, nmax)
    return (step * q - off).reshape(W.shape)


def rtn_symmetric_k(W, q_range, sc_range):
    """Round-to-nearest baseline for Q3_K/Q6_K: the largest value on the most negative level."""
    x = W.reshape(-1, 16, 16)
    s = _peak(x)[..., 0] / q_range[0]
    d = _fp16(_peak(s) / sc_range[0])
    sc = np.clip(np.rint(s * _inv(d)), *sc_range)
    step = (d * sc)[..., None]
    return (step * np.clip(np.rint(x * _inv(step)), *q_range)).reshape(W.shape)


def rtn_iq4_nl(W):
    x = W.reshape(-1, 32)
    d = _fp16(_peak(x) / iq4_nl.TABLE[0])
    table = np.asarray(iq4_nl.TABLE, np.float32)
    idx = np.abs((x * _inv(d))[..., None] - table).argmin(-1)
    return (d * table[idx]).reshape(W.shape)


def _baseline(name, W):
    if name in LEGACY_WITH_GGUF_QUANTIZER:
        return dequantize_gguf(gguf_quantize(W, GGUF_TYPES[name].ggml_type), name, W.shape).numpy()
    if name in AFFINE_K:
        return rtn_affine_k(W, *AFFINE_K[name])
    if name in SYMMETRIC_K:
        return rtn_symmetric_k(W, *SYMMETRIC_K[name])
    return rtn_iq4_nl(W)


def _weights(rng, rows=32, cols=1024, heavy=False):
    base = rng.standard_t(3, (rows, cols)) if heavy else rng.standard_normal((rows, cols))
    return (base * 10.0 ** rng.uniform(-2.5, -1, (rows, 1))).astype(np.float32)


def _werr(W, What, imp):
    return float((((What.astype(np.float64) - W) ** 2) * imp).sum())


@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_weighted_error_not_above_reference_or_rtn(name, heavy):
    rng = np.random.default_rng(10 + list(GGUF_TYPES).index(name) + 100 * heavy)
    W = _weights(rng, heavy=heavy)
    imp = (rng.uniform(0.05, 3.0, W.shape[1]) ** 2).astype(np.float32)
    ours = dequantize_gguf(quantize_gguf(W, name, imp), name, W.shape).numpy()
    assert _werr(W, ours, imp) <= _werr(W, _baseline(name, W), imp)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_default_weighting_not_above_rtn(name):
    """Without an imatrix the search minimises llama.cpp's default weighting; judged by it."""
    rng = np.random.default_rng(20)
    W = _weights(rng, heavy=True)
    blocks = W.reshape(-1, GGUF_TYPES[name].block_size)
    if name in AFFINE_K:
        w = kquant_affine.default_weights(name, blocks)
    elif name in SYMMETRIC_K:
        w = kquant_symmetric.default_weights(blocks)
    else:
        w = iq4_nl.default_weights(blocks)
    w = w.reshape(W.shape)
    ours = dequantize_gguf(quantize_gguf(W, name), name, W.shape).numpy()
    assert _werr(W, ours, w) <= _werr(W, _baseline(name, W), w)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_0"])
def test_importance_moves_error_to_unimportant_columns(name):
    rng = np.random.default_rng(30)
    W = _weights(rng)
    imp = np.ones(W.shape[1], np.float32)
    imp[::2] = 50.0  # every other column matters much more
    flat = dequantize_gguf(quantize_gguf(W, name, np.ones_like(imp)), name, W.shape).numpy()
    focused = dequantize_gguf(quantize_gguf(W, name, imp), name, W.shape).numpy()
    assert _werr(W, focused, imp) < _werr(W, flat, imp)
    assert ((focused - W)[:, ::2] ** 2).sum() < ((flat - W)[:, ::2] ** 2).sum()


def test_fit_affine_never_worse_than_min_max_rounding_per_group():
    rng = np.random.default_rng(40)
    x = torch.from_numpy((rng.standard_normal((4000, 32)) + rng.uniform(-1, 1, (4000, 1))).astype(np.float32))
    w = torch.from_numpy(rng.uniform(0.1, 2.0, (4000, 32)).astype(np.float32))
    for nmax in (3, 15, 31):
        s, o, q = search.fit_affine(x, w, nmax, search.uniform_deltas(-1, 1, 0.05))
        assert bool((q == q.round()).all()) and q.min() >= 0 and q.max() <= nmax and bool((o <= 0).all())
        err = (w * (s[:, None] * q + o[:, None] - x) ** 2).sum(-1)
        lo = x.amin(-1).clamp_max(0)
        rs = (x.amax(-1) - lo) / nmax
        rq = torch.round((x - lo[:, None]) / rs[:, None]).clamp(0, nmax)
        rtn = (w * (rs[:, None] * rq + lo[:, None] - x) ** 2).sum(-1)
        assert bool((err <= rtn * (1 + 1e-5) + 1e-12).all())


def test_fit_symmetric_never_worse_than_absmax_rounding_per_group():
    rng = np.random.default_rng(41)
    x = torch.from_numpy(rng.standard_t(3, (4000, 16)).astype(np.float32))
    w = torch.from_numpy(rng.uniform(0.1, 2.0, (4000, 16)).astype(np.float32))
    for qlo, qhi in ((-4, 3), (-8, 7), (-32, 31)):
        levels = torch.arange(qlo, qhi + 1, dtype=torch.float32)
        s, idx = search.fit_symmetric(x, w, levels, search.uniform_deltas(-1, 1, 0.1))
        err = (w * (s[:, None] * levels[idx] - x) ** 2).sum(-1)
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        rs = peak / qlo
        rtn = (w * (rs * torch.round(x / rs).clamp(qlo, qhi) - x) ** 2).sum(-1)
        assert bool((err <= rtn * (1 + 1e-5) + 1e-12).all())


def test_nearest_level_on_a_non_uniform_table():
    table = torch.tensor(iq4_nl.TABLE, dtype=torch.float32)
    v = torch.linspace(-140, 130, 5001)
    idx = search.nearest_level(v, table)
    brute = (v[:, None] - table).abs().argmin(-1)
    # equal, or an exact tie between two equally near levels
    same_distance = (v - table[idx]).abs() == (v - table[brute]).abs()
    assert bool(same_distance.all())
