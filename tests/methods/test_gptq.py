"""GPTQ: equals RTN when H = I, never worse than RTN in tr(E H Eᵀ), handles dead and ragged columns."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import FP8Format, IntFormat, MXFP4Format, NFFormat
from lowbit.methods.gptq import (GptqConfig, column_quantizer, gptq, gptq_shared, lower_triangular_inverse, reverse_,
                                 proxy_loss, upper_inverse_cholesky)


def _weights(out, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.02


def _hessian(n, tokens=2048, seed=1, outliers=(3, 17)):
    """H = XᵀX of correlated activations X [tokens, n] with a few large outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    X = torch.randn(tokens, n, generator=g) @ mix  # correlated channels
    for j in outliers:
        X[:, j] *= 20.0
    return (X.double().T @ X.double())


FORMATS = [IntFormat(4, True, 32), IntFormat(4, True, 64), IntFormat(4, False, 32), IntFormat(4, False, 64),
           IntFormat(3, True, 64), IntFormat(3, False, 64), IntFormat(2, True, 32, "absmax_half"),
           IntFormat(3, True, 64, "signed"), IntFormat(2, True, 32, "signed")]


@pytest.mark.parametrize("fmt", FORMATS + [NFFormat(4, 64), IntFormat(4, True, 0), IntFormat(4, False, -1),
                                           FP8Format("e4m3", 0), MXFP4Format()], ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_equals_rtn(fmt, act_order):
    W = _weights(24, 96)
    q, stats = gptq(W, torch.eye(96, dtype=torch.float64), fmt, block_size=32, act_order=act_order)
    ref = fmt.quantize(W)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.scales, ref.scales)
    assert (q.zeros is None and ref.zeros is None) or torch.equal(q.zeros, ref.zeros)
    assert stats.proxy_loss == pytest.approx(stats.rtn_proxy_loss, rel=1e-12)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
def test_never_worse_than_rtn_on_a_real_hessian(fmt, act_order, static):
    W, H = _weights(64, 128, seed=2), _hessian(128)
    q, stats = gptq(W, H, fmt, block_size=32, act_order=act_order, static_groups=static)
    W_q = fmt.dequantize(q)
    assert stats.proxy_loss == pytest.approx(proxy_loss(W, W_q, H), rel=1e-9)
    assert stats.rtn_proxy_loss == pytest.approx(proxy_loss(W, fmt.fake_quantize(W), H), rel=1e-9)
    assert stats.proxy_loss < stats.rtn_proxy_loss


@pytest.mark.parametrize("fmt", [NFFormat(4, 64), MXFP4Format(), FP8Format("e4m3", 0)], ids=lambda f: f.name)
def test_other_grids_beat_rtn(fmt):
    W, H = _weights(64, 128, seed=3), _hessian(128)
    _, stats = gptq(W, H, fmt, block_size=64, act_order=True)
    assert stats.proxy_loss < stats.rtn_proxy_loss


def test_result_lies_on_the_grid_it_stores():
    """Every stored code re-encodes to itself under the stored scales (the QTensor is consistent)."""
    fmt = IntFormat(4, False, 64)
    W, H = _weights(32, 96, seed=4), _hessian(96)
    q, _ = gptq(W, H, fmt, block_size=16)
    W_q = fmt.dequantize(q)
    quant = column_quantizer(fmt)
    for j in range(96):
        g = j // 64
        codes, w_q = quant(W_q[:, j], q.scales[:, g].float(), q.zeros[:, g].float())
        assert torch.equal(codes, q.codes[:, j]) and torch.equal(w_q, W_q[:, j])


def test_block_size_does_not_change_the_result_much():
    fmt = IntFormat(4, True, 64)
    W, H = _weights(32, 128, seed=5), _hessian(128)
    losses = [gptq(W, H, fmt, block_size=b)[1].proxy_loss for b in (1, 16, 128, 1000)]
    assert max(losses) / min(losses) < 1 + 1e-3  # lazy batching is exact up to float rounding


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    fmt = IntFormat(4, False, 32)
    W, H = _weights(16, 64, seed=6), _hessian(64)
    dead = [0, 5, 40]
    H[dead, :] = 0
    H[:, dead] = 0
    q, stats = gptq(W, H, fmt, block_size=16, act_order=act_order)
    W_q = fmt.dequantize(q)
    assert bool(torch.isfinite(W_q).all()) and stats.proxy_loss == stats.proxy_loss
    assert bool((W_q[:, dead] == 0).all())
    assert stats.proxy_loss <= stats.rtn_proxy_loss


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_last_group(act_order):
    fmt = IntFormat(4, True, 64)
    W, H = _weights(48, 96, seed=7), _hessian(96)  # groups of 64 and 32
    q, stats = gptq(W, H, fmt, block_size=128, act_order=act_order)
    assert q.scales.shape == (48, 2) and q.codes.shape == (48, 96)
    assert stats.proxy_loss < stats.rtn_proxy_loss


def test_mse_clip_option_is_used():
    fmt = IntFormat(3, True, 64)
    W, H = _weights(32, 128, seed=8), _hessian(128)
    plain, _ = gptq(W, H, fmt)
    clipped, stats = gptq(W, H, fmt, clip="mse")
    assert not torch.equal(plain.scales, clipped.scales)
    assert stats.proxy_loss < stats.rtn_proxy_loss


def test_inputs_untouched_and_validated():
    fmt = IntFormat(4, True, 64)
    W, H = _weights(8, 64), _hessian(64)
    W0, H0 = W.clone(), H.clone()
    gptq(W, H, fmt)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    with pytest.raises(ValueError, match="H must be"):
        gptq(W, H[:32, :32], fmt)
    with pytest.raises(ValueError, match="finite"):
        gptq(W, H * float("nan"), fmt)
    for bad in [dict(block_size=0), dict(damp=-1.0), dict(act_order=1), dict(clip="max")]:
        with pytest.raises(ValueError):
            GptqConfig(**bad)


@pytest.mark.parametrize("fmt", [IntFormat(3, True, 16), IntFormat(4, False, 32), IntFormat(4, True, 0)])
def test_shared_input_solve_equals_separate_solves(fmt):
    """Stacking q/k/v-like weights over one H gives each the result of its own GPTQ."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = (X.T @ X).double()
    Ws = [torch.randn(rows, 64, generator=g) for rows in (24, 8, 8)]
    shared = gptq_shared(Ws, H, fmt, block_size=16)
    for W, (q, st) in zip(Ws, shared):
        q_alone, st_alone = gptq(W, H, fmt, block_size=16)
        assert q.shape == q_alone.shape
        assert (q.codes != q_alone.codes).float().mean() < 0.002   # BLAS rounding may flip a rare tie
        torch.testing.assert_close(q.scales, q_alone.scales)
        assert st.proxy_loss == pytest.approx(st_alone.proxy_loss, rel=1e-3)


def test_shared_input_per_tensor_scale_is_solved_alone():
    """One scale per tensor couples the rows: each weight keeps its own scale."""
    fmt, g = IntFormat(4, False, -1), torch.Generator().manual_seed(5)
    H = torch.eye(32, dtype=torch.float64)
    Ws = [torch.randn(8, 32, generator=g), 10 * torch.randn(8, 32, generator=g)]
    for W, (q, _) in zip(Ws, gptq_shared(Ws, H, fmt)):
        q_alone, _ = gptq(W, H, fmt)
        assert torch.equal(q.codes, q_alone.codes) and torch.equal(q.scales, q_alone.scales)


@pytest.mark.parametrize("n", [5, 192, 193, 700])
def test_lower_triangular_inverse(n):
    L = torch.linalg.cholesky(_hessian(n, tokens=4 * n, outliers=(3,)))   # float64, lower, positive diagonal
    work = L.clone()
    L_inv = lower_triangular_inverse(work, base=64)
    assert L_inv.data_ptr() == work.data_ptr()             # in place: no second [n, n] buffer
    assert torch.equal(L_inv, L_inv.tril())
    torch.testing.assert_close(L_inv @ L, torch.eye(n, dtype=L.dtype), rtol=0, atol=1e-9)


def test_upper_inverse_cholesky_factors_the_damped_inverse():
    n = 400
    H = _hessian(n)
    U, damp = upper_inverse_cholesky(H, 0.01)
    assert damp == 0.01 and U.dtype == torch.float32 and torch.equal(U, U.triu())
    assert bool((U.diagonal() > 0).all())                    # the unique Cholesky factor
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * float(H.diagonal().mean()))
    inv = torch.linalg.inv(Hd)
    err = (U.double().T @ U.double() - inv).abs().max() / inv.abs().max()
    assert err < 1e-5                                         # float32 factorisation of a float64 target


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_reverse_flips_both_axes_in_place(n):
    M = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    for dense in (M.clone(), M.T.contiguous().T):          # row-major, and column-major as LAPACK returns L
        ptr = dense.data_ptr()
        assert torch.equal(reverse_(dense, chunk=37), M.flip(0, 1)) and dense.data_ptr() == ptr
