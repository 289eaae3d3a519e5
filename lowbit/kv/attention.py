"""The packed cache's semantics inside one forward pass, for perplexity: every query sees what a
token-by-token generation with QuantizedKVCache would hold when that query was written.

After token t is written the cache holds F(t) quantized tokens and the rest of 0..t in float, with
F(t) = max(0, ⌊(t + 1 − R) / m⌋·m) (R the residual window, m the token group of per-channel K, else
1); with S sink tokens (kept in float for good) the same counts start after them:
F(t) = S + max(0, ⌊(t + 1 − S − R) / m⌋·m) for t ≥ S, the sink's values standing in for their
quantized ones. A token's quantized value does not depend on when it was flushed (per-token methods quantize it
alone; a per-channel K group is complete when flushed), so one pass computes all of them: attention
runs over [K_q ; K] (2T keys) with query t allowed key j of K_q iff j < F(t) and key j of K iff
F(t) ≤ j ≤ t — intersected with the model's own mask (causal, sliding window). Without a residual window and
with per-token groups F(t) = t + 1: the queries read K_q alone under the model's own mask (half
the keys, SDPA's causal path). TurboQuant's channel
split is chosen on the window, as on a generation's first write (its prompt). With pre_rope the window's
K is turned back by RoPE at positions 0..T−1, quantized, and turned again (the cache does the same).
Installed as the transformers attention implementation "lowbit_kvcache" around SDPA.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .codec import KvCodec
from .config import KvCacheConfig
from .rope import Rope, layer_ropes

IMPLEMENTATION = "lowbit_kvcache"


def flushed(T: int, residual: int, multiple: int, sink: int = 0) -> Tensor:
    """F(t) for t = 0..T−1: tokens in the cache's quantized part right after token t is written [T],
    the first `sink` (float, never re-written) counted in it."""
    t = torch.arange(T)
    after = ((t + 1 - sink - residual).clamp_min(0) // multiple) * multiple    # tokens past the sink
    return torch.where(t < sink, t + 1, sink + after)


def cache_views(key: Tensor, value: Tensor, config: KvCacheConfig, layer: int,
                key_scale: Tensor | None = None, rope: Rope | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(K_q, V_q, F): the window's K/V [B, H, T, D] at positions 0..T−1 as the cache would de-quantize them
    (the sink and the trailing tokens of an incomplete token group left as they are: never read quantized)
    and F [T]; key_scale [H, D]: scale_k's K scales for this layer; rope: its RoPE (pre_rope)."""
    T, D = key.shape[-2], key.shape[-1]
    k_codec, v_codec = KvCodec(config, D, layer, "k", key_scale, rope), KvCodec(config, D, layer, "v")
    m = max(k_codec.token_multiple, v_codec.token_multiple)
    S = min(config.sink, T)
    full = S + (T - S) // m * m                                         # the sink, then complete groups
    kq, vq = key.clone(), value.clone()
    if full > S:
        kq[..., S:full, :] = k_codec.roundtrip(key[..., S:full, :], S)
        vq[..., S:full, :] = v_codec.roundtrip(value[..., S:full, :])
    return kq, vq, flushed(T, config.residual, m, config.sink)


def split_mask(allowed: Tensor, F: Tensor) -> Tensor:
    """allowed [B|1, 1, T, T] bool (the model's mask) -> [B|1, 1, T, 2T]: quantized keys j < F(t),
    float keys F(t) ≤ j, both within `allowed`."""
    T = allowed.shape[-1]
    j = torch.arange(T)
    quantized = j[None, :] < F[:, None]                                 # [T, T]: query t, key j
    return torch.cat([allowed & quantized, allowed & ~quantized], dim=-1)


def allowed_mask(attention_mask: Tensor | None, q_len: int, k_len: int, device) -> Tensor:
    """The model's mask as bool [B|1, 1, q, k] (None: causal)."""
    if attention_mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2   # additive float mask


def kvcache_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' attention signature: SDPA over the cache's de-quantized and float K/V."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config: KvCacheConfig | None = getattr(module, "lowbit_kvcache", None)
    T = key.shape[-2]
    if config is None or query.shape[-2] != T:      # no cache config, or a generation step: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    positions = kwargs.get("position_ids")
    if config.pre_rope and positions is not None and not bool(
            (positions == torch.arange(T, device=positions.device)).all()):
        raise ValueError("K before RoPE in one pass needs each window at positions 0..T-1")
    kq, vq, F = cache_views(key, value, config, module.layer_idx, getattr(module, "lowbit_kv_scale", None),
                            getattr(module, "lowbit_kv_rope", None))
    if bool((F == torch.arange(1, T + 1)).all()):     # every earlier token already quantized: K_q alone, own mask
        return sdpa_attention_forward(module, query, kq, vq, attention_mask, **kwargs)
    mask = split_mask(allowed_mask(attention_mask, T, T, key.device), F.to(key.device))
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, torch.cat([kq, key], -2), torch.cat([vq, value], -2), mask,
                                  is_causal=False, **kwargs)


def _register() -> None:
    from ..nn.kv_attention import register_sdpa_attention

    register_sdpa_attention(IMPLEMENTATION, kvcache_attention)


def install_kv_cache(model: nn.Module, spec, config: KvCacheConfig, key_scales: dict[int, Tensor] | None = None) -> None:
    """Make every decoder layer's attention of `model` read K/V as the packed cache would (in place);
    key_scales: {layer: [H, D]} scale_k's K scales; pre_rope reads each layer's RoPE off the model."""
    _register()
    layers = model.get_submodule(spec.layers)
    ropes = layer_ropes(model, spec) if config.pre_rope else {}
    if config.scale_k and (key_scales is None or set(key_scales) != set(range(len(layers)))):
        raise ValueError(f"--kv-scale-k needs K scales for each of the {len(layers)} layers")
    for layer in layers:
        attention = layer.get_submodule(spec.attention)
        if not hasattr(attention, "layer_idx") or not hasattr(attention, "head_dim"):
            raise ValueError(f"{type(attention).__name__}: the KV cache needs an attention module with layer_idx "
                             "and head_dim (transformers' attention interface)")
        KvCodec(config, attention.head_dim, attention.layer_idx, "v")      # validates the group against head_dim
        attention.lowbit_kvcache = config
        attention.lowbit_kv_scale = key_scales[attention.layer_idx] if config.scale_k else None
        attention.lowbit_kv_rope = ropes.get(attention.layer_idx)
        KvCodec(config, attention.head_dim, attention.layer_idx, "k", attention.lowbit_kv_scale,
                attention.lowbit_kv_rope)                                  # and K's scales and RoPE
    model.config._attn_implementation = IMPLEMENTATION
