"""Simulated KV-cache quantization inside attention (QuaRot's KV4), for evaluation.

Convention: K (after RoPE) and V are quantized–de-quantized as they enter attention, per head and
token, in groups along head_dim (an ActFormat, e.g. a4-g64-asym); every query reads the
de-quantized values, its own token's included — the cache a generation would hold. With
`rotate`, q and k are first multiplied by the normalized Hadamard of head_dim (QuaRot's online
R3): q·k is unchanged, and k's outliers are spread before it is quantized. K is quantized after
RoPE, as a cache stores it; R3 must be online because RoPE (a position-dependent rotation of
channel pairs) does not commute with a Hadamard, so it cannot be fused into k_proj.

The quantizer is installed as a transformers attention implementation ("lowbit_kv") around SDPA;
each attention module carries its KvQuant. The KV-cache issue's packed cache reuses KvQuant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..formats.activation import ActFormat, act_format_from_dict, fake_quantize_act

IMPLEMENTATION = "lowbit_kv"


@dataclass(frozen=True)
class KvQuant:
    """K and V formats (None: that one stays float) and whether q/k get the online Hadamard R3."""

    k: ActFormat | None
    v: ActFormat | None
    rotate: bool = False

    def __post_init__(self):
        for what, f in (("k", self.k), ("v", self.v)):
            if f is not None and (f.static or f.outlier_threshold is not None):
                raise ValueError(f"KV format {what}={f.name}: dynamic per token (or group) formats only")

    @property
    def name(self) -> str:
        k = "float" if self.k is None else self.k.name
        v = "float" if self.v is None else self.v.name
        return f"k {k}, v {v}" + (", R3 Hadamard on q/k" if self.rotate else "")

    def to_dict(self) -> dict:
        return {"k": None if self.k is None else self.k.to_dict(), "v": None if self.v is None else self.v.to_dict(),
                "rotate": self.rotate}

    @classmethod
    def from_dict(cls, d: dict) -> "KvQuant":
        return cls(None if d.get("k") is None else act_format_from_dict(d["k"]),
                   None if d.get("v") is None else act_format_from_dict(d["v"]), bool(d.get("rotate", False)))


def _fake_quantize_heads(x: torch.Tensor, fmt: ActFormat | None) -> torch.Tensor:
    if fmt is None:
        return x
    rows = x.reshape(-1, x.shape[-1])                     # [B, H, T, hd] -> [B*H*T, hd]: one row per head and token
    if x.requires_grad:                                   # training rotations through it: straight-through
        return x + (fake_quantize_act(rows.detach(), fmt).reshape(x.shape) - x).detach()
    return fake_quantize_act(rows, fmt).reshape(x.shape)


def kv_quant_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: SDPA on (R3-rotated) q/k and quantized k/v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv: KvQuant | None = getattr(module, "lowbit_kv", None)
    if kv is not None:
        if kv.rotate:
            from ..rotations.hadamard import hadamard_transform

            query, key = hadamard_transform(query), hadamard_transform(key)
        key, value = _fake_quantize_heads(key, kv.k), _fake_quantize_heads(value, kv.v)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_sdpa_attention(name: str, function) -> None:
    """Register `function` as transformers attention implementation `name`, with SDPA's masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def _register() -> None:
    register_sdpa_attention(IMPLEMENTATION, kv_quant_attention)


def install_kv_quant(model: nn.Module, spec, kv: KvQuant) -> None:
    """Quantize the KV cache of every decoder layer's attention of `model` (in place)."""
    _register()
    layers = model.get_submodule(spec.layers)
    for layer in layers:
        attention = layer.get_submodule(spec.attention)
        head_dim = attention.head_dim
        for f in (kv.k, kv.v):
            if f is not None and f.granularity == "group" and head_dim % f.group_size:
                raise ValueError(f"KV format {f.name}: head_dim {head_dim} is not a multiple of its group")
        attention.lowbit_kv = kv
    model.config._attn_implementation = IMPLEMENTATION
