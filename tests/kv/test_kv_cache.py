"""The packed cache in generation: token-by-token decoding with QuantizedKVCache equals the one-pass
evaluation path (float64, so no rounding flips), stores the bytes it claims, is deterministic; without
quantization it is transformers' own generation."""
from __future__ import annotations

import pytest
import torch

from lowbit.kv.attention import flushed, install_kv_cache
from lowbit.kv.cache import QuantizedKVCache
from lowbit.kv.config import KvCacheConfig
from lowbit.kv.rope import layer_ropes
from lowbit.models.load import load
from kv_fixtures import tiny  # noqa: F401  (pytest fixtures)

CONFIGS = [KvCacheConfig("int", 4), KvCacheConfig("int", 2, residual=5), KvCacheConfig("int", 3, axis="channel", group=4),
           KvCacheConfig("kivi", 2, group=4, residual=8), KvCacheConfig("turboquant", 3),
           KvCacheConfig("turboquant", 3, qjl=True, residual=2), KvCacheConfig("int", 4, sink=1),
           KvCacheConfig("turboquant", 3, sink=3), KvCacheConfig("kivi", 2, group=4, residual=8, sink=2),
           KvCacheConfig("int", 4, residual=3, pre_rope=True), KvCacheConfig("turboquant", 3, sink=2, pre_rope=True),
           KvCacheConfig("kivi", 2, group=4, residual=8, sink=2, pre_rope=True)]


def _cache(loaded, config, scales=None, for_model=False):
    """The packed cache for `loaded` under config (pre_rope: with the model's RoPE per layer)."""
    ropes = layer_ropes(loaded.model, loaded.spec) if config.pre_rope else None
    if for_model:
        return QuantizedKVCache.for_model(config, loaded.model.config, scales, ropes)
    return QuantizedKVCache(config, loaded.dims.n_layers, key_scales=scales, ropes=ropes)


def _stepwise(model, ids, cache):
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(logits)


def _one_pass(loaded, ids, config, scales=None):
    model, saved = loaded.model, loaded.model.config._attn_implementation
    install_kv_cache(model, loaded.spec, config, scales)
    try:
        with torch.no_grad():
            return model(ids).logits[0]
    finally:
        model.config._attn_implementation = saved
        for layer in model.get_submodule(loaded.spec.layers):
            attention = layer.get_submodule(loaded.spec.attention)
            del attention.lowbit_kvcache, attention.lowbit_kv_scale, attention.lowbit_kv_rope


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_generation_cache_equals_the_one_pass_evaluation(tiny, config):
    ids = torch.randint(0, 257, (1, 29), generator=torch.Generator().manual_seed(0))
    cache = _cache(tiny, config)
    step = _stepwise(tiny.model, ids, cache)
    one = _one_pass(tiny, ids, config)
    with torch.no_grad():
        plain = tiny.model(ids).logits[0]
    assert torch.allclose(step, one, atol=1e-9, rtol=0)
    assert (one - plain).abs().max() > 1e-4                          # the cache did quantize
    layer = cache.layers[0]
    assert layer.sink_tokens == config.sink
    quantized = int(flushed(29, config.residual, layer.multiple, config.sink)[-1])
    assert layer.sink_tokens + layer.quantized_tokens == quantized


def test_flushed_counts():
    assert flushed(6, 0, 1).tolist() == [1, 2, 3, 4, 5, 6]
    assert flushed(10, 2, 4).tolist() == [0, 0, 0, 0, 0, 4, 4, 4, 4, 8]
    # a sink of 3: its tokens count as soon as written, the groups of 4 start after it
    assert flushed(10, 2, 4, sink=3).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 7, 7]
    assert flushed(5, 0, 1, sink=2).tolist() == [1, 2, 3, 4, 5]


def test_cache_bytes_match_the_bits_claimed(tiny):
    config = KvCacheConfig("int", 4, group=8)                          # head_dim 24: 3 groups
    cache = QuantizedKVCache(config, tiny.dims.n_layers)
    with torch.no_grad():
        tiny.model(torch.randint(0, 257, (1, 40)), past_key_values=cache, use_cache=True)
    kv_heads = tiny.model.config.num_key_value_heads
    values = 2 * tiny.dims.n_layers * kv_heads * 24 * 40               # K and V, every layer, head and token
    assert cache.nbytes * 8 == values * (4 + 32 / 8)
    assert cache.bytes_per_token() == cache.nbytes / 40


def _held_bytes(layer) -> int:
    """Bytes of every storage a packed layer's tensors keep alive (each storage once)."""
    floats = [layer.sink_keys, layer.sink_values, layer.keys, layer.values]
    tensors = floats + [t for chunk in layer.chunks for c in chunk for p in c.parts for t in (p.packed, *p.side.values())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("config", [KvCacheConfig("int", 8), KvCacheConfig("kivi", 2, group=4, residual=8),
                                    KvCacheConfig("turboquant", 3), KvCacheConfig("turboquant", 3, sink=4, residual=50)],
                         ids=lambda c: c.name)
def test_the_cache_holds_no_more_memory_than_its_bytes(tiny, config):
    # the float prompt must not live on behind the residual's views: a 40-token prefill, then 5 steps
    cache = QuantizedKVCache(config, tiny.dims.n_layers)
    with torch.no_grad():
        tiny.model(torch.randint(0, 257, (1, 40)), past_key_values=cache, use_cache=True)
        for t in range(5):
            tiny.model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        state = layer.k_codec.state_nbytes + layer.v_codec.state_nbytes
        assert _held_bytes(layer) == layer.nbytes - state


def test_generation_is_deterministic_and_float_equals_transformers(tiny):
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(1))
    runs = [tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                past_key_values=QuantizedKVCache(KvCacheConfig("turboquant", 2.5), tiny.dims.n_layers))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    from transformers import DynamicCache

    from lowbit.kv.generate import generate_greedy

    plain = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    cache = DynamicCache(config=tiny.model.config)
    seen = []                                  # what the cache held when after_prefill ran: the prompt alone
    ours = generate_greedy(tiny.model, ids, 10, cache, after_prefill=lambda: seen.append(cache.get_seq_length()))
    assert torch.equal(ours.tokens, plain[0, ids.shape[1]:])          # the float cache: transformers' own tokens
    assert seen == [ids.shape[1]]


@pytest.fixture(scope="module")
def tiny_gemma(tiny_gemma3_dir):
    loaded = load(str(tiny_gemma3_dir))
    loaded.model.double()
    return loaded


@pytest.mark.parametrize("config", [KvCacheConfig("int", 4), KvCacheConfig("kivi", 2, group=4, residual=8),
                                    KvCacheConfig("turboquant", 3), KvCacheConfig("turboquant", 3, sink=2),
                                    KvCacheConfig("turboquant", 3, sink=1, pre_rope=True),
                                    KvCacheConfig("turboquant", 3, sink=1, norm_correct="kv")],
                         ids=lambda c: c.name)
def test_gemma_sliding_window_cache_equals_the_one_pass_evaluation(tiny_gemma, config):
    # 40 tokens: beyond the tiny Gemma's sliding window of 16, so the sliding layers' masks matter
    # (pre_rope: the sliding layers turn K with their own RoPE base)
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(2))
    step = _stepwise(tiny_gemma.model, ids, _cache(tiny_gemma, config))
    one = _one_pass(tiny_gemma, ids, config)
    assert torch.allclose(step, one, atol=1e-9, rtol=0)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_fractional_turboquant_prefill_equals_the_one_pass_evaluation(tiny, tiny_gemma, which):
    # a fractional rate splits channels on the first write: a prompt prefilled at once is that write, the
    # window the one-pass evaluation splits on (token by token the first write would be one token)
    loaded = tiny if which == "llama" else tiny_gemma
    for config in (KvCacheConfig("turboquant", 3.5), KvCacheConfig("turboquant", 3.5, center_k=True),
                   KvCacheConfig("turboquant", 3.5, center_k=True, sink=2),    # the sink: not in the first write
                   KvCacheConfig("turboquant", 3.5, center_k=True, sink=2, pre_rope=True),
                   KvCacheConfig("turboquant", 3.5, center_k=True, sink=2, pre_rope=True, norm_correct="kv")):
        _prefill_equals_one_pass(loaded, config)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_scaled_k_cache_equals_the_one_pass_evaluation(tiny, tiny_gemma, which):
    """scale_k: prefill and then token by token, the cache's logits are the one-pass evaluation's (float64)."""
    loaded = tiny if which == "llama" else tiny_gemma
    c = loaded.model.config
    g = torch.Generator().manual_seed(6)
    scales = {i: torch.exp(torch.randn(c.num_key_value_heads, c.head_dim, generator=g)).half().float()
              for i in range(c.num_hidden_layers)}
    config = KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True)
    _prefill_equals_one_pass(loaded, config, scales)
    _prefill_equals_one_pass(loaded, KvCacheConfig("turboquant", 3.5, center_k=True, scale_k=True, pre_rope=True), scales)
    step_config = KvCacheConfig("int", 4, scale_k=True)
    ids = torch.randint(0, 257, (1, 20), generator=g)
    step = _stepwise(loaded.model, ids, QuantizedKVCache(step_config, loaded.dims.n_layers, key_scales=scales))
    assert torch.allclose(step, _one_pass(loaded, ids, step_config, scales), atol=1e-9, rtol=0)
    assert not torch.allclose(step, _one_pass(loaded, ids, KvCacheConfig("int", 4)), atol=1e-6)   # the scales act
    with pytest.raises(ValueError, match="K scales for each"):
        QuantizedKVCache(step_config, loaded.dims.n_layers)


def _prefill_equals_one_pass(loaded, config, scales=None):
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefill = loaded.model(ids, past_key_values=_cache(loaded, config, scales), use_cache=True).logits[0]
    assert torch.allclose(prefill, _one_pass(loaded, ids, config, scales), atol=1e-9, rtol=0)


@pytest.mark.parametrize("config", [KvCacheConfig("int", 4), KvCacheConfig("kivi", 2, group=4, residual=8),
                                    KvCacheConfig("turboquant", 3.5),
                                    KvCacheConfig("kivi", 2, group=4, residual=8, sink=3),
                                    KvCacheConfig("turboquant", 3.5, sink=1, pre_rope=True),
                                    KvCacheConfig("kivi", 2, group=4, residual=8, pre_rope=True)],
                         ids=lambda c: c.name)
def test_gemma_sliding_layers_forget_what_their_window_hides(tiny_gemma, config, monkeypatch):
    """A 30-token prompt and 60 decoded tokens (window 16): the cache built for the model forgets its
    sliding layers' stale tokens, its logits equal those of a cache that keeps every token (float64),
    and it holds fewer bytes."""
    import lowbit.kv.cache as cache_module

    monkeypatch.setattr(cache_module, "FORGET_STEP", 4)       # per-token layouts forget in steps of 4 here
    model = tiny_gemma.model
    window = model.config.sliding_window
    ids = torch.randint(0, 257, (1, 30), generator=torch.Generator().manual_seed(4))
    steps = torch.randint(0, 257, (1, 60), generator=torch.Generator().manual_seed(5))
    runs = {}
    for name, cache in (("keeps", _cache(tiny_gemma, config)), ("forgets", _cache(tiny_gemma, config, for_model=True))):
        held = []                                              # a sliding layer's stored tokens after each step
        with torch.no_grad():
            logits = [model(ids, past_key_values=cache, use_cache=True).logits[0, -1]]
            held.append(cache.layers[0].stored_tokens)
            for t in range(steps.shape[1]):
                logits.append(model(steps[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
                held.append(cache.layers[0].stored_tokens)
        runs[name] = (torch.stack(logits), cache, held)
    (keep, kept, _), (forget, forgot, held) = runs["keeps"], runs["forgets"]
    assert torch.allclose(forget, keep, atol=1e-9, rtol=0)
    sliding = [layer for layer in forgot.layers if layer.is_sliding]
    assert sliding and not any(layer.is_sliding for layer in kept.layers) and forgot.layers[0].is_sliding
    group = config.token_group() if config.method == "kivi" else 1
    bound = window - 1 + max(4, group) + config.residual + config.sink
    assert max(held) <= bound                                  # from the prefill on, not only at the end
    assert all(layer.seen == 90 and layer.stored_tokens <= bound for layer in sliding)
    assert all(layer.stored_tokens == 90 for layer in forgot.layers if not layer.is_sliding)
    assert forgot.nbytes < kept.nbytes
    assert all(layer.sink_tokens == 0 for layer in sliding) and all(    # the sink: forgotten where the window hides it
        layer.sink_tokens == config.sink for layer in forgot.layers if not layer.is_sliding)


def test_the_sink_reads_back_exactly_and_the_rest_is_quantized(tiny):
    from transformers import DynamicCache

    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(7))
    packed, plain = QuantizedKVCache(KvCacheConfig("turboquant", 3, sink=3), tiny.dims.n_layers), DynamicCache()
    with torch.no_grad():
        tiny.model(ids[:, :2], past_key_values=packed, use_cache=True)   # a prompt shorter than the sink,
        tiny.model(ids[:, 2:], past_key_values=packed, use_cache=True)   # then the rest
        tiny.model(ids, past_key_values=plain, use_cache=True)
    for layer, ref in zip(packed.layers, plain.layers):
        k, v = layer.read()
        assert layer.sink_tokens == 3 and layer.quantized_tokens == 9
        # float64; the two calls' matmul shapes differ from the plain one's, hence 1e-12 rather than bit equality
        assert torch.allclose(k[..., :3, :], ref.keys[..., :3, :], atol=1e-12, rtol=0)
        assert torch.allclose(v[..., :3, :], ref.values[..., :3, :], atol=1e-12, rtol=0)
        assert not torch.allclose(k[..., 3:, :], ref.keys[..., 3:, :], atol=1e-3)
