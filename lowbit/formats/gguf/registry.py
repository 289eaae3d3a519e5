"""The GGUF types lowbit can write and read, and the two entry points.

quantize_gguf(W [rows, cols], "Q4_K", imatrix=None) -> uint8 [rows, cols / block * bytes], the
bytes of the tensor exactly as a GGUF file stores them (row after row of blocks);
dequantize_gguf(data, "Q4_K", (rows, cols)) -> float32 tensor, bit-exact with ggml.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lowbit.formats.gguf import iq4_nl, kquant_affine, kquant_symmetric, legacy
from lowbit.formats.gguf.layout import BlockLayout, blocks_from_bytes, rows_to_blocks

CHUNK_WEIGHTS = 1 << 18  # weights quantized per call of a type's quantizer

# blocks float32 [n, block_size], per-weight importance [n, block_size] or None -> uint8 [n, bytes]
QuantizeBlocks = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
# uint8 [n, bytes] -> float32 [n, block_size]
DequantizeBlocks = Callable[[np.ndarray], np.ndarray]
# blocks uint8 [n, bytes], unsigned codes uint8 [n, block_size] -> blocks with those codes, scales kept
SetCodes = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GGUFType:
    """One ggml quantization type: its byte layout, ggml id and (de)quantizer."""

    layout: BlockLayout
    ggml_type: GGMLQuantizationType
    quantize_blocks: QuantizeBlocks
    dequantize_blocks: DequantizeBlocks
    # uniform grids only (value = step * code + offset per weight, codes 0..code_max): what GPTQ rounds on
    set_codes: SetCodes | None = None
    code_max: int | None = None

    def __post_init__(self):
        if self.layout.name != self.ggml_type.name:
            raise ValueError(f"layout {self.layout.name} does not match ggml type {self.ggml_type.name}")
        expected = GGML_QUANT_SIZES[self.ggml_type]
        if (self.block_size, self.bytes_per_block) != expected:
            raise ValueError(f"{self.name}: layout gives (block, bytes) = {(self.block_size, self.bytes_per_block)}, "
                             f"ggml says {expected}")

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def bytes_per_block(self) -> int:
        return self.layout.bytes_per_block

    @property
    def bits_per_weight(self) -> float:
        return self.layout.bits_per_weight


def _entry(layout, quantize, dequantize, family=None) -> GGUFType:
    codes = {} if family is None else {"set_codes": partial(family.set_codes, layout.name),
                                       "code_max": family.CODE_MAX[layout.name]}
    return GGUFType(layout, GGMLQuantizationType[layout.name], quantize, dequantize, **codes)


GGUF_TYPES: MappingProxyType[str, GGUFType] = MappingProxyType({t.name: t for t in (
    _entry(legacy.Q4_0, legacy.quantize_q4_0, legacy.dequantize_q4_0, legacy),
    _entry(legacy.Q4_1, legacy.quantize_q4_1, legacy.dequantize_q4_1, legacy),
    _entry(legacy.Q5_0, legacy.quantize_q5_0, legacy.dequantize_q5_0, legacy),
    _entry(legacy.Q5_1, legacy.quantize_q5_1, legacy.dequantize_q5_1, legacy),
    _entry(legacy.Q8_0, legacy.quantize_q8_0, legacy.dequantize_q8_0, legacy),
    _entry(iq4_nl.IQ4_NL, iq4_nl.quantize_iq4_nl, iq4_nl.dequantize_iq4_nl),  # a lookup table, not a uniform grid
    _entry(kquant_affine.Q2_K, partial(kquant_affine.quantize_kquant_affine, "Q2_K"), kquant_affine.dequantize_q2_k,
           kquant_affine),
    _entry(kquant_symmetric.Q3_K, partial(kquant_symmetric.quantize_kquant_symmetric, "Q3_K"),
           kquant_symmetric.dequantize_q3_k, kquant_symmetric),
    _entry(kquant_affine.Q4_K, partial(kquant_affine.quantize_kquant_affine, "Q4_K"), kquant_affine.dequantize_q4_k,
           kquant_affine),
    _entry(kquant_affine.Q5_K, partial(kquant_affine.quantize_kquant_affine, "Q5_K"), kquant_affine.dequantize_q5_k,
           kquant_affine),
    _entry(kquant_symmetric.Q6_K, partial(kquant_symmetric.quantize_kquant_symmetric, "Q6_K"),
           kquant_symmetric.dequantize_q6_k, kquant_symmetric),
)})


def gguf_type(type_name: str) -> GGUFType:
    try:
        return GGUF_TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown GGUF type {type_name!r}; known: {', '.join(GGUF_TYPES)}") from None


def code_grid(blocks: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The uniform grid the stored scales of `blocks` (uint8 [n, bytes]) define, per weight:
    value of unsigned code c = step * c + offset, step and offset float32 [n, block_size].

    Read off ggml's own dequantizer at codes 0 and 1, so it holds for every uniform type alike."""
    t = gguf_type(type_name)
    if t.set_codes is None:
        raise ValueError(f"{type_name} is not a uniform grid (no codes to round onto)")
    n = blocks.shape[0]
    at0 = t.dequantize_blocks(t.set_codes(blocks, np.zeros((n, t.block_size), np.uint8)))
    at1 = t.dequantize_blocks(t.set_codes(blocks, np.ones((n, t.block_size), np.uint8)))
    return at1 - at0, at0


def _importance_blocks(imatrix, rows: int, cols: int, block_size: int) -> np.ndarray:
    """imatrix [cols] (mean a^2 per input column) -> per-weight importance [rows*cols/block, block]."""
    imp = np.asarray(imatrix.detach().cpu().numpy() if hasattr(imatrix, "detach") else imatrix, dtype=np.float32)
    if imp.shape != (cols,):
        raise ValueError(f"imatrix must have one value per input column ({cols}), got shape {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any() or not (imp > 0).any():
        raise ValueError("imatrix must be finite, non-negative and not all zero")
    # a column that never fired still gets a sliver of weight, so its codes stay sensible
    imp = imp + np.float32(1e-6) * imp.mean(dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(imp, (rows, cols))).reshape(-1, block_size)


def quantize_gguf(W, type_name: str, imatrix=None) -> np.ndarray:
    """W [rows, cols] float -> uint8 [rows, cols // block_size * bytes_per_block].

    imatrix: None (llama.cpp's default weighting per type; the legacy types then match ggml's
    reference quantizer byte for byte) or [cols] importance; the search then minimises
    sum over weights of imatrix[col] * (w - what)^2."""
    t = gguf_type(type_name)
    blocks = rows_to_blocks(W, t.layout)
    rows, cols = np.shape(W)
    weights = None if imatrix is None else _importance_blocks(imatrix, rows, cols, t.block_size)
    out = np.empty((blocks.shape[0], t.bytes_per_block), dtype=np.uint8)
    step = max(1, CHUNK_WEIGHTS // t.block_size)
    for start in range(0, blocks.shape[0], step):  # bounded temporaries; blocks are independent
        part = slice(start, start + step)
        out[part] = t.quantize_blocks(blocks[part], None if weights is None else weights[part])
    return out.reshape(rows, cols // t.block_size * t.bytes_per_block)


def dequantize_gguf(data, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF bytes of a [rows, cols] tensor -> float32 tensor [rows, cols]."""
    t = gguf_type(type_name)
    rows, cols = (int(s) for s in shape)
    blocks = blocks_from_bytes(data, t.layout, (rows, cols))
    return torch.from_numpy(np.ascontiguousarray(t.dequantize_blocks(blocks)).reshape(rows, cols))
