"""Hadamard constructions (Sylvester ⊗ Paley), random rotations and fast transforms."""
import math
import warnings

import pytest
import torch

from lowbit.rotations import (
    NoHadamardError,
    fwht,
    hadamard,
    hadamard_transform,
    has_hadamard,
    orthogonal,
    random_hadamard,
    random_orthogonal,
    random_signs,
)
from lowbit.rotations.hadamard import _construction, _jacobsthal

# order -> (2^k, m, construction of m, q)
SPLITS = {
    1: (1, 1, "trivial", 0),
    2: (2, 1, "trivial", 0),
    12: (1, 12, "paley1", 11),
    20: (1, 20, "paley1", 19),
    28: (1, 28, "paley2", 13),
    36: (1, 36, "paley2", 17),
    76: (1, 76, "paley2", 37),
    64: (64, 1, "trivial", 0),
    256: (256, 1, "trivial", 0),
    576: (16, 36, "paley2", 17),
    640: (32, 20, "paley1", 19),
    896: (32, 28, "paley2", 13),
    1536: (128, 12, "paley1", 11),
    2048: (2048, 1, "trivial", 0),
    4096: (4096, 1, "trivial", 0),
    4864: (64, 76, "paley2", 37),
    5504: (1, 5504, "paley1", 5503),
    11008: (2, 5504, "paley1", 5503),  # 2^8 * 43; 5503 is prime and = 3 mod 4
}
# 172 = 4 * 43 and 2752 = 64 * 43: no split has a prime q for Paley I or II
# (Hadamard matrices of order 172 exist, by other constructions not built here)
NOT_CONSTRUCTIBLE = [3, 6, 43, 86, 172, 2752]


def _eye(n, rows=None):
    eye = torch.eye(n, dtype=torch.float64)
    return eye if rows is None else eye[rows]


@pytest.mark.parametrize("n", sorted(SPLITS))
def test_split_is_largest_power_of_two(n):
    assert tuple(_construction(n)) == SPLITS[n]
    assert has_hadamard(n)


@pytest.mark.parametrize("n", [n for n in sorted(SPLITS) if n <= 2048])
def test_hadamard_exact(n):
    h = hadamard(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * _eye(n))


@pytest.mark.parametrize("n", [4096, 4864, 5504, 11008])
def test_hadamard_exact_rows(n):
    # a full n^3 product is too slow here: rows 0-3 and 12 random rows against all rows. For
    # the Paley I factor of order 5504 rows 0 and 1 are a full proof: its core Q + I is
    # circulant, so the Gram entry of rows i, j >= 1 depends only on j - i mod q (11008 is
    # H_5504 ⊗ H_2, whose rows 0-3 are those two rows times H_2's)
    h = hadamard(n)
    spot = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:12]
    rows = torch.cat([torch.arange(4), spot])
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h[rows] @ h.T, n * _eye(n, rows))


@pytest.mark.parametrize("q", [3, 5, 13, 19, 37, 5503])
def test_jacobsthal_is_the_quadratic_character(q):
    squares = {x * x % q for x in range(1, q)}
    row = _jacobsthal(q)[0].tolist()  # Q[0, j] = legendre(j)
    assert row == [0] + [1 if a in squares else -1 for a in range(1, q)]


def test_hadamard_returns_a_copy():
    h = hadamard(12)
    h.zero_()
    assert torch.equal(hadamard(12).abs(), torch.ones(12, 12, dtype=torch.float64))


@pytest.mark.parametrize("n", NOT_CONSTRUCTIBLE)
def test_no_construction_raises(n):
    assert not has_hadamard(n)
    with pytest.raises(NoHadamardError, match=f"n={n}"):
        hadamard(n)
    with pytest.raises(NoHadamardError):
        orthogonal(n, "hadamard", seed=0, fallback=False)
    with pytest.raises(NoHadamardError):
        hadamard_transform(torch.ones(n))


def test_fallback_warns_and_is_orthogonal():
    with pytest.warns(UserWarning, match="172"):
        q = orthogonal(172, "hadamard", seed=3)
    assert torch.allclose(q.T @ q, _eye(172), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(172, 3))


@pytest.mark.parametrize("n", [1, 12, 64, 576, 640])
def test_random_hadamard(n):
    q = random_hadamard(n, seed=7)
    assert torch.allclose(q.T @ q, _eye(n), atol=1e-12, rtol=0)
    assert torch.equal(q, random_hadamard(n, seed=7))
    assert torch.equal(q * math.sqrt(n), hadamard(n) * random_signs(n, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constructible: no fallback warning
        assert torch.equal(orthogonal(n, "hadamard", seed=7), q)
    if n > 1:
        assert not torch.equal(q, random_hadamard(n, seed=8))


def test_random_signs():
    s = random_signs(1000, seed=1)
    assert s.dtype == torch.float64 and set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(1000, seed=1))
    assert not torch.equal(s, random_signs(1000, seed=2))


@pytest.mark.parametrize("n", [1, 5, 100])
def test_random_orthogonal(n):
    q = random_orthogonal(n, seed=11)
    assert q.dtype == torch.float64
    assert torch.allclose(q.T @ q, _eye(n), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(n, seed=11))
    assert torch.equal(orthogonal(n, "random", seed=11), q)
    if n > 1:
        assert not torch.equal(q, random_orthogonal(n, seed=12))


def test_unknown_kind():
    with pytest.raises(ValueError, match="hadamard"):
        orthogonal(64, "givens", seed=0)


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_bad_seed(seed):
    for fn in (random_signs, random_hadamard, random_orthogonal):
        with pytest.raises(TypeError):
            fn(64, seed)
    with pytest.raises(TypeError):
        orthogonal(64, "hadamard", seed)
    with pytest.raises(TypeError):
        orthogonal(172, "hadamard", seed)  # checked before the fallback


@pytest.mark.parametrize("n", [1, 2, 64, 1024])
def test_fwht_equals_matrix(n):
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(fwht(x), x @ hadamard(n).T, atol=1e-10, rtol=0)
    y32 = fwht(x.float())
    assert y32.dtype == torch.float32
    ref = x @ hadamard(n).T
    assert (y32.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fwht_rejects_other_sizes():
    with pytest.raises(ValueError):
        fwht(torch.ones(12))


@pytest.mark.parametrize("n", [1, 12, 64, 576, 640, 896, 1536, 4864])
def test_hadamard_transform_equals_matrix(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen)
    h = hadamard(n)
    ref = x @ h.T / math.sqrt(n)
    assert torch.allclose(hadamard_transform(x), ref, atol=1e-10, rtol=0)
    assert torch.allclose(hadamard_transform(x, normalize=False), x @ h.T, atol=1e-9, rtol=0)
    y32 = hadamard_transform(x.float())
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    assert (y32.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    # a single vector (no leading dims) and a non-contiguous input
    assert torch.allclose(hadamard_transform(x[0, 0]), ref[0, 0], atol=1e-10, rtol=0)
    xt = x.transpose(0, 1)
    assert torch.allclose(hadamard_transform(xt), ref.transpose(0, 1), atol=1e-10, rtol=0)
