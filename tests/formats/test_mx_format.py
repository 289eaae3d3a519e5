"""MXFP4Format: shared block exponent, exact scale x E2M1 values, ties to even, saturation."""
import torch

from lowbit.formats import MXFP4Format
from lowbit.formats.mx import E2M1_MAGNITUDES, e2m1_round

E2M1 = torch.tensor(E2M1_MAGNITUDES)


def _scale_per_column(q):
    e = q.scales.int() - 127  # [out, n_blocks]
    return torch.ldexp(torch.ones(e.shape), e).repeat_interleave(32, 1)[:, : q.shape[1]]


def test_shared_exponent_and_exact_values():
    torch.manual_seed(0)
    W_f = torch.randn(8, 100) * torch.logspace(-4, 2, 8).unsqueeze(1)  # ragged last block of 4
    fmt = MXFP4Format()
    q = fmt.quantize(W_f)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (8, 4)
    # e = floor(log2(block absmax)) - 2 for every block, ragged one from its own 4 columns
    for b, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 96), (96, 100)]):
        absmax = W_f[:, lo:hi].abs().amax(1).double()
        assert torch.equal(q.scales[:, b].int() - 127, (torch.floor(torch.log2(absmax)) - 2).int())
    W_dq = fmt.dequantize(q)
    s = _scale_per_column(q)
    signed = torch.where(q.codes >= 8, -E2M1[(q.codes & 7).long()], E2M1[(q.codes & 7).long()])
    assert torch.equal(W_dq, signed * s)
    ratio = (W_dq / s).abs()
    assert bool(torch.isin(ratio, E2M1).all())
    assert torch.equal(W_dq, fmt.fake_quantize(W_f))


def test_nearest_with_ties_to_even_and_saturation():
    m = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.9, 0.3, 2.9])
    got = E2M1[e2m1_round(m).long()]
    assert torch.equal(got, torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 3.0]))


def test_block_max_lands_in_range_and_zero_block():
    W_f = torch.zeros(2, 64)
    W_f[0, :32] = torch.linspace(-7.0, 7.0, 32)
    q = MXFP4Format().quantize(W_f)
    W_dq = MXFP4Format().dequantize(q)
    assert int(q.scales[0, 0]) - 127 == 0  # floor(log2 7) - 2 = 0
    assert float(W_dq[0, 0]) == -6.0 and float(W_dq[0, 31]) == 6.0  # saturates at 6 * 2**0
    assert bool((W_dq[1] == 0).all()) and int(q.scales[1, 0]) == 0 and torch.isfinite(W_dq).all()


def test_mx_bits_per_weight():
    assert MXFP4Format().storage_bits((576, 576)) / (576 * 576) == 4.25
    assert MXFP4Format().name == "mxfp4"
