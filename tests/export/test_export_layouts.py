"""Engine layouts written by `lowbit export` decode, by each target's documented convention, to
exactly lowbit's W_dq; what a target cannot hold is refused with one clear line."""
from __future__ import annotations

import json

import pytest
import torch
from export_support import decode_gptq, lowbit_weights, quantized_dir, read_codes
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.export.int_layout import IntGrid, grid_group_size, pack_int32, to_grid, unpack_int32
from lowbit.export.registry import export, targets
from lowbit.formats import make_format

GEN = torch.Generator().manual_seed(0)


def _export(fmt_name: str, src, out):
    target = targets()[fmt_name]
    return export(target, str(src), out, overwrite=False, options=target.options({}))


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_int32_is_the_dense_little_endian_stream(bits):
    codes = torch.randint(0, 1 << bits, (5, 77), generator=GEN, dtype=torch.uint8)   # 77: a partial last word
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-77 * bits // 32))
    assert torch.equal(read_codes(words, bits, 77).to(torch.uint8), codes)
    assert torch.equal(unpack_int32(words, bits, 77), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_int32_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 1 << bits, (6, 64), generator=GEN, dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)        # compressed-tensors' q
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    zeros_t = pack_int32(codes.t().contiguous(), bits).t()                        # packed along dim 0
    assert torch.equal(zeros_t, helpers.pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, True), (64, False), (0, False), (-1, True), (-1, False)])
def test_regular_grid_keeps_w_dq(group, symmetric):
    W = torch.randn(24, 96, generator=GEN)                     # 96 with group 64: a ragged last group
    fmt = make_format("int", bits=4, group_size=group, symmetric=symmetric)
    q = fmt.quantize(W)
    grid = to_grid(q, grid_group_size(fmt, [96, 160]))
    assert grid.group_size == {32: 32, 64: 32, 0: 0, -1: 0}[group]
    assert torch.equal(grid.codes, q.codes)
    assert torch.equal(grid.dequantize(), fmt.dequantize(q))


@pytest.mark.parametrize("bits,group,symmetric,rule", [(4, 32, True, "absmax"), (4, 32, False, "absmax"),
                                                       (4, 64, True, "absmax"), (8, 0, False, "absmax"),
                                                       (2, 32, True, "absmax"), (4, 32, True, "signed")])
def test_compressed_tensors_decodes_to_lowbit_w_dq(tiny_llama_dir, tmp_path, bits, group, symmetric, rule):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    q = quantized_dir(tiny_llama_dir, tmp_path / "q", bits, group, symmetric, rule)
    out = tmp_path / "ct"
    _export("compressed-tensors", q, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]   # the library accepts it
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert scheme.weights.num_bits == bits and scheme.weights.symmetric == symmetric
    assert ct.__version__ == config["version"]
    tensors = load_file(str(out / "model.safetensors"))
    expected = lowbit_weights(q)
    for name, W_dq in expected.items():
        shape = tuple(tensors[f"{name}.weight_shape"].tolist())
        assert shape == tuple(W_dq.shape)
        signed = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape)).float()
        scale = tensors[f"{name}.weight_scale"].float()                          # [out, G]
        zp = torch.zeros_like(scale)
        if not symmetric:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, torch.Size(scale.shape),
                                   packed_dim=0).float()
        width = shape[1] // scale.shape[1]                                       # one width for every group
        W = (signed - zp.repeat_interleave(width, 1)) * scale.repeat_interleave(width, 1)
        assert torch.equal(W, W_dq), name
    assert "lm_head.weight" not in tensors                                       # tied: the embedding carries it


@pytest.mark.parametrize("bits,group,symmetric,rule", [(4, 32, True, "absmax"), (4, 32, False, "absmax"),
                                                       (4, 64, False, "absmax"), (3, 32, True, "absmax"),
                                                       (8, 0, True, "absmax"), (2, -1, False, "absmax"),
                                                       (4, 32, True, "signed")])
def test_gptq_decodes_to_lowbit_w_dq(tiny_llama_dir, tmp_path, bits, group, symmetric, rule):
    q = quantized_dir(tiny_llama_dir, tmp_path / "q", bits, group, symmetric, rule)
    out = tmp_path / "gptq"
    _export("gptq", q, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert (config["quant_method"], config["bits"], config["sym"], config["desc_act"], config["checkpoint_format"]) \
        == ("gptq", bits, symmetric, False, "gptq")
    tensors = load_file(str(out / "model.safetensors"))
    for name, W_dq in lowbit_weights(q).items():
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert tensors[f"{name}.scales"].shape[0] * config["group_size"] == W_dq.shape[1] or config["group_size"] == -1
        assert torch.equal(decode_gptq(tensors, name, bits, tuple(W_dq.shape)), W_dq), name
        if symmetric:        # v1 stores 2^(b-1) - 1 for the implicit symmetric zero-point
            zeros = read_codes(tensors[f"{name}.qzeros"], bits, W_dq.shape[0])
            assert bool((zeros == (1 << (bits - 1)) - 1).all())


def test_gptq_refuses_zero_point_zero():
    from lowbit.export.gptq import grid_tensors

    codes = torch.zeros(4, 32, dtype=torch.uint8)
    zeros = torch.full((4, 1), 3, dtype=torch.uint8)
    zeros[2, 0] = 0
    grid = IntGrid(codes, torch.ones(4, 1, dtype=torch.float16), zeros, 4, False, 32)
    with pytest.raises(ValueError, match="1 groups have zero-point 0"):
        grid_tensors(grid)


@pytest.mark.parametrize("target,fmt,match", [
    ("compressed-tensors", dict(family="nf", bits=4, group_size=32), "nf4-g32 .nf: non-uniform"),
    ("gptq", dict(family="mxfp4"), "mxfp4"),
    ("compressed-tensors", dict(family="int", bits=3, group_size=32), "takes 2/4/8-bit integers, not 3-bit"),
    ("gptq", dict(family="int", bits=5, group_size=32), "takes 2/3/4/8-bit integers, not 5-bit"),
])
def test_unrepresentable_formats_are_refused(tiny_llama_dir, tmp_path, target, fmt, match):
    from lowbit.export.lowbit_dir import save_quantized
    from lowbit.models.load import load
    from lowbit.quantize import QuantizeConfig, quantize

    loaded = load(str(tiny_llama_dir))
    quantize(loaded, QuantizeConfig(fmt=make_format(**fmt)), progress=False)
    q = save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    with pytest.raises(LowbitError, match=match):
        _export(target, q, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]              # nothing half-written


def test_gptq_refuses_float_decoder_linears(tiny_llama_dir, tmp_path):
    q = quantized_dir(tiny_llama_dir, tmp_path / "q", 4, 32, True, skip=("model.layers.0.mlp.*",))
    with pytest.raises(LowbitError, match="3 stayed float .model.layers.0.mlp"):
        _export("gptq", q, tmp_path / "gptq")
    out = tmp_path / "ct"                                                     # compressed-tensors ignores them
    _export("compressed-tensors", q, out)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                              "model.layers.0.mlp.up_proj"]
    assert "model.layers.0.mlp.up_proj.weight" in load_file(str(out / "model.safetensors"))


def test_gptq_quantized_head(tiny_gemma3_dir, tmp_path):
    q = quantized_dir(tiny_gemma3_dir, tmp_path / "q", 4, 32, True, quantize_head=True)
    out = tmp_path / "gptq"
    _export("gptq", q, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True and config["tie_word_embeddings"] is False
    tensors = load_file(str(out / "model.safetensors"))
    W_dq = lowbit_weights(q)["lm_head"]
    assert torch.equal(decode_gptq(tensors, "lm_head", 4, tuple(W_dq.shape)), W_dq)
