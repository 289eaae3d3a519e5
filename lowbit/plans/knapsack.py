"""The multiple-choice knapsack behind `lowbit plan`: every tensor takes exactly one of its options
(a format, with its stored size and predicted loss); minimise the summed loss with the summed size at
most the budget. Pure numpy, no model.

Exact dynamic programming over a size grid: sizes are rounded *up* to grid units (so a solution of the
grid problem never exceeds the true budget), the budget *down*. The grid unit bounds what the rounding
can cost: the answer is optimal for the rounded sizes, and the rounding gives away less than n units
of the budget (n tensors); the default unit keeps the grid at `cells` cells (SmolLM2 at 3.5 bits per
weight: about 0.004 bits per weight).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    size: int          # stored bits of the tensor in this format (codes and side data)
    loss: float        # predicted quality loss (e.g. the tensor's measured KLD alone)


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]      # per item, the index of its chosen option
    size: int                    # summed true size (bits)
    loss: float                  # summed loss
    budget: int
    unit: int                    # grid unit (bits) the DP used


def smallest(items: list[list[Option]]) -> int:
    """The least total size any choice reaches."""
    return sum(min(o.size for o in opts) for opts in items)


def solve(items: list[list[Option]], budget: int, unit: int | None = None, cells: int = 400_000) -> Solution:
    """Minimise Σ loss subject to Σ size ≤ budget, one option per item.

    unit: bits per grid cell (default: the smallest unit that keeps budget / unit ≤ cells). Raises
    ValueError when even the smallest options exceed the budget, naming the smallest reachable size.
    """
    if not items or any(not opts for opts in items):
        raise ValueError("every tensor needs at least one option")
    if max(len(opts) for opts in items) > 127:
        raise ValueError("at most 127 options per tensor")
    least = smallest(items)
    if least > budget:
        raise ValueError(f"the budget of {budget} bits is below the smallest reachable size, {least} bits")
    unit = unit or max(1, math.ceil(budget / cells))
    G = budget // unit                                                  # budget in cells, rounded down
    INF = np.inf
    best = np.full(G + 1, INF)                                          # best[g]: least loss using ≤ g cells
    best[0] = 0.0
    picks = np.zeros((len(items), G + 1), dtype=np.int8)              # argmin option per item and cell
    for i, opts in enumerate(items):
        new = np.full(G + 1, INF)
        for j, o in enumerate(opts):
            s = -(-o.size // unit)                                      # size in cells, rounded up
            if s > G:
                continue
            cand = np.full(G + 1, INF)
            cand[s:] = best[: G + 1 - s] + o.loss                       # shift by s cells
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
        if not np.isfinite(best).any():
            raise ValueError(f"no choice fits {budget} bits on a grid of {unit}-bit cells; use a finer unit")
    g = int(np.argmin(best))                                            # least loss over all cells ≤ G
    if not np.isfinite(best[g]):
        raise ValueError(f"no choice fits {budget} bits on a grid of {unit}-bit cells; use a finer unit")
    choice = []
    for i in range(len(items) - 1, -1, -1):                             # walk back through the picks
        j = int(picks[i, g])
        choice.append(j)
        g -= -(-items[i][j].size // unit)
    choice.reverse()
    size = sum(items[i][j].size for i, j in enumerate(choice))
    loss = sum(items[i][j].loss for i, j in enumerate(choice))
    return Solution(tuple(choice), size, loss, budget, unit)
