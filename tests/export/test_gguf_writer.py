"""The GGUF writer on the tiny models: names and value transforms undone by transformers' own
GGUF processors give back the HF weights exactly; an F32 export loads through transformers with
the same logits; a model quantized by a llama.cpp mix's plan is written byte for byte (the
QTensors' bytes, q/k block rows permuted), each tensor with the type llama.cpp's mix picks, and
gguf's reference dequantizer agrees bit for bit; --requantize re-rounds from the float weights;
an integer directory becomes a legacy block type without re-rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf_support import layer_of, read_tensors, with_merges

from lowbit.export.gguf.writer import write_gguf
from lowbit.formats.gguf import dequantize_gguf, quantize_gguf
from lowbit.models.gguf_names import family_for, gguf_name
from lowbit.models.load import load
from lowbit.plans.gguf_mixes import mix_plan, tensor_type
from lowbit.quantize import QuantizeConfig, quantize

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
    return {"llama": write_gguf(str(llama_dir), out / "llama.gguf").path,
            "gemma3": write_gguf(str(gemma_dir), out / "gemma3.gguf").path}


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


def quantized_by_mix(src, mix: str):
    """The model at `src`, RTN-quantized in memory by the llama.cpp mix's plan (lowbit quantize --type MIX)."""
    loaded = load(str(src))
    plan = mix_plan(loaded.model.config, loaded.spec, mix)
    quantize(loaded, QuantizeConfig(plan=plan), progress=False)
    return loaded


def stored_qtensors(loaded) -> dict[str, object]:
    """GGUF name -> (QTensor, HF name) of every quantized weight the model holds (linears and the embedding)."""
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.nn.qweight import quantized_weights

    family = family_for(loaded.model.config.model_type)
    held = {name: m.qtensor for name, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    held.update({name: h.qtensor for name, h in quantized_weights(loaded.model).items()})
    return {gguf_name(f"{name}.weight", family)[0]: (q, name) for name, q in held.items()}


def file_order_rows(data: np.ndarray, hf: str, config) -> np.ndarray:
    """lowbit's HF-order rows of blocks -> the file's order: q/k rows permuted as llama.cpp's
    converter does (written out here: per head, the two rotary halves interleaved row by row)."""
    heads = config.num_attention_heads if hf.endswith("q_proj") else \
        config.num_key_value_heads if hf.endswith("k_proj") else 0
    if not heads or config.model_type != "llama":
        return data
    rows = data.shape[0]
    half = rows // heads // 2
    order = [h * 2 * half + part * half + i for h in range(heads) for i in range(half) for part in (0, 1)]
    return data[order]


@pytest.mark.parametrize("family,mix", [("llama", "Q4_K_M"), ("llama", "Q2_K"), ("llama", "Q8_0"),
                                        ("gemma3", "Q4_K_M"), ("gemma3", "Q3_K_M")])
def test_quantized_tensors_are_lowbits_bytes_of_the_mix_types(family, mix, f32_exports, llama_dir, gemma_dir,
                                                             tmp_path):
    """quantize by the mix's plan, write: each quantized tensor is the QTensor's bytes (q/k block rows
    permuted), its type is llama.cpp's choice, the bytes are lowbit's quantizer's on the float weight
    and gguf's reference dequantizer agrees bit for bit; everything else is F32 as in the F32 file."""
    loaded = quantized_by_mix(llama_dir if family == "llama" else gemma_dir, mix)
    config = loaded.model.config
    summary = write_gguf(loaded, tmp_path / f"{mix}.gguf")
    floats = read_tensors(f32_exports[family])
    tensors = read_tensors(summary.path)
    held = stored_qtensors(loaded)
    assert set(tensors) == set(floats) and set(held) <= set(tensors)
    assert "token_embd.weight" in held  # the tied embedding is quantized in place
    seen = set()
    for name, (type_name, shape, data) in tensors.items():
        f32 = np.array(floats[name][2]).reshape(shape)
        want = tensor_type(mix, name, shape, layer_of(name), config.num_hidden_layers,
                           n_gqa=config.num_attention_heads // config.num_key_value_heads)
        assert type_name == want, name
        seen.add(type_name)
        if type_name == "F32":
            assert name not in held
            assert np.array_equal(np.array(data).reshape(shape), f32), name
            continue
        q, hf = held[name]
        assert q.fmt.name == type_name, name
        stored = np.array(data).reshape(q.codes.shape)
        assert np.array_equal(stored, file_order_rows(q.codes.numpy(), hf, config)), name
        ours = quantize_gguf(torch.from_numpy(f32), type_name)  # rows are independent: permuting commutes
        assert np.array_equal(stored, ours.reshape(stored.shape)), name
        reference = gguf_dequantize(np.array(data), GGMLQuantizationType[type_name]).reshape(shape)
        assert np.array_equal(reference, dequantize_gguf(ours, type_name, shape).numpy()), name
    assert {t.name for t in summary.tensors} == set(tensors)
    assert {t.name: t.type_name for t in summary.tensors} == {n: t[0] for n, t in tensors.items()}
    total_bits = sum(8 * t.nbytes for t in summary.tensors)
    assert summary.bits_per_weight == pytest.approx(total_bits / sum(t.params for t in summary.tensors))
    assert len(seen) >= 2 and summary.max_error == 0.0


@pytest.mark.parametrize("mix", ["Q4_K_M", "F16"])
def test_requantize_re_rounds_from_the_float_weights(mix, f32_exports, llama_dir, tmp_path):
    """requantize=MIX on a float model: the mix's types from W itself; for a GGUF mix the same bytes
    as quantizing by the mix's plan first; F16 keeps the quantizable tensors in half precision."""
    summary = write_gguf(load(str(llama_dir)), tmp_path / "r.gguf", requantize=mix)
    assert summary.mix == mix
    tensors, floats = read_tensors(summary.path), read_tensors(f32_exports["llama"])
    if mix == "F16":
        assert {t for t, _, _ in tensors.values()} == {"F16", "F32"}
        for name, (type_name, shape, data) in tensors.items():
            f32 = np.array(floats[name][2]).reshape(shape)
            want = f32.astype(np.float16) if type_name == "F16" else f32
            assert np.array_equal(np.array(data).reshape(shape), want), name
        return
    planned = read_tensors(write_gguf(quantized_by_mix(llama_dir, mix), tmp_path / "p.gguf").path)
    assert set(planned) == set(tensors)
    for name, (type_name, shape, data) in tensors.items():
        assert planned[name][0] == type_name, name
        assert np.array_equal(np.array(planned[name][2]), np.array(data)), name


def test_imatrix_changes_the_search_and_the_writer_copies_the_bytes(llama_dir, tmp_path):
    """An importance vector changes GGUFFormat's search (reproducibly), and the file holds exactly the
    QTensor's bytes: the writer never re-rounds."""
    from lowbit.formats import GGUFFormat
    from lowbit.nn.qlinear import QuantLinear

    loaded = load(str(llama_dir))
    name = "model.layers.0.mlp.down_proj"
    W = loaded.model.get_submodule(name).weight.detach().clone()
    fmt = GGUFFormat("Q6_K" if W.shape[1] % 256 == 0 else "Q5_0")
    imatrix = torch.linspace(0.01, 10.0, W.shape[1])
    weighted, again, plain = fmt.quantize(W, importance=imatrix), fmt.quantize(W, importance=imatrix), fmt.quantize(W)
    assert torch.equal(weighted.codes, again.codes)
    assert not torch.equal(weighted.codes, plain.codes)
    assert np.array_equal(weighted.codes.numpy(), quantize_gguf(W, fmt.type_name, imatrix=imatrix.double().numpy()))
    loaded.model.set_submodule(name, QuantLinear(weighted, None))
    tensors = read_tensors(write_gguf(loaded, tmp_path / "w.gguf").path)
    type_name, shape, data = tensors["blk.0.ffn_down.weight"]
    assert type_name == fmt.type_name and shape == tuple(W.shape)
    assert np.array_equal(np.array(data).reshape(weighted.codes.shape), weighted.codes.numpy())
    assert tensors["blk.0.attn_q.weight"][0] == "F32"  # the rest stays float


def test_asymmetric_integer_directory_exports_as_q4_1_within_the_fp16_minimum(llama_dir, tmp_path):
    """int4 g32 asym (RTN) -> Q4_1 without re-rounding: gguf's dequantizer gives lowbit's W_dq up to the
    fp16 rounding of each block's minimum, the error the summary reports; floats stay F32 exactly."""
    from export_support import lowbit_weights, quantized_dir

    quantized = quantized_dir(llama_dir, tmp_path / "q", 4, 32, False)
    w_dq = lowbit_weights(quantized)
    summary = write_gguf(str(quantized), tmp_path / "q.gguf")
    tensors = read_tensors(summary.path)
    assert 0 < summary.max_error < 1e-3
    assert {t for t, _, _ in tensors.values()} == {"Q4_1", "F32"}
    src = load(str(llama_dir)).model.state_dict()
    for layer in range(2):
        for role, hf in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj")):
            type_name, shape, data = tensors[f"blk.{layer}.{role}.weight"]
            assert type_name == "Q4_1"
            back = gguf_dequantize(np.array(data), GGMLQuantizationType.Q4_1).reshape(shape)
            diff = np.abs(back - w_dq[f"model.layers.{layer}.{hf}"].numpy()).max()
            assert diff <= summary.max_error, (role, diff)
        _, shape, data = tensors[f"blk.{layer}.attn_norm.weight"]
        assert np.array_equal(np.array(data).reshape(shape), src[f"model.layers.{layer}.input_layernorm.weight"].numpy())
    _, shape, data = tensors["token_embd.weight"]
    assert np.array_equal(np.array(data).reshape(shape), src["model.embed_tokens.weight"].numpy())
