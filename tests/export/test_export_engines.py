"""Other engines load lowbit's exports and compute what lowbit computes (issue 4's verification).

Each engine runs in a subprocess where `sys.modules['lowbit'] = None` is set first (peer_run.py):
plain transformers (+ compressed-tensors) in this environment, GPTQModel in its own environment
(bench/peers/venv.py; skipped with the reason when it cannot be created).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from export_support import lowbit_weights, negative_scale_share, quantized_dir, run_peer
from support import EVAL_TEXT, REPO, needs_eval_text, needs_smollm2

from lowbit.export.registry import export, targets
from lowbit.models.load import load

GPTQMODEL = "gptqmodel==7.6.0"
GPTQ_ENV = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", OMP_NUM_THREADS="1")


def _export(fmt_name: str, src, out) -> Path:
    target = targets()[fmt_name]
    export(target, str(src), out, overwrite=False, options=target.options({}))
    return out


def _logits(path, ids, dtype=torch.float32):
    with torch.no_grad():
        return load(str(path)).model.to(dtype)(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def gptqmodel_python():
    import importlib.util

    # bench/peers/venv.py, loaded by path: its name would otherwise clash with the stdlib's venv
    spec = importlib.util.spec_from_file_location("peers_venv", REPO / "bench" / "peers" / "venv.py")
    peers_venv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers_venv)
    try:
        return peers_venv.ensure_venv("gptqmodel", [GPTQMODEL])
    except Exception as e:                    # no network, no wheel, a failed build: say which
        pytest.skip(f"GPTQModel environment could not be created: {type(e).__name__}: {e}")


IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))


@pytest.mark.slow
@pytest.mark.parametrize("group,symmetric,rule", [(32, True, "absmax"), (32, False, "absmax"), (64, True, "absmax"),
                                                   (64, True, "signed")])  # signed: negative scales
def test_transformers_loads_compressed_tensors(tiny_llama_dir, tmp_path, group, symmetric, rule):
    pytest.importorskip("compressed_tensors")
    q = quantized_dir(tiny_llama_dir, tmp_path / "q", 4, group, symmetric, rule)
    assert (negative_scale_share(q) > 0.3) == (rule == "signed")
    result = run_peer(sys.executable, "transformers", _export("compressed-tensors", q, tmp_path / "ct"),
                      {"ids": IDS, "mode": "logits"}, tmp_path)
    expected = _logits(q, IDS)
    assert torch.allclose(result["logits"], expected, rtol=0, atol=1e-5), (result["logits"] - expected).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("group,rule", [(32, "absmax"), (64, "absmax"), (64, "signed")])  # signed: negative scales
def test_gptqmodel_loads_gptq(tiny_llama_dir, tmp_path, gptqmodel_python, group, rule):
    q = quantized_dir(tiny_llama_dir, tmp_path / "q", 4, group, True, rule)
    assert (negative_scale_share(q) > 0.3) == (rule == "signed")
    result = run_peer(gptqmodel_python, "gptqmodel", _export("gptq", q, tmp_path / "gptq"),
                      {"ids": IDS, "mode": "logits"}, tmp_path, env=GPTQ_ENV)
    expected = lowbit_weights(q)
    assert set(result["weights"]) == set(expected)
    for name, W_dq in expected.items():                # GPTQModel's own unpacking, float32 scales: exact
        assert torch.equal(result["weights"][name], W_dq), name
    # GPTQModel's CPU kernels run float16 only: compare with lowbit's model in float16
    reference = _logits(q, IDS, torch.float16)
    assert (result["logits"] - reference).abs().max() <= 2e-3 * reference.abs().max()


# --- the real model: SmolLM2 W4 g64 RTN, perplexity on the first 2 windows of the eval text -------

CTX, WINDOWS = 2048, 2


@pytest.fixture(scope="module")
def smollm2_w4g64(tmp_path_factory):
    from lowbit.eval.perplexity import evaluate, make_windows, tokenize

    root = tmp_path_factory.mktemp("smollm2")
    q = quantized_dir("smollm2-135m", root / "q", 4, 64, True)
    loaded = load(str(q))
    ids = tokenize(loaded.tokenizer, EVAL_TEXT.read_text(encoding="utf-8"))
    result = evaluate(loaded.model, ids, CTX, WINDOWS, progress=False)
    return root, q, make_windows(ids, CTX, WINDOWS), result.ppl


@pytest.mark.slow
@pytest.mark.real_model
@needs_smollm2
@needs_eval_text
def test_smollm2_compressed_tensors_perplexity(smollm2_w4g64):
    pytest.importorskip("compressed_tensors")
    root, q, windows, ppl = smollm2_w4g64
    ct = _export("compressed-tensors", q, root / "ct")
    result = run_peer(sys.executable, "transformers", ct, {"ids": windows, "mode": "nll"}, root)
    peer_ppl = math.exp(sum(result["window_nll"]) / len(result["window_nll"]))
    print(f"SmolLM2 W4 g64 ppl, {WINDOWS} windows: lowbit {ppl:.6f}, transformers+compressed-tensors {peer_ppl:.6f}")
    assert abs(peer_ppl / ppl - 1) < 1e-3, (peer_ppl, ppl)


@pytest.mark.slow
@pytest.mark.real_model
@needs_smollm2
@needs_eval_text
def test_smollm2_gptqmodel_perplexity(smollm2_w4g64, gptqmodel_python):
    root, q, windows, ppl = smollm2_w4g64
    gptq = _export("gptq", q, root / "gptq")
    # GPTQModel's float16 CPU path is slow: 1,053 s for these 2 windows under a load average of 7
    result = run_peer(gptqmodel_python, "gptqmodel", gptq, {"ids": windows, "mode": "nll"}, root, env=GPTQ_ENV,
                      timeout=3600)
    expected = lowbit_weights(q)
    assert all(torch.equal(result["weights"][n], W) for n, W in expected.items())
    peer_ppl = math.exp(sum(result["window_nll"]) / len(result["window_nll"]))
    print(f"SmolLM2 W4 g64 ppl, {WINDOWS} windows: lowbit {ppl:.6f}, GPTQModel (float16) {peer_ppl:.6f}")
    assert abs(peer_ppl / ppl - 1) < 1e-3, (peer_ppl, ppl)            # float16 there, float32 here
