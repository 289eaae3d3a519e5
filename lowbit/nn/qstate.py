"""A QuantLinear's stored state and back: the tensors and manifest entry lowbit's directory keeps per
quantized linear (export.lowbit_dir) and a decoder layer's checkpoint (calibration.resume) hold.
Rebuilding from the packed state gives modules whose re-packed bytes are the same."""
from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats import format_from_dict
from ..formats.activation import act_format_from_dict
from .qlinear import QuantLinear


# what a lying lowbit.json entry raises while it is turned into formats, shapes and modules
BAD_ENTRY = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


def quantized_module(name: str, entry: dict, tensors: dict):
    """(kind, module or quantized weight) of one lowbit.json entry and its tensors (popped from `tensors`)."""
    fmt = format_from_dict(entry["format"])
    shape = entry["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and 0 < d < 2**31 for d in shape)):
        raise ValueError(f"shape {str(shape)[:40]} is not two positive integers")
    parts = {k: tensors.pop(f"{name}.{k}") for k in ("codes", "scales", "zeros") if f"{name}.{k}" in tensors}
    q = fmt.unpack(parts, tuple(shape))
    if entry.get("kind") == "weight":
        return "weight", q                   # attached after the float tensors are loaded
    act = act_format_from_dict(entry["activations"]) if "activations" in entry else None
    sparse = None
    if "outliers" in entry:                      # dense-and-sparse: its float16 part
        from ..formats.sparse import SparseOutliers

        sparse = SparseOutliers(tensors.pop(f"{name}.outlier_index"), tensors.pop(f"{name}.outlier_values"),
                                tuple(shape))
        if sparse.kept != entry["outliers"]:
            raise ValueError(f"{sparse.kept} outliers stored, lowbit.json says {entry['outliers']}")
    module = QuantLinear(q, tensors.pop(f"{name}.bias", None), act, tensors.pop(f"{name}.input_scale", None),
                         input_transform=entry.get("input_transform"),
                         input_signs=tensors.pop(f"{name}.input_signs", None),
                         output_signs=tensors.pop(f"{name}.output_signs", None), outliers=sparse)
    return "linear", module


def pack_linear(name: str, module: QuantLinear, tensors: dict[str, torch.Tensor]) -> dict:
    """Add one QuantLinear's stored tensors to `tensors` under NAME.*; returns its manifest entry."""
    for key, t in module.fmt.pack(module.qtensor).items():
        tensors[f"{name}.{key}"] = t.contiguous()
    entry = {"format": module.fmt.to_dict(), "shape": [module.out_features, module.in_features],
             "bits": module.fmt.storage_bits((module.out_features, module.in_features))}
    if module.input_transform is not None:
        entry["input_transform"] = module.input_transform
    for key in ("input_signs", "output_signs", "outlier_index", "outlier_values"):   # QuIP's signs, dense-and-sparse
        if key in module._buffers:
            tensors[f"{name}.{key}"] = module._buffers[key].contiguous()
    if "outlier_index" in module._buffers:
        entry["outliers"] = module.outlier_values.numel()          # weights kept in float16
        entry["bits"] += module.outlier_bits
    if "output_signs" in module._buffers:
        entry["output_transform"] = "hadamard"
    if module.act is not None:
        entry["activations"] = module.act.to_dict()
        if "input_scale" in module._buffers:
            tensors[f"{name}.input_scale"] = module.input_scale.detach().contiguous()
    return entry


def pack_module(root: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, entries) of a module holding QuantLinears (one decoder layer): each QuantLinear packed
    as in model.safetensors, every other tensor of its state as it is; names relative to `root`."""
    quantized = {n: m for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    entries = {name: pack_linear(name, module, tensors) for name, module in quantized.items()}
    for key, t in root.state_dict().items():
        if key.rsplit(".", 1)[0] in quantized and not key.endswith(".bias"):
            continue                              # packed above
        tensors[key] = t.detach().contiguous()
    return tensors, entries


def unpack_module(root: torch.nn.Module, entries: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    """Put pack_module's (tensors, entries) back into `root` (the same module type): QuantLinears
    rebuilt and set in place, every other tensor loaded; LowbitError when they do not fit."""
    tensors = dict(tensors)
    try:
        for name, entry in entries.items():
            _, module = quantized_module(name, entry, tensors)
            root.get_submodule(name)
            root.set_submodule(name, module)
        _, unexpected = root.load_state_dict(tensors, strict=False, assign=True)   # assign: a lazy layer is on meta
    except (*BAD_ENTRY, RuntimeError) as e:
        raise LowbitError(f"checkpointed layer does not fit the model: {type(e).__name__}: {str(e)[:200]}") from None
    if unexpected:
        raise LowbitError(f"checkpointed layer has tensors the model lacks: {unexpected[:3]}")
