"""Peer: optimum-quanto 0.2.7 (Hugging Face's quantization backend; calibration-free).

`quantize(model, weights=qintB)` then `freeze(model)`, its defaults kept: asymmetric grid with a
float32 scale and a float32 shift per group, min/max (MaxOptimizer), 4-bit codes packed two per
byte. Only qint2, qint4 and qint8 exist (a 3-bit run fails, saying so). Its group size
cannot be asked for: each linear takes 128, or, when 128 does not divide the columns, the largest
of 96, 64, 32 that does (SmolLM2's 576 columns get 96, its MLP down projection 128), so a row sits
at the setting whose group is 128 and records the groups it used; a run asking for any other
group fails. Applied to the decoder layers' linears only, as lowbit's rows are.
Storage bits per weight: what its tensors hold (packed codes, scale and shift per group).

    python bench/peers/quanto_peer.py --model smollm2-135m --bits 4 --group 128 --out DIR
"""
from __future__ import annotations

from common import main, worker_args, write_dequantized


def _bits(t) -> int:
    """Storage bits of one of its tensors; a PackedTensor reports the unpacked shape, so count its storage."""
    inner = getattr(t, "_data", None)
    if inner is not None and inner is not t:
        return _bits(inner)
    return t.numel() * t.element_size() * 8


def worker() -> None:
    a = worker_args(__doc__)
    import torch
    import transformers
    from importlib.metadata import version
    from optimum.quanto import freeze, qint2, qint4, quantize

    qtype = {2: qint2, 4: qint4}.get(a.bits)
    if qtype is None:
        raise ValueError(f"optimum-quanto has no {a.bits}-bit integer weight type (qint2, qint4, qint8 only)")
    if a.group != 128:
        raise ValueError(f"optimum-quanto chooses its own group size (128, or 96/64/32 where 128 does not divide "
                         f"the columns); group {a.group} cannot be asked for")
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32)
    quantize(model.model.layers, weights=qtype)
    freeze(model.model.layers)
    tensors, stored, groups, bits, weights, quantized = {}, {}, {}, 0, 0, 0
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            w = getattr(module, "weight", None)
            if w is None or not hasattr(w, "dequantize") or w.dim() != 2:
                continue
            tensors[f"model.layers.{name}.weight"] = w.dequantize().float()     # [out, in], what QLinear multiplies by
            for key in ("_data", "_scale", "_shift"):
                t = getattr(w, key)
                bits += _bits(t)
                stored[key] = str(t.dtype)
            group = w.shape[1] if w._group_size is None else w._group_size
            groups[str(group)] = groups.get(str(group), 0) + 1
            weights += w.shape[0] * w.shape[1]
            quantized += 1
    write_dequantized(a.float_dir, tensors, a.out, {
        "tool": "optimum-quanto", "tool_version": version("optimum-quanto"),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "method": f"qint{a.bits}", "bits": a.bits, "group": a.group, "sym": False,
        "note": "asymmetric (float scale and shift); group size its own choice, see groups_used",
        "groups_used": groups, "hyperparameters": {"weights": str(qtype), "optimizer": "MaxOptimizer (default)"},
        "quantized_linears": quantized, "bits_per_weight": bits / weights, "stored_tensors": stored,
        "calibration_windows": None})


if __name__ == "__main__":
    main(__file__, __doc__, worker)
