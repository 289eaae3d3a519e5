"""The planner's multiple-choice knapsack: exact against brute force on small random instances, never
over the budget, and a budget below the smallest reachable size refused with that size named."""
from __future__ import annotations

import itertools
import random

import pytest

from lowbit.plans.knapsack import Option, smallest, solve


def _brute(items, budget):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in items]):
        size = sum(items[i][j].size for i, j in enumerate(choice))
        loss = sum(items[i][j].loss for i, j in enumerate(choice))
        if size <= budget and (best is None or loss < best - 1e-12):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_against_brute_force(seed):
    rng = random.Random(seed)
    items = [[Option(rng.randint(1, 40), rng.random()) for _ in range(rng.randint(1, 4))]
             for _ in range(rng.randint(1, 6))]
    budget = rng.randint(smallest(items), smallest(items) + 60)
    sol = solve(items, budget, unit=1)
    assert sol.size <= budget
    assert sol.loss == pytest.approx(_brute(items, budget), abs=1e-12)
    assert sol.size == sum(items[i][j].size for i, j in enumerate(sol.choice))


@pytest.mark.parametrize("seed", range(10))
def test_coarse_grid_stays_under_budget_and_close(seed):
    rng = random.Random(100 + seed)
    # tensors of 10^5..10^6 weights at 2..8 bits: sizes in bits, loss falling with bits
    items = []
    for _ in range(12):
        n = rng.randint(10**5, 10**6)
        items.append([Option(n * b + 32 * n // 64, rng.random() * 2.0 ** -b) for b in (2, 3, 4, 8)])
    weights = sum(o[0].size for o in items) / 2.5
    budget = int(3.5 * weights)
    sol = solve(items, budget, cells=5000)
    assert sol.size <= budget
    fine = solve(items, budget, unit=64)
    assert fine.loss <= sol.loss + 1e-15                 # the coarse answer is feasible on the fine grid
    assert sol.loss <= fine.loss * 1.05                  # and a coarser grid gives up little


def test_budget_below_smallest_is_refused_with_the_size():
    items = [[Option(10, 1.0), Option(20, 0.5)], [Option(5, 1.0)]]
    with pytest.raises(ValueError, match="smallest reachable size, 15 bits"):
        solve(items, 14)
    assert solve(items, 15).choice == (0, 0)
    assert solve(items, 25).choice == (1, 0)
