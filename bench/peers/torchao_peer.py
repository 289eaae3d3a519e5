"""Peer: torchao 0.18.0 (PyTorch's quantization library; calibration-free).

Its CPU weight-only path for 2- to 8-bit integers is `quantize_(model, IntxWeightOnlyConfig(
weight_dtype=torch.intB, granularity=PerGroup(G)))` with the library defaults kept: symmetric
mapping, scale absmax / ((qmax − qmin) / 2) (so int4 takes absmax / 7.5 and codes [−8, 7]),
affine parameter choice, float32 scales (the weights' dtype), IntxPackingFormat.UNPACKED_TO_INT8.
It is applied to the decoder layers' linears only, as lowbit's rows are.
Storage bits per weight as torchao keeps them on this CPU: the codes unpacked, one int8 each,
plus a float32 scale and an int8 zero-point per group (8 + 40 / G); the packed equivalent a
kernel that packs the codes would need (B + 32 / G) is in the result file as
bits_per_weight_packed. A group size that does not divide the columns is refused by torchao
(SmolLM2's 576 columns at group 128): that row is a failure row.

    python bench/peers/torchao_peer.py --model smollm2-135m --bits 4 --group 64 --out DIR
"""
from __future__ import annotations

from common import main, worker_args, write_dequantized


def worker() -> None:
    a = worker_args(__doc__)
    import torch
    import torchao
    import transformers
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if not a.sym:
        raise ValueError("this peer runs torchao's default symmetric mapping only; --asym is not wired")
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{a.bits}"), granularity=PerGroup(a.group))
    with torch.no_grad():
        quantize_(model.model.layers, config)
    tensors, stored, bits, weights, quantized = {}, {}, 0, 0, 0
    for name, module in model.model.layers.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        if not hasattr(w, "dequantize"):
            raise TypeError(f"model.layers.{name}: torchao left a plain {type(w).__name__}, expected a quantized tensor")
        tensors[f"model.layers.{name}.weight"] = w.dequantize().float()      # [out, in], what its kernel multiplies by
        for key in w.tensor_data_names:                                     # qdata, scale, zero_point
            t = getattr(w, key)
            bits += t.numel() * t.element_size() * 8
            stored[key] = str(t.dtype)
        weights += w.shape[0] * w.shape[1]
        quantized += 1
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "torchao", "tool_version": torchao.__version__,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": "intx-weight-only", "bits": a.bits, "group": a.group, "sym": True,
        "hyperparameters": {"config": repr(config)},
        "quantized_linears": quantized, "bits_per_weight": bits / weights,
        "bits_per_weight_packed": a.bits + 32 / a.group, "stored_tensors": stored,
        "calibration_windows": None})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
