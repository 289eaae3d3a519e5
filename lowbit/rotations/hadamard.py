"""Hadamard and random orthogonal matrices, and fast Hadamard transforms, for rotating
weights and activations before quantization (QuaRot-style incoherence processing).

A Hadamard matrix of order n is built as H_m ⊗ H_p with p = 2^k (Sylvester) and m one of
1, 2, q + 1 (Paley I, prime q ≡ 3 mod 4) or 2(q + 1) (Paley II, prime q ≡ 1 mod 4).
All matrices here are float64; entries of hadamard(n) are exactly ±1.
"""
from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache
from typing import NamedTuple

import torch


class NoHadamardError(ValueError):
    """No Hadamard matrix of the requested order is constructible by the rules here."""


class _Construction(NamedTuple):
    power_of_two: int  # p = 2^k, the Sylvester factor
    cofactor: int  # m, the Paley (or trivial) factor; n = m * p
    kind: str  # "trivial", "paley1" or "paley2"
    prime: int  # q of the Paley construction, 0 for "trivial"


def _check_order(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"order must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    return int(n)


def _check_seed(seed) -> int:
    # bool is an int subclass; a seed of True is almost surely a mistake
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    return int(seed)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _factorisation(n: int) -> str:
    parts, rest, d = [], n, 2
    while d * d <= rest:
        e = 0
        while rest % d == 0:
            rest, e = rest // d, e + 1
        if e:
            parts.append(f"{d}^{e}" if e > 1 else str(d))
        d += 1
    if rest > 1 or not parts:
        parts.append(str(rest))
    return " * ".join(parts)


def _cofactor_construction(m: int) -> tuple[str, int] | None:
    """How to build the order-m factor, as (kind, q), or None."""
    if m in (1, 2):
        return "trivial", 0
    # Paley I first: it is the smaller matrix to build when both apply (e.g. m = 12)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1", m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2", m // 2 - 1
    return None


@lru_cache(maxsize=256)
def _construction(n: int) -> _Construction | None:
    """The split n = m * 2^j with the largest 2^j whose cofactor m is constructible."""
    twos = (n & -n).bit_length() - 1  # exponent of 2 in n
    for j in range(twos, -1, -1):
        found = _cofactor_construction(n >> j)
        if found is not None:
            return _Construction(1 << j, n >> j, *found)
    return None


def _require_construction(n: int) -> _Construction:
    found = _construction(n)
    if found is None:
        raise NoHadamardError(
            f"no Hadamard construction for n={n} (= {_factorisation(n)}): need 2^k * m with m "
            "in {1, 2}, q+1 (prime q = 3 mod 4) or 2(q+1) (prime q = 1 mod 4)")
    return found


# The cached builders below return int8 tensors shared by every caller: public functions
# hand out float64 copies, so the cache can never be mutated from outside.

@lru_cache(maxsize=16)
def _sylvester(p: int) -> torch.Tensor:
    """Sylvester matrix of order p = 2^k, int8 [p, p]: H_2p = H_2 ⊗ H_p."""
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = legendre(j - i mod q), int8 [q, q]."""
    # Euler's criterion: a^((q-1)/2) mod q is 1 for residues, q-1 for non-residues, 0 for a=0
    powers = [pow(a, (q - 1) // 2, q) for a in range(q)]
    legendre = torch.tensor([-1 if v == q - 1 else v for v in powers], dtype=torch.int8)
    idx = torch.arange(q)
    return legendre[(idx[None, :] - idx[:, None]) % q]


@lru_cache(maxsize=16)
def _paley(m: int) -> torch.Tensor:
    """Hadamard matrix of order m in {1, 2} or by Paley I / II, int8 [m, m]."""
    kind, q = _cofactor_construction(m)
    if kind == "trivial":
        return _sylvester(m)
    jac = _jacobsthal(q)
    if kind == "paley1":
        # H = I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric (Q is, since q = 3 mod 4)
        h = torch.empty(m, m, dtype=torch.int8)
        h[0, :] = 1
        h[1:, 0] = -1
        h[1:, 1:] = jac + torch.eye(q, dtype=torch.int8)
        return h
    # Paley II: symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] of order q + 1; its zero
    # diagonal is filled by the second Kronecker term
    conf = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    conf[0, 1:] = 1
    conf[1:, 0] = 1
    conf[1:, 1:] = jac
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    minus = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(conf, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int8), minus)


@lru_cache(maxsize=8)
def _hadamard_int8(n: int) -> torch.Tensor:
    c = _require_construction(n)
    return torch.kron(_paley(c.cofactor), _sylvester(c.power_of_two))


def has_hadamard(n: int) -> bool:
    """Whether hadamard(n) can build a matrix of order n."""
    return _construction(_check_order(n)) is not None


def hadamard(n: int) -> torch.Tensor:
    """Hadamard matrix H_m ⊗ H_{2^k} of order n = m * 2^k, float64 [n, n], H Hᵀ = n I.

    Raises NoHadamardError when no split of n has a constructible cofactor m.
    """
    # .to() copies (int8 -> float64), so the caller owns the result
    return _hadamard_int8(_check_order(n)).to(torch.float64)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n independent ±1 signs from a generator seeded with seed, float64 [n]."""
    n, seed = _check_order(n), _check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Randomized Hadamard rotation Q = H diag(signs) / sqrt(n), orthogonal float64 [n, n]."""
    signs = random_signs(n, seed)  # validates n and seed before the (possibly failing) build
    return hadamard(n) * (signs / math.sqrt(n))  # broadcasting over rows scales columns


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal matrix, float64 [n, n], from the QR of a seeded Gaussian."""
    n, seed = _check_order(n), _check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    # QR is unique only up to column signs; fixing diag(R) > 0 makes Q Haar distributed
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return q * signs


def orthogonal(n: int, kind: str, seed: int, fallback: bool = True) -> torch.Tensor:
    """Orthogonal float64 [n, n] of the given kind ("hadamard" or "random").

    kind "hadamard" with no construction for n: warn and return random_orthogonal(n, seed)
    when fallback, else raise NoHadamardError.
    """
    n, seed = _check_order(n), _check_seed(seed)
    if kind == "random":
        return random_orthogonal(n, seed)
    if kind != "hadamard":
        raise ValueError(f"unknown rotation kind {kind!r}; expected 'hadamard' or 'random'")
    if has_hadamard(n) or not fallback:
        return random_hadamard(n, seed)
    warnings.warn(f"no Hadamard matrix of order {n}; using a random orthogonal matrix",
                  stacklevel=2)
    return random_orthogonal(n, seed)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (Sylvester order).

    x: [..., n] with n a power of two. Returns [..., n] equal to x @ hadamard(n).T, in
    O(n log n) per row instead of O(n^2).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < n:
        # [..., n] -> [..., n / 2h, 2, h]: dim -2 pairs element j with j + h in each block of
        # 2h, i.e. the two halves along the bit of weight h that this stage mixes
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        # butterfly, then back to [..., n] so the next stage can pick the next bit
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return y if n > 1 else y.clone()  # never return the caller's tensor itself


def hadamard_transform(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """x @ hadamard(n).T (/ sqrt(n) if normalize) over the last dim, n = m * 2^k.

    x: [..., n], floating. Returns [..., n] in x's dtype and device. With H = H_m ⊗ H_p
    (p = 2^k) and x viewed as X [..., m, p], x Hᵀ is H_m X H_pᵀ: an FWHT over p plus an
    [m, m] matmul, O(n (log p + m)) per row.
    """
    n = x.shape[-1]
    c = _require_construction(_check_order(n))
    lead = x.shape[:-1]
    if c.cofactor == 1:
        y = fwht(x)
    else:
        # [..., n] -> [..., m, p]: index a * p + b of x is (a, b), matching H_m ⊗ H_p
        y = fwht(x.reshape(*lead, c.cofactor, c.power_of_two))
        h_m = _paley(c.cofactor).to(dtype=x.dtype, device=x.device)
        # [m, m] @ [..., m, p] mixes the cofactor index; then flatten back to [..., n]
        y = torch.matmul(h_m, y).reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y
