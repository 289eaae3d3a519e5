"""Peer: bitsandbytes 0.50.2 (NF4, the 4-bit format of QLoRA; calibration-free).

NF4 is a fixed 16-level grid (normal-distribution quantiles, scaled by each block's absmax);
bitsandbytes quantizes the *flattened* weight in blocks of G consecutive values, so a block is a
group of one row only when G divides the columns. SmolLM2's 576 columns at G = 128: blocks
straddle rows, as the library does it, and its CPU dequantize_4bit then decodes them wrongly
(bench/peers/bitsandbytes_blocks.py measures it). Calls:
bitsandbytes.functional.quantize_4bit(W, blocksize=G, quant_type="nf4") and dequantize_4bit (what
its CPU matmul multiplies by), with transformers' BitsAndBytesConfig defaults otherwise: no double
quantization, so one float32 absmax per block.
Applied to the decoder layers' linears only, as lowbit's rows are.
Storage bits per weight: the packed codes (two per uint8) plus the float32 absmax (4 + 32 / G).
bitsandbytes has no 3-bit or 2-bit weight format: those settings are failure rows saying so.

    python bench/peers/bitsandbytes_peer.py --model smollm2-135m --bits 4 --group 64 --out DIR
"""
from __future__ import annotations

from common import main, worker_args, write_dequantized


def worker() -> None:
    a = worker_args(__doc__)
    if a.bits != 4:
        raise ValueError(f"bitsandbytes has no {a.bits}-bit weight format (4-bit NF4/FP4 and 8-bit only)")
    import bitsandbytes
    import bitsandbytes.functional as F
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    tensors, stored, bits, weights, quantized = {}, {}, 0, 0, 0
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            W_f = module.weight.data
            W_q, state = F.quantize_4bit(W_f, blocksize=a.group, quant_type="nf4", compress_statistics=False)
            tensors[f"model.layers.{name}.weight"] = F.dequantize_4bit(W_q, state).float()  # [out, in]
            for key, t in [("W_q", W_q), ("absmax", state.absmax)]:
                bits += t.numel() * t.element_size() * 8
                stored[key] = str(t.dtype)
            weights += W_f.numel()
            quantized += 1
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "bitsandbytes", "tool_version": bitsandbytes.__version__,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": "nf4", "bits": 4, "group": a.group, "sym": True,
        "note": "NF4's 16 levels are fixed quantiles, symmetric in scale (absmax) but not evenly spaced",
        "hyperparameters": {"quant_type": "nf4", "blocksize": a.group, "compress_statistics": False},
        "quantized_linears": quantized, "bits_per_weight": bits / weights, "stored_tensors": stored,
        "calibration_windows": None})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
