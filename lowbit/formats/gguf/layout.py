"""Byte layouts of GGUF (ggml) quantized blocks, and the byte/bit helpers the formats share.

A ggml quantized row is a run of blocks; every block is a fixed sequence of fields stored
back to back with no padding, little-endian (fp16 scales are IEEE half floats). A `BlockLayout`
names those fields and their sizes, so the bits per weight follow from the layout alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class Field:
    """One field of a block: `nbytes` bytes holding `what`."""

    name: str
    nbytes: int
    what: str

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"Field name must be an identifier, got {self.name!r}")
        if self.nbytes <= 0:
            raise ValueError(f"Field {self.name}: nbytes must be positive, got {self.nbytes}")


@dataclass(frozen=True)
class BlockLayout:
    """A block of `block_size` weights stored as `fields`, in this order."""

    name: str
    block_size: int
    fields: tuple[Field, ...]

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size % 32:
            raise ValueError(f"{self.name}: block_size must be a positive multiple of 32, got {self.block_size}")
        names = [f.name for f in self.fields]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: fields must be non-empty with unique names, got {names}")

    @property
    def bytes_per_block(self) -> int:
        return sum(f.nbytes for f in self.fields)

    @property
    def bits_per_weight(self) -> float:
        """Every stored bit counted: codes, scales, mins, high-bit masks."""
        return 8 * self.bytes_per_block / self.block_size

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Field name -> (first byte, end byte) inside the block."""
        out, at = {}, 0
        for f in self.fields:
            out[f.name] = (at, at + f.nbytes)
            at += f.nbytes
        return out

    def split(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        """blocks uint8 [n, bytes_per_block] -> field name -> uint8 view [n, nbytes]."""
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != self.bytes_per_block:
            raise ValueError(f"{self.name}: expected uint8 [n, {self.bytes_per_block}], "
                             f"got {blocks.dtype} {blocks.shape}")
        return {name: blocks[:, lo:hi] for name, (lo, hi) in self.offsets().items()}

    def join(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """field name -> uint8 [n, nbytes] -> blocks uint8 [n, bytes_per_block]."""
        if set(parts) != {f.name for f in self.fields}:
            raise ValueError(f"{self.name}: fields {sorted(parts)} != {[f.name for f in self.fields]}")
        for f in self.fields:
            p = parts[f.name]
            if p.dtype != np.uint8 or p.ndim != 2 or p.shape[1] != f.nbytes:
                raise ValueError(f"{self.name}.{f.name}: expected uint8 [n, {f.nbytes}], got {p.dtype} {p.shape}")
        return np.ascontiguousarray(np.concatenate([parts[f.name] for f in self.fields], axis=1))


# ---------------------------------------------------------------------------- rows <-> blocks

def rows_to_blocks(W, layout: BlockLayout) -> np.ndarray:
    """W [rows, cols] float -> float32 [rows * cols / block_size, block_size], refusing ragged rows.

    ggml has no partial blocks: a row whose length is not a multiple of the block size cannot
    be stored in this type at all (llama.cpp's mixes fall back to another type for such rows)."""
    W = np.asarray(W.detach().cpu().numpy() if hasattr(W, "detach") else W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"{layout.name}: expected a 2-D weight [rows, cols], got shape {W.shape}")
    if W.shape[1] % layout.block_size:
        raise ValueError(f"{layout.name}: row length {W.shape[1]} is not a multiple of the block size "
                         f"{layout.block_size}; ggml cannot store such a row in this type")
    if not np.isfinite(W).all():
        raise ValueError(f"{layout.name}: the weight holds NaN or inf")
    return np.ascontiguousarray(W).reshape(-1, layout.block_size)


def blocks_from_bytes(data, layout: BlockLayout, shape: tuple[int, int]) -> np.ndarray:
    """Quantized bytes (any shape, e.g. GGUFReader's [rows, row_bytes]) -> uint8 [n_blocks, bytes]."""
    rows, cols = shape
    if cols % layout.block_size:
        raise ValueError(f"{layout.name}: row length {cols} is not a multiple of the block size {layout.block_size}")
    raw = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(-1)
    n_blocks = rows * cols // layout.block_size
    if raw.size != n_blocks * layout.bytes_per_block:
        raise ValueError(f"{layout.name}: {raw.size} bytes do not hold a [{rows}, {cols}] tensor "
                         f"({n_blocks} blocks of {layout.bytes_per_block} bytes)")
    return raw.reshape(n_blocks, layout.bytes_per_block)


# ---------------------------------------------------------------------------- fp16 fields

def fp16_to_bytes(values: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint8 [n, 2]: IEEE half, round to nearest even, little-endian."""
    return np.ascontiguousarray(values.astype(np.float32).astype("<f2")).view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(field: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n, 1] (kept 2-D so it broadcasts over the block)."""
    return np.ascontiguousarray(field).view("<f2").astype(np.float32)


# ---------------------------------------------------------------------------- bit planes

def pack_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [..., 8 // bits, span] -> uint8 [..., span].

    Plane g (weights g*span .. g*span + span - 1 of the chunk) goes to bits [bits*g, bits*g + bits)
    of the span bytes: ggml's interleaving of 4-bit nibbles, 2-bit pairs and 1-bit masks."""
    planes = codes.shape[-2]
    if planes * bits != 8:
        raise ValueError(f"pack_planes: {planes} planes of {bits} bits do not fill a byte")
    shifts = (np.arange(planes, dtype=np.uint8) * bits).reshape(planes, 1)
    masked = codes.astype(np.uint8) & np.uint8((1 << bits) - 1)
    return np.bitwise_or.reduce(masked << shifts, axis=-2).astype(np.uint8)


def unpack_planes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., span] -> uint8 [..., 8 // bits, span], the inverse of pack_planes."""
    planes = 8 // bits
    shifts = (np.arange(planes, dtype=np.uint8) * bits).reshape(planes, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


def pack_bits_le(bits: np.ndarray) -> np.ndarray:
    """0/1 uint8 [n, 8 * k] -> uint8 [n, k]: bit j of the little-endian word = element j."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def unpack_bits_le(packed: np.ndarray) -> np.ndarray:
    """uint8 [n, k] -> 0/1 uint8 [n, 8 * k], the inverse of pack_bits_le."""
    return np.unpackbits(packed, axis=-1, bitorder="little")
