"""The foundation path on the real default model: load, quantize, evaluate, save, reload."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.data.text import read_text
from lowbit.eval.perplexity import evaluate, tokenize
from lowbit.export.lowbit_dir import save_quantized
from lowbit.formats import make_format
from lowbit.models.load import load
from lowbit.quantize import QuantizeConfig, quantize
from support import EVAL_TEXT, needs_eval_text, needs_smollm2

pytestmark = [pytest.mark.real_model, needs_smollm2, needs_eval_text]


@pytest.fixture(scope="module")
def smollm2_ids():
    loaded = load("smollm2-135m")
    return tokenize(loaded.tokenizer, read_text(EVAL_TEXT).text)


def test_fp_and_w8_perplexity(smollm2_ids):
    fp = load("smollm2-135m")
    ref = evaluate(fp.model, smollm2_ids, ctx=2048, windows=2, progress=False)
    assert math.isfinite(ref.ppl) and 5 < ref.ppl < 60     # FP over 20 windows is 20.90
    assert 300_000 < ref.tokens < 310_000                  # GPT2-BPE on WikiText-2 raw test
    w8 = load("smollm2-135m")
    quantize(w8, QuantizeConfig(fmt=make_format("int", bits=8, group_size=0)), progress=False)
    res = evaluate(w8.model, smollm2_ids, ctx=2048, windows=2, reference=fp.model, progress=False)
    assert abs(res.ppl / ref.ppl - 1) < 0.01
    assert 0 < res.kld.mean < 0.01


def test_w4_reload_bit_identical(tmp_path, smollm2_ids):
    loaded = load("smollm2-135m")
    quantize(loaded, QuantizeConfig(fmt=make_format("int", bits=4, group_size=128)), progress=False)
    window = smollm2_ids[:256][None]
    with torch.no_grad():
        expected = loaded.model(input_ids=window).logits
    out = save_quantized(loaded, {"method": "rtn"}, tmp_path / "q")
    reloaded = load(str(out))
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=window).logits, expected)
    text = read_text(EVAL_TEXT).text[:20000]
    assert reloaded.tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
