"""A transformers Cache whose layers store K and V packed (real bytes) and de-quantize on read.

Per layer: the newest tokens sit in a float residual; when it holds more than `residual` tokens,
the oldest ones (a whole number of token groups for per-channel K) are encoded into a Chunk and
leave float storage. Every read returns the de-quantized chunks followed by the float residual,
so attention sees exactly what the cache holds (with residual 0 and per-token methods, a token's
own K/V are quantized before it attends to them). Memory: the chunks' packed codes and float16
side data, plus the residual — no float copy of the quantized part is kept.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .codec import Chunk, KvCodec
from .config import KvCacheConfig


class PackedLayer(CacheLayerMixin):
    """One decoder layer's quantized K/V."""

    is_sliding = False          # sliding layers keep every token too; their mask limits what is read

    def __init__(self, config: KvCacheConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.chunks: list[tuple[Chunk, Chunk]] = []
        self.seen = 0

    def lazy_initialization(self, key_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        D = key_states.shape[-1]
        self.k_codec = KvCodec(self.config, D, self.layer, "k")
        self.v_codec = KvCodec(self.config, D, self.layer, "v")
        self.multiple = max(self.k_codec.token_multiple, self.v_codec.token_multiple)
        self.is_initialized = True

    def flush_count(self, residual_tokens: int) -> int:
        """How many of the oldest residual tokens leave for the quantized store."""
        excess = residual_tokens - self.config.residual
        return max(0, excess // self.multiple * self.multiple)

    def update(self, key_states: Tensor, value_states: Tensor, cache_kwargs=None) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        n = self.flush_count(self.keys.shape[-2])
        if n:
            k, v = self.k_codec.encode(self.keys[..., :n, :]), self.v_codec.encode(self.values[..., :n, :])
            if self.chunks and self.multiple == 1:          # per-token layouts: one growing chunk, one decode per read
                k, v = self.chunks[-1][0].extend(k), self.chunks[-1][1].extend(v)
                self.chunks[-1] = (k, v)
            else:
                self.chunks.append((k, v))
            self.keys, self.values = self.keys[..., n:, :].contiguous(), self.values[..., n:, :].contiguous()
        return self.read()

    def read(self) -> tuple[Tensor, Tensor]:
        """(K, V) [B, H, seen, D]: the de-quantized chunks, then the float residual."""
        ks = [self.k_codec.decode(k).to(self.dtype) for k, _ in self.chunks] + [self.keys]
        vs = [self.v_codec.decode(v).to(self.dtype) for _, v in self.chunks] + [self.values]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def get_mask_sizes(self, cache_position: Tensor) -> tuple[int, int]:
        return self.seen + cache_position.shape[0], 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes held: packed chunks, what the codecs fixed on the first write, and the float residual."""
        packed = sum(k.nbytes + v.nbytes for k, v in self.chunks)
        if not self.is_initialized:
            return packed
        state = self.k_codec.state_nbytes + self.v_codec.state_nbytes
        return (packed + state + self.keys.numel() * self.keys.element_size()
                + self.values.numel() * self.values.element_size())

    @property
    def quantized_tokens(self) -> int:
        return sum(k.tokens for k, _ in self.chunks)


class QuantizedKVCache(Cache):
    """The packed cache for `num_layers` decoder layers under `config`."""

    def __init__(self, config: KvCacheConfig, num_layers: int):
        super().__init__(layers=[PackedLayer(config, i) for i in range(num_layers)])
        self.config = config

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Stored bytes per token of context, over all layers (0 before the first write)."""
        seen = self.layers[0].seen if self.layers else 0
        return self.nbytes / seen if seen else 0.0
