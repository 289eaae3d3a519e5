"""`lowbit export --format gguf --method awq|awq+gptq`: AWQ scales searched on integer grids shaped like
each tensor's GGUF type, folded into the float model, then the GGUF calibration and quantizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_support import read_tensors, with_merges

from lowbit.cli.main import main
from lowbit.export.gguf.awq import PROXIES, GGUFGrid, awq_gguf_plan, linear_types, proxy_format
from lowbit.formats import IntFormat
from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf, quantize_gguf
from lowbit.formats.gguf.layout import blocks_from_bytes
from lowbit.formats.gguf.registry import code_grid
from lowbit.methods.awq import output_error, scaled_fake_quantize, search_scales
from lowbit.models.load import load

UNIFORM = [name for name, t in GGUF_TYPES.items() if t.set_codes is not None]


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    return with_merges(tiny_llama_dir, tmp_path_factory.mktemp("gguf_awq_llama"))


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    text = tmp_path_factory.mktemp("gguf_awq_text") / "calib.txt"
    text.write_text("the cat sat on the mat and then it went home. a dog ran by the river at noon. " * 60)
    return text


def test_every_quantized_gguf_type_has_a_proxy():
    assert set(PROXIES) == set(GGUF_TYPES)


@pytest.mark.parametrize("name", UNIFORM)
def test_proxy_has_the_types_levels_and_scale_block_width(name):
    """The proxy grid has as many levels as the type has codes, and one scale per run of weights
    as long as the type's (sub-)block: read off the stored blocks' own grid."""
    fmt = proxy_format(name)
    t = GGUF_TYPES[name]
    assert 2 ** fmt.bits == t.code_max + 1  # Q8_0: codes 0..255 stored, ggml's rounding uses [-127, 127]
    W = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    blocks = blocks_from_bytes(quantize_gguf(W, name), t.layout, tuple(W.shape))  # [n_blocks, bytes per block]
    step, _ = code_grid(blocks, name)  # [n_blocks, block_size]
    runs = step.reshape(-1, fmt.group_size)  # [runs, width]: one step per proxy group
    assert np.all(runs == runs[:, :1])
    # and the type's steps do change from one proxy group to the next (the width is not too small)
    assert np.any(runs[1:, 0] != runs[:-1, 0])


def test_float_tensors_in_a_mix_are_judged_on_the_finest_grid():
    assert proxy_format("F16") == proxy_format("Q8_0") == IntFormat(8, True, 32, "absmax")


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "Q6_K", "IQ4_NL"])
def test_gguf_grid_quantizes_the_scaled_weight_weighted_by_the_scaled_inputs(type_name):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 256, generator=g)
    s = torch.rand(256, generator=g) + 0.5
    imx = (torch.rand(256, generator=g) + 0.1).double().numpy()
    grid = GGUFGrid(type_name, imx)
    expected = dequantize_gguf(quantize_gguf(W * s, type_name, imatrix=imx / s.double().numpy() ** 2),
                               type_name, (8, 256)) / s
    assert torch.equal(scaled_fake_quantize(grid, W, s), expected)
    assert torch.equal(grid.fake_quantize(W), dequantize_gguf(quantize_gguf(W, type_name, imatrix=imx), type_name, (8, 256)))
    plain = GGUFGrid(type_name)  # no imatrix: llama.cpp's default weighting
    assert torch.equal(plain.fake_quantize(W), dequantize_gguf(quantize_gguf(W, type_name), type_name, (8, 256)))
    assert torch.equal(GGUFGrid("F16").fake_quantize(W), W)
    # an integer Format has no own scaled quantizer: Q(W·diag(s))·diag(s)⁻¹ directly
    fmt = IntFormat(4, False, 32)
    assert torch.equal(scaled_fake_quantize(fmt, W, s), fmt.fake_quantize(W * s) / s)


def test_search_scales_takes_one_format_per_linear():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 64, generator=g)
    X[:, 5] *= 20  # a salient channel
    H, x_mean = X.T @ X, X.abs().mean(0)
    Ws = [torch.randn(32, 64, generator=g) * 0.1, torch.randn(48, 64, generator=g) * 0.1]
    fmts = [IntFormat(4, False, 32), IntFormat(6, True, 16)]
    s, info = search_scales(Ws, H, x_mean, fmts, grid=6)
    expected = sum(output_error(W, f.fake_quantize(W * s) / s, H) for W, f in zip(Ws, fmts))
    assert info["error"] == pytest.approx(float(expected), rel=1e-5)
    assert info["error"] <= info["error_unscaled"]
    same, _ = search_scales(Ws, H, x_mean, IntFormat(4, False, 32), grid=6)
    both, _ = search_scales(Ws, H, x_mean, [IntFormat(4, False, 32)] * 2, grid=6)
    assert torch.equal(same, both)
    with pytest.raises(ValueError, match="2 linears"):
        search_scales(Ws, H, x_mean, fmts[:1], grid=6)


def test_linear_types_are_the_types_the_file_gets(llama_dir, tmp_path):
    from lowbit.export.gguf.names import family_for, gguf_name

    out = tmp_path / "q.gguf"
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q3_K_M", "--out", str(out)]) == 0
    written = read_tensors(out)
    loaded = load(str(llama_dir))
    family = family_for(loaded.model.config.model_type)
    types = linear_types(loaded, "Q3_K_M")
    assert len(types) == 7 * loaded.dims.n_layers
    for (index, name), type_name in types.items():
        tensor, _ = gguf_name(f"{loaded.spec.layers}.{index}.{name}.weight", family)
        assert written[tensor][0] == type_name, tensor


@pytest.mark.parametrize("grid", ["gguf", "proxy"])
def test_awq_plan_has_a_scale_per_group_and_keeps_the_model(llama_dir, grid):
    loaded = load(str(llama_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    samples = torch.randint(0, 259, (4, 24), generator=torch.Generator().manual_seed(0))
    plan = awq_gguf_plan(loaded, "Q4_K_M", samples, grid=grid, progress=False)
    assert grid in plan.meta["format"]
    assert sorted(plan.scales) == list(range(loaded.dims.n_layers))
    for entries in plan.scales.values():
        assert set(entries) == {g.source for g in loaded.spec.groups}
        for s in entries.values():
            assert torch.isfinite(s).all() and (s > 0).all()
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # search only
    with pytest.raises(ValueError, match="grid"):
        awq_gguf_plan(loaded, "Q4_K_M", samples, grid="int", progress=False)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_export_folds_the_plan_into_the_file(llama_dir, calib_text, tmp_path, method):
    from lowbit.data.text import read_text
    from lowbit.export.gguf.imatrix import calibration_windows
    from lowbit.methods.awq import apply_awq_plan

    plain, awq, folded_f32 = tmp_path / "i.gguf", tmp_path / "a.gguf", tmp_path / "f.gguf"
    common = ["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--calib", str(calib_text)]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--method", method, "--out", str(awq)]) == 0
    t_plain, t_awq = read_tensors(plain), read_tensors(awq)
    assert {k: v[0] for k, v in t_plain.items()} == {k: v[0] for k, v in t_awq.items()}  # same mix
    # the file's norms are the float model's with the plan folded in (the same seeded windows)
    loaded = load(str(llama_dir))
    plan = awq_gguf_plan(loaded, "Q4_K_M", calibration_windows(loaded, read_text(str(calib_text))), progress=False)
    apply_awq_plan(loaded.model, loaded.spec, plan)
    from lowbit.export.gguf.writer import write_gguf

    write_gguf(loaded, "F32", folded_f32)
    t_f32 = read_tensors(folded_f32)
    norms = [k for k in t_awq if k.endswith("_norm.weight") and k.startswith("blk.")]
    assert norms
    for name in norms:
        np.testing.assert_array_equal(np.asarray(t_awq[name][2]), np.asarray(t_f32[name][2]))
    changed = [n for n in norms if not np.array_equal(np.asarray(t_awq[n][2]), np.asarray(t_plain[n][2]))]
    assert changed, "AWQ chose s = 1 everywhere"


@pytest.mark.parametrize("flags, message", [
    (["--method", "awq"], "needs --calib"),
    (["--method", "awq+gptq", "--type", "F16", "--calib", "TEXT"], "needs a quantized --type"),
    (["--method", "smooth", "--calib", "TEXT"], "unknown --method smooth"),
])
def test_awq_bad_flags_are_one_line(llama_dir, calib_text, tmp_path, capsys, flags, message):
    out = tmp_path / "out.gguf"
    flags = [str(calib_text) if f == "TEXT" else f for f in flags]
    if "--type" not in flags:
        flags += ["--type", "Q4_K_M"]
    capsys.readouterr()
    code = main(["export", str(llama_dir), "--format", "gguf", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and not out.exists()
