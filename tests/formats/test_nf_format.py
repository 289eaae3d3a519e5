"""NFFormat: the NF4 table, NFk level counts, dequantized values on scale x codebook."""
import pytest
import torch

from lowbit.formats import NFFormat
from lowbit.formats.normal_float import nf_levels

NF4_TABLE = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_nf4_levels_match_qlora_table():
    levels = nf_levels(4)
    assert torch.allclose(levels, torch.tensor(NF4_TABLE), atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nfk_has_2k_distinct_levels_with_exact_zero(bits):
    levels = nf_levels(bits)
    assert levels.numel() == 2**bits and torch.unique(levels).numel() == 2**bits
    assert float(levels[0]) == -1.0 and float(levels[-1]) == 1.0
    assert int((levels == 0).sum()) == 1
    assert int((levels > 0).sum()) == 2 ** (bits - 1)  # one more positive level than negative


@pytest.mark.parametrize("bits,g", [(4, 64), (3, 128), (2, 0), (4, -1)])
def test_dequantized_values_on_scale_times_codebook(bits, g):
    torch.manual_seed(bits)
    W_f = torch.randn(24, 576)  # g=128: ragged last group
    fmt = NFFormat(bits, g)
    q = fmt.quantize(W_f)
    W_dq = fmt.dequantize(q)
    levels = nf_levels(bits)
    n = fmt.n_groups(576)
    assert q.scales.shape == ((1, 1) if g == -1 else (24, n)) and q.scales.dtype == torch.float16
    width = {0: 576, -1: 576}.get(g, g)
    s = q.scales.float().repeat_interleave(width, 1)[:, :576]  # per-column scale [R, in]
    assert torch.equal(W_dq, levels[q.codes.long()] * s)
    # nearest level: no other level is closer than the chosen one
    dist = (W_f.unsqueeze(-1) - levels * s.unsqueeze(-1)).abs()  # [out, in, 2**bits]
    chosen = (W_f - W_dq).abs()
    assert bool((chosen <= dist.min(-1).values + 1e-6).all())


def test_nf_ragged_group_scale_and_zero_rows():
    W_f = torch.randn(4, 100)
    W_f[1] = 0.0
    fmt = NFFormat(4, 64)
    q = fmt.quantize(W_f)
    assert q.scales.shape == (4, 2)
    rows = [0, 2, 3]  # row 1 is all zero: its scale is the guard value 1
    assert torch.allclose(q.scales[rows, 1].float(), W_f[rows, 64:].abs().amax(1), rtol=1e-3)
    assert bool((q.scales[1] == 1).all())
    W_dq = fmt.dequantize(q)
    assert torch.isfinite(W_dq).all() and bool((W_dq[1] == 0).all())
    assert torch.equal(W_dq, fmt.fake_quantize(W_f))


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=5), dict(group_size=-3)])
def test_invalid_nf_config(kwargs):
    with pytest.raises(ValueError):
        NFFormat(**kwargs)
