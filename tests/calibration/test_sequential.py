"""The sequential walk: one forward per layer, each group solved when every sample reaches it."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration.capture import capture_inputs
from lowbit.calibration.walker import walk
from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.methods.gptq import gptq
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear

FMT = IntFormat(3, True, 16)


def _samples(n=3, length=40, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _gptq_solve(seen: dict):
    """A stats-dependent solve: GPTQ each linear of the group and write it back."""
    def solve(index, layer, stats):
        for name, st in stats.items():
            seen[index, name] = st.hessian.clone()
            linear = layer.get_submodule(name)
            q, _ = gptq(linear.weight.detach(), st.hessian, FMT)
            layer.set_submodule(name, QuantLinear(q, linear.bias))
    return solve


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_each_group_sees_the_quantized_groups_before_it(request, arch):
    """What every group's solve saw equals its input in the finished quantized model: the layers
    before it *and* the groups before it in its own layer were already quantized."""
    loaded = load(str(request.getfixturevalue(arch)))
    model, spec = loaded.model, loaded.spec
    samples, seen = _samples(), {}
    walk(model, spec, samples, _gptq_solve(seen), {"hessian"}, progress=False, sequential=True, sink_weight=5.0)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(spec.linears) * loaded.dims.n_layers
    names = [f"{spec.layers}.{i}.{g.linears[0]}" for i in range(loaded.dims.n_layers) for g in spec.groups]
    with capture_inputs(model, names, {"hessian"}, sink_weight=5.0) as after, torch.no_grad():
        for row in samples:
            model(input_ids=row[None], use_cache=False)
    for i in range(loaded.dims.n_layers):
        for g in spec.groups:
            want = after[f"{spec.layers}.{i}.{g.linears[0]}"].hessian
            for name in g.linears:
                torch.testing.assert_close(seen[i, name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_two_pass_groups_see_the_float_layer(tiny_llama_dir):
    """The contrast that makes the test above meaningful: in the two-pass walk, the o_proj of
    layer 0 saw the float q/k/v, so its H differs from its input in the quantized model."""
    loaded = load(str(tiny_llama_dir))
    model, spec, samples, seen = loaded.model, loaded.spec, _samples(), {}
    walk(model, spec, samples, _gptq_solve(seen), {"hessian"}, progress=False, sequential=False)
    name = f"{spec.layers}.0.self_attn.o_proj"
    with capture_inputs(model, [name], {"hessian"}) as after, torch.no_grad():
        for row in samples:
            model(input_ids=row[None], use_cache=False)
    assert not torch.allclose(seen[0, "self_attn.o_proj"], after[name].hessian, rtol=1e-3)


def test_a_failing_solve_leaves_no_paused_sample_and_no_gate(tiny_llama_dir):
    import gc

    from lowbit.calibration.sequential import SampleRun

    loaded = load(str(tiny_llama_dir))

    def solve(index, layer, stats):
        if "mlp.gate_proj" in stats:
            raise LowbitError("boom")

    with pytest.raises(LowbitError, match="boom"):
        walk(loaded.model, loaded.spec, _samples(4), solve, {"hessian"}, progress=False, sequential=True)
    gc.collect()
    assert not [run for run in gc.get_objects() if type(run) is SampleRun and run]   # none left paused
    layer = loaded.model.get_submodule(loaded.spec.layers)[0]
    assert all(type(layer.get_submodule(n)) is torch.nn.Linear for n in loaded.spec.linears)


def test_sequential_cannot_offload(tiny_llama_dir, tmp_path):
    loaded = load(str(tiny_llama_dir))
    with pytest.raises(LowbitError, match="offload"):
        walk(loaded.model, loaded.spec, _samples(1), lambda *a: None, {"hessian"}, progress=False,
             sequential=True, offload=tmp_path)
