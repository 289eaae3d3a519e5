"""Load an exported checkpoint with another engine, with lowbit made unimportable, and report.

    python -I peer_run.py ENGINE CHECKPOINT REQUEST.pt RESULT.pt

ENGINE: "transformers" (AutoModelForCausalLM, float32; compressed-tensors checkpoints go through
transformers' compressed-tensors integration) or "gptqmodel" (GPTQModel, torch kernel on CPU,
float16: its CPU kernels take no float32). REQUEST holds {"ids": [n, T] int64, "mode": "logits"
or "nll" or "probe"}. RESULT gets "logits" [n, T, V] (mode logits) or "window_nll" (mean NLL of each row's
T−1 next-token predictions, mode nll) or, mode probe (after one forward of "ids"), the request's
"linear"'s output "y" for the request's "x" and that linear's float "weight" and, for gptqmodel, "weights": every quantized linear
de-quantized by GPTQModel's own code with its scales in float32, [out, in].
"""
import sys

sys.modules["lowbit"] = None          # set first: nothing below may reach lowbit

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), {}


def load_gptqmodel(path):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            fp16_scales = module.scales
            module.scales = fp16_scales.float()          # exact: the stored scales are float16
            weights[name] = module.dequantize_weight().t().float().contiguous()   # [in, out] -> [out, in]
            module.scales = fp16_scales
    return model, weights


def main() -> None:
    engine, path, request_file, result_file = sys.argv[1:5]
    request = torch.load(request_file)
    model, weights = {"transformers": load_transformers, "gptqmodel": load_gptqmodel}[engine](path)
    result = {"weights": weights}
    with torch.inference_mode():
        if request["mode"] == "logits":
            result["logits"] = model(input_ids=request["ids"]).logits.float()
        elif request["mode"] == "probe":
            model(input_ids=request["ids"])               # compressed checkpoints decompress on a first forward
            linear = model.get_submodule(request["linear"])
            result["y"] = linear(request["x"]).float()
            result["weight"] = linear.weight.float()
        else:
            result["window_nll"] = []
            for window in request["ids"]:
                logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
                result["window_nll"].append(F.cross_entropy(logits, window[1:], reduction="mean").item())
    torch.save(result, result_file)


if __name__ == "__main__":
    main()
