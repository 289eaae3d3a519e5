"""A transformers Cache whose layers store K and V packed (real bytes) and de-quantize on read.

Per layer: the sequence's first `sink` tokens stay in float for good (config.sink). After them the
newest tokens sit in a float residual; when it holds more than `residual` tokens, the oldest ones (a
whole number of token groups for per-channel K) are encoded into a Chunk and leave float storage.
Every read returns the sink, the de-quantized chunks and the float residual, so attention sees
exactly what the cache holds (with residual 0 and per-token methods, a token's own K/V are
quantized before it attends to them). Memory: the chunks' packed codes and float16 side data, plus
the sink and the residual — no float copy of the quantized part is kept. A sliding-window layer
(Gemma 3's local layers) forgets the chunks no later query can see, as transformers'
DynamicSlidingWindowLayer does, and tells the mask where its tokens now start.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .codec import Chunk, KvCodec
from .config import KvCacheConfig
from .rope import Rope


# per-token layouts forget a sliding layer's stale tokens this many at a time: one copy of the chunk per
# 64 steps instead of one per decoded token
FORGET_STEP = 64


def _empty_like(x: Tensor) -> Tensor:
    """[B, H, 0, D] with x's dtype, in storage of its own (an empty view would keep x's alive)."""
    return x.new_empty(*x.shape[:-2], 0, x.shape[-1])


class PackedLayer(CacheLayerMixin):
    """One decoder layer's quantized K/V; `window`: the layer's sliding window (None: full attention);
    `key_scale` [H, D]: scale_k's K scales for this layer; `rope`: its RoPE (pre_rope; a token's position
    is its place in the sequence)."""

    def __init__(self, config: KvCacheConfig, layer: int, window: int | None = None, key_scale: Tensor | None = None,
                 rope: Rope | None = None):
        super().__init__()
        self.config, self.layer, self.window, self.key_scale, self.rope = config, layer, window, key_scale, rope
        self.is_sliding = window is not None      # the mask of sliding layers is built from the first one's sizes
        self.chunks: list[tuple[Chunk, Chunk]] = []
        self.seen = 0
        self.offset = 0                           # tokens forgotten: the position of the first one stored
        self.sunk = 0                             # tokens that went to the float sink (at most config.sink)
        self.sink_keys = self.sink_values = self.keys = self.values = None

    def lazy_initialization(self, key_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        D = key_states.shape[-1]
        self.k_codec = KvCodec(self.config, D, self.layer, "k", self.key_scale, self.rope)
        self.v_codec = KvCodec(self.config, D, self.layer, "v")
        self.multiple = max(self.k_codec.token_multiple, self.v_codec.token_multiple)
        self.is_initialized = True

    def _fill_sink(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Move the new tokens that belong to the float sink there; the rest go on to the residual."""
        take = min(self.config.sink - self.sunk, key_states.shape[-2])
        if take <= 0:
            return key_states, value_states
        self.sink_keys = torch.cat([self.sink_keys, key_states[..., :take, :]], dim=-2)
        self.sink_values = torch.cat([self.sink_values, value_states[..., :take, :]], dim=-2)
        self.sunk += take
        # copies: views would keep the sink's tokens stored twice behind the residual
        return key_states[..., take:, :].clone(), value_states[..., take:, :].clone()

    def flush_count(self, residual_tokens: int) -> int:
        """How many of the oldest residual tokens leave for the quantized store."""
        excess = residual_tokens - self.config.residual
        return max(0, excess // self.multiple * self.multiple)

    def update(self, key_states: Tensor, value_states: Tensor, cache_kwargs=None) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            self.sink_keys, self.sink_values = _empty_like(key_states), _empty_like(value_states)
        self.seen += key_states.shape[-2]
        key_states, value_states = self._fill_sink(key_states, value_states)
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        n = self.flush_count(self.keys.shape[-2])
        if n:
            # a sliding layer's token groups that are stale once this step is read go in a chunk of their
            # own, which forget() drops whole (per-token layouts drop a chunk's front instead)
            stale = 0
            first = self.seen - self.keys.shape[-2]              # the position of the first residual token
            if self.window is not None and self.multiple > 1:
                stale = min(n, max(0, self.seen - (self.window - 1) - first)) // self.multiple * self.multiple
            for a, b in ((0, stale), (stale, n)):
                if b > a:
                    self._store(self.keys[..., a:b, :], self.values[..., a:b, :], first + a)
            # copies: a view (contiguous() returns an empty or single-head slice as is) would keep the whole
            # float prompt's storage alive behind a residual of a few tokens
            self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        states = self.read()                      # this step's queries may still read what is forgotten next
        self.forget()
        return states

    def _store(self, keys: Tensor, values: Tensor, start: int) -> None:
        """Encode [B, H, n, D] float K/V at positions start..start+n−1 into the quantized store."""
        k, v = self.k_codec.encode(keys, start), self.v_codec.encode(values, start)
        if self.chunks and self.multiple == 1:          # per-token layouts: one growing chunk, one decode per read
            self.chunks[-1] = (self.chunks[-1][0].extend(k), self.chunks[-1][1].extend(v))
        else:
            self.chunks.append((k, v))

    def forget(self) -> None:
        """Sliding layers: drop stored tokens older than the newest window-1 (no later query sees them):
        the sink once all of it is stale, then whole chunks, or FORGET_STEP tokens at a time from a
        per-token layout's one chunk."""
        if self.window is None:
            return
        stale = self.seen - (self.window - 1) - self.offset
        if n := self.sink_tokens:
            if stale < n:                         # the sink holds the oldest tokens: nothing after it goes first
                return
            self.sink_keys, self.sink_values = _empty_like(self.sink_keys), _empty_like(self.sink_values)
            self.offset, stale = self.offset + n, stale - n
        while self.chunks and self.chunks[0][0].tokens <= stale:
            tokens = self.chunks.pop(0)[0].tokens
            self.offset, stale = self.offset + tokens, stale - tokens
        if self.chunks and self.multiple == 1 and stale >= FORGET_STEP:
            k, v = self.chunks[0]
            self.chunks[0] = (k.drop_front(stale), v.drop_front(stale))
            self.offset += stale

    def read(self) -> tuple[Tensor, Tensor]:
        """(K, V) [B, H, stored, D]: the float sink, the de-quantized chunks, then the float residual."""
        ks = [self.sink_keys] + [self.k_codec.decode(k).to(self.dtype) for k, _ in self.chunks] + [self.keys]
        vs = [self.sink_values] + [self.v_codec.decode(v).to(self.dtype) for _, v in self.chunks] + [self.values]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def get_mask_sizes(self, cache_position: Tensor) -> tuple[int, int]:
        """(keys the next update returns, position of the first): the stored tokens, then the new ones."""
        return self.seen - self.offset + cache_position.shape[0], self.offset

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes held: packed chunks, what the codecs fixed on the first write, the float sink and residual."""
        packed = sum(k.nbytes + v.nbytes for k, v in self.chunks)
        if not self.is_initialized:
            return packed
        state = self.k_codec.state_nbytes + self.v_codec.state_nbytes
        floats = (self.sink_keys, self.sink_values, self.keys, self.values)
        return packed + state + sum(t.numel() * t.element_size() for t in floats if t is not None)

    @property
    def quantized_tokens(self) -> int:
        """Tokens in the quantized store now (a sliding layer's forgotten ones not counted)."""
        return sum(k.tokens for k, _ in self.chunks)

    @property
    def sink_tokens(self) -> int:
        """Tokens in the float sink now (0 once a sliding layer forgot it)."""
        return self.sink_keys.shape[-2] if self.sink_keys is not None else 0

    @property
    def stored_tokens(self) -> int:
        return self.seen - self.offset


class QuantizedKVCache(Cache):
    """The packed cache for `num_layers` decoder layers under `config`; `windows[i]`: layer i's
    sliding window, or None for full attention (no windows: every layer keeps every token);
    `key_scales`: {layer: [H, D]} scale_k's K scales (key_scales.KeyStats.scales); `ropes`: {layer: Rope}
    (pre_rope; rope.layer_ropes)."""

    def __init__(self, config: KvCacheConfig, num_layers: int, windows: list[int | None] | None = None,
                 key_scales: dict[int, Tensor] | None = None, ropes: dict[int, Rope] | None = None):
        windows = windows or [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows for {num_layers} layers")
        if config.scale_k and (key_scales is None or set(key_scales) != set(range(num_layers))):
            raise ValueError(f"--kv-scale-k needs K scales for each of the {num_layers} layers")
        if config.pre_rope and (ropes is None or set(ropes) != set(range(num_layers))):
            raise ValueError(f"--kv-pre-rope needs the RoPE of each of the {num_layers} layers")
        scales = key_scales if config.scale_k else {}
        ropes = ropes if config.pre_rope else {}
        super().__init__(layers=[PackedLayer(config, i, w, scales.get(i), ropes.get(i)) for i, w in enumerate(windows)])
        self.config = config

    @classmethod
    def for_model(cls, config: KvCacheConfig, model_config, key_scales: dict[int, Tensor] | None = None,
                  ropes: dict[int, Rope] | None = None) -> "QuantizedKVCache":
        """The cache for a transformers model: its sliding layers (config.layer_types) forget what
        their window no longer shows, as the model's own DynamicCache does."""
        n = model_config.num_hidden_layers
        kinds = getattr(model_config, "layer_types", None) or ["full_attention"] * n
        window = getattr(model_config, "sliding_window", None)
        return cls(config, n, [window if kind == "sliding_attention" and window else None for kind in kinds],
                   key_scales, ropes)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Stored bytes per token of context, over all layers (0 before the first write)."""
        seen = self.layers[0].seen if self.layers else 0
        return self.nbytes / seen if seen else 0.0
