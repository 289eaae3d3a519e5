"""scale_k: per-channel K scales from the model's q/K energies (lowbit/kv/key_scales.py) — the optimum of
the score-error bound, the codec on K over its scales, the statistics, their file, the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowbit.kv import key_scales as ks
from lowbit.kv.codec import KvCodec
from lowbit.kv.config import KvCacheConfig
from lowbit.models.load import load
from support import run_cli
from kv_fixtures import text, tiny  # noqa: F401  (pytest fixtures)


def _bound(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(Σ E[q²] s²)(Σ E[k²]/s²): the score-error bound the scales minimise, per head."""
    return (q * s**2).sum(-1) * (k / s**2).sum(-1)


def test_key_scales_minimise_the_score_error_bound():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(3, 32, generator=g, dtype=torch.float64) ** 4 * 50      # skewed energies, as real heads have
    k = torch.rand(3, 32, generator=g, dtype=torch.float64) ** 4 * 50
    s = ks.key_scales(q, k).double()
    best = _bound(q, k, s)
    assert torch.allclose(best, (q * k).sqrt().sum(-1) ** 2, rtol=2e-3)   # Cauchy–Schwarz's equality (float16 s)
    assert (best < _bound(q, k, torch.ones_like(s))).all()
    for _ in range(50):                                                     # no other scale does better
        other = s * torch.exp(0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64))
        assert (best <= _bound(q, k, other) * (1 + 1e-3)).all()
    assert torch.allclose(s.log().mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-3)   # geometric mean 1
    assert torch.equal(s, s.half().double())                                # float16, as the cache stores it


@pytest.mark.parametrize("config", [KvCacheConfig("turboquant", 3.5, scale_k=True),
                                    KvCacheConfig("turboquant", 2.5, center_k=True, scale_k=True),
                                    KvCacheConfig("int", 4, scale_k=True)], ids=lambda c: c.name)
def test_scaled_k_is_the_codec_on_k_over_its_scales(config):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 24, 64, generator=g, dtype=torch.float64)
    x[..., 7] += 30                                                         # a bias channel
    s = torch.exp(torch.randn(2, 64, generator=g)).half().float()
    codec = KvCodec(config, 64, 0, "k", s)
    y = codec.roundtrip(x)
    plain = KvCodec(dataclasses.replace(config, scale_k=False, center_k=False), 64, 0, "k")
    mean = x.mean(dim=(0, 2)).half().double()[None, :, None, :] if config.center_k else 0
    sd = s.double()[None, :, None, :]                                       # [H, D] -> [1, H, 1, D]
    assert torch.allclose(y, plain.roundtrip((x - mean) / sd) * sd + mean, atol=1e-12, rtol=0)
    unscaled = KvCodec(dataclasses.replace(config, scale_k=False), 64, 0, "k")
    unscaled.roundtrip(x)
    assert codec.state_nbytes == unscaled.state_nbytes + 2 * s.numel()     # float16 scales are counted
    v = KvCodec(config, 64, 0, "v", s)
    assert v.scale is None and torch.equal(v.roundtrip(x), plain_v(config).roundtrip(x))   # V is never scaled
    with pytest.raises(ValueError, match="needs the K scales"):
        KvCodec(config, 64, 0, "k")


def plain_v(config):
    return KvCodec(dataclasses.replace(config, scale_k=False), 64, 0, "v")


def test_measure_sums_a_k_heads_query_heads(tiny):
    from lowbit.kv.diagnose import capture

    windows = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(2))
    stats = ks.measure(tiny, windows, "t", progress=False)
    q0, k0 = zip(*[(capture(tiny, w)[0][0][0], capture(tiny, w)[0][1][0]) for w in windows])
    q, k = torch.cat(q0, 1), torch.cat(k0, 1)                               # [Hq, 40, D], [Hkv, 40, D]
    rep = q.shape[0] // k.shape[0]
    for h in range(k.shape[0]):                                             # K head h serves query heads h·rep ..
        expect = sum(q[h * rep + r].pow(2).mean(0) for r in range(rep))
        assert torch.allclose(stats.q_energy[0][h], expect, rtol=1e-12)
    assert torch.allclose(stats.k_energy[0], k.pow(2).mean(1), rtol=1e-12)
    assert torch.allclose(stats.k_mean[0], k.mean(1), rtol=1e-10, atol=1e-14)
    assert stats.tokens == 40 and set(stats.q_energy) == {0, 1}
    centered = stats.scales(centered=True)[0]
    assert torch.equal(centered, ks.key_scales(stats.q_energy[0], k.var(1, correction=0)))


def test_stats_file_round_trips_and_refuses_strangers(tmp_path, tiny):
    windows = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(3))
    stats = ks.measure(tiny, windows, "calib.txt", progress=False)
    path = tmp_path / "k.safetensors"
    ks.save(stats, path, "tiny")
    back = ks.load(path)
    assert back.tokens == 16 and back.source == "calib.txt"
    assert all(torch.equal(back.q_energy[l], stats.q_energy[l]) for l in stats.q_energy)
    back.check(2, 2, 24)
    with pytest.raises(ValueError, match="another model"):
        back.check(30, 3, 64)
    (tmp_path / "junk.safetensors").write_text("not one")
    with pytest.raises(ValueError, match="not a K-scales file"):
        ks.load(tmp_path / "junk.safetensors")


def test_eval_and_generate_with_scaled_k(capsys, tiny_llama_dir, text, tmp_path):
    scales = tmp_path / "s.safetensors"
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "2",
                                "--kv", "turboquant", "--kv-bits", "3.5", "--kv-center-k", "--kv-scale-k", text,
                                "--kv-scales-out", scales, "--json", out)
    assert code == 0, err
    assert "turboquant3.5-kcenter-kscale" in stdout and json.loads(out.read_text())["kv_cache"]["scale_k"]
    assert ks.load(scales).tokens == 4 * 256                                # 4 windows of the tiny model's 256
    code, stdout, err = run_cli(capsys, "generate", tiny_llama_dir, "--prompt", "the cat sat", "--max-new-tokens",
                                "4", "--kv", "turboquant", "--kv-bits", "3", "--kv-scale-k", scales)
    assert code == 0 and "turboquant3-kscale" in stdout, err


@pytest.mark.parametrize("flags, needle", [
    (["--kv", "kivi", "--kv-bits", "2", "--kv-scale-k", "x.safetensors"], "applies to per-token K"),
    (["--kv", "turboquant", "--kv-bits", "3", "--kv-scale-k", "nope.safetensors"], "no such file"),
    (["--kv-scale-k", "x.txt"], "--kv-scale-k needs --kv"),
    (["--kv", "turboquant", "--kv-bits", "3", "--kv-scales-out", "o.safetensors"], "needs --kv-scale-k")])
def test_bad_scale_flags_are_one_line(capsys, tiny_llama_dir, text, flags, needle):
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "1", *flags)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1


def test_scales_of_another_model_are_one_line(capsys, tiny_llama_dir, tiny_gemma3_dir, text, tmp_path):
    scales = tmp_path / "gemma.safetensors"
    gemma = load(str(tiny_gemma3_dir))
    ks.save(ks.measure(gemma, torch.randint(0, 257, (1, 16)), "t", progress=False), scales)
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "1",
                           "--kv", "turboquant", "--kv-bits", "3", "--kv-scale-k", scales)
    assert code != 0 and "K scales measured on another model" in err and len(err.strip().splitlines()) == 1


def test_scales_are_not_measured_on_the_evaluation_text(capsys, tiny_llama_dir, text):
    from support import EVAL_TEXT

    if not EVAL_TEXT.is_file():
        pytest.skip(f"{EVAL_TEXT} is absent")
    code, _, err = run_cli(capsys, "eval", tiny_llama_dir, "--text", text, "--ctx", "64", "--windows", "1",
                           "--kv", "turboquant", "--kv-bits", "3", "--kv-scale-k", EVAL_TEXT)
    assert code != 0 and "refusing to measure K scales on the evaluation text" in err
    assert "--allow-eval-text" not in err and len(err.strip().splitlines()) == 1
