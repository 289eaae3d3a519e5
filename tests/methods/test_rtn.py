"""RTN and the per-group MSE clip search."""
import importlib

import pytest
import torch

from lowbit.formats import FP8Format, IntFormat, MXFP4Format, NFFormat
from lowbit.methods.rtn import RtnConfig, group_error, mse_clip, rtn

FORMATS = [IntFormat(4, True, 64), IntFormat(3, False, 128), IntFormat(4, True, 0), IntFormat(4, False, -1),
           NFFormat(4, 64), NFFormat(3, 128), FP8Format("e4m3", 0), MXFP4Format()]


def _student_t(shape, seed=0, df=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, int(df)), generator=g).square().sum(-1)
    return z / (chi2 / df).sqrt() * 0.02  # heavy-tailed, like LLM weights


def test_rtn_without_clip_is_plain_quantize():
    W_f = torch.randn(16, 128)
    fmt = IntFormat(4, True, 64)
    q = rtn(W_f, fmt)
    ref = fmt.quantize(W_f)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_mse_clip_never_worse_per_group_and_better_on_heavy_tails(fmt, norm):
    W_f = _student_t((48, 320), seed=1)  # 320 % 128 != 0: ragged groups
    cfg = RtnConfig(clip="mse", clip_grid=20, clip_min=0.5, clip_norm=norm)
    base = group_error(W_f, fmt.dequantize(rtn(W_f, fmt)), fmt.group_size, norm)
    clipped = group_error(W_f, fmt.dequantize(rtn(W_f, fmt, cfg)), fmt.group_size, norm)
    assert clipped.shape == base.shape == fmt.scale_shape(tuple(W_f.shape))
    assert bool((clipped <= base * (1 + 1e-5)).all())
    if not isinstance(fmt, MXFP4Format):  # power-of-two scales: shrinking only costs saturation
        assert float(clipped.sum()) < float(base.sum())


def test_mse_clip_factors_on_grid_and_chunking_invariant(monkeypatch):
    W_f = _student_t((100, 192), seed=2)
    fmt = IntFormat(4, True, 64)
    clip = mse_clip(W_f, fmt, 11, 0.5, 2.4)
    assert clip.shape == (100, 3)
    grid = torch.linspace(1.0, 0.5, 11)
    assert bool(torch.isin(clip, grid).all())
    rtn_module = importlib.import_module("lowbit.methods.rtn")  # the package re-exports rtn()
    monkeypatch.setattr(rtn_module, "CHUNK_ELEMENTS", 192 * 7)  # 7 rows per chunk
    assert torch.equal(mse_clip(W_f, fmt, 11, 0.5, 2.4), clip)


def test_grid_of_one_is_no_clip():
    W_f = _student_t((8, 64))
    fmt = NFFormat(4, 32)
    q = rtn(W_f, fmt, RtnConfig(clip="mse", clip_grid=1))
    assert torch.equal(q.codes, fmt.quantize(W_f).codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_zero_rows_no_nan(fmt):
    W_f = _student_t((8, 96))
    W_f[3] = 0.0
    q = rtn(W_f, fmt, RtnConfig(clip="mse"))
    W_dq = fmt.dequantize(q)
    assert torch.isfinite(W_dq).all() and bool((W_dq[3] == 0).all())


@pytest.mark.parametrize("kwargs", [dict(clip="max"), dict(clip_grid=0), dict(clip_min=0.0),
                                    dict(clip_min=1.5), dict(clip_norm=0.0), dict(clip_norm=float("inf"))])
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        RtnConfig(**kwargs)


def test_accepts_half_and_param_inputs():
    W = torch.nn.Parameter(_student_t((8, 64)).half())
    q = rtn(W, IntFormat(4, True, 32), RtnConfig(clip="mse"))
    assert q.shape == (8, 64) and torch.isfinite(q.fmt.dequantize(q)).all()
