"""Importing quantized HF checkpoints (lowbit/models/imported*.py, `lowbit import`): the imported
QuantLinears hold exactly the checkpoint's codes, scales and zero-points.

  * round trips: lowbit quantize (RTN / GPTQ) -> `lowbit export --format gptq | compressed-tensors`
    -> import: codes, scales, zeros, W_dq and logits identical to the lowbit directory's;
  * checkpoints packed here by an independent packer (AutoGPTQ's shift-and-or loop; compressed-
    tensors' own pack_to_int32) import to the codes that were packed;
  * what cannot be held exactly (act-order g_idx, a v1 zero-point field 2^b - 1, fp32 scales,
    other methods and formats) is refused with one line, and `lowbit import` then writes nothing;
  * checkpoints the tools write themselves: tests/models/test_import_peers.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import assert_one_line_error, needs_smollm2, run_cli

from lowbit.errors import LowbitError
from lowbit.export.int_layout import grid_group_size, to_grid
from lowbit.export.lowbit_dir import save_quantized
from lowbit.export.registry import export, targets
from lowbit.formats import IntFormat, make_format
from lowbit.models.imported import quantization_config
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear
from lowbit.quantize import QuantizeConfig, quantize

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny128_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama whose every width is a multiple of 64 (group 64 needs no regrid;
    GPTQModel's AWQ wants output widths in multiples of 64)."""
    from conftest import _tiny
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return _tiny(config, tmp_path_factory.mktemp("tiny128"))


def _quantized(src: Path, out: Path, method: str, bits: int, group: int, sym: bool, rule: str = "absmax") -> Path:
    loaded = load(str(src))
    fmt = make_format("int", bits=bits, group_size=group, symmetric=sym, scale_rule=rule)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)) if method == "gptq" else None
    quantize(loaded, QuantizeConfig(fmt=fmt, method=method), samples=samples, progress=False)
    return save_quantized(loaded, {"method": method}, out)


def _export(fmt_name: str, src: Path, out: Path) -> Path:
    target = targets()[fmt_name]
    export(target, str(src), out, overwrite=False, options=target.options({}))
    return out


def _linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _assert_holds(original, imported) -> None:
    """Every QuantLinear of `original` is in `imported` with the same codes, scales (on the
    checkpoint's regular grid when lowbit's group had to be regridded), zeros and W_dq; the
    format is the same one whenever the checkpoint could state lowbit's group; logits equal."""
    ours, theirs = _linears(original.model), _linears(imported.model)
    assert set(ours) == set(theirs) and ours
    widths = sorted({m.in_features for m in ours.values()})
    for name, a in ours.items():
        b = theirs[name]
        assert torch.equal(a.codes, b.codes), name
        assert torch.equal(a.W_dq, b.W_dq), name
        fmt = a.fmt
        if fmt.group_size == -1 or grid_group_size(fmt, widths) != fmt.group_size:
            grid = to_grid(a.qtensor, grid_group_size(fmt, widths))     # what the engine layouts can state
            assert b.fmt.group_size == grid.group_size
            assert torch.equal(b.scales, grid.scales), name
            assert torch.equal(b.zeros if b.zeros is not None else torch.full_like(grid.zeros, 1 << (fmt.bits - 1)),
                               grid.zeros), name
        else:
            assert b.fmt == fmt, (name, b.fmt, fmt)
            assert torch.equal(a.scales, b.scales), name
            assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros), name
    with torch.no_grad():
        assert torch.equal(original.model(IDS).logits, imported.model(IDS).logits)


@pytest.mark.parametrize("method,bits,group,sym", [
    ("rtn", 4, 32, True), ("rtn", 4, 64, False), ("rtn", 4, 0, True), ("rtn", 2, 64, True), ("rtn", 8, -1, False),
    ("gptq", 4, 64, True), ("gptq", 4, 32, False), ("gptq", 4, 0, False), ("gptq", 3, 64, True)])
def test_round_trip_through_gptq_and_compressed_tensors(tiny128_dir, tmp_path, method, bits, group, sym):
    q = _quantized(tiny128_dir, tmp_path / "q", method, bits, group, sym)
    original = load(str(q))
    formats = ("gptq", "compressed-tensors") if bits != 3 else ("gptq",)    # compressed-tensors: 2/4/8 bits
    for fmt_name in formats:
        ckpt = _export(fmt_name, q, tmp_path / fmt_name)
        assert quantization_config(ckpt) is not None
        _assert_holds(original, load(str(ckpt)))


@pytest.mark.parametrize("rule", ["signed", "absmax_half"])
def test_symmetric_scale_rules_come_back(tiny128_dir, tmp_path, rule):
    # signed: negative scales; absmax_half uses code 0 (GPTQ's and compressed-tensors' own grid)
    q = _quantized(tiny128_dir, tmp_path / "q", "gptq", 4, 32, True, rule)
    original = load(str(q))
    assert any(bool((m.codes == 0).any()) for m in _linears(original.model).values())
    for fmt_name in ("gptq", "compressed-tensors"):
        imported = load(str(_export(fmt_name, q, tmp_path / fmt_name)))
        assert {m.fmt.scale_rule for m in _linears(imported.model).values()} == {rule}
        _assert_holds(original, imported)


def test_ragged_groups_come_back_on_the_written_grid(tiny_llama_dir, tmp_path):
    # 96 and 160 columns with group 64: the exporters write group 32 with each scale repeated
    q = _quantized(tiny_llama_dir, tmp_path / "q", "rtn", 4, 64, False)
    for fmt_name in ("gptq", "compressed-tensors"):
        imported = load(str(_export(fmt_name, q, tmp_path / fmt_name)))
        assert {m.fmt.name for m in _linears(imported.model).values()} == {"int4-g32-asym"}
        _assert_holds(load(str(q)), imported)


def test_cli_import_writes_a_lowbit_directory(tiny128_dir, tmp_path, capsys):
    q = _quantized(tiny128_dir, tmp_path / "q", "rtn", 4, 64, True)
    ckpt = _export("gptq", q, tmp_path / "gptq")
    code, out, err = run_cli(capsys, "import", ckpt, "--out", tmp_path / "imp")
    assert code == 0, err
    assert "int4-g64-sym" in out and "model.layers.*.mlp.down_proj" in out and "bits/weight" in out
    manifest = json.loads((tmp_path / "imp" / "lowbit.json").read_text())
    assert manifest["method"]["method"] == "import" and manifest["method"]["quantization_config"]["quant_method"] == "gptq"
    assert "quantization_config" not in json.loads((tmp_path / "imp" / "config.json").read_text())
    reloaded = load(str(tmp_path / "imp"))
    assert reloaded.source.kind == "lowbit"
    _assert_holds(load(str(q)), reloaded)
    bits = sum(e["bits"] for e in manifest["tensors"].values()) / sum(
        e["shape"][0] * e["shape"][1] for e in manifest["tensors"].values())
    assert f"{bits:.4g}" in out                                  # the summary's total bits/weight
    code, _, err = run_cli(capsys, "import", ckpt, "--out", tmp_path / "imp")
    assert_one_line_error(code, err, "--overwrite")
    code, _, err = run_cli(capsys, "import", q, "--out", tmp_path / "again")
    assert_one_line_error(code, err, "quantization_config", "lowbit directory")
    assert not (tmp_path / "again").exists()


# --- checkpoints packed without lowbit's packers --------------------------------------------------

def _autogptq_pack(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing loop: rows of intweight [n, cols] (values < 2^bits; bits 2/4/8), 32 // bits
    consecutive rows per int32 word, the first in the low bits -> [n·bits/32, cols]."""
    per = 32 // bits
    x = intweight.to(torch.int64)
    words = torch.zeros(x.shape[0] // per, x.shape[1], dtype=torch.int64)
    for row in range(words.shape[0]):
        for j in range(per):
            words[row] |= x[row * per + j] << (bits * j)
    return (words - (words >= 1 << 31).long() * (1 << 32)).to(torch.int32)


def _checkpoint(float_dir: Path, out: Path, qc: dict, linears: dict[str, dict]) -> Path:
    """An HF directory: float_dir's config + tokenizer, `qc`, its float tensors with `linears`' tensors
    in place of their weights."""
    shutil.copytree(float_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    for name, parts in linears.items():
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in parts.items()})
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return out


def _gptq_linears(float_dir: Path, bits: int, group: int, v1: bool, zeros=None, symmetric=False):
    """Random codes / fp16 scales / zero-points per decoder linear, packed the AutoGPTQ way."""
    shapes = {n: tuple(t.shape) for n, t in load_file(str(float_dir / "model.safetensors")).items()
              if n.endswith("proj.weight")}
    linears, expected = {}, {}
    for key, (out, in_features) in shapes.items():
        name = key[: -len(".weight")]
        G = in_features // group if group > 0 else 1
        codes = torch.randint(0, 1 << bits, (out, in_features), generator=GEN, dtype=torch.uint8)
        scales = (torch.rand(out, G, generator=GEN) * 0.01 + 1e-3).half()
        z = torch.full((out, G), 1 << (bits - 1), dtype=torch.uint8) if symmetric else \
            torch.randint(1, 1 << bits, (out, G), generator=GEN, dtype=torch.uint8)
        if zeros is not None:
            z[0, 0] = zeros
        stored = z.to(torch.int64) - 1 if v1 else z.to(torch.int64)
        idx = torch.arange(in_features) // group if group > 0 else torch.zeros(in_features, dtype=torch.long)
        linears[name] = {"qweight": _autogptq_pack(codes.t(), bits),                         # along the input
                         "qzeros": _autogptq_pack(stored & ((1 << bits) - 1), bits).t().contiguous(),  # along out
                         "scales": scales.t().contiguous(), "g_idx": idx.to(torch.int32)}
        expected[name] = (codes, scales, z, (codes.float() - z.float()[:, idx]) * scales.float()[:, idx])
    return linears, expected


@pytest.mark.parametrize("bits,group,fmt,symmetric", [(4, 32, "gptq", False), (4, 32, "gptq", True),
                                                      (2, 64, "gptq_v2", False), (8, -1, "gptq", True)])
def test_autogptq_packed_checkpoint_imports_its_codes(tiny128_dir, tmp_path, bits, group, fmt, symmetric):
    linears, expected = _gptq_linears(tiny128_dir, bits, group, fmt == "gptq", symmetric=symmetric)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric, "desc_act": False,
          "checkpoint_format": fmt}
    loaded = load(str(_checkpoint(tiny128_dir, tmp_path / "ckpt", qc, linears)))
    got = _linears(loaded.model)
    assert set(got) == set(expected)
    for name, (codes, scales, z, W) in expected.items():
        m = got[name]
        assert isinstance(m.fmt, IntFormat) and m.fmt.symmetric == symmetric and m.fmt.group_size == max(group, 0)
        assert torch.equal(m.codes, codes) and torch.equal(m.scales, scales) and torch.equal(m.W_dq, W)
        assert m.zeros is None if symmetric else torch.equal(m.zeros, z)
    float_ref = load_file(str(tiny128_dir / "model.safetensors"))
    assert torch.equal(loaded.model.model.embed_tokens.weight, float_ref["model.embed_tokens.weight"])
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight      # still tied


@pytest.mark.parametrize("bits,version", [(4, "0.17.1"), (3, "0.17.1"), (3, "0.19.0")])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_packed_checkpoint_imports_its_codes(tiny128_dir, tmp_path, bits, version, symmetric):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from lowbit.formats.packing import pack_int32

    group, offset = 32, 1 << (bits - 1)
    shapes = {k[: -len(".weight")]: tuple(t.shape) for k, t in load_file(str(tiny128_dir / "model.safetensors")).items()
              if k.endswith("proj.weight")}
    linears, expected = {}, {}
    for name, (out, in_features) in shapes.items():
        q = torch.randint(-offset, offset, (out, in_features), generator=GEN).to(torch.int8)   # signed codes
        zp = torch.randint(-offset, offset, (out, in_features // group), generator=GEN).to(torch.int8)
        scale = (torch.rand(out, in_features // group, generator=GEN) * 0.01 + 1e-3).to(torch.bfloat16)
        dense = version >= "0.18"             # 0.17.1 packs 32 // b codes per word; 0.18 on: dense streams
        pack = (lambda v, dim=1: pack_int32((v.to(torch.int16) + offset).to(torch.uint8), bits) if dim == 1 else
                pack_int32((v.t().to(torch.int16) + offset).to(torch.uint8).contiguous(), bits).t().contiguous()) \
            if dense else (lambda v, dim=1: helpers.pack_to_int32(v, bits, packed_dim=dim))
        parts = {"weight_packed": pack(q), "weight_scale": scale, "weight_shape": torch.tensor([out, in_features])}
        if not symmetric:
            parts["weight_zero_point"] = pack(zp, 0)
        linears[name] = parts
        z = zp.float().repeat_interleave(group, 1) if not symmetric else 0
        expected[name] = (q.to(torch.int16) + offset, (q.float() - z) * scale.float().repeat_interleave(group, 1))
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
          "ignore": ["lm_head"], "version": version}
    got = _linears(load(str(_checkpoint(tiny128_dir, tmp_path / "ckpt", qc, linears))).model)
    assert set(got) == set(expected)
    for name, (codes, W) in expected.items():
        assert torch.equal(got[name].codes.to(torch.int16), codes), name
        assert torch.equal(got[name].W_dq, W), name                  # bf16 scales held exactly in float16


# --- refusals: one line, nothing written ----------------------------------------------------------

def _refused(capsys, ckpt: Path, out: Path, *needles) -> None:
    with pytest.raises(LowbitError) as e:
        load(str(ckpt))
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), str(e.value)
    code, _, err = run_cli(capsys, "import", ckpt, "--out", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("qc,needles", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ("bitsandbytes", "gptq", "compressed-tensors")),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, ("marlin", "gptq_v2")),
    ({"quant_method": "gptq", "bits": 5, "group_size": 32}, ("bits 5",)),
    ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 32}, ("gemv", "gemm")),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}, ("float-quantized",)),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
        "input_activations": {"num_bits": 8, "type": "int"}}}}, ("activations",)),
])
def test_unsupported_quantization_config_is_refused(tiny128_dir, tmp_path, capsys, qc, needles):
    ckpt = _checkpoint(tiny128_dir, tmp_path / "ckpt", qc, {})
    _refused(capsys, ckpt, tmp_path / "out", *needles)


def test_act_order_g_idx_is_refused(tiny128_dir, tmp_path, capsys):
    linears, _ = _gptq_linears(tiny128_dir, 4, 32, True)
    name = next(iter(linears))
    linears[name]["g_idx"] = linears[name]["g_idx"][torch.randperm(128, generator=GEN)]   # desc_act order
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "checkpoint_format": "gptq"}
    _refused(capsys, _checkpoint(tiny128_dir, tmp_path / "ckpt", qc, linears), tmp_path / "out", "g_idx", name)


def test_v1_zero_point_field_of_all_ones_is_refused(tiny128_dir, tmp_path, capsys):
    linears, _ = _gptq_linears(tiny128_dir, 4, 32, True, zeros=0)      # z = 0 stored minus one: 15
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq"}
    _refused(capsys, _checkpoint(tiny128_dir, tmp_path / "ckpt", qc, linears), tmp_path / "out", "zero-point")


def test_scales_float16_cannot_hold_are_refused(tiny128_dir, tmp_path, capsys):
    linears, _ = _gptq_linears(tiny128_dir, 4, 32, False)
    name = next(iter(linears))
    linears[name]["scales"] = linears[name]["scales"].float() * (1 + 2**-15)                 # fp32, off the fp16 grid
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}
    _refused(capsys, _checkpoint(tiny128_dir, tmp_path / "ckpt", qc, linears), tmp_path / "out", "float16", name)


# --- the real model -------------------------------------------------------------------------------

@pytest.mark.real_model
@needs_smollm2
def test_smollm2_gptq_import_computes_the_same_logits(tmp_path):
    q = _quantized("smollm2-135m", tmp_path / "q", "rtn", 4, 64, True)
    original = load(str(q))
    imported = load(str(_export("gptq", q, tmp_path / "gptq")))
    ids = torch.randint(0, original.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original.model(ids).logits, imported.model(ids).logits)
    assert {m.fmt.name for m in _linears(imported.model).values()} == {"int4-g64-sym"}
    assert len(_linears(imported.model)) == 30 * 7
    text = "The quick brown fox jumps over the lazy dog. 12345"
    assert imported.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
