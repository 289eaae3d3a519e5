"""One layer's K/V codec: encode [B, H, T, D] float states into stored chunks and decode them back,
for the methods of config.py (pure tensor work; the cache decides when tokens are written)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..rotations.hadamard import orthogonal
from .config import KvCacheConfig
from .rope import Rope
from .quantizers import (Codes, compute_dtype, int_dequantize, int_quantize, qjl_matrix, turboquant, turboquant_dequantize)


@dataclass
class Chunk:
    """T consecutive tokens of K or V as stored: one Codes per channel set; `start`: the position of the
    first (pre_rope turns K back by it on decode)."""

    tokens: int
    parts: list[Codes]
    start: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def extend(self, other: "Chunk") -> "Chunk":
        """This chunk followed by `other` along the tokens (per-token layouts: codes [B, H, T, bytes])."""
        if other.start != self.start + self.tokens:
            raise ValueError(f"chunk at position {other.start} does not follow tokens "
                             f"{self.start}..{self.start + self.tokens - 1}")
        parts = [Codes(torch.cat([a.packed, b.packed], -2), a.bits, a.n,
                       {k: torch.cat([a.side[k], b.side[k]], -2) for k in a.side}) for a, b in zip(self.parts, other.parts)]
        return Chunk(self.tokens + other.tokens, parts, self.start)

    def drop_front(self, n: int) -> "Chunk":
        """This chunk less its oldest n tokens (per-token layouts), copied so their storage is freed."""
        parts = [Codes(p.packed[..., n:, :].clone(), p.bits, p.n, {k: t[..., n:, :].clone() for k, t in p.side.items()})
                 for p in self.parts]
        return Chunk(self.tokens - n, parts, self.start + n)


class KvCodec:
    """Encodes/decodes one layer's K or V ("k" / "v") under `config`; head_dim D; `scale` [H, D]: scale_k's
    per-channel K scales for this layer (key_scales.py), required for K when config.scale_k; `rope`: the
    layer's RoPE (rope.py), required for K when config.pre_rope."""

    def __init__(self, config: KvCacheConfig, head_dim: int, layer: int, which: str, scale: Tensor | None = None,
                 rope: Rope | None = None):
        self.config, self.D, self.which = config, head_dim, which
        self.rope = rope if config.pre_rope and which == "k" else None
        if config.pre_rope and which == "k":
            if rope is None:
                raise ValueError(f"--kv-pre-rope needs the RoPE of every layer (kv.rope.layer_ropes), none given for "
                                 f"layer {layer}")
            if rope.head_dim != head_dim:
                raise ValueError(f"RoPE of head_dim {rope.head_dim} for a head_dim of {head_dim}")
        self.scale: Tensor | None = None
        if config.scale_k and which == "k":
            if scale is None:
                raise ValueError("--kv-scale-k needs the K scales of every layer (key_scales.py), none given for "
                                 f"layer {layer}")
            if scale.shape[-1] != head_dim or scale.dim() != 2:
                raise ValueError(f"K scales of shape {list(scale.shape)} for a head_dim of {head_dim}")
            self.scale = scale.to(torch.float16).to(torch.float32)
        self.seed = config.seed * 1000 + 2 * layer + (which == "v")
        # int's default: 64 values (quanto's q_group_size; one group across Gemma 3's 256-wide heads was far
        # worse in development), or the whole head when 64 does not divide it
        group = config.group or (32 if config.method == "kivi" else 64 if head_dim % 64 == 0 else head_dim)
        if self.per_channel:
            self.group = config.token_group()
        else:
            self.group = group
            if head_dim % group:
                raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group {group}")
        self.dtype = torch.float32
        self.split: Tensor | None = None           # turboquant: [H, D] channel order, high-bit channels first
        self.mean: Tensor | None = None            # center_k: [H, D] K's per-channel mean of the first write
        self._rot: dict[int, Tensor] = {}
        self._S: dict[int, Tensor] = {}

    @property
    def per_channel(self) -> bool:
        """K per channel in groups of tokens (kivi, int axis=channel)."""
        c = self.config
        return self.which == "k" and (c.method == "kivi" or (c.method == "int" and c.axis == "channel"))

    @property
    def token_multiple(self) -> int:
        """Chunks must hold a multiple of this many tokens."""
        return self.group if self.per_channel else 1

    @property
    def centers(self) -> bool:
        return self.config.center_k and self.which == "k"

    @property
    def state_nbytes(self) -> int:
        """Bytes fixed on the first write or before: a fractional split's channel order (a byte per channel),
        center_k's float16 mean and scale_k's float16 scale per channel, per head."""
        split = self.split.numel() if self.split is not None and len(self._parts(None)) > 1 else 0
        scale = 2 * self.scale.numel() if self.scale is not None else 0
        return split + (2 * self.mean.numel() if self.mean is not None else 0) + scale

    def _centered(self, x: Tensor) -> Tensor:
        """x less the per-channel mean (fixed on the first write: the prompt in generation, the window
        in the one-pass evaluation, as the split is)."""
        if not self.centers:
            return x
        if self.mean is None:
            dt = compute_dtype(x)
            self.mean = x.to(dt).mean(dim=(0, 2)).to(torch.float16).to(dt)       # [B, H, T, D] -> [H, D]
        return x - self.mean[None, :, None, :].to(x.dtype)

    def _scaled(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] over scale_k's per-channel scales (what is quantized)."""
        if self.scale is None:
            return x
        if self.scale.shape[0] != x.shape[1]:
            raise ValueError(f"K scales for {self.scale.shape[0]} heads, the layer has {x.shape[1]}")
        return x / self.scale[None, :, None, :].to(x.dtype)

    # ------------------------------------------------------------------ turboquant's parts
    def _parts(self, x: Tensor) -> list[tuple[int, int]]:
        """[(channels, bits)] of turboquant's channel sets (one set at an integer rate)."""
        b = self.config.bits
        lo = int(math.floor(b))
        hi_n = round((b - lo) * self.D)
        return [(hi_n, lo + 1), (self.D - hi_n, lo)] if hi_n else [(self.D, lo)]

    def _choose_split(self, x: Tensor) -> None:
        """High-bit channels: per head, the largest RMS over the first write's tokens (and batch);
        one channel set (an integer rate): the channels in their own order."""
        H = x.shape[1]
        if len(self._parts(x)) == 1:
            self.split = torch.arange(self.D).expand(H, -1)
            return
        rms = x.float().pow(2).mean(dim=(0, 2))                       # [B, H, T, D] -> [H, D]
        self.split = torch.argsort(rms, dim=-1, descending=True, stable=True)

    def _rotation(self, n: int) -> Tensor:
        if n not in self._rot:
            self._rot[n] = orthogonal(n, "hadamard", self.seed + 7919 * n).float()
        return self._rot[n]

    def _qjl(self, n: int) -> Tensor | None:
        if not (self.config.qjl and self.which == "k"):
            return None
        if n not in self._S:
            self._S[n] = qjl_matrix(n, self.seed + 104729 * n)
        return self._S[n]

    def _gather(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] with each head's channels in split order."""
        idx = self.split[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1)
        return torch.gather(x, -1, idx)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: Tensor, start: int = 0) -> Chunk:
        """x [B, H, T, D] at positions start..start+T−1 -> Chunk (T a multiple of token_multiple)."""
        B, H, T, D = x.shape
        self.dtype = compute_dtype(x)
        if T % self.token_multiple:
            raise ValueError(f"{T} tokens do not fill groups of {self.token_multiple}")
        c = self.config
        if self.rope is not None:
            x = self.rope.undo(x.to(self.dtype), start)
        x = self._scaled(self._centered(x))
        if c.method in ("int", "kivi"):
            bits = int(c.bits)
            if self.per_channel:
                xt = x.transpose(-1, -2)                               # [B, H, T, D] -> [B, H, D, T]: groups of tokens
                return Chunk(T, [int_quantize(xt, bits, self.group, c.symmetric)], start)
            return Chunk(T, [int_quantize(x, bits, self.group, c.symmetric)], start)
        if self.split is None:
            self._choose_split(x)
        xs, parts, first = self._gather(x), [], 0
        for n, bits in self._parts(x):
            part = xs[..., first:first + n]
            parts.append(turboquant(part, self._rotation(n), bits, self._qjl(n), self.which in c.norm_correct))
            first += n
        return Chunk(T, parts, start)

    def decode(self, chunk: Chunk) -> Tensor:
        """float32 [B, H, T, D] of a chunk (float64 when the codec encoded float64)."""
        y = self._decode(chunk)
        if self.scale is not None:
            y = y * self.scale[None, :, None, :].to(y.dtype)
        if self.centers:
            y = y + self.mean[None, :, None, :].to(y.dtype)
        return self.rope.apply(y, chunk.start) if self.rope is not None else y

    def _decode(self, chunk: Chunk) -> Tensor:
        c = self.config
        if c.method in ("int", "kivi"):
            y = int_dequantize(chunk.parts[0], c.symmetric)
            return y.transpose(-1, -2) if self.per_channel else y      # [B, H, D, T] -> [B, H, T, D]
        pieces, start = [], 0
        for (n, _), q in zip(self._parts(None), chunk.parts):
            pieces.append(turboquant_dequantize(q, self._rotation(n), self._qjl(n), self.dtype))
            start += n
        ys = torch.cat(pieces, -1)                                     # [B, H, T, D] in split order
        out = torch.empty_like(ys)
        return out.scatter_(-1, self.split[None, :, None, :].expand_as(ys), ys)

    def roundtrip(self, x: Tensor, start: int = 0) -> Tensor:
        """decode(encode(x, start)) in x's dtype."""
        return self.decode(self.encode(x, start)).to(x.dtype)
