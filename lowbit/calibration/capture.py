"""Hooks live here and nowhere else: capture what flows into linears while a module runs."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .stats import InputStats


@contextmanager
def capture_inputs(root: torch.nn.Module, names: list[str], wanted: frozenset | set):
    """Accumulate InputStats of the inputs of each named submodule of `root` while the block runs.

    Yields {name: InputStats}; the hooks are removed on exit, also on error.
    """
    stats, handles = {}, []
    try:
        for name in names:
            module = root.get_submodule(name)
            in_features = module.in_features if hasattr(module, "in_features") else module.weight.shape[-1]
            stats[name] = InputStats(in_features, frozenset(wanted))

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
