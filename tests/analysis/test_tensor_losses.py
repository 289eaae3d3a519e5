"""The planner's per-tensor rounding (analysis.tensor_losses.rounded): RTN is the format's own rounding,
GPTQ is lowbit's gptq / gptq_gguf / dense-and-sparse gptq on the given Hessian, and it beats RTN on it."""
from __future__ import annotations

import pytest
import torch

from lowbit.analysis.tensor_losses import rounded
from lowbit.formats import format_from_name
from lowbit.methods.gptq import gptq, gptq_outliers, proxy_loss
from lowbit.methods.gptq_gguf import gptq_gguf


def _problem(out=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))  # correlated inputs
    return W, (X.T @ X).double()


def test_rtn_is_the_formats_rounding():
    W, _ = _problem()
    fmt = format_from_name("int3-g64-sym")
    assert torch.equal(rounded(W, fmt), fmt.fake_quantize(W))


@pytest.mark.parametrize("name", ["int3-g64-sym", "int2-g64-sym-signed"])
def test_gptq_is_gptq_and_beats_rtn_on_its_hessian(name):
    W, H = _problem()
    fmt = format_from_name(name)
    W_dq = rounded(W, fmt, H=H, rounding="gptq")
    assert torch.equal(W_dq, fmt.dequantize(gptq(W, H, fmt)[0]))
    assert proxy_loss(W, W_dq, H) < 0.9 * proxy_loss(W, fmt.fake_quantize(W), H)


def test_gptq_with_outliers_keeps_them_and_is_dense_and_sparse_gptq():
    W, H = _problem(seed=1)
    fmt = format_from_name("int2-g64-sym")
    W_dq = rounded(W, fmt, 0.01, H, "gptq")
    q, _, sparse = gptq_outliers([W], H, fmt, 0.01)[0]
    assert torch.equal(W_dq, sparse.apply(fmt.dequantize(q)))
    assert sparse.kept == round(0.01 * W.numel())
    flat = W_dq.reshape(-1)[sparse.index.long()]                      # the kept entries: float16 values, off the grid
    assert torch.equal(flat, sparse.values.float())


def test_gptq_on_a_gguf_type_is_gptq_gguf():
    W, H = _problem(seed=2)
    fmt = format_from_name("Q3_K")
    W_dq = rounded(W, fmt, H=H, rounding="gptq")
    data, _ = gptq_gguf(W, H, "Q3_K")
    assert torch.equal(W_dq, fmt.dequantize(fmt.from_bytes(data, tuple(W.shape))))
    assert proxy_loss(W, W_dq, H) < proxy_loss(W, fmt.fake_quantize(W), H)


def test_gptq_and_outliers_need_the_hessian_and_a_known_rounding():
    W, H = _problem()
    fmt = format_from_name("int4-g64-sym")
    with pytest.raises(ValueError, match="Hessian"):
        rounded(W, fmt, rounding="gptq")
    with pytest.raises(ValueError, match="Hessian"):
        rounded(W, fmt, 0.01)
    with pytest.raises(ValueError, match="unknown rounding"):
        rounded(W, fmt, H=H, rounding="awq")
