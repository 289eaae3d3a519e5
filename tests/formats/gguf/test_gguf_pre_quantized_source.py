"""SmolLM2's weights come from a Q4_1 file: Q5_1's weighted search lands on that grid exactly, ggml's
min-max reference (used without an imatrix) does not -- the README's account of Q5_K_M without an imatrix."""
from __future__ import annotations

import numpy as np
import pytest
from support import needs_smollm2

from lowbit.formats.gguf import dequantize_gguf, quantize_gguf

pytestmark = [pytest.mark.real_model, needs_smollm2]


def test_q5_1_search_reproduces_smollm2s_q4_1_grid_and_the_reference_does_not():
    from lowbit.models.load import load

    layers = load("smollm2-135m").model.model.layers
    for index in (0, 17):
        for name, module in layers[index].named_modules():
            if not hasattr(module, "weight") or module.weight.ndim != 2:
                continue
            W = module.weight.detach().float()
            rel = {}
            for label, imx in (("reference", None), ("searched", np.ones(W.shape[1], np.float32))):
                W_dq = dequantize_gguf(quantize_gguf(W, "Q5_1", imatrix=imx), "Q5_1", tuple(W.shape))
                rel[label] = float((W - W_dq).norm() / W.norm())
            assert rel["searched"] < 1e-6 and rel["reference"] > 0.02, (index, name, rel)
