"""The planner's per-tensor rounding (analysis.tensor_losses.rounded): RTN is the format's own rounding,
GPTQ is lowbit's gptq / gptq_gguf / dense-and-sparse gptq on the given Hessian with `lowbit quantize`'s own
options, it beats RTN on it, and on a model's first layer it is the rounding `quantize` stores."""
from __future__ import annotations

import pytest
import torch

from lowbit.analysis.tensor_losses import input_hessians, rounded
from lowbit.formats import format_from_name
from lowbit.export.hf import dequantized_linears
from lowbit.methods.gptq import GptqConfig, gptq, gptq_outliers, proxy_loss
from lowbit.methods.gptq_gguf import gptq_gguf
from lowbit.models.load import load
from lowbit.plans.planner import decoder_linears
from lowbit.quantize import QuantizeConfig, quantize
from lowbit.quantize_config import QUANTIZE_GPTQ, SINK_WEIGHT

# gptq's keyword options as `lowbit quantize` runs it (act order on)
QUANTIZE_OPTIONS = QUANTIZE_GPTQ.options()


def _problem(out=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))  # correlated inputs
    return W, (X.T @ X).double()


def test_rtn_is_the_formats_rounding():
    W, _ = _problem()
    fmt = format_from_name("int3-g64-sym")
    assert torch.equal(rounded(W, fmt), fmt.fake_quantize(W))


@pytest.mark.parametrize("name", ["int3-g64-sym", "int2-g64-sym-signed"])
def test_gptq_is_gptq_and_beats_rtn_on_its_hessian(name):
    W, H = _problem()
    fmt = format_from_name(name)
    W_dq = rounded(W, fmt, H=H, rounding="gptq")
    assert QUANTIZE_GPTQ.act_order                            # the CLI's default, so the planner's
    assert torch.equal(W_dq, fmt.dequantize(gptq(W, H, fmt, **QUANTIZE_OPTIONS)[0]))
    plain = rounded(W, fmt, H=H, rounding="gptq", gptq_config=GptqConfig())
    assert torch.equal(plain, fmt.dequantize(gptq(W, H, fmt)[0])) and not torch.equal(plain, W_dq)
    assert proxy_loss(W, W_dq, H) < 0.9 * proxy_loss(W, fmt.fake_quantize(W), H)


def test_gptq_with_outliers_keeps_them_and_is_dense_and_sparse_gptq():
    W, H = _problem(seed=1)
    fmt = format_from_name("int2-g64-sym")
    W_dq = rounded(W, fmt, 0.01, H, "gptq")
    q, _, sparse = gptq_outliers([W], H, fmt, 0.01, **QUANTIZE_OPTIONS)[0]
    assert torch.equal(W_dq, sparse.apply(fmt.dequantize(q)))
    assert sparse.kept == round(0.01 * W.numel())
    flat = W_dq.reshape(-1)[sparse.index.long()]                      # the kept entries: float16 values, off the grid
    assert torch.equal(flat, sparse.values.float())


def test_gptq_on_a_gguf_type_is_gptq_gguf():
    W, H = _problem(seed=2)
    fmt = format_from_name("Q3_K")
    W_dq = rounded(W, fmt, H=H, rounding="gptq")
    data, _ = gptq_gguf(W, H, "Q3_K")
    assert torch.equal(W_dq, fmt.dequantize(fmt.from_bytes(data, tuple(W.shape))))
    assert proxy_loss(W, W_dq, H) < proxy_loss(W, fmt.fake_quantize(W), H)


def test_gptq_and_outliers_need_the_hessian_and_a_known_rounding():
    W, H = _problem()
    fmt = format_from_name("int4-g64-sym")
    with pytest.raises(ValueError, match="Hessian"):
        rounded(W, fmt, rounding="gptq")
    with pytest.raises(ValueError, match="Hessian"):
        rounded(W, fmt, 0.01)
    with pytest.raises(ValueError, match="unknown rounding"):
        rounded(W, fmt, H=H, rounding="awq")


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_input_hessians_stop_after_the_last_named_linear_and_equal_a_full_pass(request, fixture):
    loaded = load(str(request.getfixturevalue(fixture)))
    model = loaded.model.double()
    rows = torch.randint(3, 200, (6, 9), generator=torch.Generator().manual_seed(0))
    first = [n for n in decoder_linears(model, loaded.spec) if n.startswith(f"{loaded.spec.layers}.0.")]
    full, seen_head = {}, []

    def hook(name):
        def fn(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            full[name] = full.get(name, 0) + x.T @ x
        return fn
    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in first]
    with torch.no_grad():
        for i in range(0, 6, 4):
            model(input_ids=rows[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    head = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen_head.append(1))
    try:
        H, count = input_hessians(model, rows, first, batch=4)
    finally:
        head.remove()
    assert seen_head == []                                  # the forward stopped inside layer 0
    assert set(H) == set(first) and all(count[n] == 6 * 9 for n in first)
    for n in first:
        torch.testing.assert_close(H[n], full[n], rtol=1e-12, atol=1e-12)
    # every decoder linear: the pass runs through the last layer and still stops before the head
    head = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen_head.append(1))
    try:
        H_all, count_all = input_hessians(model, rows[:2], decoder_linears(model, loaded.spec))
    finally:
        head.remove()
    assert seen_head == [] and set(H_all) == set(decoder_linears(model, loaded.spec))
    assert set(count_all.values()) == {2 * 9}


@pytest.mark.parametrize("name", ["int3-g32-sym-signed", "int2-g32-sym-signed"])
def test_gptq_rounding_is_what_quantize_stores_in_the_first_layer(tiny_llama_dir, name):
    """Layer 0's q, k and v projections see the same inputs in both (nothing is quantized before them; the
    walker feeds o, gate, up and down the outputs of the already-quantized ones): the planner's GPTQ rounding
    of each, on Hessians that count the sinks as quantize does, is the tensor quantize stores."""
    loaded = load(str(tiny_llama_dir))
    rows = torch.randint(3, 250, (8, 24), generator=torch.Generator().manual_seed(3))
    first = [f"{loaded.spec.layers}.0.self_attn.{p}_proj" for p in "qkv"]
    fmt = format_from_name(name)
    H = input_hessians(loaded.model, rows, first, sink_weight=SINK_WEIGHT)[0]
    W = {n: loaded.model.get_submodule(n).weight.detach().float().clone() for n in first}
    planned = {n: rounded(W[n], fmt, H=H[n], rounding="gptq") for n in first}
    without_sinks = input_hessians(loaded.model, rows, first)[0]
    quantize(loaded, QuantizeConfig(fmt=fmt, method="gptq", gptq=QUANTIZE_GPTQ), samples=rows, progress=False)
    dequantized_linears(loaded.model)
    for n in first:
        stored = loaded.model.get_submodule(n).weight.detach().float()
        step = (stored - W[n]).abs().max()                   # about half a grid step: the scale of a flipped code
        assert (stored - planned[n]).abs().max() < 1e-3 * step, n
        # the property has teeth: without act order, or without the sinks counted, the rounding differs
        assert not torch.allclose(stored, rounded(W[n], fmt, H=H[n], rounding="gptq", gptq_config=GptqConfig()))
        assert not torch.allclose(stored, rounded(W[n], fmt, H=without_sinks[n], rounding="gptq"))
