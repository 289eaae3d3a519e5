"""Rotation peer rows (issue 25): llm-compressor's SpinQuantModifier / QuIPModifier + GPTQ, scored by lowbit.

The W8A8 peers' convention (w8a8_peers.py), for the same reason: the online Hadamards (SpinQuant's R4
before down_proj, QuIP's input rotation on every linear) and the W4A4 activation quantization run
inside the tool's modules at run time, so a de-quantized weight directory cannot carry them. The
worker, in the llmcompressor environment, keeps the tool's in-memory model and scores it with
lowbit's own evaluate_many: lowbit's evaluation tokens (handed over as a file), the float model of
common.float_dir as KLD reference (its ppl recorded as float_ppl_worker), lowbit's calibration
windows of WikiText-2 valid (the shared calibration sample file of the W8A8 peers).

Peers (rotation_tools.PEERS; recipes recorded in each row):
  llmcompressor-spinquant-w4a4       its spinquant example's SpinQuantModifier (R1 R2 R4, hadamard, block 64),
                                     then GPTQ int4 per-channel weights, int4 per-token dynamic activations
  llmcompressor-spinquant-w4a4-full  the same with full-size random-hadamard (no blocks, like QuaRot / lowbit)
  llmcompressor-spinquant-w4a16      example SpinQuantModifier, GPTQ int4 g128 weight-only
  llmcompressor-quip-w4a16 / -w3 / -w2   QuIPModifier() (input rotations, random-hadamard), GPTQ int4 g128 /
                                     int3 g64 / int2 g64 weight-only
Checks in each row: `rotation_identity` (the rotation modifier alone must leave the float model's
function unchanged, up to its embedding centering, which under RMSNorm is not an identity and is
measured apart; done first: beyond rotation_tools.EXACT_LIMIT the row is an error, nothing quantized),
`online_rotation` on layer 1's down_proj (the tool's output against our own re-statement of its
online Hadamard + activation quantizer, and against the same weights without the rotation), and
`qdq_switch`. A failed check makes the row an error with its measured numbers under "unverified".

    python bench/peers/rotation_peers.py --model smollm2-135m [--peer NAME ...] [--windows 20] [--group 64]

Writes bench/results/peers/rotations/<peer>_<model>.json (a weight-only peer: <peer>_<model>_g<G>.json with --group);
a peer that fails gets a row with "error". Logs: bench/peers/logs/rotations_<peer>_<model>.log.
--smoke builds tiny random models (tiny-llama-h128, tiny-llama-h96, tiny-gemma3-h128) and random tokens instead.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from common import CALIB_TEXT, EVAL_TEXT, LLMC, REPO, RESULTS, _venv_module, failure_reason, float_dir, \
    run_worker, write_samples
from rotation_tools import PEERS
from w8a8_peers import CACHE, eval_ids

HERE = Path(__file__).resolve().parent
OUT = RESULTS / "rotations"
LOGS = HERE / "logs"
CHECK_MODULE = "model.layers.1.mlp.down_proj"       # SpinQuant's R4 and QuIP's input rotation both act here
SMOKE = {"tiny-llama-h128": ("Llama", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                           num_key_value_heads=2)),
         "tiny-llama-h96": ("Llama", dict(hidden_size=96, intermediate_size=192, num_attention_heads=3,
                                         num_key_value_heads=1)),
         "tiny-gemma3-h128": ("Gemma3", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                             num_key_value_heads=1, sliding_window=32))}


# ---------------------------------------------------------------- driver (lowbit's environment)

def smoke_inputs(model: str, a) -> tuple[Path, Path, Path]:
    """A tiny random Llama or Gemma 3 (random norm weights, tied head and tokenizer as SmolLM2) and random tokens."""
    import torch
    import transformers
    from safetensors.torch import save_file

    root = CACHE / "smoke" / model
    if not (root / "config.json").exists():
        torch.manual_seed(0)
        arch, sizes = SMOKE[model]
        config = getattr(transformers, "Gemma3TextConfig" if arch == "Gemma3" else f"{arch}Config")(
            vocab_size=49152, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=2048,
            **sizes)
        m = getattr(transformers, f"{arch}ForCausalLM")(config)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_((0 if arch == "Gemma3" else 1) + 0.2 * torch.randn_like(p))
        m.save_pretrained(root)
        tokenizer = float_dir("smollm2-135m")      # oneshot wants a processor even for token ids: SmolLM2's
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer / file).is_file():
                shutil.copy2(tokenizer / file, root / file)
        g = torch.Generator().manual_seed(1)
        for file, shape in (("calib", (a.samples, a.seq_len)), ("eval", (a.ctx * a.windows + 1,))):
            save_file({"input_ids": torch.randint(0, 1024, shape, generator=g)}, str(root / f"{file}.safetensors"))
    return root, root / "calib.safetensors", root / "eval.safetensors"


def run(peer: str, model: str, a) -> dict:
    row = {"peer": peer, "tool": "llm-compressor", "requirements": list(LLMC), "model": model,
           "eval": {"text": "random tokens (smoke)" if a.smoke else str(EVAL_TEXT), "ctx": a.ctx, "windows": a.windows,
                    "kld_ref": f"{model} (float32)"}}
    suffix = f"_g{a.group}" if a.group and PEERS[peer][4] else ""        # only the grouped (weight-only) peers
    out = Path(a.out_dir) / f"{peer}_{model}{suffix}.json"
    try:
        python = _venv_module().ensure_venv("llmcompressor", list(LLMC))
        if a.smoke:
            source, samples, ids = smoke_inputs(model, a)
        else:
            source, ids = float_dir(model), eval_ids(model)
            samples = CACHE / model / f"calib-{a.samples}x{a.seq_len}-seed{a.seed}.safetensors"
            if not samples.exists():
                write_samples(model, a.samples, a.seq_len, a.seed, samples)
        row["calibration"] = {"text": "random tokens (smoke)" if a.smoke else str(CALIB_TEXT), "samples": a.samples,
                              "seq_len": a.seq_len, "seed": a.seed, "file": str(samples)}
        log = LOGS / f"rotations_{peer}_{model}{suffix}.log"
        row.update(run_worker(python, Path(__file__), [
            "--peer", peer, "--model-name", model, "--float-dir", str(source), "--samples-file", str(samples),
            "--eval-ids", str(ids), "--ctx", str(a.ctx), "--windows", str(a.windows),
            "--group", str(a.group if suffix else 0)], out.parent / f".{out.stem}.worker.json", a.threads, log))
        row.update(float_dir=str(source), log=str(log.relative_to(REPO)))
    except Exception as e:  # a peer that cannot run is a row saying why, not a gap
        row["error"] = failure_reason(e)
        row["error_log_tail"] = str(e)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    return row


def driver() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="lowbit model name (repeatable; default smollm2-135m)")
    p.add_argument("--peer", action="append", choices=list(PEERS), help="repeatable; default all")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", type=int, default=None,
                   help="group size of the weight-only peers instead of theirs (128 / 64); SmolLM2's 576 needs 64")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the worker (default 2)")
    p.add_argument("--out-dir", default=None, help=f"default {OUT.relative_to(REPO)}")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:                 # tiny random models, a few short windows, results out of the tree
        a.ctx, a.windows = min(a.ctx, 64), min(a.windows, 2)
        a.samples, a.seq_len = min(a.samples, 4), min(a.seq_len, 64)
        a.threads, a.out_dir = 1, a.out_dir or "/tmp/lowbit-rotation-peers-smoke"
    a.out_dir = a.out_dir or str(OUT)
    for model in a.model or (list(SMOKE) if a.smoke else ["smollm2-135m"]):
        for peer in a.peer or list(PEERS):
            row = run(peer, model, a)
            shown = {k: row.get(k) for k in ("peer", "model", "ppl", "kld", "weight_bits", "quantize_seconds",
                                             "float_ppl_worker", "error") if k in row}
            print(json.dumps(shown), flush=True)


# ---------------------------------------------------------------- worker (inside the llmcompressor environment)

def online_check(tool, model, name: str, window) -> dict:
    """Layer 1's down_proj on its real input (captured before the tool's own pre-hooks): the tool's
    output against our re-statement (its online Hadamard, then its activation quantizer, then a
    matmul with its quantized weights), against the same without activation quantization, and
    against the same without the online rotation."""
    import torch
    import torch.nn.functional as F

    rel = lambda u, v: ((u - v).norm() / v.norm()).item()
    module = model.get_submodule(name)
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]), prepend=True)
    with torch.no_grad():
        model.model(input_ids=window)
    hook.remove()
    x = seen["x"]
    with torch.no_grad():
        y, W = module(x), tool.weight(module)
        xr, transforms = tool.online(module, x)
        check = {"module": name, "input": "its real input on calibration window 0", "online_transforms": transforms,
                 "rel_diff_vs_simulated": rel(y, tool.simulate(module, xr, W)),
                 "rel_diff_vs_float_activations": rel(y, F.linear(xr, W, module.bias)),
                 "rel_diff_vs_no_online_rotation": rel(y, tool.simulate(module, x, W))}
    sim = check["rel_diff_vs_simulated"]
    check["online_rotation_applied"] = (check["rel_diff_vs_no_online_rotation"] > 10 * sim) if transforms else None
    check["activations_quantized"] = check["rel_diff_vs_float_activations"] > 10 * sim
    return check


def problems(tool, checks) -> list[str]:
    found = []
    online = checks["online_rotation"]
    if online["online_transforms"] and not all(t["is_hadamard"] for t in online["online_transforms"]):
        found.append("an online transform is not a Hadamard matrix")
    if online["online_rotation_applied"] is False:
        found.append("the online rotation is not applied in the model's forward")
    if online["rel_diff_vs_simulated"] > 1e-3:
        found.append(f"the module does not compute what the recipe says "
                     f"(rel diff {online['rel_diff_vs_simulated']:.2g})")
    if bool(tool.acts) != online["activations_quantized"]:
        found.append(f"activations quantized: {online['activations_quantized']}, recipe: {bool(tool.acts)}")
    return found


def worker() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--peer", "--model-name", "--float-dir", "--samples-file", "--eval-ids", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--worker", action="store_true")
    for flag in ("--ctx", "--windows", "--group"):
        p.add_argument(flag, type=int, required=True)
    a = p.parse_args()
    sys.path.append(str(REPO))                         # lowbit's evaluation code, nothing else of lowbit
    import torch
    import transformers
    from safetensors.torch import load_file

    from lowbit.eval.perplexity import evaluate_many
    from rotation_tools import Rotation
    from w8a8_tools import decoder_linears

    torch.manual_seed(0)
    tool = Rotation(a.peer, a.group or None)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(a.float_dir, dtype=torch.float32).eval()
    has_tokenizer = (Path(a.float_dir) / "tokenizer_config.json").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(a.float_dir) if has_tokenizer else None
    reference = load()
    samples, ids = load_file(a.samples_file)["input_ids"], load_file(a.eval_ids)["input_ids"]
    base = {"tool": tool.tool, "act_bits": tool.act_bits, "activation_granularity": tool.act_granularity,
            "weight_granularity": tool.weight_granularity, "group": tool.group}
    checks = {"rotation_identity": tool.rotation_identity(load, samples, reference)}
    print("rotation_identity:", json.dumps(checks["rotation_identity"]), flush=True)
    if not (ident := checks["rotation_identity"])["rotation_exact"]:
        kl = ident.get("kl_float_vs_rotated_without_centering", ident["kl_float_vs_rotated"])
        Path(a.out).write_text(json.dumps({**base, "checks": checks, "error": (
            f"{tool.rotator} alone is not an identity on {ident['architecture']}: KL(float || rotated) {kl:.3g} nats"
            f"{' (embedding centering aside)' if 'kl_float_vs_rotated_without_centering' in ident else ''} > "
            f"{ident['exact_limit']}; not quantized")}, indent=1, default=str))
        return

    model = load()
    names = decoder_linears(model)
    start, cpu = time.perf_counter(), time.process_time()
    info = tool.quantize(model, samples, reference, tokenizer)
    quantize_seconds, quantize_cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_quantized = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    checks["online_rotation"] = online_check(tool, model, CHECK_MODULE, samples[:1])
    checks.update(tool.model_checks(model, samples, reference))
    print("checks:", json.dumps(checks, default=str), flush=True)

    res = evaluate_many({"quantized": model, "float": reference}, ids, a.ctx, a.windows, reference=reference,
                        reference_name=f"{a.model_name} float32")
    q, fp = res["quantized"], res["float"]
    try:
        bits, stored = tool.stored_bits(model, names)
    except Exception as e:      # its compressed save is a measurement of size only, not of the row
        bits, stored = None, {"error": f"{type(e).__name__}: {e}"[:300]}
    measured = {"ppl": q.ppl, "kld": q.kld.mean, "kld_p99": q.kld.p99, "top1_changed": q.kld.top1_changed}
    row = {**base, **info, "versions": {"torch": torch.__version__, **info.pop("versions", {})}, **measured,
           "eval_tokens": q.tokens, "eval_windows": q.windows, "eval_seconds": q.seconds,
           "float_ppl_worker": fp.ppl, "convention": q.convention, "weight_bits": bits, "stored_tensors": stored,
           "quantized_linears": len(names), "lm_head": "float (not quantized; rotated by R1 where SpinQuant)",
           "quantize_seconds": quantize_seconds, "quantize_cpu_seconds": quantize_cpu,
           "peak_rss_after_quantize_mib": rss_quantized, "calibration_used": True, "checks": checks}
    if found := problems(tool, checks):
        row["error"] = "; ".join(found)
        row["unverified"] = {k: row.pop(k) for k in measured}
    Path(a.out).write_text(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        driver()
