"""A peer tool's quantized checkpoint of the real SmolLM2-135M, imported into lowbit and exported
to GGUF without re-rounding: does the GGUF hold the checkpoint's weights, and does llama.cpp
compute the same function?

Checkpoints (each written by the tool itself, in its own environment, ~/.cache/lowbit/venvs/):
  llmcompressor-rtn-w4g64-bf16  llm-compressor 0.14.0.1, QuantizationModifier (round to nearest,
        min/max scales, no calibration data), int4 symmetric, group 64 (it refuses group 128 on
        SmolLM2's 576 columns), lm_head left float; the model quantized in bfloat16 so that the
        stored scales are bfloat16 (float16 holds them exactly)
  llmcompressor-rtn-w4g64-fp32  the same in float32, as bench/peers/llmcompressor_peer.py runs it:
        float32 scales, which `lowbit import` refuses (it stores float16 scales and re-rounds nothing).
        Kept as a probe row: the refusal line is recorded, nothing else is checked.
  gptqmodel-gptq-w4g128          GPTQModel 7.6.0, GPTQ with the peer script's config (bench/peers/
        gptqmodel_peer.py: damp 0.05, desc_act False, act_group_aware True, ...), int4 symmetric,
        group 128 (group 64 if the tool refuses 128), calibrated on lowbit's own windows
        (wikitext-2 valid, --samples x --seq-len, seed 0), quantized in float32, float16 scales
The peer scripts keep only a de-quantized float directory (their checkpoints go to temporary
directories), so bench/peers/import_worker.py runs the same recipes (imported from bench/peers/*_peer.py) and
keeps the saved checkpoint, plus the tool's own de-quantized weights (GPTQModel: its
dequantize_weight on the reloaded checkpoint, float32 scales; llm-compressor: fake_quantize on the
quantized model, in its dtype, and compressed-tensors' unpack_from_int32 of the saved codes).

Checks per checkpoint (lowbit's environment):
  (i)   `lowbit import CKPT --out DIR`; every imported QuantLinear's W_dq against the tool's own
        de-quantized weight (GPTQModel: equal bit for bit; llm-compressor: the codes equal, and W_dq
        rounded to bfloat16 equals its bfloat16 weights) and against the checkpoint's formula
        q * scale evaluated in float32 from the stored tensors (compressed-tensors: exact);
  (ii)  `lowbit export DIR --format gguf`: every decoder linear is Q4_0 and the gguf package's
        dequantizer gives gguf_tensor(W_dq) bit for bit (q/k rows permuted as llama.cpp wants);
  (iii) llama.cpp (llama-cpp-python, CPU) logits on the first 256 tokens of wikitext-2-raw test:
        the `--requantize F32` file against lowbit's imported model (KL, max |dlogit|) and the
        Q4_0 file against lowbit (KL, top-1 agreement; llama.cpp's CPU Q4_0 kernel rounds the
        activations to 8 bits, so this one is close, not equal).

    python bench/import_to_gguf.py                  # produce missing checkpoints, check, write JSON
    python bench/import_to_gguf.py --reuse-only     # check the cached checkpoints only

Writes bench/results/import_to_gguf.json. The checkpoints stay in --cache (default
~/.cache/lowbit/bench/import_to_gguf/<row>/ckpt), where tests/export/test_import_to_gguf_real.py
finds them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_DIR = HERE / "peers"
CACHE = Path.home() / ".cache" / "lowbit" / "bench" / "import_to_gguf"
RESULT = HERE / "results" / "import_to_gguf.json"
EVAL_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "test.txt"
MODEL = "smollm2-135m"
N_TOKENS = 256

# row name -> how the tool is run; "groups" are tried in order (the first the tool accepts is kept)
ROWS = {
    "llmcompressor-rtn-w4g64-bf16": dict(tool="llmcompressor", venv="llmcompressor", method="rtn", bits=4,
                                         groups=(64,), dtype="bfloat16", probe=False),
    "llmcompressor-rtn-w4g64-fp32": dict(tool="llmcompressor", venv="llmcompressor", method="rtn", bits=4,
                                         groups=(64,), dtype="float32", probe=True),
    "gptqmodel-gptq-w4g128": dict(tool="gptqmodel", venv="gptqmodel", method="gptq", bits=4,
                                  groups=(128, 64), dtype="float32", probe=False),
}
REQUIREMENTS = {"llmcompressor": ["llmcompressor==0.14.0.1"], "gptqmodel": ["gptqmodel==7.6.0"]}


# ---------------------------------------------------------------- driver (lowbit's environment)

def _peers_module(stem: str):
    """bench/peers/<stem>.py, loaded by path (nothing added to sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_peers_{stem}_i2g", PEERS_DIR / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def produce(row: str, cache: Path, samples: int, seq_len: int, threads: int) -> dict:
    """Run the tool for `row` (first group it accepts); the checkpoint goes to cache/row/ckpt."""
    import shutil

    spec = ROWS[row]
    common = _peers_module("common")
    python = common._venv_module().ensure_venv(spec["venv"], REQUIREMENTS[spec["venv"]])
    float_dir = common.float_dir(MODEL)
    samples_file = Path.home() / ".cache/lowbit/bench/peers" / MODEL / f"calib-{samples}x{seq_len}-seed0.safetensors"
    if spec["method"] != "rtn" and not samples_file.exists():
        common.write_samples(MODEL, samples, seq_len, 0, samples_file)
    out = cache / row
    attempts = []
    for group in spec["groups"]:
        if out.exists():
            shutil.rmtree(out)
        (out / "ckpt").mkdir(parents=True)
        argv = [str(python), str(PEERS_DIR / "import_worker.py"), "--worker", spec["tool"], "--method", spec["method"],
                "--float-dir", str(float_dir), "--samples-file", str(samples_file), "--dtype", spec["dtype"],
                "--bits", str(spec["bits"]), "--group", str(group), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", GPTQMODEL_CPU_WORKERS="2")   # its worker pools need 2 (as run_peer sets)
        env.pop("PYTHONPATH", None)
        wall, cpu, rss, code = common.run_measured(["nice", "-n", "5", *argv], env, cache / f"{row}.log")
        if code == 0:
            record = json.loads((out / "tool.json").read_text())
            record.update(row=row, float_dir=str(float_dir), wall_seconds=wall, cpu_seconds=cpu, peak_rss_mib=rss,
                          threads=threads, groups_tried=attempts + [{"group": group, "ok": True}],
                          calibration_file=str(samples_file) if spec["method"] != "rtn" else None,
                          calibration_text=str(common.CALIB_TEXT) if spec["method"] != "rtn" else None,
                          status="ok")
            (out / "tool.json").write_text(json.dumps(record, indent=1))
            return record
        lines = (cache / f"{row}.log").read_text(errors="replace").strip().splitlines()
        raised = [line for line in lines if common.EXCEPTION_LINE.match(line.strip())]
        attempts.append({"group": group, "ok": False, "error": (raised or lines or [""])[-1][:400]})
        print(f"{row}: group {group} failed: {attempts[-1]['error']}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return {"row": row, "status": "failed", "groups_tried": attempts}


def _lowbit(*argv) -> tuple[int, str, str]:
    from lowbit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _linears(model) -> dict:
    from lowbit.nn.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_import(ckpt: Path, view_file: Path, record: dict, imported_dir: Path) -> tuple[dict, object]:
    """(i): lowbit import, and the imported W_dq against the tool's own de-quantized weights."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowbit.models.load import load

    t0 = time.perf_counter()
    code, out, err = _lowbit("import", ckpt, "--out", imported_dir, "--overwrite")
    result = {"import_exit": code, "import_seconds": time.perf_counter() - t0}
    if code != 0:
        result["import_error"] = err.strip().splitlines()[-1] if err.strip() else out
        return result, None
    result["import_summary"] = out.strip().splitlines()
    imported = load(str(imported_dir))
    direct = _linears(load(str(ckpt)).model)               # the checkpoint loaded directly, not via the directory
    got = _linears(imported.model)
    view = load_file(str(view_file))
    names = sorted(k[2:] for k in view if k.startswith("W."))
    bf16 = record["tool"] == "llm-compressor" and record["dtype"] != "float32"
    exact, rounded, codes_equal, formula_exact, max_abs, max_rel = 0, 0, 0, 0, 0.0, 0.0
    raw = {}
    if record["tool"] == "llm-compressor":
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_scale")}
    for name in names:
        m, W_tool = got[name], view["W." + name]
        W = m.W_dq
        assert torch.equal(W, direct[name].W_dq), f"{name}: load(ckpt) and the imported directory differ"
        exact += int(torch.equal(W, W_tool))
        diff = (W - W_tool).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / W_tool.abs().clamp_min(torch.finfo(torch.float32).tiny)).max()))
        if bf16:
            rounded += int(torch.equal(W.to(torch.bfloat16).float(), W_tool))
        if "codes." + name in view:
            codes = view["codes." + name].to(torch.int16) + (1 << (record["bits"] - 1))
            codes_equal += int(torch.equal(m.codes.to(torch.int16), codes))
            scale = raw[name + ".weight_scale"].float()                    # [out, G] in the tool's dtype
            q = view["codes." + name].float()
            group = record["group"]
            idx = torch.arange(q.shape[1]) // group
            formula_exact += int(torch.equal(W, q * scale[:, idx]))       # one float32 product per weight
    result.update({
        "quantized_linears": len(got), "compared_linears": len(names),
        "names_match": sorted(got) == names,
        "formats": sorted({m.fmt.name for m in got.values()}),
        "W_dq_equal_tool_bitwise": exact,
        "W_dq_max_abs_diff_vs_tool": max_abs, "W_dq_max_rel_diff_vs_tool": max_rel,
    })
    if bf16:
        result["W_dq_rounded_to_bf16_equal_tool"] = rounded
    if raw:
        result["codes_equal_tool_unpacked"] = codes_equal
        result["W_dq_equal_ckpt_formula_q_times_scale_fp32"] = formula_exact
    return result, imported


def check_gguf(imported_dir: Path, imported, work: Path) -> tuple[dict, Path, Path]:
    """(ii): export to GGUF (Q4_0 without re-rounding, and F32), and the file's weights against W_dq."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.export.gguf.writer import stored_tensors
    from lowbit.formats import QTensor
    from lowbit.models.gguf_names import family_for, gguf_name, gguf_tensor

    q4, f32 = work / "q4_0.gguf", work / "f32.gguf"
    t0 = time.perf_counter()
    code, out, err = _lowbit("export", imported_dir, "--format", "gguf", "--out", q4, "--overwrite")
    if code != 0:
        raise RuntimeError(f"lowbit export failed: {err.strip()}")
    export_seconds = time.perf_counter() - t0
    code, out32, err = _lowbit("export", imported_dir, "--format", "gguf", "--requantize", "F32", "--out", f32,
                               "--overwrite")
    if code != 0:
        raise RuntimeError(f"lowbit export --requantize F32 failed: {err.strip()}")
    cfg = imported.model.config
    family = family_for(cfg.model_type)
    tensors = {t.name: t for t in GGUFReader(q4).tensors}
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    linears = q4_linears = exact_linears = exact_floats = floats = 0
    max_abs = 0.0
    for hf_name, value in stored_tensors(imported.model).items():
        name, _ = gguf_name(hf_name, family)
        quantized = isinstance(value, QTensor)
        if quantized:
            linears += 1
            q4_linears += int(tensors[name].tensor_type.name == "Q4_0")
            value = value.fmt.dequantize(value)
        expected = gguf_tensor(hf_name, value, family, cfg.num_attention_heads, cfg.num_key_value_heads)
        got = torch.from_numpy(np.array(dequantize(tensors[name].data, tensors[name].tensor_type)))
        got = got.reshape(expected.shape).float()
        same = torch.equal(got, expected)
        if quantized:
            exact_linears += int(same)
            max_abs = max(max_abs, float((got - expected).abs().max()))
        else:
            floats += 1
            exact_floats += int(same)
    f32_types = sorted({t.tensor_type.name for t in GGUFReader(f32).tensors})
    field = GGUFReader(q4).fields.get(f"{family.arch}.rope.freq_base")
    freq_base = float(field.parts[field.data[0]][0]) if field is not None else None
    return {"export_seconds": export_seconds, "export_summary": [l for l in out.strip().splitlines() if l.strip()],
            "re_rounded_no": any(l.split()[:1] == ["re-rounded"] and l.split()[-1] == "no" for l in out.splitlines()),
            "gguf_tensor_types": types, "decoder_linears": linears, "decoder_linears_q4_0": q4_linears,
            "linears_dequantized_equal_W_dq_bitwise": exact_linears, "linears_max_abs_diff": max_abs,
            "float_tensors": floats, "float_tensors_equal": exact_floats,
            "q4_0_bytes": q4.stat().st_size, "f32_file_types": f32_types, "rope_freq_base": freq_base}, q4, f32


def checkpoint_rope_theta(ckpt: Path) -> float | None:
    """The RoPE base the checkpoint's config.json states: transformers 5 writes it inside
    "rope_parameters" (GPTQModel 7.6's save does), transformers 4 as "rope_theta"."""
    config = json.loads((ckpt / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    theta = (rope.get("full_attention", rope) or {}).get("rope_theta", config.get("rope_theta"))
    return None if theta is None else float(theta)


def check_llama_cpp(imported, q4: Path, f32: Path, threads: int) -> dict:
    """(iii): llama.cpp's logits on both files against lowbit's imported model."""
    import torch

    llamacpp = _peers_module("llamacpp_tools")

    text = EVAL_TEXT.read_text()[:4000]
    ids = imported.tokenizer(text)["input_ids"][:N_TOKENS]
    with torch.no_grad():
        ref = imported.model(torch.tensor([ids])).logits[0].double()
    result = {"tokens": len(ids), "text": str(EVAL_TEXT), "llama_cpp_threads": threads}
    logits = {label: llamacpp.logits(path, ids, threads) for label, path in (("f32", f32), ("q4_0", q4))}

    def compare(reference):
        out = {}
        for label, other in logits.items():
            kl, kl_max = llamacpp.kl(reference, other)
            out[label] = {"kl_mean": kl, "kl_max": kl_max, "max_abs_dlogit": float((other - reference).abs().max()),
                          "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).double().mean())}
        return out

    result.update(compare(ref))
    return result


def check_row(row: str, cache: Path = CACHE, threads: int = 2, keep_gguf: bool = False) -> dict:
    """All checks on cache/row (produced earlier); returns the result row."""
    base = cache / row
    record = json.loads((base / "tool.json").read_text())
    result = {"row": row, "tool": record}
    work = Path(tempfile.mkdtemp(prefix=f"i2g-{row}-", dir=cache))
    try:
        imp, imported = check_import(base / "ckpt", base / "tool_view.safetensors", record, work / "imported")
        result["import"] = imp
        if imported is None:
            return result
        gguf, q4, f32 = check_gguf(work / "imported", imported, work)
        result["gguf"] = gguf
        theta = checkpoint_rope_theta(base / "ckpt")
        result["config"] = {"rope_theta_checkpoint": theta,
                            "rope_theta_imported_model": getattr(imported.model.config, "rope_theta", None),
                            "rope_theta_imported_dir_config": json.loads(
                                (work / "imported" / "config.json").read_text()).get("rope_theta"),
                            "rope_freq_base_gguf": gguf["rope_freq_base"],
                            "checkpoint_transformers_version": json.loads(
                                (base / "ckpt" / "config.json").read_text()).get("transformers_version")}
        result["llama_cpp"] = check_llama_cpp(imported, q4, f32, threads)
    finally:
        if not keep_gguf:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return result


def cached_rows(cache: Path = CACHE) -> list[str]:
    return [r for r in ROWS if (cache / r / "tool.json").is_file() and (cache / r / "ckpt" / "config.json").is_file()
            and (cache / r / "tool_view.safetensors").is_file()]


def _versions() -> dict:
    import importlib.metadata as md

    def v(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return None

    return {"lowbit_commit": git("rev-parse", "HEAD"), "lowbit_tree_dirty": bool(git("status", "--porcelain")),
            "llama-cpp-python": v("llama_cpp_python"), "gguf": v("gguf"), "torch": v("torch"),
            "transformers": v("transformers"), "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--reuse-only", action="store_true", help="never run a tool; check what the cache holds")
    p.add_argument("--samples", type=int, default=4, help="GPTQ calibration windows (default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--threads", type=int, default=1, help="threads of the tool process (default 1)")
    p.add_argument("--llama-threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=RESULT)
    a = p.parse_args()
    import torch

    torch.set_num_threads(max(a.llama_threads, 1))
    a.cache.mkdir(parents=True, exist_ok=True)
    report = {"what": __doc__.strip().splitlines()[0], "model": MODEL, "versions": _versions(),
              "conditions": {"machine": platform.machine(), "cpus": os.cpu_count(), "device": "CPU only",
                             "load_average_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "cache": str(a.cache)},
              "settings": {"rows": {r: ROWS[r] for r in a.rows}, "gptq_calibration": f"{a.samples} x {a.seq_len} "
                           "lowbit windows of wikitext-2 valid, seed 0", "eval_tokens": N_TOKENS,
                           "tool_threads": a.threads}, "rows": {}}
    for row in a.rows:
        if row not in cached_rows(a.cache):
            if a.reuse_only:
                report["rows"][row] = {"row": row, "status": "absent from the cache"}
                continue
            print(f"{row}: running the tool ...", flush=True)
            rec = produce(row, a.cache, a.samples, a.seq_len, a.threads)
            if rec["status"] != "ok":
                report["rows"][row] = rec
                continue
        print(f"{row}: checking ...", flush=True)
        report["rows"][row] = check_row(row, a.cache, a.llama_threads)
        print(json.dumps({k: v for k, v in report["rows"][row].items() if k != "tool"}, indent=1, default=str)[:3000])
    report["conditions"]["load_average_end"] = os.getloadavg()[0]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
