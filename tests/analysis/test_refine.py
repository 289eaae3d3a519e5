"""The model side of the measured search (analysis/refine.py) on a tiny Llama: the library's options of the
starting plan are the tensors quantize stores for it, the assembled model's KLD is the float model's 0 and
grows with coarser choices, and refine puts the float weights back and returns a plan within the budget whose
measured KLD is what the scorer reads for it."""
from __future__ import annotations

import pytest
import torch

from lowbit.analysis.tensor_losses import rounded
from lowbit.export.hf import dequantized_linears
from lowbit.models.load import load
from lowbit.plans.planner import PlannerConfig, decoder_linears, plan_bits
from lowbit.analysis.refine import AssembledKLD, Assembly, refine, round_all, walked_hessians
from lowbit.plans.search import SearchConfig
from lowbit.quantize import QuantizeConfig, quantize
from lowbit.quantize_config import QUANTIZE_GPTQ

FORMATS = ("int2-g32-sym", "int4-g32-sym", "int8-g32-sym")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    names = decoder_linears(loaded.model, loaded.spec)
    gen = torch.Generator().manual_seed(1)
    samples = torch.randint(3, 250, (4, 32), generator=gen)
    config = PlannerConfig(3.5, FORMATS, "fisher", (0.01,), ("int2-g32-sym",))
    shapes = {n: tuple(loaded.model.get_submodule(n).weight.shape) for n in names}
    # made-up losses (not the model's): a plan that mixes int2 with and without outliers and int4, and a poor
    # start the search can improve
    base = {"int2-g32-sym": 4.0, "int2-g32-sym+1%": 3.0, "int4-g32-sym": 1.0, "int8-g32-sym": 0.1}
    plan = plan_bits(names, shapes, {n: {k: v * (1 + i % 3) for k, v in base.items()} for i, n in enumerate(names)},
                     config)
    library = round_all(loaded.model, names, config.candidates(), config.outlier_shares, config.outlier_beside(),
                        walked_hessians(loaded, plan, samples, progress=False), progress=False)
    return loaded, names, samples, config, library, torch.randint(3, 250, (2, 48), generator=gen), plan


def test_the_starting_plan_assembled_is_what_quantize_stores(tiny, tiny_llama_dir):
    """The library is rounded on the Hessians of quantize's own walk of the plan: its options of the plan's
    choices are the tensors `lowbit quantize --plan … --method gptq` stores (to float16's 2^-11), and another
    option is that tensor's GPTQ rounding on the same Hessian."""
    loaded, names, samples, config, library, _, plan = tiny
    stored = load(str(tiny_llama_dir))
    H = {}
    quantize(stored, QuantizeConfig(plan=plan.format_plan(), method="gptq", gptq=QUANTIZE_GPTQ), samples=samples,
             progress=False, on_hessian=lambda n, h: H.__setitem__(n, h.clone()))
    dequantized_linears(stored.model)
    assert set(H) == set(names) and set(library) == set(names)
    assert {c.option for c in plan.choices} >= {"int2-g32-sym+1%", "int4-g32-sym"}      # a mixed plan, with outliers
    for c in plan.choices:
        W_q = stored.model.get_submodule(c.name).weight.detach().float()
        W_f = loaded.model.get_submodule(c.name).weight.detach().float()
        step = (W_q - W_f).abs().max()
        # the library keeps float16: compare with the stored tensor in float16
        assert (library[c.name][c.option].float() - W_q.half().float()).abs().max() < 2e-3 * step, c.name
        other = next(f for f in config.candidates() if f.name != c.format)
        torch.testing.assert_close(library[c.name][other.name].float(), rounded(W_f, other, 0.0, H[c.name], "gptq"),
                                   rtol=2 ** -10, atol=1e-6)


def test_assembled_kld_is_zero_for_float_and_grows_with_coarser_options(tiny):
    loaded, names, _, _, library, rows, _ = tiny
    scorer = AssembledKLD(loaded.model, rows, positions=20)
    assert scorer.at.numel() == 20 and int(scorer.at.min()) >= 1 and int(scorer.at.max()) <= 47
    assert scorer() == pytest.approx(0.0, abs=1e-9)
    assembly = Assembly(loaded.model, library)
    try:
        klds = []
        for f in ("int8-g32-sym", "int4-g32-sym", "int2-g32-sym"):
            assembly.set({n: f for n in names})
            klds.append(scorer())
    finally:
        assembly.restore()
    assert 0 < klds[0] < klds[1] < klds[2]
    assert scorer() == pytest.approx(0.0, abs=1e-9)                    # the float weights are back


def test_refine_stays_within_the_budget_and_puts_the_float_weights_back(tiny):
    loaded, names, _, config, library, rows, plan = tiny
    before = {n: loaded.model.get_submodule(n).weight.data.clone() for n in names}
    scorer = AssembledKLD(loaded.model, rows, positions=30)
    new, result, check = refine(plan, loaded.model, library, scorer, config, SearchConfig(evals=64, seed=0),
                                progress=False)
    assert check is None
    assert all(torch.equal(loaded.model.get_submodule(n).weight.data, before[n]) for n in names)
    assert new.bits_per_weight <= config.target_bpw and sum(c.bits for c in new.choices) == result.size
    assert result.loss < result.start_loss and result.accepted >= 1
    assembly = Assembly(loaded.model, library)
    try:
        assembly.set({c.name: c.option for c in new.choices})
        assert scorer() == pytest.approx(result.loss, rel=1e-6)      # the plan returned is the one measured
    finally:
        assembly.restore()


def test_a_search_no_better_on_held_out_rows_gives_the_start_back(tiny):
    loaded, names, _, config, library, rows, plan = tiny
    scorer = AssembledKLD(loaded.model, rows, positions=30)
    new, result, check = refine(plan, loaded.model, library, scorer, config, SearchConfig(evals=64, seed=0),
                                progress=False, holdout=scorer)
    # the same rows held out: the search's plan is better there, so kept
    assert check.kept == "search" and check.kld == pytest.approx(result.loss) and check.start_kld == pytest.approx(result.start_loss)
    assert [c.option for c in new.choices] != [c.option for c in plan.choices]

    class Reversed:                                  # held-out rows that rank every plan the other way round
        def __call__(self):
            return -scorer()
    new, result, check = refine(plan, loaded.model, library, scorer, config, SearchConfig(evals=64, seed=0),
                                progress=False, holdout=Reversed())
    assert check.kept == "start" and result.loss < result.start_loss
    assert [c.option for c in new.choices] == [c.option for c in plan.choices]
