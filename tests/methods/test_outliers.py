"""Dense-and-sparse GPTQ: no kept weight is plain GPTQ; the kept weights are the largest OBS
saliencies, stored exactly (float16) and counted at 48 bits each; on a weight with planted outliers
keeping 1% cuts GPTQ's output error by far more than the storage it adds."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import make_format
from lowbit.methods.gptq import gptq, gptq_outliers, proxy_loss
from lowbit.methods.outliers import SparseOutliers, choose_outliers, kept_rtn, obs_saliency



def _problem(out=48, n=64, planted=12, seed=0):
    """(W [out, n] with `planted` huge weights, H [n, n] with an outlier channel): the same for the
    same seed whichever tests ran before."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n, generator=gen)
    X[:, 3] *= 8                                                     # an outlier input channel
    W = torch.randn(out, n, generator=gen) * 0.05
    idx = torch.randperm(out * n, generator=gen)[:planted]
    W.view(-1)[idx] = torch.randn(planted, generator=gen).sign() * 1.5   # a few huge weights
    return W, X.T @ X


def test_share_zero_is_plain_gptq():
    W, H = _problem()
    fmt = make_format("int", bits=3, group_size=32)
    (q, st, sparse), = gptq_outliers([W], H, fmt, 0.0)
    q0, st0 = gptq(W, H, fmt)
    assert torch.equal(q.codes, q0.codes) and torch.equal(q.scales, q0.scales)
    assert sparse.index.numel() == 0 and sparse.storage_bits == 0
    assert st.proxy_loss == pytest.approx(st0.proxy_loss, rel=1e-6)


def test_kept_weights_are_the_salient_ones_stored_exactly():
    W, H = _problem()
    fmt = make_format("int", bits=3, group_size=32)
    share = 0.01
    mask = choose_outliers(W, H, fmt, share)
    k = round(share * W.numel())
    assert int(mask.sum()) == k
    sal = obs_saliency(W, H, fmt)
    assert float(sal[mask].min()) >= float(sal[~mask].max())
    (q, st, sparse), = gptq_outliers([W], H, fmt, share)
    assert torch.equal(sparse.index.long(), mask.reshape(-1).nonzero().squeeze(1))
    assert sparse.storage_bits == k * 48
    W_dq = sparse.apply(fmt.dequantize(q))
    assert torch.equal(W_dq.reshape(-1)[sparse.index.long()], sparse.values.float())


def test_keeping_one_percent_beats_plain_gptq_by_far():
    W, H = _problem()
    fmt = make_format("int", bits=3, group_size=32)
    q0, st0 = gptq(W, H, fmt)
    (q, st, sparse), = gptq_outliers([W], H, fmt, 0.01)
    assert st.proxy_loss < 0.5 * st0.proxy_loss
    assert proxy_loss(W, sparse.apply(fmt.dequantize(q)), H) == pytest.approx(st.proxy_loss, rel=1e-6)


def test_sparse_outliers_validate():
    with pytest.raises(ValueError, match="ascending"):
        SparseOutliers(torch.tensor([3, 1], dtype=torch.int32), torch.zeros(2, dtype=torch.float16), (2, 2))
    with pytest.raises(ValueError, match="int32 index"):
        SparseOutliers(torch.tensor([1]), torch.zeros(1, dtype=torch.float16), (2, 2))
    with pytest.raises(ValueError, match="share"):
        choose_outliers(torch.zeros(2, 2), torch.eye(2), make_format("int", bits=4, group_size=2), 0.7)


def test_column_layout_keeps_whole_columns_and_counts_them():
    W, H = _problem()
    fmt = make_format("int", bits=3, group_size=32)
    (q, st, sparse), = gptq_outliers([W], H, fmt, 2 / 64, layout="columns")
    assert sparse.layout == "columns" and sparse.index.numel() == 2 and sparse.values.shape == (48, 2)
    assert sparse.storage_bits == 2 * 32 + 48 * 2 * 16
    assert 3 in sparse.index.tolist()                                # the outlier input channel
    W_dq = sparse.apply(fmt.dequantize(q))
    assert torch.equal(W_dq[:, sparse.index.long()], sparse.values.float())
    q0, st0 = gptq(W, H, fmt)
    assert st.proxy_loss < st0.proxy_loss


def test_kept_rtn_keeps_the_salient_weights_and_rounds_the_rest_on_a_grid_without_them():
    W, H = _problem()
    fmt = make_format("int", bits=3, group_size=32)
    W_dq = kept_rtn(W, fmt, H, 0.01)
    mask = choose_outliers(W, H, fmt, 0.01)
    assert int(mask.sum()) == round(0.01 * W.numel())
    assert torch.equal(W_dq[mask], W[mask].half().float())                  # kept: float16 values
    dense = fmt.fake_quantize(W.masked_fill(mask, 0.0))
    assert torch.equal(W_dq[~mask], dense[~mask])                           # the rest: RTN without them
    # the planted huge weights no longer stretch their groups: the output error falls by more than half
    plain = fmt.fake_quantize(W)
    assert proxy_loss(W, W_dq, H) < 0.5 * proxy_loss(W, plain, H)
