"""A per-tensor plan of several integer formats exported as compressed-tensors: one config group per
format targeting its linears by name, each group decoding to lowbit's W_dq bit for bit, and
transformers (with compressed-tensors) loading the checkpoint to lowbit's logits."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from export_support import lowbit_weights, run_peer
from safetensors.torch import load_file


PLAN = {"default": "int4-g32-asym", "tensors": {"model.layers.0.mlp.*": "int2-g32-sym",
                                                "model.layers.1.self_attn.*": "int8-g32-sym"}}


@pytest.fixture(scope="module")
def mixed(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed_ct")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps(PLAN))
    from lowbit.cli.main import main

    assert main(["-q", "quantize", str(tiny_llama_dir), "--plan", str(plan), "--method", "rtn", "--out", str(tmp / "q")]) == 0
    assert main(["-q", "export", str(tmp / "q"), "--format", "compressed-tensors", "--out", str(tmp / "ct")]) == 0
    return tmp / "q", tmp / "ct"


def test_each_format_is_a_config_group_that_decodes_to_w_dq(mixed):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    q, ct = mixed
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(config).config_groups
    assert len(groups) == 3
    by_bits = {g.weights.num_bits: g for g in groups.values()}
    assert sorted(by_bits) == [2, 4, 8] and by_bits[4].weights.symmetric is False
    assert set(by_bits[2].targets) == {f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")}
    tensors, expected = load_file(str(ct / "model.safetensors")), lowbit_weights(q)
    bits_of = {name: g.weights.num_bits for g in groups.values() for name in g.targets}
    for name, W_dq in expected.items():
        bits, shape = bits_of[name], tuple(W_dq.shape)
        signed = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape)).float()
        scale = tensors[f"{name}.weight_scale"].float()
        zp = torch.zeros_like(scale)
        if f"{name}.weight_zero_point" in tensors:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, torch.Size(scale.shape), packed_dim=0).float()
        width = shape[1] // scale.shape[1]
        assert torch.equal((signed - zp.repeat_interleave(width, 1)) * scale.repeat_interleave(width, 1), W_dq), name


def test_transformers_loads_the_mixed_checkpoint(mixed, tmp_path):
    pytest.importorskip("compressed_tensors")
    from lowbit.models.load import load

    q, ct = mixed
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    result = run_peer(sys.executable, "transformers", ct, {"ids": ids, "mode": "logits"}, tmp_path)
    with torch.no_grad():
        expected = load(str(q)).model(input_ids=ids).logits.float()
    assert torch.allclose(result["logits"], expected, rtol=0, atol=1e-5), (result["logits"] - expected).abs().max()
