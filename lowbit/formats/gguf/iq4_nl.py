"""IQ4_NL: 32-weight blocks of 4-bit indices into a fixed non-linear table of 16 int8 levels.

Byte layout: d:fp16 | qs[16]; qs byte j holds the index of weight j (bits 0-3) and of weight
j + 16 (bits 4-7), as Q4_0. w = d * TABLE[index]. 18 bytes / 32 weights = 4.5 bits per weight.

The table is denser near zero, fitting bell-shaped weights better than 16 even steps. The
quantizer is a scale search (search.fit_symmetric over the table: the largest-magnitude weight is
tried on or near either end level), then the index is re-chosen under the stored fp16 d and d is
refit once by least squares. Default weights without an importance vector: x^2, as llama.cpp.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.gguf import search
from lowbit.formats.gguf.layout import BlockLayout, Field, fp16_from_bytes, fp16_to_bytes, pack_planes, unpack_planes

TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl

IQ4_NL = BlockLayout("IQ4_NL", 32, (Field("d", 2, "fp16 scale"),
                                    Field("qs", 16, "4-bit table indices, weight j and j + 16 per byte")))

_LEVELS = torch.tensor(TABLE, dtype=torch.float32)
_DELTAS = search.uniform_deltas(-12.0, 12.0, 1.0)  # level units; the end steps are ~20 apart


def default_weights(blocks: np.ndarray) -> np.ndarray:
    return blocks * blocks


def _error(x, w, d, idx):
    return (w * (d[:, None] * _LEVELS[idx] - x) ** 2).sum(-1)


def _indices(x, d):
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
    return search.nearest_level(x * inv[:, None], _LEVELS)


def quantize_iq4_nl(blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    x = torch.from_numpy(blocks)
    w = torch.from_numpy(default_weights(blocks) if weights is None else weights)
    scale, _ = search.fit_symmetric(x, w, _LEVELS, _DELTAS)
    d = search.fp16_round(scale)
    idx = _indices(x, d)
    err = _error(x, w, d, idx)
    # refit d on the chosen levels, store it as fp16, re-choose the levels; keep if better
    lv = _LEVELS[idx]
    den = (w * lv * lv).sum(-1)
    d2 = search.fp16_round(torch.where(den > 0, (w * x * lv).sum(-1) / den.clamp_min(1e-30), d))
    idx2 = _indices(x, d2)
    better = _error(x, w, d2, idx2) < err
    d = torch.where(better, d2, d)
    idx = torch.where(better[:, None], idx2, idx)
    n = blocks.shape[0]
    qs = pack_planes(idx.numpy().astype(np.uint8).reshape(n, 2, 16), 4)  # [n, 2 planes, 16] -> [n, 16]
    return IQ4_NL.join({"d": fp16_to_bytes(d.numpy()), "qs": qs})


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    p = IQ4_NL.split(blocks)
    idx = unpack_planes(p["qs"], 4).reshape(-1, 32)
    return fp16_from_bytes(p["d"]) * np.asarray(TABLE, dtype=np.float32)[idx]
