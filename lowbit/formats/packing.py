"""Row-wise bit packing of unsigned integer codes into uint8 bytes.

Layout: each row is an independent little-endian bitstream. Code j of a row occupies
stream bits [j*bits, (j+1)*bits), least significant bit first, and stream bit k lives in
byte k // 8 at bit position k % 8. For bits in {1, 2, 4} this is the usual "first code in
the low bits" nibble/crumb order; 3/5/6/7-bit codes are dense (8 3-bit codes in 3 bytes).
Each row is zero-padded to a whole number of bytes, so a row takes
ceil(n * bits / 8) bytes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of n `bits`-bit codes takes (padding included)."""
    return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes [rows, n] uint8 (each < 2**bits) -> [rows, ceil(n*bits/8)] uint8."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, n = codes.shape
    if bits == 8:
        return codes.contiguous()
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2**bits = {1 << bits}, got max {int(codes.max())}")
    n_bytes = packed_row_bytes(n, bits)
    if 8 % bits == 0:
        per = 8 // bits
        padded = codes.new_zeros(rows, n_bytes * per)
        padded[:, :n] = codes
        grouped = padded.reshape(rows, n_bytes, per)  # the `per` codes that share one byte
        out = grouped[:, :, 0].clone()
        for j in range(1, per):
            out |= grouped[:, :, j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.uint8)
    planes = (codes.unsqueeze(-1) >> shifts) & 1  # [rows, n, bits] bit planes, LSB first
    stream = codes.new_zeros(rows, n_bytes * 8)
    stream[:, : n * bits] = planes.reshape(rows, n * bits)  # row bitstream, zero tail
    stream = stream.reshape(rows, n_bytes, 8)  # 8 consecutive stream bits per byte
    out = stream[:, :, 0].clone()
    for k in range(1, 8):
        out |= stream[:, :, k] << k
    return out


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Exact inverse of pack_bits: packed [rows, ceil(n*bits/8)] uint8 -> [rows, n] uint8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, n_bytes = packed.shape
    if n_bytes != packed_row_bytes(n, bits):
        raise ValueError(
            f"packed has {n_bytes} bytes per row, expected {packed_row_bytes(n, bits)} for n={n}, bits={bits}"
        )
    if bits == 8:
        return packed.contiguous()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # [rows, n_bytes, per]
        return codes.reshape(rows, n_bytes * per)[:, :n].contiguous()  # drop pad codes
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = (packed.unsqueeze(-1) >> shifts) & 1  # [rows, n_bytes, 8] bits, LSB first
    planes = stream.reshape(rows, n_bytes * 8)[:, : n * bits]  # drop the byte padding
    planes = planes.reshape(rows, n, bits)  # `bits` stream bits per code
    codes = planes[:, :, 0].clone()
    for k in range(1, bits):
        codes |= planes[:, :, k] << k
    return codes


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Densely pack unsigned codes [rows, n] (uint8, < 2^bits) into int32 [rows, ceil(n·bits/32)].

    Row r is one little-endian bit stream, laid out as pack_bits lays out bytes: code i in stream
    bits [i·b, (i+1)·b), stream bit k in word k // 32 at bit k % 32 (four consecutive bytes make
    one word). The engines' int32 layouts (GPTQ, compressed-tensors) use it; lowbit.export.int_layout
    re-exports it.
    """
    rows, n = values.shape
    n_words = -(-n * bits // 32)
    stream = pack_bits(values.contiguous(), bits)           # [rows, ceil(n·bits/8)] bytes
    padded = stream.new_zeros(rows, 4 * n_words)
    padded[:, : stream.shape[1]] = stream
    byte = padded.reshape(rows, n_words, 4).to(torch.int64)  # the 4 bytes of each word, low first
    words = byte[..., 0] | byte[..., 1] << 8 | byte[..., 2] << 16 | byte[..., 3] << 24
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 bit pattern -> int32
    return words.to(torch.int32)


def unpack_int32(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_int32: int32 [rows, ceil(n·bits/32)] -> uint8 codes [rows, n]."""
    rows, n_words = words.shape
    if n_words != -(-n * bits // 32):
        raise ValueError(f"{n_words} words per row cannot hold {n} codes of {bits} bits")
    shifts = torch.arange(32, dtype=torch.int64)
    stream = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1    # [rows, n_words, 32] bits
    planes = stream.reshape(rows, n_words * 32)[:, : n * bits].reshape(rows, n, bits)  # bits per code
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    return (planes * weights).sum(-1).to(torch.uint8)
