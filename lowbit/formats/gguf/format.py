"""A GGUF block type as a lowbit Format: the QTensor holds the tensor's GGUF bytes.

GGUFFormat("Q4_K") quantizes W [out, in] with lowbit's own GGUF quantizer (optionally weighted
by an importance vector, llama.cpp's imatrix) and keeps the result exactly as a GGUF file stores
it: QTensor.codes is uint8 [out, in / block * bytes_per_block], the scales live inside the
blocks (QTensor.scales is an empty [out, 0] tensor). Export therefore copies these bytes; it
never re-rounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from lowbit.formats.base import Format, QTensor
from lowbit.formats.gguf.registry import GGUF_TYPES, dequantize_gguf, gguf_type, quantize_gguf


def check_type_name(type_name: str) -> None:
    """ValueError (one line) for a type the installed gguf package or lowbit does not know."""
    from importlib.metadata import version

    from gguf.constants import GGMLQuantizationType

    if type_name in GGUF_TYPES:
        return
    if type_name in GGMLQuantizationType.__members__:
        raise ValueError(f"GGUF type {type_name} has no lowbit quantizer (lowbit writes: {', '.join(GGUF_TYPES)})")
    raise ValueError(f"GGUF type {type_name!r} is unknown to the installed gguf package "
                     f"{version('gguf')} (lowbit writes: {', '.join(GGUF_TYPES)})")


@dataclass(frozen=True)
class GGUFFormat(Format):
    """One llama.cpp block type (Q4_0, Q4_K, Q6_K, ...). Rows must be a multiple of its block."""

    type_name: str = "Q4_K"

    family: ClassVar[str] = "gguf"

    def __post_init__(self) -> None:
        if not isinstance(self.type_name, str):
            raise ValueError(f"GGUFFormat.type_name must be a string, got {self.type_name!r}")
        check_type_name(self.type_name)

    @property
    def group_size(self) -> int:
        """The block width (what AWQ's weight salience and the plan checks read)."""
        return gguf_type(self.type_name).block_size

    @property
    def name(self) -> str:
        return self.type_name

    @property
    def code_bits(self) -> int:
        return 8  # the codes are the blocks' bytes

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float16

    @property
    def bits_per_weight(self) -> float:
        return gguf_type(self.type_name).bits_per_weight

    def codes_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        out, in_features = shape
        t = gguf_type(self.type_name)
        return out, in_features // t.block_size * t.bytes_per_block

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return shape[0], 0  # the scales are inside the blocks

    def check_shape(self, shape: tuple[int, int]) -> None:
        """ValueError unless every row is a whole number of blocks."""
        block = gguf_type(self.type_name).block_size
        if shape[1] % block:
            raise ValueError(f"{self.type_name} needs rows that are a multiple of {block} weights, got {shape[1]}")

    def quantize(self, W_f: Tensor, clip: Tensor | None = None, importance: Tensor | None = None) -> QTensor:
        """W_f [out, in] -> QTensor of GGUF bytes; importance [in]: the imatrix (None: llama.cpp's default)."""
        if clip is not None:
            raise ValueError(f"{self.type_name}: GGUF types search their own scales; a clip does not apply")
        W, _ = self._prepare(W_f, None)
        self.check_shape(tuple(W.shape))
        imp = None if importance is None else torch.as_tensor(importance).detach().double().cpu().numpy()
        return self.from_bytes(quantize_gguf(W.cpu(), self.type_name, imatrix=imp), tuple(W.shape))

    def from_bytes(self, data, shape: tuple[int, int]) -> QTensor:
        """A QTensor around existing GGUF bytes uint8 [out, row_bytes] (e.g. from gptq_gguf)."""
        codes = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
        return QTensor(codes, torch.empty(self.scale_shape(shape), dtype=torch.float16), None, shape, self)

    def dequantize(self, q: QTensor) -> Tensor:
        return dequantize_gguf(q.codes.numpy(), self.type_name, q.shape)

    def pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"codes": q.codes.contiguous()}  # already the file's bytes

    def unpack(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> QTensor:
        if set(tensors) != {"codes"}:
            raise ValueError(f"tensors must have keys ['codes'], got {sorted(tensors)}")
        shape = (int(shape[0]), int(shape[1]))
        return QTensor(tensors["codes"], torch.empty(self.scale_shape(shape), dtype=torch.float16), None, shape, self)

    def storage_bits(self, shape: tuple[int, int]) -> int:
        out, row_bytes = self.codes_shape(shape)
        return 8 * out * row_bytes
