"""pre_rope: K quantized before RoPE (lowbit/kv/rope.py) — the rotation is the model's own, undone exactly,
per-channel statistics hold at every position before RoPE and not after, its statistics and its flag."""
from __future__ import annotations

import json
import types

import pytest
import torch

from lowbit.kv import key_scales as ks
from lowbit.kv.cache import QuantizedKVCache
from lowbit.kv.codec import Chunk, KvCodec
from lowbit.kv.config import KvCacheConfig
from lowbit.kv.rope import Rope, layer_ropes, pair_mean
from lowbit.models.load import load
from support import run_cli
from kv_fixtures import text, tiny  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def tiny_gemma(tiny_gemma3_dir):
    return load(str(tiny_gemma3_dir))


def _model_rope(loaded, layer):
    """The (cos, sin) tables the model itself builds for `layer`'s attention type, positions 0..511."""
    kinds = getattr(loaded.model.config, "layer_types", None) or ["full_attention"] * 99
    module = loaded.model.get_submodule(dict(loaded.spec.rotary)[kinds[layer]])
    cos, sin = module(torch.zeros(1, 1, 1), torch.arange(512)[None])
    return cos[0].double(), sin[0].double()


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_the_rope_is_the_models_own_per_layer(tiny, tiny_gemma, which):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    loaded = tiny if which == "llama" else tiny_gemma
    ropes = layer_ropes(loaded.model, loaded.spec)
    assert set(ropes) == set(range(loaded.dims.n_layers))
    positions = torch.arange(512)
    for layer, rope in ropes.items():
        cos, sin = _model_rope(loaded, layer)
        ours = rope.cos_sin(positions, torch.float64)
        # the model builds its tables in float32: angles up to 511 rad carry ~3e-5 of rounding
        assert torch.allclose(ours[0], cos, atol=1e-4) and torch.allclose(ours[1], sin, atol=1e-4)
        x = torch.randn(1, 2, 512, rope.head_dim, dtype=torch.float64)
        applied, _ = apply_rotary_pos_emb(x, x, ours[0][None], ours[1][None])   # transformers' rotation, our tables
        assert torch.allclose(rope.apply(x), applied, atol=1e-12)
        assert torch.allclose(rope.undo(rope.apply(x)), x, atol=1e-12)
    if which == "gemma":       # the sliding layers turn with their own (local) base, the full ones with the global
        kinds = loaded.model.config.layer_types
        local, full = loaded.model.model.rotary_emb_local.inv_freq.double(), loaded.model.model.rotary_emb.inv_freq.double()
        assert not torch.allclose(local, full)
        for i, kind in enumerate(kinds[:loaded.dims.n_layers]):
            assert torch.equal(ropes[i].inv_freq, local if kind == "sliding_attention" else full)


def test_attention_scaling_is_undone():
    rope = Rope(torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64), attention_scaling=1.3)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    assert torch.allclose(rope.undo(rope.apply(x, 3), 3), x, atol=1e-12)
    assert torch.allclose(rope.apply(x, 3).norm(dim=-1), 1.3 * x.norm(dim=-1), atol=1e-12)
    # the kept tables (grown as positions arrive) give what fresh trigonometry gives
    cos, sin = rope.cos_sin(torch.arange(40, 47), torch.float64)
    turned = x * cos + torch.cat([-x[..., 3:], x[..., :3]], -1) * sin
    assert torch.allclose(rope.apply(x, 40), turned, atol=1e-12)


def _keys(D=64, T=96):
    """K that is a constant per-channel bias plus small noise before RoPE, turned by RoPE at 0..T−1."""
    g = torch.Generator().manual_seed(0)
    rope = Rope(1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    bias = 8 * torch.randn(1, 2, 1, D, generator=g, dtype=torch.float64)
    k_pre = bias + 0.3 * torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    return rope, rope.apply(k_pre)


@pytest.mark.parametrize("config", [KvCacheConfig("turboquant", 3, center_k=True), KvCacheConfig("int", 4, center_k=True),
                                    KvCacheConfig("kivi", 2)], ids=lambda c: c.name)
def test_before_rope_a_channel_holds_still(config):
    # before RoPE the bias is one vector that center_k's mean (or a per-channel group's offset) takes out;
    # after RoPE the fast pairs turn it from token to token and it costs the quantizer its range
    rope, k = _keys()
    post = KvCodec(config, 64, 0, "k").roundtrip(k)
    pre_codec = KvCodec(KvCacheConfig(**{**config.to_dict(), "pre_rope": True}), 64, 0, "k", rope=rope)
    pre = pre_codec.roundtrip(k)
    assert (pre - k).norm() < 0.5 * (post - k).norm()
    # a chunk written later is turned back at its own positions: the first write's mean still fits it there
    later = pre_codec.roundtrip(k[..., 32:, :], start=32)
    assert (later - k[..., 32:, :]).norm() < 0.5 * (post - k).norm()
    if config.center_k:                                      # at the wrong positions the mean no longer fits
        wrong = pre_codec.roundtrip(k[..., 32:, :], start=0)
        assert (wrong - k[..., 32:, :]).norm() > 2 * (later - k[..., 32:, :]).norm()


def test_pre_rope_refusals(tiny):
    config = KvCacheConfig("turboquant", 3, pre_rope=True)
    with pytest.raises(ValueError, match="needs the RoPE"):
        KvCodec(config, 24, 0, "k")
    with pytest.raises(ValueError, match="head_dim 16 for a head_dim of 24"):
        KvCodec(config, 24, 0, "k", rope=Rope(torch.ones(8, dtype=torch.float64)))
    assert KvCodec(config, 24, 0, "v").rope is None                           # V is never turned
    with pytest.raises(ValueError, match="RoPE of each of the 2 layers"):
        QuantizedKVCache(config, 2)
    with pytest.raises(ValueError, match="pre_rope must be True or False"):
        KvCacheConfig("int", 4, pre_rope=1)
    with pytest.raises(ValueError, match="does not follow"):
        Chunk(4, [], start=0).extend(Chunk(4, [], start=5))
    spec = types.SimpleNamespace(family="x", rotary=(("sliding_attention", "model.rotary_emb"),))
    with pytest.raises(ValueError, match="no rotary module known for full_attention"):
        layer_ropes(tiny.model, spec)
    rotary = tiny.model.model.rotary_emb
    saved = getattr(rotary, "rope_type", None)
    rotary.rope_type = "dynamic"
    try:
        with pytest.raises(ValueError, match="dynamic RoPE"):
            layer_ropes(tiny.model, tiny.spec)
    finally:
        rotary.rope_type = saved
    from lowbit.kv.attention import install_kv_cache

    saved = tiny.model.config._attn_implementation
    install_kv_cache(tiny.model, tiny.spec, config)
    try:                                      # one pass turns K back at 0..T-1: a window placed elsewhere is refused
        with pytest.raises(ValueError, match="positions 0..T-1"), torch.no_grad():
            tiny.model(torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[5, 6, 7]]))
    finally:
        tiny.model.config._attn_implementation = saved
    assert KvCacheConfig("turboquant", 3.5, center_k=True, pre_rope=True, sink=1).name == \
        "turboquant3.5-prerope-kcenter-sink1"


def test_pre_rope_statistics_and_scales(tiny, tmp_path):
    from lowbit.kv.diagnose import capture

    windows = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(2))
    stats = ks.measure(tiny, windows, "t", progress=False)
    rope = layer_ropes(tiny.model, tiny.spec)[1]
    k = torch.cat([rope.undo(capture(tiny, w)[1][1][0]) for w in windows], 1)   # [Hkv, 40, D]
    assert torch.allclose(stats.k_energy_pre[1], k.pow(2).mean(1), rtol=1e-10)
    assert torch.allclose(stats.k_mean_pre[1], k.mean(1), rtol=1e-8, atol=1e-12)
    # RoPE turns each pair: the pair's energy is the same before and after it
    assert torch.allclose(pair_mean(stats.k_energy_pre[1]), pair_mean(stats.k_energy[1]), rtol=1e-10)
    scales = stats.scales(centered=True, pre_rope=True)[1]
    assert torch.equal(scales, ks.key_scales(pair_mean(stats.q_energy[1]), k.var(1, correction=0)))
    path = tmp_path / "k.safetensors"
    ks.save(stats, path)
    assert torch.equal(ks.load(path).scales(True, pre_rope=True)[1], scales)
    old = ks.KeyStats(stats.q_energy, stats.k_energy, stats.k_mean, stats.tokens, "old.safetensors")
    ks.save(old, path)                                                      # a file from before pre-RoPE K
    with pytest.raises(ValueError, match="hold no K before RoPE"):
        ks.load(path).scales(True, pre_rope=True)
    # a model whose RoPE the cache cannot undo still gets its statistics after RoPE, none before
    rotary = tiny.model.model.rotary_emb
    saved = getattr(rotary, "rope_type", None)
    rotary.rope_type = "dynamic"
    try:
        after_only = ks.measure(tiny, windows, "t", progress=False)
    finally:
        rotary.rope_type = saved
    assert after_only.k_energy_pre is None and torch.equal(after_only.k_energy[1], stats.k_energy[1])
    ks.save(after_only, path)
    with pytest.raises(ValueError, match="hold no K before RoPE"):
        ks.load(path).scales(True, pre_rope=True)


def test_eval_and_generate_with_k_before_rope(capsys, tiny_llama_dir, text, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "2",
                                "--kv", "turboquant", "--kv-bits", "3.5", "--kv-pre-rope", "--kv-center-k",
                                "--kv-scale-k", text, "--json", out)
    assert code == 0, err
    assert "KV cache turboquant3.5-prerope-kcenter-kscale: K (before RoPE, turned back on read)" in stdout
    assert json.loads(out.read_text())["kv_cache"]["pre_rope"] is True
    code, stdout, err = run_cli(capsys, "generate", tiny_llama_dir, "--prompt", "the cat sat", "--max-new-tokens",
                                "4", "--kv", "kivi", "--kv-bits", "2", "--kv-group", "4", "--kv-pre-rope")
    assert code == 0 and "kivi2-g4-prerope" in stdout, err
