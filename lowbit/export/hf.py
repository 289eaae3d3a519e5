"""`--format hf`: a plain float Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

SRC is any model argument. A GGUF (or a model name) gives its de-quantized float weights; a lowbit
quantized directory gives its de-quantized weights W_dq (each QuantLinear becomes an nn.Linear
holding exactly the weight lowbit computes with); an HF directory is re-written. The tokenizer is
lowbit's (built from the GGUF's own vocabulary), and generation_config.json comes from the config.
`--dtype` (float32 by default: W_dq exact) casts every floating tensor.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .registry import ExportReport, Flag, Target

DTYPES = ("float32", "bfloat16", "float16")


def dequantized_linears(model) -> int:
    """Replace every QuantLinear of `model` by an nn.Linear holding its W_dq; returns how many."""
    import torch

    from ..nn.qlinear import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = model.get_submodule(name)
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(q.W_dq.clone(), requires_grad=False)
        if q.bias is not None:
            linear.bias = torch.nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, linear)
    return len(names)


def write(src: str, out: Path, options: Mapping[str, object]) -> ExportReport:
    import torch
    from transformers import GenerationConfig

    from ..models.load import load

    loaded = load(src)
    model = loaded.model
    n_dequantized = dequantized_linears(model)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    dtype = getattr(torch, str(options["dtype"]))
    model = model.to(dtype)
    if model.generation_config is None:           # save_pretrained then writes generation_config.json
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    notes = (f"{n_dequantized} quantized linears written as their de-quantized weights",) if n_dequantized else ()
    return ExportReport({"source kind": loaded.source.kind, "dtype": options["dtype"],
                         "parameters": sum(p.numel() for p in model.parameters())}, notes)


TARGET = Target(
    name="hf",
    summary="plain float Hugging Face directory (transformers from_pretrained), from any model argument; "
            "a lowbit directory gives its de-quantized weights",
    source="model",
    write=write,
    flags=(Flag("--dtype", "float32", {"choices": DTYPES,
                                       "help": "hf: dtype of the written tensors (default: float32, exact W_dq)"}),),
)
