"""The KV cache's formats: bit-exact packing, Lloyd–Max levels that satisfy their two conditions,
int and TurboQuant quantizers equal to plain re-statements, stored bytes equal to the bits claimed."""
from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest
import torch

from lowbit.kv.codec import KvCodec
from lowbit.kv.config import KvCacheConfig
from lowbit.kv.lloyd_max import coordinate_density, lloyd_max, mse
from lowbit.kv.packing import pack_codes, packed_bytes, unpack_codes
from lowbit.kv.quantizers import (int_bits, int_dequantize, int_quantize, qjl_matrix, turboquant,
                                  turboquant_dequantize)
from lowbit.rotations.hadamard import random_hadamard


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, packed_bytes(37, bits)) == (3, 5, math.ceil(37 * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, 37), codes.to(torch.uint8))


def test_pack_layout_is_lsb_first():
    # 2-bit codes 1, 2, 3, 0 -> bits 10 01 11 00 from the least significant end: 0b00111001
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit codes 5, 6, 7: stream 101 011 111 (LSB first) -> bytes 0b11110101, 0b00000001
    assert pack_codes(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b00000001]


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="1..8"):
        pack_codes(torch.tensor([1]), 9)


def _cell_moments(d: int, a: float, b: float) -> tuple[float, float]:
    """∫ f_d and ∫ x f_d over [a, b] by 200-point Gauss–Legendre (independent of lloyd_max's grid)."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    x = (b - a) / 2 * nodes + (a + b) / 2
    f = coordinate_density(torch.from_numpy(x), d).numpy()
    w = weights * (b - a) / 2
    return float((w * f).sum()), float((w * x * f).sum())


@pytest.mark.parametrize("d", [24, 64, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_centroid_and_midpoint_conditions(d, bits):
    levels, bounds = lloyd_max(d, bits)
    assert len(levels) == 1 << bits and torch.all(levels.diff() > 0)
    assert torch.allclose(levels, -levels.flip(0), atol=1e-15)                       # symmetric
    assert torch.allclose(bounds, (levels[1:] + levels[:-1]) / 2, atol=1e-15)         # midpoint condition
    edges = [-1.0, *bounds.tolist(), 1.0]
    for i, level in enumerate(levels.tolist()):                                       # centroid condition
        mass, moment = _cell_moments(d, edges[i], edges[i + 1])
        assert abs(moment / mass - level) < 1e-6 * math.sqrt(1 / d) + 1e-9


def test_lloyd_max_density_and_gaussian_limit():
    nodes, weights = np.polynomial.legendre.leggauss(400)
    f = coordinate_density(torch.from_numpy(nodes), 64).numpy()
    assert abs((weights * f).sum() - 1) < 1e-9                                        # a density
    # large d: √d · levels approach the N(0, 1) Lloyd–Max levels (±0.4528, ±1.5104 at 2 bits)
    levels, _ = lloyd_max(4096, 2)
    assert np.allclose((levels * 64).tolist(), [-1.5104, -0.4528, 0.4528, 1.5104], atol=2e-3)
    errors = [mse(64, b) * 64 for b in (1, 2, 3, 4)]                                  # ≈ 0.36, 0.117, 0.03, 0.009
    assert all(a > 2.5 * b for a, b in zip(errors, errors[1:])) and 0.1 < errors[1] < 0.125


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_quantizer_equals_reference_and_stores_its_bits(bits, symmetric):
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(bits)) * 3
    q = int_quantize(x, bits, 32, symmetric)
    y = int_dequantize(q, symmetric)
    g = x.reshape(2, 3, 5, 2, 32)                                                      # a plain re-statement
    if symmetric:
        m = 2 ** (bits - 1) - 1
        s = (g.abs().amax(-1, keepdim=True) / m).half().float()
        ref = (torch.round(g / s).clamp(-m, m) * s)
    else:
        lo = g.amin(-1, keepdim=True).half().float()
        s = ((g.amax(-1, keepdim=True) - lo) / (2 ** bits - 1)).half().float()
        ref = lo + torch.round((g - lo) / s).clamp(0, 2 ** bits - 1) * s
    assert torch.equal(y, ref.reshape(x.shape))
    assert q.nbytes * 8 == x.numel() * int_bits(bits, 32, symmetric)


def test_turboquant_picks_the_nearest_level_and_counts_its_bytes():
    d, bits = 64, 3
    R = random_hadamard(d, 0).float()
    x = torch.randn(4, 2, 7, d, generator=torch.Generator().manual_seed(0))
    q = turboquant(x, R, bits)
    levels, _ = lloyd_max(d, bits)
    u = (x / x.norm(dim=-1, keepdim=True).half().float()) @ R.T
    nearest = (u[..., None] - levels.float()).abs().argmin(-1)
    ref = (levels.float()[nearest] @ R) * x.norm(dim=-1, keepdim=True).half().float()
    assert torch.allclose(turboquant_dequantize(q, R), ref, atol=1e-6)
    assert q.nbytes == x[..., 0].numel() * (d * bits // 8 + 2)                         # codes + float16 norm
    rel = ((turboquant_dequantize(q, R) - x).norm(dim=-1) ** 2 / x.norm(dim=-1) ** 2).mean()
    assert abs(rel - mse(d, bits) * d) < 0.3 * mse(d, bits) * d                        # the MSE it promises


def test_qjl_makes_inner_products_unbiased():
    d = 64
    R = random_hadamard(d, 1).float()
    x = torch.randn(d, generator=torch.Generator().manual_seed(3))
    y = torch.randn(d, generator=torch.Generator().manual_seed(4))
    with_qjl, without = [], []
    for seed in range(400):                                  # expectation over QJL's random matrix
        S = qjl_matrix(d, seed)
        with_qjl.append(float(turboquant_dequantize(turboquant(x, R, 2, S), R, S) @ y))
    mse_only = float(turboquant_dequantize(turboquant(x, R, 1), R) @ y)
    exact = float(x @ y)
    mean, sd = np.mean(with_qjl), np.std(with_qjl) / math.sqrt(len(with_qjl))
    assert abs(mean - exact) < 4 * sd                        # unbiased within the sampling error
    assert abs(mse_only - exact) > abs(mean - exact)         # the 1-bit MSE quantizer alone is biased here


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_norm_correct_keeps_each_vectors_projection(bits):
    d = 64
    R = random_hadamard(d, 2).double()
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    plain, fixed = turboquant(x, R, bits), turboquant(x, R, bits, norm_correct=True)
    assert torch.equal(plain.packed, fixed.packed) and fixed.nbytes == plain.nbytes    # same codes, same bytes
    y_plain, y_fixed = turboquant_dequantize(plain, R, dtype=torch.float64), turboquant_dequantize(fixed, R, dtype=torch.float64)
    proj = lambda y: (y * x).sum(-1) / x.pow(2).sum(-1)                 # ⟨x̂, x⟩ / ‖x‖² per vector
    assert torch.allclose(proj(y_fixed), torch.ones(4000, dtype=torch.float64), atol=2e-3)   # float16 norm
    shrink = 1 - mse(d, bits) * d                                       # Lloyd–Max: ⟨x̂, x⟩ ≈ (1 − D)‖x‖²
    assert abs(float(proj(y_plain).mean()) - shrink) < 0.25 * mse(d, bits) * d
    # inner products with independent vectors: the plain ones shrink by 1 − D on average, the fixed ones do not
    q = torch.randn(4000, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = (q * x).sum(-1)
    slope = lambda y: float((q * y).sum(-1) @ exact / (exact @ exact))  # least-squares slope of scores on exact ones
    assert abs(slope(y_fixed) - 1) < abs(slope(y_plain) - 1)
    assert abs(slope(y_plain) - shrink) < 0.03
    zero = turboquant(torch.zeros(2, d, dtype=torch.float64), R, bits, norm_correct=True)
    assert torch.equal(turboquant_dequantize(zero, R, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64))


def test_norm_correct_in_the_codec_leaves_qjl_ks_unbiasing_alone():
    x = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(1))
    qjl, both = KvCacheConfig("turboquant", 3, qjl=True), KvCacheConfig("turboquant", 3, qjl=True, norm_correct="kv")
    assert torch.equal(KvCodec(qjl, 64, 0, "k").roundtrip(x), KvCodec(both, 64, 0, "k").roundtrip(x))
    assert not torch.equal(KvCodec(qjl, 64, 0, "v").roundtrip(x), KvCodec(both, 64, 0, "v").roundtrip(x))
    # a fractional rate: each channel set (3 and 2 bits) keeps its own projection, so the whole vector does
    proj = lambda y: (y * x).sum(-1) / x.pow(2).sum(-1)
    fixed = KvCodec(KvCacheConfig("turboquant", 2.5, norm_correct="kv"), 64, 0, "v").roundtrip(x)
    plain = KvCodec(KvCacheConfig("turboquant", 2.5), 64, 0, "v").roundtrip(x)
    assert torch.allclose(proj(fixed), torch.ones(1, 2, 16), atol=3e-3)                # float16 norms
    assert float(proj(plain).mean()) < 0.97                                           # shrunk without it
    assert KvCacheConfig("turboquant", 3.5, norm_correct="kv", pre_rope=True).name == "turboquant3.5-ncorr-prerope"
    assert KvCacheConfig("turboquant", 3.5, norm_correct="v").name == "turboquant3.5-ncorrv"
    only_v = KvCacheConfig("turboquant", 3, norm_correct="v")
    assert torch.equal(KvCodec(only_v, 64, 0, "k").roundtrip(x), KvCodec(KvCacheConfig("turboquant", 3), 64, 0, "k").roundtrip(x))


@pytest.mark.parametrize("config, bits_per_value", [
    (KvCacheConfig("int", 4), 4 + 32 / 64), (KvCacheConfig("int", 2, group=32), 2 + 32 / 32),
    (KvCacheConfig("kivi", 2), 2 + 32 / 32), (KvCacheConfig("turboquant", 3), 3 + 16 / 64),
    (KvCacheConfig("turboquant", 2.5), 2.5 + 32 / 64), (KvCacheConfig("turboquant", 3.5, norm_correct="kv"), 3.5 + 32 / 64)])
def test_codec_bytes_match_the_bits_claimed(config, bits_per_value):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for which in "kv":
        chunk = KvCodec(config, 64, 0, which).encode(x)
        assert chunk.nbytes * 8 == pytest.approx(x.numel() * bits_per_value)


def test_turboquant_split_gives_the_high_bits_to_the_largest_channels():
    x = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(0))
    x[..., 5] *= 20                                            # an outlier channel
    codec = KvCodec(KvCacheConfig("turboquant", 2.5), 64, 0, "k")
    y = codec.roundtrip(x)
    assert codec.split[:, 0].tolist() == [5, 5]
    plain = KvCodec(KvCacheConfig("turboquant", 2), 64, 0, "k").roundtrip(x)
    assert (y - x).norm() < (plain - x).norm()


@pytest.mark.parametrize("config", [KvCacheConfig("turboquant", 3.5, center_k=True),
                                    KvCacheConfig("int", 4, center_k=True)], ids=lambda c: c.name)
def test_centered_k_is_the_codec_on_k_less_its_first_write_mean(config):
    g = torch.Generator().manual_seed(5)
    first, later = torch.randn(1, 2, 16, 64, generator=g), torch.randn(1, 2, 8, 64, generator=g)
    first[..., 3] += 40                                        # a constant "bias" channel, as K has
    later[..., 3] += 40
    codec = KvCodec(config, 64, 0, "k")
    y_first, y_later = codec.roundtrip(first), codec.roundtrip(later)
    assert torch.equal(codec.mean, first.mean(dim=(0, 2)).half().float())   # fixed on the first write, float16
    mean = codec.mean[None, :, None, :]                        # [H, D] -> [1, H, 1, D]
    plain = KvCodec(dataclasses.replace(config, center_k=False), 64, 0, "k")
    plain.roundtrip(first - mean)                              # the same first write fixes the same split
    assert torch.allclose(y_later, plain.roundtrip(later - mean) + mean, atol=1e-6)
    assert (y_first - first).norm() < (KvCodec(dataclasses.replace(config, center_k=False), 64, 0, "k")
                                       .roundtrip(first) - first).norm()    # the bias channel no longer costs bits
    assert codec.state_nbytes == 2 * 2 * 64 + (2 * 64 if config.bits == 3.5 else 0)   # mean (+ split order)
    v = KvCodec(config, 64, 0, "v")
    v.roundtrip(first)
    assert v.mean is None                                      # V is never centered


@pytest.mark.parametrize("kwargs, needle", [
    (dict(method="int", bits=5), "supports --kv-bits 2, 3, 4, 8"), (dict(method="turboquant", bits=1.5), "2.5"),
    (dict(method="kivi", bits=3.5), "supports"), (dict(method="nope"), "unknown KV cache method"),
    (dict(residual=-1), "residual"), (dict(sink=-2), "sink"), (dict(sink=True), "sink"),
    (dict(method="kivi", axis="channel"), "axis"),
    (dict(method="int", qjl=True), "qjl"), (dict(group=0), "group"), (dict(seed="x"), "seed"),
    (dict(method="kivi", bits=2, center_k=True), "center_k"),
    (dict(method="int", axis="channel", center_k=True), "center_k"),
    (dict(method="int", norm_correct="kv"), "applies to --kv turboquant only"),
    (dict(method="turboquant", norm_correct=True), "norm_correct must be"), (dict(method="turboquant", norm_correct="q"), "norm_correct must be")])
def test_bad_kv_configs(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        KvCacheConfig(**kwargs)


def test_context_checks():
    with pytest.raises(ValueError, match="larger than the context"):
        KvCacheConfig("kivi", 2, residual=4096).check_context(2048)
    with pytest.raises(ValueError, match="--kv-sink 4096 is larger than the context"):
        KvCacheConfig("turboquant", 3, sink=4096).check_context(2048)
    assert KvCacheConfig("turboquant", 3, center_k=True, sink=4).name == "turboquant3-kcenter-sink4"


@pytest.mark.parametrize("n", [1, 7, 8, 50, 64])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_fast_unpack_equals_the_reference(bits, n):
    from lowbit.kv.packing import unpack_reference

    codes = torch.randint(0, 1 << bits, (4, 3, n), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, n), unpack_reference(packed, bits, n))
    assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))
