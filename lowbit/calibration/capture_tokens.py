"""Per-token captures and layer replays, for analysis: the hooks stay in calibration/.

`capture_token_inputs` keeps keep(x) of the input of named modules on every call (the per-token
counterpart of capture_inputs, whose statistics are streaming sums); `start_at_layer` lets a
model's own forward begin at decoder layer `start` from given hidden states, so the
embedding, masks, position embeddings, final norm, head and any logit soft-capping are the
model's own code, not a copy of it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.specs import ArchSpec


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


@contextmanager
def capture_token_inputs(root: torch.nn.Module, names: list[str], keep=lambda t: t):
    """Collect keep(input) of each named submodule of `root` on every call: {name: [value, ...]}.

    The input is the module's first argument (or its `hidden_states` keyword), detached.
    Hooks are removed on exit, also on error.
    """
    kept, handles = {name: [] for name in names}, []
    try:
        for name in names:
            def hook(_module, args, kwargs, _name=name):
                kept[_name].append(keep(_first_input(args, kwargs).detach()))

            handles.append(root.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        yield kept
    finally:
        for h in handles:
            h.remove()


@contextmanager
def start_at_layer(model: torch.nn.Module, spec: ArchSpec, start: int, hidden: torch.Tensor | None):
    """Inside the block, a forward of `model` runs decoder layers start.. on `hidden` [B, T, d].

    Layers before `start` become pass-through stubs and layer start-1 returns `hidden`, so
    layer `start` sees exactly the hidden states recorded earlier for the same input ids.
    start == 0 changes nothing. The class forwards come back on exit, also on error.
    """
    layers = model.get_submodule(spec.layers)
    if not 0 <= start < len(layers):
        raise ValueError(f"start layer {start} is outside 0..{len(layers) - 1}")

    def stub(last: bool):
        def forward(hidden_states, *args, **kwargs):
            out = hidden if last else hidden_states
            return (out,) if spec.layer_returns_tuple else out
        return forward

    patched = list(layers)[:start]
    try:
        for i, layer in enumerate(patched):
            layer.forward = stub(i == start - 1)
        yield
    finally:
        for layer in patched:
            if "forward" in vars(layer):
                del layer.forward                # back to the class's forward
