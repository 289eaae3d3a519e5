"""Bit-packing of small integer codes into bytes: the cache stores what it claims.

Layout (one row = the last dimension): code i of a row occupies bits [i·b, (i+1)·b) of the row's
bit stream, least significant bit first; the stream is padded with zeros to a whole byte. Any
b in 1..8 works, so 3-bit codes cost 3 bits, not 4.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of n codes of `bits` bits."""
    return math.ceil(n * bits / 8)


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"codes of 1..8 bits can be packed, got {bits!r}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes [..., n] integers in [0, 2^bits) -> uint8 [..., packed_bytes(n, bits)]."""
    _check(bits)
    n = codes.shape[-1]
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed in {bits} bits")
    if bits == 8:
        return c.to(torch.uint8)
    planes = (c.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int16)) & 1     # [..., n, bits]
    stream = planes.reshape(*codes.shape[:-1], n * bits)                         # [..., n*bits]: the bit stream
    stream = torch.nn.functional.pad(stream, (0, (-n * bits) % 8))
    octets = stream.reshape(*codes.shape[:-1], -1, 8)                            # [..., bytes, 8]
    return (octets << torch.arange(8, dtype=torch.int16)).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of pack_codes: uint8 [..., packed_bytes(n, bits)] -> uint8 codes [..., n]."""
    _check(bits)
    if packed.shape[-1] != packed_bytes(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes per row, {packed_bytes(n, bits)} expected for {n} {bits}-bit codes")
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:                                   # fast path: whole codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)             # [..., bytes, per]
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    # any other width: 8 codes fill exactly `bits` bytes, so each run of `bits` bytes is one word
    p = torch.nn.functional.pad(packed, (0, (-packed.shape[-1]) % bits)).to(torch.int64)
    runs = p.reshape(*packed.shape[:-1], -1, bits)                               # [..., runs, bits bytes]
    words = (runs << (8 * torch.arange(bits, dtype=torch.int64))).sum(-1)        # [..., runs]: ≤ 56 bits
    codes = (words.unsqueeze(-1) >> (bits * torch.arange(8, dtype=torch.int64))) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)        # [..., runs·8] -> [..., n]


def unpack_reference(packed: Tensor, bits: int, n: int) -> Tensor:
    """unpack_codes through the bit stream, for any width (the reference the fast path is tested against)."""
    p = packed.to(torch.int16)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1)      # [..., bytes, 8]
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits]             # [..., n*bits]
    planes = stream.reshape(*packed.shape[:-1], n, bits)                         # [..., n, bits]
    return (planes << torch.arange(bits, dtype=torch.int16)).sum(-1).to(torch.uint8)
