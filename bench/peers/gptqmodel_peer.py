"""Peer: GPTQModel 7.6.0 (ModelCloud; installs transformers 5.x of its own choosing).

Methods, each with the library's own defaults (weight-only, integer, symmetric unless --asym,
group size --group along the input dimension, lm_head / tied embedding left float):
  gptq  GPTQConfig: damp_percent 0.05 (auto-increment 0.01 when the Hessian is not positive
        definite), desc_act False, act_group_aware True (its default: groups reordered by
        activation, GAR), static_groups False, mse 0 (no grid search), true_sequential True;
        stored in the GPTQ format (int32-packed codes and zero-points, float16 scales, g_idx)
  (both with offload_to_disk False: the model stays in memory)
  awq   AWQConfig with FORMAT.GEMM (int32-packed codes and zero-points, scales in the model's
        dtype: bfloat16 here), built and run through the portable torch kernel (BACKEND.AWQ_TORCH)
The model is quantized on the CPU (GPTQMODEL_CPU_WORKERS=2 is set by the driver), in float32 for
GPTQ and in bfloat16 for AWQ (its AWQ kernel refuses to pack a float32 model, and float16 has
no fast path on this CPU: see the comment in worker()).
Calibration: lowbit's own token windows as {"input_ids", "attention_mask"} rows, in their order
(calibration_sort None).
De-quantization, as a user meets the model: the quantized model is saved (GPTQ / AWQ format),
loaded back with GPTQModel.load (torch kernels, float16), and each linear is de-quantized by
GPTQModel's own code (dequantize_weight with its float16 scales widened to float32: exact), or,
where a kernel has no such method, by its forward applied to the identity matrix. Why not read
the model in memory right after quantize(): GPTQModel 7.6 keeps the zero-points there in the v1
layout its save writes (zero − 1), while its torch kernel decodes v2, so every code comes out one
step too high (SmolLM2 W4 g64: relative weight error 0.38–0.47 against RTN's 0.11, ppl 2.6e9).
The other tensors (norms and embeddings; AWQ folds its scales into the norms) come from the
quantized model in memory, where the peer changed them (write_dequantized keeps the float32
original of a tensor AWQ's bfloat16 run only cast).
Storage bits per weight: every buffer the quantized linears hold (qweight, qzeros, scales,
g_idx) at its dtype, over the weights they stand for.

    python bench/peers/gptqmodel_peer.py --peer gptqmodel-gptq --model smollm2-135m \
        --bits 4 --group 64 --samples 32 --seq-len 2048 --out DIR
"""
from __future__ import annotations

import dataclasses
import tempfile

from common import main, read_samples, worker_args, write_dequantized


def _config(method: str, bits: int, group: int, sym: bool):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    # offload_to_disk off: its default moves finished layers to disk and leaves meta tensors behind;
    # a 135M model fits in memory many times over
    common = dict(bits=bits, group_size=group, sym=sym, offload_to_disk=False)
    if method == "gptq":
        return QuantizeConfig(**common)
    if method == "awq":
        return QuantizeConfig(**common, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    raise ValueError(f"unknown GPTQModel method {method!r}")


def _dequantized_linear(module):
    """W [out, in] float32 of a loaded quantized linear: GPTQModel's own dequantize_weight with
    float32 scales (the stored float16 scales widen exactly), else forward(I) = I @ W^T + b."""
    import torch

    if hasattr(module, "dequantize_weight") and hasattr(module, "g_idx"):
        fp16_scales = module.scales
        module.scales = fp16_scales.float()
        try:
            return module.dequantize_weight().t().float().contiguous()    # [in, out] -> [out, in]
        finally:
            module.scales = fp16_scales
    eye = torch.eye(module.in_features, dtype=module.scales.dtype)
    out = module(eye)                               # [in, out]
    if getattr(module, "bias", None) is not None:
        out = out - module.bias.to(out.dtype)
    return out.T.float().contiguous()


def worker() -> None:
    a = worker_args(__doc__)
    import gptqmodel
    import torch
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    torch.manual_seed(0)
    config = _config(a.method, a.bits, a.group, a.sym)
    ids = read_samples(a.samples_file)                       # [N, L] int64
    calibration = [{"input_ids": row[None, :], "attention_mask": torch.ones_like(row)[None, :]} for row in ids]
    # its AWQ kernel (AwqTorchLinear) refuses to pack float32; of the two it takes, bfloat16 is the
    # one this CPU computes fast (avx512_bf16): one [2048, 576] @ [576, 1536] product on one thread
    # took 2.3 s in float16, 0.047 s in float32 and 0.015 s in bfloat16 (torch 2.13, 2026-12-01)
    dtype = torch.bfloat16 if a.method == "awq" else torch.float32
    model = GPTQModel.load(a.float_dir, config, device="cpu", dtype=dtype)
    backend = BACKEND.AWQ_TORCH if a.method == "awq" else BACKEND.AUTO
    model.quantize(calibration, batch_size=1, backend=backend, calibration_sort=None)

    stored, bits, weights, quantized = {}, 0, 0, 0
    for module in model.model.modules():
        if not isinstance(module, BaseQuantLinear):
            continue
        for key, buf in module.named_buffers(recurse=False):
            if key.startswith("wf_"):                # unpacking helper constants, not stored
                continue
            bits += buf.numel() * buf.element_size() * 8
            stored[key] = str(buf.dtype)
        weights += module.in_features * module.out_features
        quantized += 1
    if not weights:
        raise RuntimeError("GPTQModel left no quantized linear in the model")
    # norms and embeddings in float32 from memory; the linears from the saved checkpoint (docstring)
    # (in their own dtype: write_dequantized keeps the float original of a tensor only cast to bfloat16)
    tensors = {k: v.clone() for k, v in model.model.state_dict().items() if v.is_floating_point()}
    with tempfile.TemporaryDirectory(dir=a.out) as saved, torch.no_grad():
        model.save(saved)
        del model
        kernel = BACKEND.AWQ_TORCH if a.method == "awq" else BACKEND.TORCH
        loaded = GPTQModel.load(saved, device="cpu", backend=kernel, dtype=torch.float16).model.eval()
        reloaded = 0
        for name, module in loaded.named_modules():
            if isinstance(module, BaseQuantLinear):
                tensors[name + ".weight"] = _dequantized_linear(module)
                backend_name = type(module).__name__
                reloaded += 1
    if reloaded != quantized:
        raise RuntimeError(f"GPTQModel quantized {quantized} linears but its saved checkpoint loads {reloaded}")
    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name in ("damp_percent", "damp_auto_increment", "desc_act", "act_group_aware", "static_groups",
                            "mse", "true_sequential", "format", "method", "pack_dtype")}
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "GPTQModel", "tool_version": gptqmodel.__version__,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": a.method, "bits": a.bits, "group": a.group, "sym": a.sym,
        "hyperparameters": {k: str(v) if not isinstance(v, (int, float, bool, type(None))) else v
                            for k, v in params.items()},
        "kernel": backend_name, "quantized_linears": quantized,
        "bits_per_weight": bits / weights, "stored_tensors": stored, "calibration_windows": list(ids.shape)})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
