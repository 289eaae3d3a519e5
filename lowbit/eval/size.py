"""Bits per weight, counted from what is stored: codes + scales + zero-points + float tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.qlinear import QuantLinear
from ..nn.qweight import quantized_weights


@dataclass(frozen=True)
class SizeReport:
    quantized_params: int
    quantized_bits: int              # codes + scales + zero-points, as packed on disk
    float_params: int                # parameters kept in float (embeddings, norms, head, biases)
    float_bits: int                  # at their stored dtype
    float_tensors: tuple[str, ...]   # names of the float weights that are not norms or biases

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the quantized linears (everything they store)."""
        return self.quantized_bits / self.quantized_params if self.quantized_params else float("nan")

    @property
    def model_bits_per_weight(self) -> float:
        """Bits per parameter of the whole model as stored, float tensors included."""
        return (self.quantized_bits + self.float_bits) / (self.quantized_params + self.float_params)

    @property
    def bytes(self) -> int:
        return (self.quantized_bits + self.float_bits) // 8


def size_report(model: torch.nn.Module) -> SizeReport:
    """Count every parameter once (tied tensors once), quantized linears by their packed size."""
    q_params = q_bits = f_params = f_bits = 0
    seen, big_float = set(), []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            shape = (module.out_features, module.in_features)
            q_params += shape[0] * shape[1]
            q_bits += module.fmt.storage_bits(shape) + module.outlier_bits   # dense-and-sparse: its float16 part
    for name, holder in quantized_weights(model).items():   # e.g. a GGUF mix's embedding
        shape = (holder.out_features, holder.in_features)
        q_params += shape[0] * shape[1]
        q_bits += holder.fmt.storage_bits(shape)
        seen.add(model.get_submodule(name).weight.data_ptr())  # its weight is W_dq, not stored
    for name, param in model.named_parameters(remove_duplicate=False):
        key = name if param.is_meta else param.data_ptr()     # a lazy model's written layers are on meta
        if key in seen:
            continue                          # a tied head shares the embedding's storage
        seen.add(key)
        f_params += param.numel()
        f_bits += param.numel() * param.element_size() * 8
        if param.dim() == 2:
            big_float.append(name)
    return SizeReport(q_params, q_bits, f_params, f_bits, tuple(big_float))
