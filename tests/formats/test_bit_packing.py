"""pack_bits/unpack_bits and every format's pack/unpack/storage_bits."""
import pytest
import torch

from lowbit.formats import FP8Format, IntFormat, MXFP4Format, NFFormat
from lowbit.formats.packing import pack_bits, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 64, 101])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_lsb_first_and_rows_independent():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 0]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [[0x21, 0x43], [0x0F, 0x00]]
    three = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 8 codes -> 3 bytes
    packed = pack_bits(three, 3)
    assert packed.shape == (1, 3)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(three[0]))
    assert packed[0].tolist() == [(stream >> (8 * k)) & 0xFF for k in range(3)]
    assert torch.equal(pack_bits(codes[1:], 4), pack_bits(codes, 4)[1:])


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)


FORMATS = (
    [IntFormat(b, s, g) for b in range(2, 9) for s in (True, False) for g in (64, 0, -1)]
    + [IntFormat(3, True, 100), NFFormat(2, 64), NFFormat(3, 0), NFFormat(4, 64), NFFormat(4, -1)]
    + [FP8Format("e4m3", 0), FP8Format("e5m2", -1), MXFP4Format()]
)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_format_pack_unpack_exact_and_storage_bits(fmt):
    torch.manual_seed(0)
    shape = (9, 150)  # 150 % 8 != 0 and ragged groups
    W_f = torch.randn(shape)
    q = fmt.quantize(W_f)
    packed = fmt.pack(q)
    q2 = fmt.unpack({k: v.clone() for k, v in packed.items()}, shape)
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.scales, q.scales)
    assert (q.zeros is None) == (q2.zeros is None)
    if q.zeros is not None:
        assert torch.equal(q2.zeros, q.zeros)
    assert torch.equal(fmt.dequantize(q2), fmt.dequantize(q))
    assert fmt.storage_bits(shape) == 8 * sum(t.nbytes for t in packed.values())
    assert packed["codes"].dtype == torch.uint8


def test_bits_per_weight_examples():
    assert IntFormat(4, True, 64).storage_bits((576, 576)) / (576 * 576) == 4 + 16 / 64
    # ragged g128 on 576 columns: 5 fp16 scales per row
    assert IntFormat(4, True, 128).storage_bits((576, 576)) == 576 * (576 * 4 + 5 * 16)
    # asym: 5 zero-points of 4 bits = 20 bits -> 3 bytes per row
    assert IntFormat(4, False, 128).storage_bits((576, 576)) == 576 * (576 * 4 + 5 * 16 + 24)
    # 3-bit: 576 codes = 216 bytes per row exactly (8 codes in 3 bytes)
    assert IntFormat(3, True, 64).storage_bits((576, 576)) == 576 * (216 * 8 + 9 * 16)
    assert FP8Format("e4m3", 0).storage_bits((576, 576)) == 576 * (576 * 8 + 32)
