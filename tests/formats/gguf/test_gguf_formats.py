"""GGUF block / K-quant formats: layouts against ggml's sizes, dequantization bit-exact against
gguf.quants on random bytes and on our own output, quantizer bytes equal to gguf's reference
where it has one, ragged rows refused."""
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf, gguf_type, quantize_gguf
from lowbit.formats.gguf.kquant_affine import pack_scales_6bit, unpack_scales_6bit
from lowbit.formats.gguf.kquant_symmetric import pack_scales_q3, unpack_scales_q3
from lowbit.formats.gguf.layout import pack_planes, unpack_planes

ALL = list(GGUF_TYPES)
FP16_FIELDS = ("d", "dmin", "m")


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _gguf_has_quantizer(name: str) -> bool:
    try:
        gguf_quantize(np.zeros((1, GGUF_TYPES[name].block_size), np.float32), GGUF_TYPES[name].ggml_type)
    except NotImplementedError:
        return False
    return True


def _random_blocks(name: str, n_blocks: int, rng) -> np.ndarray:
    """Random bytes for every field, with finite random fp16 values in the fp16 fields."""
    t = GGUF_TYPES[name]
    blocks = rng.integers(0, 256, (n_blocks, t.bytes_per_block), dtype=np.uint8)
    for field, (lo, hi) in t.layout.offsets().items():
        if field in FP16_FIELDS:
            vals = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-5, 1, n_blocks)).astype(np.float16)
            blocks[:, lo:hi] = vals.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _weights(rows, cols, rng) -> np.ndarray:
    """Gaussian rows at very different scales, heavy-tailed columns, one all-zero and one constant block."""
    W = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 0, (rows, 1))
    W[:, ::7] *= 4
    W[0, :32] = 0.0
    W[1, 32:64] = -0.25
    return W.astype(np.float32)


@pytest.mark.parametrize("name", ALL)
def test_layout_matches_ggml_sizes_and_bits_per_weight(name):
    t = gguf_type(name)
    block, nbytes = GGML_QUANT_SIZES[t.ggml_type]
    assert (t.block_size, t.bytes_per_block) == (block, nbytes)
    assert t.bits_per_weight == 8 * nbytes / block
    offsets = t.layout.offsets()
    assert max(hi for _, hi in offsets.values()) == nbytes
    assert all(offsets[f.name][1] - offsets[f.name][0] == f.nbytes for f in t.layout.fields)


def test_bits_per_weight_of_the_k_quants():
    bpw = {name: GGUF_TYPES[name].bits_per_weight for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    assert bpw == {"Q2_K": 84 * 8 / 256, "Q3_K": 110 * 8 / 256, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 210 * 8 / 256}


@pytest.mark.parametrize("name", ALL)
def test_dequantize_random_bytes_bit_exact(name):
    rng = np.random.default_rng(ALL.index(name))
    t = GGUF_TYPES[name]
    rows, blocks_per_row = 6, 3
    data = _random_blocks(name, rows * blocks_per_row, rng).reshape(rows, -1)
    ours = dequantize_gguf(data, name, (rows, blocks_per_row * t.block_size))
    ref = gguf_dequantize(data, t.ggml_type)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    np.testing.assert_array_equal(_bits(ours.numpy()), _bits(ref))


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_quantize_then_dequantize_bit_exact_with_gguf(name, with_imatrix):
    rng = np.random.default_rng(1)
    W = _weights(8, 512, rng)
    imatrix = rng.uniform(0.01, 4.0, 512).astype(np.float32) if with_imatrix else None
    data = quantize_gguf(W, name, imatrix)
    t = GGUF_TYPES[name]
    assert data.dtype == np.uint8 and data.shape == (8, 512 // t.block_size * t.bytes_per_block)
    ours = dequantize_gguf(data, name, W.shape).numpy()
    np.testing.assert_array_equal(_bits(ours), _bits(gguf_dequantize(data, t.ggml_type)))
    # a sane reconstruction: the all-zero block stays zero, relative error well below 1
    assert np.all(ours[0, :32] == 0)
    rel = np.linalg.norm(ours - W) / np.linalg.norm(W)
    assert rel < 0.5, rel


@pytest.mark.parametrize("name", [n for n in ALL if _gguf_has_quantizer(n)])
def test_reference_bytes_equal_gguf_quantizer(name):
    assert name in ALL
    rng = np.random.default_rng(2)
    for W in (_weights(16, 256, rng), (rng.standard_t(2, (4, 1024)) * 0.05).astype(np.float32)):
        ours = quantize_gguf(torch.from_numpy(W), name)
        ref = gguf_quantize(W, GGUF_TYPES[name].ggml_type)
        np.testing.assert_array_equal(ours, ref)


def test_gguf_reference_quantizers_cover_the_legacy_types():
    # if gguf grows a quantizer for another type, the byte-equality test above picks it up
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= {n for n in ALL if _gguf_has_quantizer(n)}


@pytest.mark.parametrize("name", ALL)
def test_ragged_rows_are_refused(name):
    block = GGUF_TYPES[name].block_size
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        quantize_gguf(np.ones((2, block + 16), np.float32), name)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        dequantize_gguf(np.zeros(10, np.uint8), name, (1, block - 16 if block > 32 else 48))


def test_bad_arguments_are_refused():
    W = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        quantize_gguf(W, "Q4_K_M")
    with pytest.raises(ValueError, match="one value per input column"):
        quantize_gguf(W, "Q4_K", imatrix=np.ones(255, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_gguf(W, "Q4_K", imatrix=-np.ones(256, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quantize_gguf(np.full((1, 256), np.nan, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_gguf(np.zeros(143, np.uint8), "Q4_K", (1, 256))


def test_bit_plane_and_scale_packing_round_trip():
    rng = np.random.default_rng(3)
    for bits in (1, 2, 4):
        codes = rng.integers(0, 1 << bits, (5, 8 // bits, 32), dtype=np.uint8)
        assert np.array_equal(unpack_planes(pack_planes(codes, bits), bits), codes)
    sc, mn = rng.integers(0, 64, (2, 50, 8), dtype=np.uint8)
    got_sc, got_mn = unpack_scales_6bit(pack_scales_6bit(sc, mn))
    assert np.array_equal(got_sc, sc) and np.array_equal(got_mn, mn)
    stored = rng.integers(0, 64, (50, 16), dtype=np.uint8)
    assert np.array_equal(unpack_scales_q3(pack_scales_q3(stored)), stored)
