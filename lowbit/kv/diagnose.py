"""Why K resists a per-token cache: per layer, the attention error of K quantized alone by each K
quantizer, read off the model's own queries, and two facts about K (bench/kv_cache.py --stage diagnose).

For one window of the evaluation text, every layer's query and key (after RoPE) are captured. For each
K quantizer the layer's attention KL, mean over heads and queries of KL(softmax(s) ‖ softmax(ŝ)) with
s = scaling·q·kᵀ under the model's mask and ŝ the same with K de-quantized, is measured twice: on K as
it is, and on K with its per-channel mean over the window (per head) taken out before quantization and
added back after (one float vector per head; tells whether the constant "bias" channels are the cost),
and, given scale_k's statistics, on K over its per-channel scales (key_scales.py), as it is and centered.
Facts per layer: `bias_share`, the share of K's energy in those per-channel means, and
`within_group_var`, the variance of a channel inside groups of 32 consecutive tokens over its variance
across the window (small: neighbouring tokens agree, which a per-channel K group exploits and a
per-token quantizer, TurboQuant included, cannot).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .codec import KvCodec
from .config import KvCacheConfig
from .quantizers import compute_dtype

QUANTIZERS = {   # K alone, as the cache rows of bench/kv_cache.py quantize it
    "int4": KvCacheConfig("int", 4),
    "int4-kchannel": KvCacheConfig("int", 4, axis="channel", group=32),
    "turboquant4": KvCacheConfig("turboquant", 4),
    "turboquant3.5": KvCacheConfig("turboquant", 3.5),
    "turboquant2.5": KvCacheConfig("turboquant", 2.5),
}
GROUP = 32


CAPTURE = "lowbit_kv_capture"


def _record(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation: SDPA, after writing (q, k, mask, scaling) into module.lowbit_capture."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .attention import allowed_mask

    T = key.shape[-2]
    q, k = (x.detach().to(compute_dtype(x)) for x in (query, key))       # float64 stays float64 (exactness tests)
    module.lowbit_capture[module.layer_idx] = (q, k, allowed_mask(attention_mask, T, T, key.device),
                                               float(kwargs.get("scaling") or module.scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture(loaded, ids: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor, float]]:
    """{layer: (q [1, Hq, T, D], k [1, Hkv, T, D], allowed [1|B, 1, T, T] bool, scaling)} for one forward."""
    from ..nn.kv_attention import register_sdpa_attention

    register_sdpa_attention(CAPTURE, _record)
    model, seen = loaded.model, {}
    attentions = [layer.get_submodule(loaded.spec.attention) for layer in model.get_submodule(loaded.spec.layers)]
    before = model.config._attn_implementation
    for attention in attentions:
        attention.lowbit_capture = seen
    model.config._attn_implementation = CAPTURE
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        model.config._attn_implementation = before
        for attention in attentions:
            del attention.lowbit_capture
    return seen


def attention_kl(q: Tensor, k: Tensor, k_hat: Tensor, allowed: Tensor, scaling: float) -> float:
    """Mean over heads and queries of KL(softmax(s) ‖ softmax(ŝ)); k, k_hat [1, Hkv, T, D] repeated to q's heads."""
    rep = q.shape[1] // k.shape[1]                       # grouped-query attention: each K head serves rep query heads
    k, k_hat = k.repeat_interleave(rep, 1), k_hat.repeat_interleave(rep, 1)
    neg = torch.finfo(q.dtype).min
    logp = (scaling * q @ k.transpose(-1, -2)).masked_fill(~allowed, neg).log_softmax(-1)          # [1, Hq, T, T]
    logp_hat = (scaling * q @ k_hat.transpose(-1, -2)).masked_fill(~allowed, neg).log_softmax(-1)
    kl = (logp.exp() * (logp - logp_hat)).masked_fill(~allowed, 0).sum(-1)                        # [1, Hq, T]
    return float(kl.mean())


def k_facts(k: Tensor) -> dict:
    """bias_share and within_group_var of k [1, H, T, D] (tokens after the last whole group of GROUP left out
    of the group variance)."""
    mean = k.mean(dim=2, keepdim=True)                                   # [1, H, 1, D] per head and channel
    bias_share = float(mean.pow(2).sum() * k.shape[2] / k.pow(2).sum())
    B, H, T, D = k.shape
    g = k[:, :, : T // GROUP * GROUP].reshape(B, H, T // GROUP, GROUP, D)   # [1, H, T, D] -> [1, H, groups, 32, D]
    within = g.var(dim=3).mean(dim=2)                                    # [1, H, D]
    total = k.var(dim=2)                                                 # [1, H, D]
    return {"bias_share": bias_share, "within_group_var": float(within.sum() / total.sum())}


def diagnose(loaded, ids: Tensor, stats=None) -> dict:
    """{"layers": [...], "mean": {quantizer: {"plain", "centered"[, "scaled", "centered_scaled"]}}, "bias_share",
    "within_group_var"} for the window `ids` [T] (the layers' means of the per-layer numbers); with `stats`
    (key_scales.KeyStats) also K over scale_k's scales, as it is and centered."""
    layers = []
    scales = {False: stats.scales(False), True: stats.scales(True)} if stats is not None else None
    for layer, (q, k, allowed, scaling) in sorted(capture(loaded, ids).items()):
        mean = k.mean(dim=2, keepdim=True)
        row = {"layer": layer, **k_facts(k), "attention_kl": {}}
        for name, config in QUANTIZERS.items():
            variants = {"plain": KvCodec(config, k.shape[-1], layer, "k").roundtrip(k),
                        "centered": KvCodec(config, k.shape[-1], layer, "k").roundtrip(k - mean) + mean}
            if scales is not None:
                s, sc = (scales[c][layer][None, :, None, :].to(k.dtype) for c in (False, True))   # [H, D] -> [1, H, 1, D]
                variants["scaled"] = KvCodec(config, k.shape[-1], layer, "k").roundtrip(k / s) * s
                variants["centered_scaled"] = KvCodec(config, k.shape[-1], layer, "k").roundtrip((k - mean) / sc) * sc + mean
            row["attention_kl"][name] = {how: attention_kl(q, k, k_hat, allowed, scaling) for how, k_hat in variants.items()}
        layers.append(row)
    hows = list(layers[0]["attention_kl"][next(iter(QUANTIZERS))])
    avg = {name: {how: sum(r["attention_kl"][name][how] for r in layers) / len(layers) for how in hows}
           for name in QUANTIZERS}
    return {"layers": layers, "mean": avg,
            "bias_share": sum(r["bias_share"] for r in layers) / len(layers),
            "within_group_var": sum(r["within_group_var"] for r in layers) / len(layers)}
