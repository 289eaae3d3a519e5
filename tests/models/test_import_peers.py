"""Checkpoints written by the tools themselves, in their own environments (slow): GPTQModel 7.6.0
(GPTQ sym/asym, AWQ gemm) and llm-compressor 0.14.0.1 (GPTQ sym/asym, 3-bit) on a tiny Llama import
into lowbit to the tools' own de-quantized weights."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from support import REPO

from lowbit.models.load import load
from models.test_import import _linears, tiny128_dir  # noqa: F401  (a fixture, used by name)

# --- checkpoints the tools write themselves (their own environments) ------------------------------

PEER_WORKER = r'''
import glob, sys
sys.modules["lowbit"] = None
import torch
tool, float_dir, out, bits, group, sym, method = sys.argv[1:8]
bits, group, sym = int(bits), int(group), sym == "sym"
torch.manual_seed(0)
ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
view = {"codes": {}, "weights": {}}
if tool == "gptqmodel":
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    common = dict(bits=bits, group_size=group, sym=sym, offload_to_disk=False)
    if method == "awq":
        from gptqmodel.quantization import FORMAT, METHOD
        cfg = QuantizeConfig(**common, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
        dtype, backend, kernel = torch.bfloat16, BACKEND.AWQ_TORCH, BACKEND.AWQ_TORCH
    else:
        cfg, dtype, backend, kernel = QuantizeConfig(**common), torch.float32, BACKEND.AUTO, BACKEND.TORCH
    model = GPTQModel.load(float_dir, cfg, device="cpu", dtype=dtype)
    model.quantize([{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in ids],
                   batch_size=1, backend=backend, calibration_sort=None)
    model.save(out)
    loaded = GPTQModel.load(out, device="cpu", backend=kernel, dtype=torch.float16).model.eval()
    for name, m in loaded.named_modules():
        if not isinstance(m, BaseQuantLinear):
            continue
        if hasattr(m, "dequantize_weight") and hasattr(m, "g_idx"):   # GPTQ: float32 scales, exact
            s16 = m.scales
            m.scales = s16.float()
            view["weights"][name] = m.dequantize_weight().t().float().contiguous()
            m.scales = s16
        else:                                                          # AWQ: its forward on the identity
            with torch.no_grad():
                y = m(torch.eye(m.in_features, dtype=m.scales.dtype))
                if getattr(m, "bias", None) is not None:
                    y = y - m.bias.to(y.dtype)
            view["weights"][name] = y.t().float().contiguous()
else:
    import transformers
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    tok = transformers.AutoTokenizer.from_pretrained(float_dir)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=[GPTQModifier(config_groups={"group_0": scheme},
            ignore=["lm_head"])], num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, pipeline="sequential")
    for name, m in model.named_modules():
        if hasattr(m, "weight_scale") and getattr(m, "quantization_scheme", None) is not None:
            view["weights"][name] = m.weight.detach().float().clone()      # its de-quantized (bf16) weight
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    tensors = {}
    for f in glob.glob(out + "/*.safetensors"):
        tensors.update(load_file(f))
    for name in view["weights"]:
        shape = torch.Size(tensors[name + ".weight_shape"].tolist())
        view["codes"][name] = unpack_from_int32(tensors[name + ".weight_packed"], bits, shape)   # its unpacking
torch.save(view, out + "/peer_view.pt")
'''

PEER_ENVS = {"gptqmodel": ["gptqmodel==7.6.0"], "llmcompressor": ["llmcompressor==0.14.0.1"]}


def _peer_python(name: str) -> Path:
    spec = importlib.util.spec_from_file_location("peers_venv_import", REPO / "bench" / "peers" / "venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.ensure_venv(name, PEER_ENVS[name])
    except Exception as e:
        pytest.skip(f"{name} environment could not be created: {type(e).__name__}: {e}")


def _peer_checkpoint(tool: str, float_dir: Path, out: Path, bits: int, group: int, sym: bool, method: str = "gptq"):
    python = _peer_python(tool)
    script = out.parent / "peer_worker.py"
    script.write_text(PEER_WORKER)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), "-I", str(script), tool, str(float_dir), str(out), str(bits), str(group),
                           "sym" if sym else "asym", method], capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, f"{tool} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return torch.load(out / "peer_view.pt")


@pytest.mark.slow
@pytest.mark.parametrize("sym", [True, False])
def test_gptqmodel_gptq_checkpoint_imports_to_its_weights(tiny128_dir, tmp_path, sym):
    view = _peer_checkpoint("gptqmodel", tiny128_dir, tmp_path / "ckpt", 4, 32, sym)
    got = _linears(load(str(tmp_path / "ckpt")).model)
    assert set(got) == set(view["weights"]) and len(got) == 14
    for name, W in view["weights"].items():          # GPTQModel's dequantize_weight, float32 scales: exact
        assert got[name].fmt.name == ("int4-g32-sym-half" if sym else "int4-g32-asym"), got[name].fmt.name
        assert torch.equal(got[name].W_dq, W), name


@pytest.mark.slow
def test_gptqmodel_awq_gemm_checkpoint_imports_to_its_weights(tiny128_dir, tmp_path):
    view = _peer_checkpoint("gptqmodel", tiny128_dir, tmp_path / "ckpt", 4, 32, False, "awq")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    got = _linears(load(str(tmp_path / "ckpt")).model)
    assert set(got) == set(view["weights"]) and len(got) == 14
    for name, W in view["weights"].items():          # its float16 kernel: within float16 rounding
        assert got[name].fmt.name == "int4-g32-asym"
        assert torch.allclose(got[name].W_dq, W, rtol=2**-10, atol=0), (name, (got[name].W_dq - W).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True)])
def test_llmcompressor_checkpoint_imports_its_codes(tiny128_dir, tmp_path, bits, sym):
    view = _peer_checkpoint("llmcompressor", tiny128_dir, tmp_path / "ckpt", bits, 32, sym)
    got = _linears(load(str(tmp_path / "ckpt")).model)
    assert set(got) == set(view["codes"]) and len(got) == 14
    for name, codes in view["codes"].items():        # compressed-tensors' own unpacking of the same file
        assert torch.equal(got[name].codes.to(torch.int16), codes.to(torch.int16) + (1 << (bits - 1))), name
        # its de-quantized weight is computed in bfloat16: lowbit's exact float32 W_dq rounded to bfloat16
        assert torch.equal(got[name].W_dq.to(torch.bfloat16).float(), view["weights"][name]), name
