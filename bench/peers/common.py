"""Peers side by side: the driver (lowbit's environment) and the worker helpers (peer environments).

Every peer gets the same inputs and hands back the same kind of output:
  in   the float model as a plain HF directory (lowbit's float cache of the model) and the
       calibration windows lowbit itself samples, int64 [N, L] in a safetensors file
       (key "input_ids"), so no peer tokenizes the calibration text itself;
  out  a float HF directory holding the peer's *de-quantized* weights (config and tokenizer files
       copied from the float directory) plus peer.json: tool, version, method, hyperparameters,
       storage bits per weight as the peer stores them, and what was checked.
lowbit then evaluates that directory with its own `lowbit eval` (same tokens, same KLD reference),
so the evaluation is identical for every row.

The peer itself runs as a subprocess in its own virtual environment (venv.py); its wall time and
peak RSS are measured from outside with os.wait4, like bench/common.py's run_measured.

Top-level imports are standard library only: the peer environments import this file too (for
the worker helpers at the bottom), and they have neither lowbit nor its transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"
EVAL_TEXT = DATA / "wikitext-2-raw" / "test.txt"
CALIB_TEXT = DATA / "wikitext-2" / "valid.txt"
RESULTS = REPO / "bench" / "results" / "peers"
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:")  # "ValueError: ..." in a log
# files of the float directory that describe the model but are not its weights
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Peer:
    """One runnable peer row: which script, which environment, which of its methods."""

    script: str                     # file in bench/peers/
    venv: str                       # environment name under ~/.cache/lowbit/venvs/
    requirements: tuple[str, ...]
    method: str                     # passed to the script's worker as --method

    def __post_init__(self):
        if not self.script.endswith("_peer.py") or not self.requirements:
            raise ValueError(f"a peer needs a bench/peers/*_peer.py script and requirements, got {self}")


LLMC = ("llmcompressor==0.14.0.1",)
GPTQMODEL = ("gptqmodel==7.6.0",)
HQQ = ("hqq==0.2.8.post1", "transformers==4.57.6")
TORCHAO = ("torchao==0.18.0", "transformers==4.57.6")
BITSANDBYTES = ("bitsandbytes==0.50.2", "transformers==4.57.6")
AUTOROUND = ("auto-round==0.16.1",)
QUANTO = ("optimum-quanto==0.2.7", "transformers==4.57.6")
PEERS = {
    "llmcompressor-gptq": Peer("llmcompressor_peer.py", "llmcompressor", LLMC, "gptq"),
    "llmcompressor-awq": Peer("llmcompressor_peer.py", "llmcompressor", LLMC, "awq"),
    "llmcompressor-rtn": Peer("llmcompressor_peer.py", "llmcompressor", LLMC, "rtn"),
    "gptqmodel-gptq": Peer("gptqmodel_peer.py", "gptqmodel", GPTQMODEL, "gptq"),
    "gptqmodel-awq": Peer("gptqmodel_peer.py", "gptqmodel", GPTQMODEL, "awq"),
    "hqq": Peer("hqq_peer.py", "hqq", HQQ, "hqq"),
    "torchao-intx": Peer("torchao_peer.py", "torchao", TORCHAO, "intx"),
    "bitsandbytes-nf4": Peer("bitsandbytes_peer.py", "bitsandbytes", BITSANDBYTES, "nf4"),
    "autoround": Peer("autoround_peer.py", "autoround", AUTOROUND, "signround"),
    "quanto": Peer("quanto_peer.py", "quanto", QUANTO, "qint"),
}


# ---------------------------------------------------------------- driver side (lowbit's environment)

def float_dir(model: str) -> Path:
    """The plain HF directory of `model`'s float weights: lowbit's float cache (written on first use)."""
    sys.path.insert(0, str(REPO))
    from lowbit.models.load import _float_cache, sha256_file
    from lowbit.models.registry import resolve

    source = resolve(model)
    if source.kind == "gguf":
        return _float_cache(source, sha256_file(source.path))
    if source.kind == "hf":
        return source.path
    raise ValueError(f"{model} is a lowbit directory, not a float model")


def write_samples(model: str, samples: int, seq_len: int, seed: int, path: Path, calib: Path = CALIB_TEXT) -> Path:
    """lowbit's own calibration windows for `model`, int64 [samples, seq_len], as safetensors "input_ids"."""
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from lowbit.data.calibration import CalibConfig
    from lowbit.data.text import read_text
    from lowbit.models.load import load
    from lowbit.quantize import calibration_samples

    ids = calibration_samples(load(model), read_text(calib), CalibConfig(samples, seq_len, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path


def _venv_module():
    """bench/peers/venv.py, loaded by path: as `import venv` it would be the standard library's
    whenever this file is imported as peers.common (bench/weight_only.py does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lowbit_bench_peers_venv", HERE / "venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_measured(argv: list[str], env: dict, log: Path) -> tuple[float, float, int, int]:
    """Run argv with stdout+stderr to `log`; (wall s, CPU s, peak RSS MiB, exit code) of the child.

    CPU seconds (user + system, the child and the children it waited for) are reported beside
    wall time because on the shared 2-core machine wall time mostly measures the other jobs."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE)
        _, status, usage = os.wait4(proc.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - start, cpu, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status)


def run_worker(python, script: Path, args: list[str], partial: Path, threads: int, log: Path) -> dict:
    """Run `script --worker ARGS --out partial` under the peer's `python` (offline, `threads` OMP threads,
    nice 5), measured; returns the worker's JSON plus wall/CPU time, peak RSS and the load around it.
    RuntimeError with the log's tail when the worker fails."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    argv = ["nice", "-n", "5", str(python), str(Path(script).resolve()), "--worker", *args, "--out", str(partial)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    log.parent.mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]
    wall, cpu, rss, code = run_measured(argv, env, log)
    if code != 0 or not partial.exists():
        lines = log.read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"worker exited {code}:\n" + "\n".join(lines[-15:]))
    result = json.loads(partial.read_text())
    partial.unlink()
    return {**result, "worker_wall_seconds": wall, "worker_cpu_seconds": cpu, "peak_rss_mib": rss,
            "threads": threads, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def run_peer(name: str, model: str, setting: dict, samples_file: Path, out_dir: Path, threads: int = 1) -> dict:
    """Quantize `model` with peer `name` at setting {"bits", "group", "sym"}; the de-quantized
    float directory goes to out_dir. Returns peer.json plus wall time and peak RSS; raises
    RuntimeError (with the tail of the peer's log) when the peer fails."""
    ensure_venv = _venv_module().ensure_venv
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    peer = PEERS[name]
    python = ensure_venv(peer.venv, list(peer.requirements))
    source = float_dir(model)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    argv = [str(python), str(HERE / peer.script), "--worker", "--method", peer.method,
            "--float-dir", str(source), "--samples-file", str(Path(samples_file).resolve()),
            "--bits", str(setting["bits"]), "--group", str(setting["group"]),
            "--sym" if setting.get("sym", True) else "--asym", "--out", str(out_dir.resolve())]
    # one thread per process on the shared 2-core machine; no GPU anywhere; nothing from the hub
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GPTQMODEL_CPU_WORKERS="2")
    env.pop("PYTHONPATH", None)     # the script's folder (for `common`) is on the worker's path anyway
    log = out_dir / "peer.log"
    load_before = os.getloadavg()[0]
    wall, cpu, rss, code = run_measured(["nice", "-n", "5", *argv], env, log)
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raised = [line for line in lines if EXCEPTION_LINE.match(line.strip())][-1:]
        tail = lines[-15:] + [line for line in raised if line not in lines[-15:]]
        raise RuntimeError(f"{name} exited {code}:\n" + "\n".join(tail))
    for file in COPIED_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, out_dir / file)
    record = json.loads((out_dir / "peer.json").read_text())
    record.update(peer=name, quantize_seconds=wall, quantize_cpu_seconds=cpu, peak_rss_mib=rss, threads=threads,
                  load_average_before=load_before, load_average_after=os.getloadavg()[0], float_dir=str(source))
    (out_dir / "peer.json").write_text(json.dumps(record, indent=1))
    return record


def failure_reason(error: Exception, limit: int = 300) -> str:
    """One line for a peer's failure row: the last exception line of its log tail (a list of
    layer names printed after it would otherwise hide it), else the message's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    return f"{type(error).__name__}: {(raised or lines)[-1][:limit]}"


def lowbit_eval(directory: Path, model: str, windows: int, ctx: int = 2048, text: Path = EVAL_TEXT) -> dict:
    """`lowbit eval` of a peer's de-quantized directory, KLD against the float `model`."""
    out = Path(directory) / "eval.json"
    argv = [sys.executable, "-m", "lowbit", "-q", "eval", str(directory), "--text", str(text), "--ctx", str(ctx),
            "--windows", str(windows), "--kld-ref", model, "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(["nice", "-n", "5", *argv], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"lowbit eval {directory} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def evaluate_results(model: str, result_files: list[Path], windows: int, ctx: int = 2048) -> None:
    """Evaluate the peer directories of several result files in one pass of the float reference
    (lowbit's evaluate_many: K models cost K + 1 forwards per window instead of 2K) and write
    ppl / KLD into each file. Same tokens, windows and reference as `lowbit eval --kld-ref model`."""
    sys.path.insert(0, str(REPO))
    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate_many, tokenize
    from lowbit.models.load import load

    rows = {str(f): json.loads(Path(f).read_text()) for f in result_files}
    todo = {f: r for f, r in rows.items() if "error" not in r and "dir" in r}
    if not todo:                    # only failure rows: nothing to load, no reference pass to pay for
        print("no quantized model to evaluate in", ", ".join(rows))
        return
    fp = load(model)
    ids = tokenize(fp.tokenizer, read_text(EVAL_TEXT).text)
    models = {f: load(r["dir"]).model for f, r in todo.items()}
    results = evaluate_many(models, ids, ctx, windows, reference=fp.model, reference_name=model)
    for f, r in todo.items():
        res = results[f]
        r.update(ppl=res.ppl, kld=res.kld.mean, kld_p99=res.kld.p99, top1_changed=res.kld.top1_changed,
                 eval_tokens=res.tokens, eval_windows=res.windows, eval_seconds=res.seconds,
                 eval={"text": str(EVAL_TEXT), "ctx": ctx, "windows": windows, "kld_ref": model,
                       "batched_with": len(todo)})
        _write(Path(f), r)
        print(f"{r['peer']}: ppl {res.ppl:.2f}, KLD {res.kld.mean:.3f}")


def result_path(name: str, model: str, bits: int, group: int) -> Path:
    return RESULTS / f"{name}_{model}_w{bits}g{group}.json"


def cli(script: str, description: str) -> None:
    """`python bench/peers/<peer>_peer.py ...`: quantize with the peer, evaluate, write the result JSON."""
    names = [n for n, p in PEERS.items() if p.script == script]
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--peer", default=names[0], choices=names)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the peer process (default 1: "
                   "bench/weight_only.py's peer rows run one thread each)")
    p.add_argument("--out", required=True, help="directory for the de-quantized model")
    p.add_argument("--no-eval", action="store_true",
                   help="quantize only; evaluate later, several at once: python bench/peers/common.py FILES")
    p.add_argument("--json", default=None, help=f"result file (default: {RESULTS.relative_to(REPO)}/<peer>_<model>_w<b>g<g>.json)")
    a = p.parse_args()
    setting = {"bits": a.bits, "group": a.group, "sym": not a.asym}
    json_path = Path(a.json) if a.json else result_path(a.peer, a.model, a.bits, a.group)
    samples = Path.home() / ".cache/lowbit/bench/peers" / a.model / f"calib-{a.samples}x{a.seq_len}-seed{a.seed}.safetensors"
    row = {"peer": a.peer, "model": a.model, "setting": setting, "calibration": {
        "text": str(CALIB_TEXT), "samples": a.samples, "seq_len": a.seq_len, "seed": a.seed, "file": str(samples)},
        "eval": {"text": str(EVAL_TEXT), "ctx": 2048, "windows": a.windows, "kld_ref": a.model}}
    try:
        if not samples.exists():
            write_samples(a.model, a.samples, a.seq_len, a.seed, samples)
        row.update(run_peer(a.peer, a.model, setting, samples, Path(a.out), threads=a.threads))
    except Exception as e:  # a peer that cannot run is a result row saying why, not a silent gap
        row["error"] = failure_reason(e)                # one line for the table
        row["error_log_tail"] = str(e)
        _write(json_path, row)
        print(row["error"], file=sys.stderr)
        sys.exit(1)
    row["dir"] = str(Path(a.out).resolve())
    _write(json_path, row)          # quantization kept even if the evaluation below is cut short
    if a.no_eval:
        return
    res = lowbit_eval(Path(a.out), a.model, a.windows)
    row.update(ppl=res["ppl"], kld=res["kld"]["mean"], kld_p99=res["kld"]["p99"],
               top1_changed=res["kld"]["top1_changed"], eval_tokens=res["tokens"], eval_windows=res["windows"],
               eval_seconds=res["seconds"])
    _write(json_path, row)
    print(json.dumps({k: row.get(k) for k in ("peer", "tool_version", "method", "ppl", "kld", "bits_per_weight",
                                                "quantize_seconds", "peak_rss_mib")}))


def main(script: str, description: str, worker) -> None:
    """A peer script's entry point: its worker inside the peer's environment (--worker, started by
    run_peer), else the command line in lowbit's environment."""
    if "--worker" in sys.argv:
        worker()
    else:
        cli(Path(script).name, description)


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


# ---------------------------------------------------------------- worker side (inside a peer's environment)

def worker_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--method", required=True)
    p.add_argument("--float-dir", required=True)
    p.add_argument("--samples-file", required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group", type=int, required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--out", required=True)
    return p.parse_args()


def read_samples(path: str):
    """int64 [N, L] calibration windows written by write_samples."""
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


def write_dequantized(float_dir: str, tensors: dict, out: str, report: dict) -> None:
    """Write out/model.safetensors: every tensor of the float checkpoint, replaced by the peer's
    de-quantized tensor of the same name where the peer has one, plus out/peer.json = report.

    Why the whole state dict and not only the linears: AWQ folds its scales into the norms.
    A peer that ran in a narrower dtype (GPTQModel's AWQ runs in bfloat16) hands back tensors it
    never changed, only cast (the embeddings): where a peer tensor equals the float tensor cast to
    its dtype, the float tensor is kept, so the row measures the quantization, not the cast.
    Refuses a peer tensor whose shape differs, and counts how many tensors the peer changed.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    merged, changed = {}, []
    with safe_open(str(Path(float_dir) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            ref = f.get_tensor(key)
            new = tensors.get(key)
            if new is None:
                merged[key] = ref
                continue
            new = new.detach().to("cpu")
            if new.shape != ref.shape:
                raise ValueError(f"{key}: peer tensor {tuple(new.shape)} vs float {tuple(ref.shape)}")
            if new.dtype != ref.dtype and torch.equal(new, ref.to(new.dtype)):
                new = ref                           # only cast, never changed: keep the original
            new = new.to(torch.float32).contiguous()
            if not torch.equal(new, ref):
                changed.append(key)
            merged[key] = new
    save_file(merged, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    report = dict(report, tensors_changed=len(changed),
                  tensors_changed_kinds=sorted({k.split(".")[-2] for k in changed}))
    (Path(out) / "peer.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="evaluate quantized peer rows (result JSON files) in one pass")
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    evaluate_results(args.model, args.results, args.windows, args.ctx)
