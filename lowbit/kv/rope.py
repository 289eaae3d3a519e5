"""RoPE as the cache needs it: a layer's rotation at given positions, applied and undone.

pre_rope (config.py) quantizes K before RoPE: the cache un-rotates each written key at its position,
quantizes that, and rotates the de-quantized key back on read. Before RoPE a channel means the same
thing at every position (KVQuant's observation), so per-channel statistics — center_k's mean, scale_k's
scales, a per-channel K group's range — hold at any context length; after RoPE a pair of channels turns
with the position, fast for the high-frequency pairs, so they do not.

Convention (transformers' `rotate_half`): channel j pairs with channel j + D/2, both turned by the angle
position·inv_freq[j]; cos and sin carry the rotary module's `attention_scaling`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    """One layer's rotary embedding: inv_freq [D/2] (float64), attention_scaling (1 for plain RoPE).
    One Rope serves every layer that shares a rotary module, and keeps its cos/sin tables for the
    positions used so far (per dtype; grown by doubling), so a read turns its keys without trigonometry."""

    inv_freq: Tensor
    attention_scaling: float = 1.0

    def __post_init__(self):
        if self.inv_freq.dim() != 1 or self.inv_freq.numel() == 0:
            raise ValueError(f"RoPE inv_freq must be a non-empty vector, got shape {list(self.inv_freq.shape)}")
        if not self.attention_scaling > 0:
            raise ValueError(f"RoPE attention_scaling must be > 0, got {self.attention_scaling}")
        object.__setattr__(self, "_tables", {})        # a cache of its own tables, not state

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [T, D] for integer positions [T], in float64 before the cast (as exact as the
        model's own float32 tables or better)."""
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None, :]   # [T, D/2]
        angles = torch.cat([angles, angles], dim=-1)                    # [T, D/2] -> [T, D]: both halves of a pair
        return ((angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype))

    def _table(self, start: int, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos_sin for positions start..start+T−1, cut from the kept tables."""
        cos, sin = self._tables.get(dtype, (None, None))
        if cos is None or cos.shape[0] < start + T:
            n = max(start + T, 2 * cos.shape[0] if cos is not None else 0)
            cos, sin = self._tables[dtype] = self.cos_sin(torch.arange(n), dtype)
        return cos[start:start + T], sin[start:start + T]

    def apply(self, x: Tensor, start: int = 0) -> Tensor:
        """x [..., T, D] rotated at positions start..start+T−1 (what the model does to K)."""
        self._check(x)
        cos, sin = self._table(start, x.shape[-2], x.dtype)
        return x * cos + _rotate_half(x) * sin

    def undo(self, x: Tensor, start: int = 0) -> Tensor:
        """`apply` inverted: R(θ)ᵀ / scaling² (R(θ) orthogonal, cos and sin each carry the scaling once)."""
        self._check(x)
        cos, sin = self._table(start, x.shape[-2], x.dtype)
        return (x * cos - _rotate_half(x) * sin) / self.attention_scaling ** 2

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE of head_dim {self.head_dim} applied to vectors of {x.shape[-1]}")


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (−x2, x1) over the two halves of the last dimension."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def pair_mean(e: Tensor) -> Tensor:
    """[..., D] with channels j and j + D/2 both set to their mean: what survives every RoPE angle."""
    h = e.shape[-1] // 2
    m = (e[..., :h] + e[..., h:]) / 2
    return torch.cat([m, m], dim=-1)


def layer_ropes(model, spec) -> dict[int, Rope]:
    """{layer: Rope} from the model's own rotary modules (spec.rotary: attention type -> module path;
    the layer's type from config.layer_types, full attention without them). ValueError (one line) when a
    layer's attention type has no rotary module or the module is not plain table RoPE."""
    config = model.config
    n = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * n
    paths = dict(spec.rotary)
    out, shared = {}, {}
    for layer, kind in enumerate(kinds[:n]):
        if kind not in paths:
            raise ValueError(f"{spec.family}: no rotary module known for {kind} layers (spec.rotary)")
        if paths[kind] not in shared:                   # one Rope (and one set of tables) per rotary module
            module = model.get_submodule(paths[kind])
            if getattr(module, "rope_type", "default") == "dynamic":
                raise ValueError(f"{spec.family}: dynamic RoPE changes its frequencies with the length; "
                                 "K before RoPE cannot be served")
            shared[paths[kind]] = Rope(module.inv_freq.detach().to("cpu", torch.float64),
                                       float(getattr(module, "attention_scaling", 1.0)))
        out[layer] = shared[paths[kind]]
    return out
