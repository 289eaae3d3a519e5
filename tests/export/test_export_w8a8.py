"""W8A8 as compressed-tensors "int-quantized": the layout, refusals, and transformers + compressed-tensors
(lowbit unimportable) computing what lowbit computes, input quantization included."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from export_support import run_peer
from safetensors.torch import load_file
from support import assert_one_line_error, run_cli

from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
SMALL = ["--samples", "4", "--seq-len", "64"]


def _quantized(capsys, src, out, calib, recipe):
    code, _, err = run_cli(capsys, "quantize", src, "--recipe", recipe, "--calib", calib, *SMALL, "--out", out)
    assert code == 0, err
    return out


def _logits(path, weights_only=False):
    """lowbit's logits; weights_only: the same model with its inputs left float."""
    model = load(str(path)).model
    for m in model.modules():
        if isinstance(m, QuantLinear) and weights_only:
            m.set_act(None)
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("recipe, static", [("w8a8-smoothquant-static", True), ("w8a8-naive", False)])
def test_int_quantized_layout_and_transformers_forward(capsys, tiny_llama_dir, tmp_path, calib, recipe, static):
    pytest.importorskip("compressed_tensors")
    q = _quantized(capsys, tiny_llama_dir, tmp_path / "q", calib, recipe)
    code, out, err = run_cli(capsys, "export", q, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert code == 0, err
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts["strategy"], acts["dynamic"]) == (("tensor", False) if static else ("token", True))
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    lowbit_linear = load(str(q)).model.get_submodule(name)
    assert tensors[f"{name}.weight"].dtype == torch.int8
    assert torch.equal(tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"].float(), lowbit_linear.W_dq)
    assert (f"{name}.input_scale" in tensors) == static
    if static:
        assert torch.equal(tensors[f"{name}.input_scale"], lowbit_linear.input_scale)
    # the reader's forward quantizes the inputs: one linear's output is its weight times the input as
    # compressed-tensors quantizes it (static: lowbit's stored scale; dynamic: its own absmax / 127.5
    # per token, codes −128..127), not times the raw input
    x = torch.randn(1, 16, lowbit_linear.in_features, generator=torch.Generator().manual_seed(1)) * 3
    probe = run_peer(sys.executable, "transformers", tmp_path / "ct",
                     {"ids": IDS, "mode": "probe", "linear": name, "x": x}, tmp_path)
    assert torch.equal(probe["weight"], lowbit_linear.W_dq)
    s = lowbit_linear.input_scale if static else x.abs().amax(-1, keepdim=True) / 127.5
    x_q = (x / s).round().clamp(-128, 127) * s
    expected, raw = x_q @ probe["weight"].T, x @ probe["weight"].T
    assert torch.allclose(probe["y"], expected, rtol=1e-5, atol=1e-5)
    assert (probe["y"] - raw).abs().max() > 100 * (probe["y"] - expected).abs().max()
    if static:   # the same grid (lowbit saturates at ±127, compressed-tensors at −128..127): the same model
        result = run_peer(sys.executable, "transformers", tmp_path / "ct", {"ids": IDS, "mode": "logits"}, tmp_path)
        w8a8, weights_only = _logits(q), _logits(q, weights_only=True)
        assert (result["logits"] - w8a8).abs().max() < (result["logits"] - weights_only).abs().max() / 10
    # dynamic: another grid (absmax / 127.5, not / 127) rounds each activation independently, so the
    # logits agree only to within int8 noise: the probe above is the check


def test_llm_int8_is_refused_with_the_reason(capsys, tiny_llama_dir, tmp_path, calib):
    q = _quantized(capsys, tiny_llama_dir, tmp_path / "q", calib, "llm-int8")
    code, _, err = run_cli(capsys, "export", q, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert_one_line_error(code, err, "a8-token-sym-split6", "float columns")
    assert not (tmp_path / "ct").exists()
