"""Peer: auto-round 0.16.1 (Intel's SignRound: signed-gradient descent on each weight's rounding
offset and the groups' min/max clip, block by block, against the float block's output).

Its defaults are kept, as a user gets them from `AutoRound(model, tokenizer, bits=B, group_size=G,
sym=True)`: 200 iterations per decoder block, batch 8, learning rate 1/iters, min/max tuning on,
quantized inputs for the next block, bfloat16 autocast on this CPU, float16 scales; no
torch.compile (it needs a compiler toolchain at run time). The calibration windows are lowbit's
(one [1, L] tensor each, handed over as its dataset), so it tokenizes nothing itself.
What comes back: after quantize() each linear holds its quantize-dequantized weight in bfloat16
plus `scale` (float16, one per group) and the zero-point; the integer codes are recovered as
round(W / scale) (exact: the remainder is checked below 0.25) and the handed-over weight is
scale × code in float32, what its exported checkpoint decodes to. A decoder linear it leaves
unquantized (it skips shapes its packing cannot hold) fails the row rather than flatter it.
Storage bits per weight, its GPTQ-style export: B-bit codes plus a float16 scale and a B-bit
zero-point per group (B + (16 + B) / G).

    python bench/peers/autoround_peer.py --model smollm2-135m --bits 4 --group 64 --out DIR
"""
from __future__ import annotations

from common import main, read_samples, worker_args, write_dequantized


def worker() -> None:
    a = worker_args(__doc__)
    import auto_round
    import torch
    import transformers
    from auto_round import AutoRound

    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.float_dir)
    samples = read_samples(a.samples_file)                  # int64 [N, L]
    dataset = [samples[i:i + 1] for i in range(samples.shape[0])]   # N tensors [1, L]
    rounder = AutoRound(model, tokenizer=tokenizer, bits=a.bits, group_size=a.group, sym=a.sym,
                        dataset=dataset, nsamples=samples.shape[0], seqlen=samples.shape[1],
                        device_map="cpu", enable_torch_compile=False)
    rounder.quantize()
    tensors, left_float, weights, quantized = {}, [], 0, 0
    with torch.no_grad():
        for name, module in rounder.model.model.layers.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            scale = getattr(module, "scale", None)
            if scale is None or getattr(module, "bits", 16) != a.bits:
                left_float.append(name)
                continue
            # scale: [out, ceil(in / G)] → one value per weight, [out, in] (ragged last group cut)
            s = scale.float().repeat_interleave(a.group, dim=1)[:, :module.in_features]
            ratio = module.weight.float() / s
            code = ratio.round()
            if (ratio - code).abs().max() > 0.25:
                raise ValueError(f"model.layers.{name}: its weight is not scale x integer code, cannot decode it")
            tensors[f"model.layers.{name}.weight"] = s * code
            weights += module.weight.numel()
            quantized += 1
    if left_float:
        raise ValueError(f"auto-round left {len(left_float)} decoder linears unquantized, e.g. {left_float[:3]}")
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "auto-round", "tool_version": auto_round.__version__,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": "signround", "bits": a.bits, "group": a.group, "sym": a.sym,
        "hyperparameters": {k: getattr(rounder, k, None) for k in (
            "iters", "batch_size", "lr", "minmax_lr", "enable_minmax_tuning", "enable_quanted_input",
            "amp", "amp_dtype", "seed")} | {"amp_dtype": str(getattr(rounder, "amp_dtype", None))},
        "quantized_linears": quantized, "bits_per_weight": a.bits + (16 + a.bits) / a.group,
        "stored_tensors": {"codes": f"int{a.bits} packed", "scale": "torch.float16", "zero": f"int{a.bits} packed"},
        "calibration_windows": list(samples.shape)})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
