"""Hooks live here and nowhere else: capture what flows into linears while a module runs."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .stats import InputStats


@contextmanager
def capture_inputs(root: torch.nn.Module, names: list[str], wanted: frozenset | set, sink_weight: float = 1.0):
    """Accumulate InputStats of the inputs of each named submodule of `root` while the block runs.

    Yields {name: InputStats}; the hooks are removed on exit, also on error.
    """
    stats, handles = {}, []
    try:
        for name in names:
            module = root.get_submodule(name)
            in_features = module.in_features if hasattr(module, "in_features") else module.weight.shape[-1]
            stats[name] = InputStats(in_features, frozenset(wanted), sink_weight)

            def hook(_module, args, _stats=stats[name]):
                _stats.update(args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(root: torch.nn.Module, names: list[str], keep=lambda t: t):
    """Collect keep(output) of each named submodule on every call: {name: [tensor, ...]}."""
    outputs, handles = {name: [] for name in names}, []
    try:
        for name in names:
            def hook(_module, _args, output, _name=name):
                out = output[0] if isinstance(output, tuple) else output
                outputs[_name].append(keep(out.detach()))

            handles.append(root.get_submodule(name).register_forward_hook(hook))
        yield outputs
    finally:
        for h in handles:
            h.remove()


class Gate(torch.nn.Module):
    """Stands in for a linear while a sequential walk runs: feeds its input to `stats`, calls
    `pause()` (meanwhile the walker gives the name back to the linear and solves its group),
    then runs whatever module holds the name now: the quantized one the solve wrote back.

    The layer is kept outside the module tree (a plain attribute would make it a submodule of
    its own child).
    """

    def __init__(self, layer: torch.nn.Module, name: str, stats: InputStats, pause):
        super().__init__()
        self.inner = layer.get_submodule(name)
        self.__dict__["_layer"] = layer
        self._name, self._stats, self._pause = name, stats, pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._stats.update(x)
        self._pause()
        current = self._layer.get_submodule(self._name)
        return (self.inner if current is self else current)(x)


@contextmanager
def gated(layer: torch.nn.Module, stats: dict, pause):
    """Put a Gate at each name of `stats` ({name: InputStats}) inside `layer`. Yields
    release(name), which gives the name back to the module the gate stood in for (so a solve
    finds the real linear there); on exit every gate still in place is released."""
    gates = {name: Gate(layer, name, st, pause(name)) for name, st in stats.items()}

    def release(name: str) -> None:
        gate = gates[name]
        gate._stats = None                      # its samples are all in; the walker holds the statistics
        if layer.get_submodule(name) is gate:
            layer.set_submodule(name, gate.inner)
        gate.inner = None                       # the solve replaces the linear: its float weight goes with it

    try:
        for name, gate in gates.items():
            layer.set_submodule(name, gate)
        yield release
    finally:
        for name in gates:
            release(name)
