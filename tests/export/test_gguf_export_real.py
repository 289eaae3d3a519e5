"""GGUF export of the real SmolLM2-135M: the F32 export carries the source GGUF's metadata and
reads back through transformers with the same logits; a model quantized by the Q4_K_M mix's plan
is written with llama.cpp's types and lowbit's bytes; and, when llama-cpp-python is installed,
llama.cpp itself is the judge (it reads the files; GPTQ's file is closer to F32 than imatrix's)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf_support import layer_of, read_tensors

from lowbit.export.gguf.writer import write_gguf
from lowbit.formats.gguf import quantize_gguf
from lowbit.models.gguf_names import family_for, gguf_name, permute_rotary_rows
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.qweight import quantized_weights
from lowbit.plans.gguf_mixes import MIXES, mix_plan, tensor_type
from lowbit.quantize import QuantizeConfig, quantize

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, museums and cafés. " * 4


def quantized(model: str, mix: str = "Q4_K_M", method: str = "rtn", calib=None):
    """`lowbit quantize MODEL --format gguf --type MIX --method METHOD [--calib TEXT]` in memory;
    calib: (Text, CalibConfig)."""
    from lowbit.quantize import calibration_samples

    loaded = load(model)
    config = QuantizeConfig(plan=mix_plan(loaded.model.config, loaded.spec, mix), method=method,
                            **({} if calib is None else {"calib": calib[1]}))
    samples = None if calib is None else calibration_samples(loaded, calib[0], calib[1])
    quantize(loaded, config, samples, progress=False)
    return loaded


def file_bytes(loaded) -> dict[str, np.ndarray]:
    """GGUF name -> the bytes the writer must store for every quantized weight: the QTensor's codes,
    q/k block rows in llama.cpp's rotary order."""
    config = loaded.model.config
    family = family_for(config.model_type)
    held = {n: m.qtensor for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    held.update({n: h.qtensor for n, h in quantized_weights(loaded.model).items()})
    out = {}
    for name, q in held.items():
        codes = q.codes
        heads = config.num_attention_heads if name.endswith("q_proj") else \
            config.num_key_value_heads if name.endswith("k_proj") else 0
        if heads and family.permute_qk:
            codes = permute_rotary_rows(codes, heads)
        out[gguf_name(f"{name}.weight", family)[0]] = codes.numpy()
    return out


@pytest.fixture(scope="module")
def smol():
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def smol_q4_k_m():
    return quantized("smollm2-135m")


@pytest.fixture(scope="module")
def exports(smol, smol_q4_k_m, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_real")
    return {"F32": write_gguf(smol, out / "smollm2-F32.gguf"),
            "Q4_K_M": write_gguf(smol_q4_k_m, out / "smollm2-Q4_K_M.gguf")}


@pytest.fixture(scope="module")
def tokens(smol):
    return smol.tokenizer(TEXT, return_tensors="pt").input_ids[:, :64]


def _fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_f32_export_keeps_the_source_metadata_and_logits(smol, exports, tokens, tmp_path, monkeypatch):
    path = exports["F32"].path
    source, ours = _fields(smol.source.path), _fields(path)
    assert ours.pop("general.file_type") == MIXES["F32"].file_type and source.pop("general.file_type") == 3
    assert ours == source  # tokenizer, chat template, hyper-parameters: all copied
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    back = load(str(path))
    assert torch.equal(back.tokenizer(TEXT, return_tensors="pt").input_ids[:, :64], tokens)
    with torch.no_grad():
        diff = (smol.model(tokens).logits - back.model(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_q4_k_m_export_has_llama_cpps_types_and_lowbits_bytes(exports, smol_q4_k_m):
    floats, quant = read_tensors(exports["F32"].path), read_tensors(exports["Q4_K_M"].path)
    assert set(floats) == set(quant) and len(quant) == 272
    held = file_bytes(smol_q4_k_m)
    assert len(held) == 7 * 30 + 1  # every decoder linear and the tied token_embd
    for name, (type_name, shape, data) in quant.items():
        assert type_name == tensor_type("Q4_K_M", name, shape, layer_of(name), 30, n_gqa=3), name
        if type_name == "F32":
            assert name not in held and np.array_equal(np.array(data), np.array(floats[name][2])), name
        else:
            assert np.array_equal(np.array(data).reshape(held[name].shape), held[name]), name
    for name in ("blk.0.attn_v.weight", "blk.3.attn_q.weight", "blk.0.ffn_down.weight", "blk.4.ffn_down.weight"):
        type_name, shape, data = quant[name]
        f32 = torch.from_numpy(np.array(floats[name][2]).reshape(shape))
        assert np.array_equal(np.array(data).reshape(-1), quantize_gguf(f32, type_name).reshape(-1)), name
    assert {t for t, _, _ in quant.values()} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}
    assert 6.0 < exports["Q4_K_M"].bits_per_weight < 6.4  # the Q8_0 tied embedding is 28M of 135M weights


def test_llama_cpp_reads_lowbits_exports(smol, exports, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = tokens[0].tolist()
    with torch.no_grad():
        reference = smol.model(tokens).logits[0].numpy()
    # an F32 KV cache (type 0): llama.cpp's default F16 cache alone moves these logits by ~0.03
    llm = llama_cpp.Llama(model_path=str(exports["F32"].path), logits_all=True, n_ctx=128, n_threads=1,
                          type_k=0, type_v=0, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:len(ids)] == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    assert np.abs(theirs - reference).max() <= 1e-3
    del llm
    llm = llama_cpp.Llama(model_path=str(exports["Q4_K_M"].path), n_ctx=128, n_threads=1, verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] >= 1 and re.search(r"\w", text), text


def test_gemma3_exports_match_llama_cpps_file_and_the_source_logits(tmp_path, monkeypatch):
    """Gemma 3 270M: our Q4_K_M has the same tensor names, shapes and types as the Q4_K_M llama.cpp
    wrote (the model's own source file); the F32 export (norms stored as 1 + w) reads back exactly."""
    ours = read_tensors(write_gguf(quantized("gemma3-270m"), tmp_path / "gemma-q4_k_m.gguf").path)
    gemma = load("gemma3-270m")
    theirs = read_tensors(gemma.source.path)
    assert {n: (t, s) for n, (t, s, _) in ours.items()} == {n: (t, s) for n, (t, s, _) in theirs.items()}
    path = write_gguf(gemma, tmp_path / "gemma-f32.gguf").path
    text = "The capital of France is Paris. It is known for the Eiffel Tower. " * 4
    ids = gemma.tokenizer(text, return_tensors="pt").input_ids[:, :64]
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    back = load(str(path))
    assert torch.equal(back.tokenizer(text, return_tensors="pt").input_ids[:, :64], ids)
    with torch.no_grad():
        diff = (gemma.model(ids).logits - back.model(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_gptq_export_beats_the_imatrix_export_in_llama_cpp(smol, exports, tmp_path):
    """--method gptq against --method imatrix, the same calibration windows, the same mix: llama.cpp's
    own logits on WikiText-2 test tokens are closer to the F32 export's (KL divergence, natural log)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from support import CALIB_TEXT, EVAL_TEXT

    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text

    calib = (read_text(str(CALIB_TEXT)), CalibConfig(samples=8, seq_len=512))
    files = {method: write_gguf(quantized("smollm2-135m", method=method, calib=calib), tmp_path / f"{method}.gguf")
             for method in ("imatrix", "gptq")}
    types = {m: {n: t for n, (t, _, _) in read_tensors(s.path).items()} for m, s in files.items()}
    assert types["imatrix"] == types["gptq"]  # the same mix
    ids = smol.tokenizer(EVAL_TEXT.read_text()[:20000], return_tensors="pt").input_ids[0, :256].tolist()

    def log_probs(path):
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
        llm.eval(ids)
        scores = torch.from_numpy(np.asarray(llm.scores[:len(ids)], dtype=np.float32))
        del llm
        return torch.log_softmax(scores.double(), -1)

    ref = log_probs(exports["F32"].path)
    kld = {name: float((ref.exp() * (ref - log_probs(s.path))).sum(-1).mean()) for name, s in files.items()}
    assert 0 < kld["gptq"] < 0.9 * kld["imatrix"], kld
