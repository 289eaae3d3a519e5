"""Saving a quantized model and loading it back gives bit-identical outputs; nothing half-written."""
from __future__ import annotations

import pytest
import torch

from lowbit.export.lowbit_dir import save_quantized
from lowbit.formats import make_format
from lowbit.methods.rtn import RtnConfig
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear
from lowbit.quantize import QuantizeConfig, quantize

FORMATS = [
    make_format("int", bits=4, group_size=64, symmetric=True),
    make_format("int", bits=3, group_size=64, symmetric=False),
    make_format("int", bits=8, group_size=0),
    make_format("nf", bits=4, group_size=64),
    make_format("fp8-e4m3", group_size=0),
    make_format("mxfp4", bits=4, group_size=32),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_reload_bit_identical(request, tmp_path, fmt, arch):
    src = request.getfixturevalue(arch)
    loaded = load(str(src))
    before = {k: v.clone() for k, v in load(str(src)).model.state_dict().items()}
    quantize(loaded, QuantizeConfig(fmt=fmt, rtn=RtnConfig(clip="mse"), quantize_head=True), progress=False)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = _logits(loaded.model, ids)
    out = save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    reloaded = load(str(out))
    n_quant = sum(isinstance(m, QuantLinear) for m in reloaded.model.modules())
    assert n_quant == 2 * 7 + 1                          # every layer linear + the head
    assert torch.equal(_logits(reloaded.model, ids), expected)
    assert reloaded.tokenizer("héllo wörld")["input_ids"] == loaded.tokenizer("héllo wörld")["input_ids"]
    # the input model on disk is untouched
    after = load(str(src)).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantized_head_keeps_embedding_float(tiny_llama_dir, tmp_path):
    loaded = load(str(tiny_llama_dir))
    emb = loaded.model.get_submodule("model.embed_tokens").weight.detach().clone()
    quantize(loaded, QuantizeConfig(fmt=make_format("int", bits=2, group_size=32), quantize_head=True),
             progress=False)
    assert torch.equal(loaded.model.get_submodule("model.embed_tokens").weight, emb)
    assert not loaded.model.config.tie_word_embeddings


def test_interrupted_save_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    loaded = load(str(tiny_llama_dir))
    quantize(loaded, QuantizeConfig(fmt=make_format("int", bits=4, group_size=32)), progress=False)
    import lowbit.export.lowbit_dir as lowbit_dir

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit_dir, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_stored_size_matches_reported_bits(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    loaded = load(str(tiny_llama_dir))
    fmt = make_format("int", bits=3, group_size=32, symmetric=False)
    quantize(loaded, QuantizeConfig(fmt=fmt), progress=False)
    out = save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    stored = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".codes", ".scales", ".zeros")):
                t = f.get_tensor(key)
                stored += t.numel() * t.element_size() * 8
    from lowbit.eval.size import size_report

    assert stored == size_report(loaded.model).quantized_bits
