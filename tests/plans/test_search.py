"""The measured search after the knapsack (plans/search.py): mutants never leave the budget, the search never
returns worse than its start, cannot improve a knapsack-optimal start when losses do add, and finds what
brute force finds on small instances whose losses do not add (the case it exists for)."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from lowbit.plans.knapsack import Option, solve
from lowbit.plans.search import SearchConfig, _ladder, evolve, mutate


def _instance(seed, n=6):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        params = rng.choice([8, 16, 24])
        # bits 2..6 per weight, loss falling with bits and scaled by the tensor's sensitivity
        sens = rng.uniform(0.1, 3.0)
        items.append([Option(params * b + rng.randint(0, 3), sens * 2.0 ** -b) for b in (2, 3, 4, 6)])
    least = sum(min(o.size for o in opts) for opts in items)
    return items, least + rng.randint(10, 40 * n)


def _size(items, c):
    return sum(items[i][j].size for i, j in enumerate(c))


def _additive(items):
    return lambda c: sum(items[i][j].loss for i, j in enumerate(c))


def _coupled(items):
    """A loss that does not add: neighbours' errors compound (their product), as errors in consecutive layers do."""
    base = _additive(items)
    return lambda c: base(c) + 4.0 * sum(items[i][c[i]].loss * items[i + 1][c[i + 1]].loss for i in range(len(c) - 1))


@pytest.mark.parametrize("seed", range(20))
def test_mutants_stay_within_the_budget_and_move_one_rung(seed):
    items, budget = _instance(seed)
    ladders = [_ladder(o) for o in items]
    start = solve(items, budget, unit=1).choice
    rng = np.random.default_rng(seed)
    for swaps in (1, 2, 5):
        kid = mutate(items, ladders, start, budget, swaps, rng)
        assert _size(items, kid) <= budget
        rungs = [abs(ladders[i].index(a) - ladders[i].index(b)) for i, (a, b) in enumerate(zip(start, kid))]
        assert max(rungs) <= swaps and sum(rungs) <= 2 * swaps


@pytest.mark.parametrize("seed", range(10))
def test_an_optimal_start_is_kept_when_losses_add(seed):
    items, budget = _instance(seed)
    start = solve(items, budget, unit=1)
    res = evolve(items, budget, start.choice, _additive(items), SearchConfig(evals=64, seed=seed))
    assert res.loss == pytest.approx(start.loss, abs=1e-12) and res.start_loss == pytest.approx(start.loss)
    assert res.size <= budget


def test_finds_the_brute_force_optimum_when_losses_do_not_add():
    improved = 0
    for seed in range(10):
        items, budget = _instance(seed, n=5)
        loss = _coupled(items)
        feasible = [c for c in itertools.product(*[range(len(o)) for o in items]) if _size(items, c) <= budget]
        best = min(loss(c) for c in feasible)
        start = solve(items, budget, unit=1).choice          # the knapsack on the additive part
        res = evolve(items, budget, start, loss, SearchConfig(evals=400, seed=seed))
        assert res.size <= budget and res.size == _size(items, res.choice)
        assert res.loss == pytest.approx(loss(res.choice)) and res.loss <= res.start_loss
        assert res.loss <= best * (1 + 1e-9) + 1e-12, seed
        assert list(res.history) == sorted(res.history, reverse=True)   # the parent only ever improves
        improved += res.start_loss > best * (1 + 1e-9)
    assert improved >= 4          # teeth: on these instances the knapsack's start is often not the optimum


def test_a_start_over_budget_and_bad_configs_are_refused():
    items, budget = _instance(0)
    over = tuple(len(o) - 1 for o in items)
    with pytest.raises(ValueError, match="over the budget"):
        evolve(items, _size(items, over) - 1, over, _additive(items))
    for bad in ({"evals": 0}, {"offspring": -1}, {"max_swaps": 1.5}, {"evals": True}):
        with pytest.raises(ValueError, match="positive integer"):
            SearchConfig(**bad)
