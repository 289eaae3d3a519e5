"""W8A8 peer rows (issue 24): four tools' int8-weight, int8-activation quantization, scored by lowbit.

Convention — why this differs from the weight-only peers (common.py): W8A8 quantizes activations
at run time inside the tool's own modules, so a de-quantized weight directory cannot carry it.
Instead the worker, inside the peer's virtual environment, keeps the tool's in-memory quantized
model and scores it with lowbit's OWN evaluation code (`lowbit.eval.perplexity.evaluate_many`,
imported from this checkout; it needs only torch and tqdm there). To keep every row comparable
with lowbit's rows:
  same tokens      the evaluation ids are tokenized by lowbit in lowbit's environment (exactly as
                   common.evaluate_results does) and handed to the worker as a safetensors file;
  same reference   the KLD reference is the float model of common.float_dir, float32, loaded in
                   the worker; the float model is also scored in the same pass (free: evaluate_many
                   reuses the reference's logits) and recorded as float_ppl_worker, which must equal
                   `lowbit eval MODEL` — a check that the peer's transformers runs the model alike;
  same calibration lowbit's own windows of WikiText-2 *valid* (common.CALIB_TEXT), never the
                   evaluation text; only the tools with static parts use them (llm-compressor's
                   SmoothQuant + GPTQ, quanto's activation scales).
The tools (w8a8_tools.py): llm-compressor SmoothQuant + GPTQ W8A8 (its example recipe; plus a
control row without SmoothQuant: its mapping for Gemma 3 smooths the wrong norm), torchao
Int8DynamicActivationInt8WeightConfig, bitsandbytes LLM.int8() (Linear8bitLt, threshold 6.0),
optimum-quanto qint8/qint8. Each row records `checks`: one real linear's output compared with the
same quantized weights and float activations, and with our own re-statement of the tool's
activation quantizer, so "it quantizes activations" is a measured statement.

    python bench/peers/w8a8_peers.py --model smollm2-135m [--peer NAME ...] [--windows 20]

Writes bench/results/peers/w8a8/<peer>_<model>.json; a peer that fails gets a row with "error".
Worker logs: bench/peers/logs/w8a8_<peer>_<model>.log (ignored by git). Memory: a Gemma 3 worker
peaks near 10 GB (two float copies plus [2047, 262144] logits per model per window); run one at a time.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, LLMC, QUANTO, REPO, RESULTS, TORCHAO, BITSANDBYTES, _venv_module, \
    failure_reason, float_dir, run_worker, write_samples

HERE = Path(__file__).resolve().parent
OUT = RESULTS / "w8a8"
LOGS = HERE / "logs"
CACHE = Path.home() / ".cache/lowbit/bench/peers"
# peer name -> (environment, requirements): the weight-only peers' environments, same pins
ENVS = {"llmcompressor-w8a8": ("llmcompressor", LLMC), "llmcompressor-w8a8-nosmooth": ("llmcompressor", LLMC),
        "torchao-w8a8": ("torchao", TORCHAO),
        "bitsandbytes-int8": ("bitsandbytes", BITSANDBYTES), "quanto-w8a8": ("quanto", QUANTO)}
CHECK_MODULE = "model.layers.1.mlp.down_proj"      # the widest input, where activation outliers live


# ---------------------------------------------------------------- driver (lowbit's environment)

def eval_ids(model: str) -> Path:
    """lowbit's evaluation token ids of EVAL_TEXT for `model`, [T] int64 in safetensors "input_ids"."""
    import hashlib

    digest = hashlib.sha256(EVAL_TEXT.read_bytes()).hexdigest()[:16]
    path = CACHE / model / f"eval-ids-{digest}.safetensors"
    if not path.exists():
        sys.path.insert(0, str(REPO))
        from safetensors.torch import save_file

        from lowbit.data.text import read_text
        from lowbit.eval.perplexity import tokenize
        from lowbit.models.load import load

        ids = tokenize(load(model).tokenizer, read_text(EVAL_TEXT).text)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.contiguous()}, str(path))
    return path


def run(peer: str, model: str, a) -> dict:
    venv, requirements = ENVS[peer]
    from w8a8_tools import TOOLS

    row = {"peer": peer, "tool": TOOLS[peer].tool, "requirements": list(requirements), "model": model, "act_bits": 8,
           "eval": {"text": str(EVAL_TEXT), "ctx": a.ctx, "windows": a.windows, "kld_ref": f"{model} (float32)"}}
    out = Path(a.out_dir) / f"{peer}_{model}.json"
    try:
        python = _venv_module().ensure_venv(venv, list(requirements))
        samples = CACHE / model / f"calib-{a.samples}x{a.seq_len}-seed{a.seed}.safetensors"
        if not samples.exists():
            write_samples(model, a.samples, a.seq_len, a.seed, samples)
        row["calibration"] = {"text": str(CALIB_TEXT), "samples": a.samples, "seq_len": a.seq_len, "seed": a.seed,
                              "file": str(samples)}
        source = float_dir(model)
        log = LOGS / f"w8a8_{peer}_{model}.log"
        row.update(run_worker(python, Path(__file__), [
            "--peer", peer, "--model-name", model, "--float-dir", str(source), "--samples-file", str(samples),
            "--eval-ids", str(eval_ids(model)), "--ctx", str(a.ctx), "--windows", str(a.windows)],
            Path(a.out_dir) / f".{peer}_{model}.worker.json", a.threads, log))
        row.update(float_dir=str(source), log=str(log.relative_to(REPO)))
        if row.get("calibration_used") is False:
            row["calibration"] = None
    except Exception as e:  # a peer that cannot run is a row saying why, not a gap
        row["error"] = failure_reason(e)
        row["error_log_tail"] = str(e)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    return row


def driver() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="lowbit model name (repeatable; default smollm2-135m)")
    p.add_argument("--peer", action="append", choices=list(ENVS), help="repeatable; default all")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the worker (default 2)")
    p.add_argument("--out-dir", default=str(OUT), help=f"default {OUT.relative_to(REPO)}")
    a = p.parse_args()
    for model in a.model or ["smollm2-135m"]:
        for peer in a.peer or list(ENVS):
            row = run(peer, model, a)
            shown = {k: row.get(k) for k in ("peer", "model", "ppl", "kld", "weight_bits", "quantize_seconds",
                                             "float_ppl_worker", "error") if k in row}
            print(json.dumps(shown), flush=True)


# ---------------------------------------------------------------- worker (inside the peer's environment)

def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def activation_check(tool, model, name: str, window) -> dict:
    """One decoder linear, its real input from a calibration window: the tool's output against
    (a) its quantized weights with float activations and (b) our re-statement of its quantizer."""
    import torch

    module = model.get_submodule(name)
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]), prepend=True)
    with torch.no_grad():
        model.model(input_ids=window)
    hook.remove()
    x = seen["x"]
    x = x.dequantize() if hasattr(x, "dequantize") else x
    with torch.no_grad():
        y = module(x)
        y = y.dequantize() if hasattr(y, "dequantize") else y
        W = tool.weight(module)
        y_w = torch.nn.functional.linear(x, W, module.bias)
        y_sim = tool.simulate(module, x, W)
        check = {"module": name, "input": "its real input on calibration window 0",
                 "module_class": type(module).__name__,
                 "rel_diff_vs_float_activations": _rel(y, y_w),
                 "rel_diff_vs_simulated_quantizer": _rel(y, y_sim)}
        if hasattr(tool, "extra_check"):
            check.update(tool.extra_check(module, x))
    check["activations_quantized"] = check["rel_diff_vs_float_activations"] > 10 * check["rel_diff_vs_simulated_quantizer"]
    return check


def worker() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--peer", "--model-name", "--float-dir", "--samples-file", "--eval-ids", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--windows", type=int, required=True)
    a = p.parse_args()
    sys.path.append(str(REPO))                         # lowbit's evaluation code, nothing else of lowbit
    import torch
    import transformers
    from safetensors.torch import load_file

    from lowbit.eval.perplexity import evaluate_many
    from w8a8_tools import TOOLS, LlmCompressor, Quanto, decoder_linears

    torch.manual_seed(0)
    tool = TOOLS[a.peer]()
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32).eval()
    reference, model = load(), load()
    samples = load_file(a.samples_file)["input_ids"]
    ids = load_file(a.eval_ids)["input_ids"]
    names = decoder_linears(model)

    start, cpu = time.perf_counter(), time.process_time()
    info = tool.quantize(model, samples, reference)
    quantize_seconds, quantize_cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_quantized = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    check = activation_check(tool, model, CHECK_MODULE, samples[:1])
    checks = {"activation_quantization": check}
    if hasattr(tool, "model_checks"):
        checks.update(tool.model_checks(model, load, samples, reference))
    print("checks:", json.dumps(checks), flush=True)
    if a.peer == "bitsandbytes-int8":                 # its per-call float16-cast warning, once is enough
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    res = evaluate_many({"quantized": model, "float": reference}, ids, a.ctx, a.windows, reference=reference,
                        reference_name=f"{a.model_name} float32")
    q, fp = res["quantized"], res["float"]
    bits, stored = tool.stored_bits(model, names)
    versions = {"torch": torch.__version__, **info.pop("versions", {})}
    row = {"tool": tool.tool, **info, "versions": versions,
           "ppl": q.ppl, "kld": q.kld.mean, "kld_p99": q.kld.p99, "top1_changed": q.kld.top1_changed,
           "eval_tokens": q.tokens, "eval_windows": q.windows, "eval_seconds": q.seconds,
           "float_ppl_worker": fp.ppl, "convention": q.convention,
           "weight_bits": bits, "stored_tensors": stored, "act_bits": 8,
           "activation_granularity": tool.act_granularity, "weight_granularity": tool.weight_granularity,
           "quantized_linears": len(names), "lm_head": "float (not quantized)",
           "quantize_seconds": quantize_seconds, "quantize_cpu_seconds": quantize_cpu,
           "peak_rss_after_quantize_mib": rss_quantized,
           "calibration_used": isinstance(tool, (LlmCompressor, Quanto)),
           "checks": checks}
    Path(a.out).write_text(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        driver()
