"""lowbit.export.gguf.lossless: IntFormat QTensors written into GGUF legacy blocks without re-rounding.

Q4_0 / Q5_0 / Q8_0 must dequantize (ggml's arithmetic) bit for bit to fmt.dequantize(q);
Q4_1 / Q5_1 differ only by the fp16 rounding of m = -scale*z: at most half an fp16 ulp of
|scale*z| per weight, and exactly the error encode_lossless reports.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_py_dequantize

from lowbit.export.gguf.lossless import encode_lossless, lossless_type
from lowbit.formats import FP8Format, IntFormat, MXFP4Format, NFFormat, QTensor
from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf

RULES = ("absmax", "absmax_half", "signed")
GROUPS = (32, 64, 128, 0, -1)
SHAPES = ((6, 64), (4, 576), (3, 1536))  # 576 with g128: groups 128 x4 + a ragged 64


def weight(shape, seed=0) -> torch.Tensor:
    """Random [out, in] weight with per-row magnitudes spread over two decades and a few outliers."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * torch.logspace(-3, -1, shape[0]).unsqueeze(1)  # [out] -> [out, 1]
    W[:, 5] *= 8  # an outlier column: the largest magnitude, positive in some rows, negative in others
    return W


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # float32 -> its bit pattern (tells -0.0 from 0.0)


def check_bytes(name, data, shape):
    out, cols = shape
    assert data.dtype == np.uint8
    assert data.shape == (out, cols // 32 * GGUF_TYPES[name].bytes_per_block)


def fp16_half_ulp(x: np.ndarray) -> np.ndarray:
    """Half the fp16 spacing at |x|: the largest error of rounding x to float16 (normal or subnormal)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -14)))  # fp16 subnormals share 2**-14's spacing
    return 2.0 ** (e - 11)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bits,type_name", [(4, "Q4_0"), (5, "Q5_0"), (8, "Q8_0")])
def test_symmetric_is_bit_exact(bits, type_name, rule, group, shape):
    fmt = IntFormat(bits, True, group, rule)
    q = fmt.quantize(weight(shape))
    name, data, err = encode_lossless(q)
    assert (name, err) == (type_name, 0.0)
    assert lossless_type(fmt, shape[1]) == type_name
    check_bytes(name, data, shape)
    assert torch.equal(bits_of(dequantize_gguf(data, name, shape)), bits_of(fmt.dequantize(q)))


def test_ragged_last_group_of_64():
    fmt = IntFormat(4, True, 128, "absmax")
    q = fmt.quantize(weight((4, 576)))
    assert q.scales.shape == (4, 5)  # 128 x4 + one group of 64
    name, data, _ = encode_lossless(q)
    d = data.reshape(4, 18, 18)[:, :, :2].copy().view(np.float16)[..., 0]  # [out, 18 blocks]: each block's d
    assert np.array_equal(d, q.scales.numpy()[:, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 2])


@pytest.mark.parametrize("rule", ("absmax_half", "signed"))
def test_q8_0_code_minus_128(rule):
    fmt = IntFormat(8, True, 64, rule)
    q = fmt.quantize(weight((6, 128)))
    if rule == "absmax_half":  # -128 needs w = -absmax exactly under the rounded-up scale: set one by hand
        codes = q.codes.clone()
        codes[0, 0] = 0
        q = QTensor(codes, q.scales, None, q.shape, fmt)
    assert bool((q.codes == 0).any())  # u = 0 is c = -128
    _, data, _ = encode_lossless(q)
    qs = data.reshape(-1, 34)[:, 2:].view(np.int8)  # [blocks, d:2 | qs:32] -> int8 codes
    assert (qs == -128).any()
    assert torch.equal(dequantize_gguf(data, "Q8_0", q.shape), fmt.dequantize(q))


@pytest.mark.parametrize("bits,type_name", [(4, "Q4_0"), (5, "Q5_0"), (8, "Q8_0")])
def test_negative_signed_scales_survive(bits, type_name):
    fmt = IntFormat(bits, True, 32, "signed")
    q = fmt.quantize(weight((6, 128)))
    assert bool((q.scales < 0).any()) and bool((q.scales > 0).any())
    name, data, _ = encode_lossless(q)
    bpb = GGUF_TYPES[name].bytes_per_block
    d = data.reshape(-1, bpb)[:, :2].copy().view(np.float16).reshape(6, 4)  # [blocks, 2] -> [out, 4 blocks]
    assert np.array_equal(d, q.scales.numpy())  # sign and all: group 32 = one block
    assert torch.equal(dequantize_gguf(data, name, q.shape), fmt.dequantize(q))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits,type_name", [(4, "Q4_1"), (5, "Q5_1")])
def test_affine_error_is_m_rounding(bits, type_name, group, shape):
    fmt = IntFormat(bits, False, group)
    W = weight(shape) + 0.01  # shift so zero-points vary and scale*z is rarely fp16-exact
    q = fmt.quantize(W)
    name, data, err = encode_lossless(q)
    assert name == type_name
    check_bytes(name, data, shape)
    diff = (dequantize_gguf(data, name, shape) - fmt.dequantize(q)).abs()
    assert float(diff.max()) == err  # the reported error is the measured one, to the bit
    # bound per weight: half an fp16 ulp of |scale*z| of its group
    scale_z = (q.scales.float() * q.zeros.float()).numpy().astype(np.float64)  # [out, G] or [1, 1]
    cols = shape[1]
    col_group = np.arange(cols) // group if 0 < group < cols else np.zeros(cols, dtype=np.int64)
    bound = np.broadcast_to(fp16_half_ulp(scale_z)[:, col_group], shape)  # [out or 1, in] -> [out, in]
    assert (diff.numpy() <= bound).all()


def test_affine_error_is_nonzero_and_small():
    fmt = IntFormat(4, False, 128)
    q = fmt.quantize(weight((4, 576)) + 0.01)
    _, _, err = encode_lossless(q)
    scale_z = (q.scales.float() * q.zeros.float()).max().item()
    assert 0.0 < err <= fp16_half_ulp(np.float64(scale_z))


def test_affine_exact_when_scale_z_is_fp16():
    fmt = IntFormat(4, False, 32)
    W = torch.rand(4, 64)  # all non-negative: z = 0, m = 0
    q = fmt.quantize(W)
    assert int(q.zeros.max()) == 0
    name, data, err = encode_lossless(q)
    assert (name, err) == ("Q4_1", 0.0)
    assert torch.equal(dequantize_gguf(data, name, q.shape), fmt.dequantize(q))


@pytest.mark.parametrize("fmt,type_name", [(IntFormat(4, True, 64, "signed"), "Q4_0"), (IntFormat(8, True, 0), "Q8_0"),
                                           (IntFormat(4, False, 64), "Q4_1")])
def test_bytes_match_gguf_py(fmt, type_name):
    """The gguf package's own numpy dequantizer (independent of lowbit) reads the same weights."""
    q = fmt.quantize(weight((4, 256)))
    name, data, err = encode_lossless(q)
    ref = gguf_py_dequantize(data, GGMLQuantizationType[name])
    assert ref.shape == (4, 256)
    assert np.abs(ref - fmt.dequantize(q).numpy()).max() == err


def test_group_wider_than_row_is_one_group():
    assert lossless_type(IntFormat(4, True, 48), 32) == "Q4_0"  # one group of 32 columns
    assert lossless_type(IntFormat(4, True, 1000), 576) == "Q4_0"


@pytest.mark.parametrize("fmt,cols,reason", [
    (NFFormat(4, 64), 128, "non-uniform table"),
    (FP8Format("e4m3", 0), 128, "FP8"),
    (MXFP4Format(), 128, "MXFP4"),
    (IntFormat(3, True, 64), 128, "3-bit symmetric codes"),
    (IntFormat(3, True, 128), 576, "3-bit symmetric codes"),  # ragged 3-bit: the width refuses first
    (IntFormat(6, True, 64), 128, "6-bit symmetric codes"),
    (IntFormat(8, False, 64), 128, "8-bit asymmetric codes"),
    (IntFormat(4, True, 48), 96, "groups of 48 columns split 32-weight GGUF blocks"),
    (IntFormat(4, True, 16), 64, "groups of 16 columns split"),
    (IntFormat(4, True, 0), 40, "40 columns are not a whole number of 32-weight GGUF blocks"),
    (IntFormat(4, True, 32), 40, "40 columns"),
    (IntFormat(4, False, -1), 40, "40 columns"),
])
def test_refusals_name_format_and_reason(fmt, cols, reason):
    with pytest.raises(ValueError) as info:
        lossless_type(fmt, cols)
    msg = str(info.value)
    assert msg.startswith(f"{fmt.name}: ") and reason in msg and "--requantize" in msg and "\n" not in msg


def test_encode_refuses_in_features_40():
    q = IntFormat(4, True, 0).quantize(weight((3, 40)))
    with pytest.raises(ValueError, match=r"int4-ch-sym: rows of 40 columns"):
        encode_lossless(q)


def test_encode_refuses_nf4():
    q = NFFormat(4, 64).quantize(weight((3, 128)))
    with pytest.raises(ValueError, match=r"nf4-g64: NormalFloat"):
        encode_lossless(q)
