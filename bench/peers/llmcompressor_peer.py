"""Peer: llm-compressor 0.14.0.1 (vLLM project; compressed-tensors 0.19, transformers 5.17).

Methods, each with the library's own defaults (weight-only, integer, symmetric unless --asym,
group size --group along the input dimension, lm_head / tied embedding left float):
  gptq  GPTQModifier: dampening_frac 0.01, block_size 128, actorder "static" (its default: columns
        processed in activation order, groups kept contiguous, so no g_idx is stored)
  awq   AWQModifier (duo_scaling True, n_grid 20, the built-in Llama mappings; no clip search)
        followed by QuantizationModifier (min/max observer) — the library's two-step AWQ recipe.
        Slow on a CPU: each of the 20 grid points re-runs the mapping's parent module (the whole
        attention block for q/k/v) on every calibration token; 8 x 2048 windows of SmolLM2 took
        3757 s on one thread, 32 x 2048 (4x the tokens) would take about four hours (result file
        bench/results/peers/llmcompressor-awq_smollm2-135m_w4g64.json)
  rtn   QuantizationModifier alone: min/max scales, round to nearest, no calibration data
Calibration: lowbit's own token windows, passed as a pre-tokenized dataset in their order.
Storage bits per weight are counted from the compressed checkpoint llm-compressor itself saves
(pack-quantized: codes packed in int32, scales in the model's dtype — float32 here since the
model is quantized in float32 —, zero-points only when asymmetric, a weight_shape per linear).

    python bench/peers/llmcompressor_peer.py --peer llmcompressor-gptq --model smollm2-135m \
        --bits 4 --group 64 --samples 32 --seq-len 2048 --out DIR
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import main, read_samples, worker_args, write_dequantized


def _cpu_pin_memory_patch() -> None:
    """AWQ pins its cached activations for faster host-to-GPU copies; pinning needs an accelerator,
    so on a CPU-only machine it raises. Pinning only affects copy speed: make it a no-op here."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _recipe(method: str, scheme):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    quant = dict(config_groups={"group_0": scheme}, ignore=["lm_head"])
    if method == "gptq":
        return [GPTQModifier(**quant)]
    if method == "rtn":
        return [QuantizationModifier(**quant)]
    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(**quant)]
    raise ValueError(f"unknown llm-compressor method {method!r}")


def _stored_bits(model, quantized: list[str]) -> tuple[float, dict]:
    """Bits per weight of the quantized linears in llm-compressor's own compressed checkpoint.
    Saving compresses the model in place (its float weights go): call this last."""
    from safetensors import safe_open

    weights = sum(model.get_submodule(n).weight.numel() for n in quantized)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        bits, kinds = 0, {}
        for file in Path(tmp).glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    prefix, _, leaf = key.rpartition(".")
                    if prefix in quantized:
                        t = f.get_tensor(key)
                        bits += t.numel() * t.element_size() * 8
                        kinds[leaf] = str(t.dtype)
    return bits / weights, kinds


def worker() -> None:
    a = worker_args(__doc__)
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot

    torch.manual_seed(0)
    _cpu_pin_memory_patch()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.float_dir)
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, strategy="group", group_size=a.group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = _recipe(a.method, scheme)
    ids = read_samples(a.samples_file)                        # [N, L] int64
    data = None
    if a.method != "rtn":
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            pipeline="sequential" if data is not None else "datafree")

    # de-quantize every quantized linear from its own codes: weight through its stored grid
    tensors, quantized = {}, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale") and getattr(module, "quantization_scheme", None) is not None:
                zero = getattr(module, "weight_zero_point", None)
                tensors[name + ".weight"] = fake_quantize(module.weight, module.weight_scale, zero,
                                                          module.quantization_scheme.weights)
                quantized.append(name)
        tensors.update({k: v for k, v in model.state_dict().items() if k not in tensors and "weight_" not in k})
    bits, stored = _stored_bits(model, quantized)
    shown = ("dampening_frac", "block_size", "actorder", "duo_scaling", "n_grid", "ignore")
    modifiers = [json.loads(json.dumps({"name": type(m).__name__, **{k: v for k, v in m.model_dump().items()
                                                                    if k in shown}}, default=str)) for m in recipe]
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "llm-compressor", "tool_version": llmcompressor.__version__,
        "versions": {"compressed-tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "method": a.method, "bits": a.bits, "group": a.group, "sym": a.sym, "hyperparameters": modifiers,
        "quantized_linears": len(quantized), "bits_per_weight": bits, "stored_tensors": stored,
        "calibration_windows": list(ids.shape) if data is not None else None})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
