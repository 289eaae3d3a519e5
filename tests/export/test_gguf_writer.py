"""The GGUF writer on the tiny models: names and value transforms undone by transformers' own
GGUF processors give back the HF weights exactly; an F32 export loads through transformers with
the same logits; every quantized tensor read back with gguf.GGUFReader is lowbit's quantizer's
bytes for the type llama.cpp's mix picks, and gguf's reference dequantizer agrees bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf_support import layer_of, read_tensors, with_merges

from lowbit.export.gguf.mixes import tensor_type
from lowbit.export.gguf.writer import write_gguf
from lowbit.formats.gguf import dequantize_gguf, quantize_gguf
from lowbit.models.load import load

# GGUF layer suffix -> HF layer suffix, per family (written out here, independently of names.py)
LLAMA = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GEMMA3 = {**LLAMA, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
          "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm"}


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    return with_merges(tiny_llama_dir, tmp_path_factory.mktemp("gguf_llama"))


@pytest.fixture(scope="module")
def gemma_dir(tiny_gemma3_dir, tmp_path_factory):
    return with_merges(tiny_gemma3_dir, tmp_path_factory.mktemp("gguf_gemma"))


@pytest.fixture(scope="module")
def f32_exports(llama_dir, gemma_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_f32")
    return {"llama": write_gguf(str(llama_dir), "F32", out / "llama.gguf").path,
            "gemma3": write_gguf(str(gemma_dir), "F32", out / "gemma3.gguf").path}


def hf_name(gguf: str, layer_map: dict) -> str:
    if gguf == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf == "output_norm.weight":
        return "model.norm.weight"
    _, layer, role, kind = gguf.split(".")
    return f"model.layers.{layer}.{layer_map[role]}.{kind}"


def undo_transforms(family: str, name: str, value: np.ndarray, config) -> np.ndarray:
    """What transformers' GGUF loader does to a stored tensor (its own processors, not lowbit's code)."""
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor, LlamaTensorProcessor

    heads = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    processor = LlamaTensorProcessor(heads) if family == "llama" else Gemma2TensorProcessor(heads)
    return processor.process(weights=value, name=name).weights


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_f32_export_holds_the_hf_weights(family, f32_exports, llama_dir, gemma_dir):
    src = load(str(llama_dir if family == "llama" else gemma_dir)).model
    state = src.state_dict()
    tensors = read_tensors(f32_exports[family])
    layer_map = LLAMA if family == "llama" else GEMMA3
    assert "output.weight" not in tensors                               # tied embeddings: no output tensor
    covered = set()
    for name, (type_name, shape, data) in tensors.items():
        assert type_name == "F32"
        hf = hf_name(name, layer_map)
        back = undo_transforms(family, name, np.array(data).reshape(shape), src.config)
        assert np.array_equal(back, state[hf].numpy()), name
        covered.add(hf)
    assert covered == set(state) - {"lm_head.weight"}
    if family == "llama":  # the permutation is real: q is stored in a different row order
        q = tensors["blk.0.attn_q.weight"][2].reshape(tensors["blk.0.attn_q.weight"][1])
        assert not np.array_equal(q, state["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_f32_export_loads_with_the_same_logits_and_tokens(f32_exports, llama_dir, tmp_path, monkeypatch):
    src = load(str(llama_dir))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))  # the export's float copy goes here
    back = load(str(f32_exports["llama"]))
    text = "the weather is hot; then he said 12345 words."
    ids = src.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(back.tokenizer(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        diff = (src.model(ids).logits - back.model(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family,mix", [("llama", "Q4_K_M"), ("llama", "Q2_K"), ("llama", "Q8_0"),
                                        ("llama", "F16"), ("gemma3", "Q4_K_M"), ("gemma3", "Q3_K_M")])
def test_quantized_tensors_are_lowbits_bytes_of_the_mix_types(family, mix, f32_exports, llama_dir, gemma_dir,
                                                             tmp_path):
    src = llama_dir if family == "llama" else gemma_dir
    summary = write_gguf(str(src), mix, tmp_path / f"{mix}.gguf")
    config = load(str(src)).model.config
    floats = read_tensors(f32_exports[family])
    tensors = read_tensors(summary.path)
    assert set(tensors) == set(floats)
    seen = set()
    for name, (type_name, shape, data) in tensors.items():
        f32 = np.array(floats[name][2]).reshape(shape)
        want = tensor_type(mix, name, shape, layer_of(name), config.num_hidden_layers,
                           n_gqa=config.num_attention_heads // config.num_key_value_heads)
        assert type_name == want, name
        seen.add(type_name)
        if type_name == "F32":
            assert np.array_equal(np.array(data).reshape(shape), f32)
        elif type_name == "F16":
            assert np.array_equal(np.array(data).reshape(shape), f32.astype(np.float16))
        else:
            ours = quantize_gguf(torch.from_numpy(f32), type_name)
            assert np.array_equal(np.array(data).reshape(ours.shape), ours), name
            reference = gguf_dequantize(np.array(data), GGMLQuantizationType[type_name]).reshape(shape)
            assert np.array_equal(reference, dequantize_gguf(ours, type_name, shape).numpy()), name
    by_name = {t.name: t for t in summary.tensors}
    assert {n: t.type_name for n, t in by_name.items()} == {n: t[0] for n, t in tensors.items()}
    total_bits = sum(8 * t.nbytes for t in summary.tensors)
    assert summary.bits_per_weight == pytest.approx(total_bits / sum(t.params for t in summary.tensors))
    assert len(seen) >= 2 if mix != "F16" else seen == {"F16", "F32"}


def test_imatrix_changes_the_search_and_keeps_the_bytes_reproducible(llama_dir, f32_exports, tmp_path):
    floats = read_tensors(f32_exports["llama"])
    _, shape, data = floats["blk.0.ffn_down.weight"]
    imatrix = {"blk.0.ffn_down.weight": np.linspace(0.01, 10.0, shape[1], dtype=np.float32)}
    plain = read_tensors(write_gguf(str(llama_dir), "Q4_K_M", tmp_path / "a.gguf").path)
    weighted = read_tensors(write_gguf(str(llama_dir), "Q4_K_M", tmp_path / "b.gguf", imatrix=imatrix).path)
    type_name = weighted["blk.0.ffn_down.weight"][0]
    ours = quantize_gguf(torch.from_numpy(np.array(data).reshape(shape)), type_name,
                         imatrix=imatrix["blk.0.ffn_down.weight"])
    assert np.array_equal(np.array(weighted["blk.0.ffn_down.weight"][2]).reshape(ours.shape), ours)
    assert not np.array_equal(np.array(plain["blk.0.ffn_down.weight"][2]), np.array(weighted["blk.0.ffn_down.weight"][2]))
    assert np.array_equal(np.array(plain["blk.0.attn_q.weight"][2]), np.array(weighted["blk.0.attn_q.weight"][2]))


def test_lowbit_directory_exports_its_dequantized_weights(llama_dir, tmp_path):
    from export_support import lowbit_weights, quantized_dir

    quantized = quantized_dir(llama_dir, tmp_path / "q", 4, 32, False)
    w_dq = lowbit_weights(quantized)
    tensors = read_tensors(write_gguf(str(quantized), "F32", tmp_path / "q.gguf").path)
    for layer in range(2):
        for role, hf in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj")):
            _, shape, data = tensors[f"blk.{layer}.{role}.weight"]
            assert np.array_equal(np.array(data).reshape(shape), w_dq[f"model.layers.{layer}.{hf}"].numpy())
