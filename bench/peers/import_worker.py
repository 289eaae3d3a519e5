"""The tool side of bench/import_to_gguf.py: runs a peer's recipe in the peer's own environment
(imported from bench/peers/*_peer.py) and keeps what the peer scripts throw away: the saved
checkpoint, and the tool's own de-quantized weights to compare lowbit's import against.

    <venv python> bench/peers/import_worker.py --worker llmcompressor|gptqmodel --method M ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent      # bench/
PEERS_DIR = HERE / "peers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")



def _worker_llmcompressor(a, ckpt: Path) -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor_peer import _cpu_pin_memory_patch, _recipe
    from safetensors.torch import load_file

    torch.manual_seed(0)
    _cpu_pin_memory_patch()
    dtype = getattr(torch, a.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.float_dir)
    args = QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group", group_size=a.group)
    recipe = _recipe(a.method, QuantizationScheme(targets=["Linear"], weights=args))
    data, windows = None, None
    if a.method != "rtn":
        from common import read_samples
        from datasets import Dataset

        ids = read_samples(a.samples_file)
        windows = list(ids.shape)
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=windows[0] if windows else 1, max_seq_length=windows[1] if windows else 2048,
            shuffle_calibration_samples=False, pipeline="sequential" if data is not None else "datafree")
    seconds = time.perf_counter() - start
    view, names = {}, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale") and getattr(module, "quantization_scheme", None) is not None:
                zero = getattr(module, "weight_zero_point", None)
                # the tool's own de-quantization, in the model's dtype
                view["W." + name] = fake_quantize(module.weight, module.weight_scale, zero,
                                                  module.quantization_scheme.weights).float().contiguous()
                names.append(name)
    model.save_pretrained(str(ckpt), save_compressed=True)
    tokenizer.save_pretrained(str(ckpt))
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    for name in names:
        shape = torch.Size(tensors[name + ".weight_shape"].tolist())
        view["codes." + name] = unpack_from_int32(tensors[name + ".weight_packed"], a.bits, shape).to(torch.int8)
    shown = ("ignore",)
    return {"tool": "llm-compressor", "tool_version": llmcompressor.__version__,
            "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "recipe": [{"name": type(m).__name__, **{k: v for k, v in m.model_dump().items() if k in shown}}
                       for m in recipe],
            "quantize_seconds": seconds, "calibration_windows": windows, "quantized_linears": len(names),
            "tool_dequantization": "compressed_tensors fake_quantize on the quantized model, in " + a.dtype,
            "tool_codes": "compressed_tensors unpack_from_int32 of the saved weight_packed"}, view


def _worker_gptqmodel(a, ckpt: Path) -> dict:
    import dataclasses

    import gptqmodel
    import torch
    import transformers
    from common import read_samples
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel_peer import _config, _dequantized_linear

    torch.manual_seed(0)
    config = _config(a.method, a.bits, a.group, True)
    ids = read_samples(a.samples_file)
    calibration = [{"input_ids": row[None, :], "attention_mask": torch.ones_like(row)[None, :]} for row in ids]
    model = GPTQModel.load(a.float_dir, config, device="cpu", dtype=getattr(torch, a.dtype))
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1, backend=BACKEND.AUTO, calibration_sort=None)
    seconds = time.perf_counter() - start
    model.save(str(ckpt))
    del model
    view, kernel = {}, None
    with torch.no_grad():
        loaded = GPTQModel.load(str(ckpt), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
        for name, module in loaded.named_modules():
            if isinstance(module, BaseQuantLinear):
                view["W." + name] = _dequantized_linear(module)
                kernel = type(module).__name__
    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name in ("damp_percent", "damp_auto_increment", "desc_act", "act_group_aware", "static_groups",
                            "mse", "true_sequential", "format", "method", "pack_dtype")}
    return {"tool": "GPTQModel", "tool_version": gptqmodel.__version__,
            "versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "hyperparameters": {k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                                for k, v in params.items()},
            "quantize_seconds": seconds, "calibration_windows": list(ids.shape), "quantized_linears": len(view),
            "tool_dequantization": f"GPTQModel dequantize_weight of the reloaded checkpoint ({kernel}), "
                                   "float16 scales widened to float32"}, view


def worker() -> None:
    import importlib.util

    sys.modules["lowbit"] = None                     # the tool's side never reaches lowbit
    # bench/ (this script's folder, first on sys.path) has a common.py of its own: the peer scripts'
    # `from common import ...` must get bench/peers/common.py; bench/peers goes after the standard
    # library (its venv.py would shadow the standard library's)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HERE, PEERS_DIR)]
    sys.path.append(str(PEERS_DIR))
    spec = importlib.util.spec_from_file_location("common", PEERS_DIR / "common.py")
    sys.modules["common"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["common"])
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=("llmcompressor", "gptqmodel"))
    for flag in ("--method", "--float-dir", "--samples-file", "--dtype", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group", type=int, required=True)
    a = p.parse_args()
    import shutil

    from safetensors.torch import save_file

    out = Path(a.out)
    ckpt = out / "ckpt"
    run = _worker_llmcompressor if a.worker == "llmcompressor" else _worker_gptqmodel
    record, view = run(a, ckpt)
    for name in TOKENIZER_FILES:                     # whatever the tool's save left out
        if (Path(a.float_dir) / name).is_file() and not (ckpt / name).exists():
            shutil.copy2(Path(a.float_dir) / name, ckpt / name)
    save_file(view, str(out / "tool_view.safetensors"))
    record.update(method=a.method, bits=a.bits, group=a.group, sym=True, dtype=a.dtype)
    (out / "tool.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    worker()
