"""A checkpoint a peer tool wrote for the real SmolLM2-135M, imported and exported to GGUF Q4_0
without re-rounding (bench/import_to_gguf.py): the GGUF holds the checkpoint's de-quantized
weights bit for bit, and llama.cpp computes lowbit's function on them.

The checkpoints are not produced here (GPTQModel's GPTQ takes many minutes on a CPU): the test
checks those bench/import_to_gguf.py left in its cache (~/.cache/lowbit/bench/import_to_gguf) and
skips, saying how to produce them, when they are absent.

  llmcompressor-rtn-w4g64-bf16  llm-compressor RTN, int4 sym g64, bfloat16 scales
  gptqmodel-gptq-w4g128         GPTQModel GPTQ, int4 sym g128 (g64 if it refused 128), float16 scales
  llmcompressor-rtn-w4g64-fp32  the same RTN in float32: float32 scales, which `lowbit import` refuses
"""
from __future__ import annotations

import importlib.util
import sys

import pytest

from support import REPO, needs_eval_text

pytestmark = [pytest.mark.slow, pytest.mark.real_model, needs_eval_text]


def _script():
    spec = importlib.util.spec_from_file_location("bench_import_to_gguf", REPO / "bench" / "import_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


I2G = _script()


def _cached_or_skip(row: str) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    if row not in I2G.cached_rows():
        pytest.skip(f"no {row} checkpoint in {I2G.CACHE / row}: produce it with "
                    f"`python bench/import_to_gguf.py --rows {row}`")


@pytest.mark.parametrize("row", ["llmcompressor-rtn-w4g64-bf16", "gptqmodel-gptq-w4g128"])
def test_peer_checkpoint_exports_to_q4_0_equal_to_its_weights(row):
    _cached_or_skip(row)
    r = I2G.check_row(row, threads=2)
    imp, gguf, lc = r["import"], r["gguf"], r["llama_cpp"]
    tool = r["tool"]
    # (i) imported: every decoder linear, the tool's grid, the tool's weights
    assert imp["import_exit"] == 0 and imp["names_match"]
    assert imp["quantized_linears"] == imp["compared_linears"] == 30 * 7
    assert imp["formats"] and all(f.startswith(f"int4-g{tool['group']}-sym") for f in imp["formats"]), imp["formats"]
    if tool["tool"] == "GPTQModel":          # its dequantize_weight with float32 scales: exact
        assert imp["W_dq_equal_tool_bitwise"] == 210
    else:                                    # its codes exactly; its bfloat16 weights = W_dq rounded to bfloat16
        assert imp["codes_equal_tool_unpacked"] == 210
        assert imp["W_dq_equal_ckpt_formula_q_times_scale_fp32"] == 210
        assert imp["W_dq_rounded_to_bf16_equal_tool"] == 210
    # (ii) Q4_0 blocks without re-rounding, de-quantizing to W_dq bit for bit
    assert gguf["re_rounded_no"]
    assert gguf["decoder_linears"] == gguf["decoder_linears_q4_0"] == 210
    assert gguf["linears_dequantized_equal_W_dq_bitwise"] == 210 and gguf["linears_max_abs_diff"] == 0.0
    assert gguf["float_tensors_equal"] == gguf["float_tensors"]
    # the model around the weights: the RoPE base the checkpoint states (GPTQModel 7.6 saves a
    # transformers-5 config, rope_theta inside "rope_parameters") is the one lowbit computes with
    # and the one the GGUF carries
    cfg = r["config"]
    assert cfg["rope_freq_base_gguf"] == cfg["rope_theta_checkpoint"], cfg
    assert cfg["rope_theta_imported_model"] == cfg["rope_theta_checkpoint"], (
        f"lowbit's imported model uses rope_theta {cfg['rope_theta_imported_model']}, the checkpoint states "
        f"{cfg['rope_theta_checkpoint']} (llama.cpp vs lowbit on the F32 file: KL {lc['f32']['kl_mean']:.3g}; "
        f"with the checkpoint's base: {lc.get('diagnosis_lowbit_with_checkpoint_rope_theta', {}).get('f32')})")
    # (iii) llama.cpp on the F32 file computes lowbit's function (float32 tolerance); on the Q4_0
    # file, its kernel's 8-bit activation rounding on top (lowbit's own int4 directory: KL 0.0029)
    assert lc["tokens"] == I2G.N_TOKENS
    assert lc["f32"]["kl_mean"] < 1e-5 and lc["f32"]["max_abs_dlogit"] < 0.2
    assert lc["q4_0"]["kl_mean"] < 0.01 and lc["q4_0"]["top1_agreement"] > 0.93


def test_float32_scales_of_llmcompressor_are_refused_in_one_line():
    row = "llmcompressor-rtn-w4g64-fp32"
    _cached_or_skip(row)
    r = I2G.check_row(row)
    assert r["import"]["import_exit"] == 2
    assert "float16" in r["import"]["import_error"] and "lowbit: error:" in r["import"]["import_error"]
