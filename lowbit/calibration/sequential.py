"""One forward per layer: every sample's pass through the layer pauses at each linear group.

The two-pass walk runs a layer twice (capture in float, then the quantized re-run). Here each
sample's forward runs as a coroutine (a greenlet) that stops at the first linear of each spec
group (a Gate); once every sample has stopped there, the group's statistics are complete, the
walker solves the group, and the samples go on through the now-quantized linears. The
outputs are the quantized layer's outputs, so the convention is the two-pass walk's, and each
group's statistics also come from the already-quantized groups before it in the same layer
(GPTQ's "true sequential" order).

Coroutines, not threads: everything stays on the walker's thread, so torch keeps one pool of
intra-op threads (with a thread per sample, the idle pools of the paused threads slowed down
the solves between them). The cost is memory: every sample's intermediate tensors
are alive while a group is solved (lowbit.quantize.choose_walk weighs that).
"""
from __future__ import annotations

import time
from functools import partial

import torch
from greenlet import greenlet, getcurrent

from ..errors import LowbitError
from .capture import gated
from .stats import InputStats


class SampleRun(greenlet):
    """fn() as a coroutine that runs only between step() and its next pause() (or its end)."""

    def __init__(self, fn):
        super().__init__(run=fn)
        self.result = self.at = None

    @property
    def done(self) -> bool:
        return self.dead

    def step(self) -> None:
        """Let fn run until it pauses or ends; its errors are raised here."""
        out = self.switch()
        if self.dead:
            self.result = out

    def pause(self, at) -> None:
        """Called from inside fn: hand control back to the walker until the next step."""
        self.at = at
        self.parent.switch()

    def cancel(self) -> None:
        if self:                 # started and paused: unwind its frames (GreenletExit)
            self.throw()


def _pause(name: str):
    def pause():
        run = getcurrent()
        if not isinstance(run, SampleRun):
            raise LowbitError(f"{name} ran outside the walker's sample runs")
        run.pause(name)
    return pause


def walk_layer(layer: torch.nn.Module, groups, inputs: list, run_layer, solve, wanted: set, sink_weight: float):
    """Pass `inputs` (hidden states [1, L, d] each) once through `layer`, solving each group as
    every sample reaches it. run_layer(h) is one sample's forward; solve({linear: InputStats})
    quantizes one group in place. Returns (outputs, capture_seconds, solve_seconds, tail_seconds)."""
    stats = {}
    for g in groups:
        first = layer.get_submodule(g.linears[0])
        stats[g.linears[0]] = InputStats(first.weight.shape[-1], frozenset(wanted), sink_weight)
    runs = [SampleRun(partial(run_layer, h)) for h in inputs]
    capture = solving = 0.0
    try:
        with gated(layer, stats, _pause) as release:
            for g in groups:
                start = time.perf_counter()
                for run in runs:
                    run.step()
                    if run.done or run.at != g.linears[0]:
                        where = "the layer's end" if run.done else run.at
                        raise LowbitError(f"the layer reached {where} before {g.linears[0]}: "
                                          "the spec's groups are not in forward order")
                solved = time.perf_counter()
                release(g.linears[0])
                solve({name: stats[g.linears[0]] for name in g.linears})
                del stats[g.linears[0]]              # solved: the walk holds one group's statistics at a time
                capture, solving = capture + solved - start, solving + time.perf_counter() - solved
            start = time.perf_counter()
            for run in runs:
                run.step()
                if not run.done:
                    raise LowbitError(f"the layer paused at {run.at} twice")
            outputs = [run.result for run in runs]
            tail = time.perf_counter() - start
    finally:
        for run in runs:
            run.cancel()
    return outputs, capture, solving, tail
