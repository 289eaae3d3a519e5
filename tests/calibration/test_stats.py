"""InputStats: streamed statistics equal the statistics of all tokens at once."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration.stats import InputStats, gram


def test_hessian_of_float32_batches_matches_the_float64_sum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 2048, 96, generator=g)
    X[:, 0, 7] = 800.0  # a massive activation on each batch's first token, as in real models
    st = InputStats(96, frozenset({"hessian", "mean_abs"}))
    for x in X:  # batch by batch, float32 products
        st.update(x)
    Xd = X.reshape(-1, 96).double()
    ref = Xd.T @ Xd
    assert st.hessian.dtype == torch.float64 and st.tokens == 4 * 2048
    rel = (st.hessian - ref).abs() / (ref.diag()[:, None] * ref.diag()[None, :]).sqrt()
    assert float(rel.max()) < 1e-6  # entry errors far below each entry's natural size (Cauchy-Schwarz bound)
    torch.testing.assert_close(st.mean_abs.double(), Xd.abs().mean(0), rtol=1e-6, atol=0)


def test_float64_inputs_stay_exact():
    X = torch.randn(300, 16, dtype=torch.float64)
    st = InputStats(16, frozenset({"hessian"}))
    st.update(X[:100])
    st.update(X[100:])
    torch.testing.assert_close(st.hessian, X.T @ X, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wanted", [{"hessian"}, {"absmax"}, {"hessian", "mean_abs"}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(wanted, bad):
    x = torch.randn(2, 16, 8)
    x[1, 5, 3] = bad
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        InputStats(8, wanted).update(x)


@pytest.mark.parametrize("width", [5, 192, 193, 576, 1000])
@pytest.mark.parametrize("block", [64, 192])
def test_gram_equals_the_full_product(width, block):
    # the blocks on and above the diagonal are computed, the rest mirrored: the same matrix
    x = torch.randn(300, width, dtype=torch.float64)
    h = gram(x, block)
    torch.testing.assert_close(h, x.T @ x, rtol=1e-12, atol=1e-10)


def test_wide_inputs_sum_h_by_block_rows_to_the_same_bits(monkeypatch):
    """Above WIDE inputs H is summed one block row at a time (no [in, in] float32 temporary): the
    same float64 sums, to the bit, as the whole product, sink weight included, over several batches."""
    import lowbit.calibration.stats as stats_module

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 37, 500, generator=g) * (1 + 9 * (torch.arange(500) == 7)) for _ in range(3)]
    whole, by_rows = (InputStats(500, frozenset({"hessian"}), sink_weight=100.0) for _ in range(2))
    for x in batches:
        whole.update(x)
    monkeypatch.setattr(stats_module, "WIDE", 100)
    for x in batches:
        by_rows.update(x)
    assert torch.equal(whole.hessian, by_rows.hessian) and by_rows.tokens == whole.tokens
    bad = batches[0].clone()
    bad[0, 5, 499] = float("nan")
    with pytest.raises(FloatingPointError):
        by_rows.update(bad)
