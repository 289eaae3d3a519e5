"""Peer: HQQ 0.2.8.post1 (Half-Quadratic Quantization, Mobius Labs; calibration-free).

HQQ fits each group's zero-point by a few proximal iterations that minimise an lp-norm
(p < 1) of the weight error, starting from min/max; no calibration data is used (the
samples file is ignored). Its defaults, kept here: hqq_base_quant_config(nbits, group_size,
axis=1) → optimize True with lp_norm 0.7, beta 10, kappa 1.01, 20 iterations; round_zero True
for 4-bit only; no quantized scale/zero metadata; compute_dtype float16 (its default), so the
scales and zero-points it stores are float16. The grid is always asymmetric with a *float*
zero-point: a symmetric setting cannot be asked for, so rows report sym False.
Storage bits per weight: the packed codes (W_q; 4-bit two per uint8, 3-bit ten per int32,
2-bit four per uint8) plus the float16 scale and zero of every group.

    python bench/peers/hqq_peer.py --model smollm2-135m --bits 4 --group 64 --out DIR
"""
from __future__ import annotations

from common import main, worker_args, write_dequantized


def worker() -> None:
    a = worker_args(__doc__)
    import hqq
    import torch
    import transformers
    from hqq.core.quantize import HQQBackend, HQQLinear, hqq_base_quant_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    config = hqq_base_quant_config(nbits=a.bits, group_size=a.group, axis=1)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    tensors, stored, bits, weights, quantized = {}, {}, 0, 0, 0
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            q = HQQLinear(module, quant_config=config, compute_dtype=torch.float16, device="cpu", del_orig=False)
            # the weights HQQ's runtime multiplies by, [out, in]
            tensors[f"model.layers.{name}.weight"] = q.dequantize().float()
            for key, t in [("W_q", q.W_q), ("scale", q.meta["scale"]), ("zero", q.meta["zero"])]:
                bits += t.numel() * t.element_size() * 8
                stored[key] = str(t.dtype)
            weights += module.weight.numel()
            quantized += 1
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "hqq", "tool_version": getattr(hqq, "__version__", "0.2.8.post1"),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": "hqq", "bits": a.bits, "group": a.group, "sym": False,
        "note": "HQQ grids are asymmetric with a float zero-point; --sym cannot be honoured",
        "hyperparameters": {"weight_quant_params": {k: v for k, v in config["weight_quant_params"].items()},
                            "optimizer": "proximal, lp_norm 0.7, beta 10, kappa 1.01, iters 20 (library defaults)",
                            "compute_dtype": "float16"},
        "quantized_linears": quantized, "bits_per_weight": bits / weights, "stored_tensors": stored,
        "calibration_windows": None})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
