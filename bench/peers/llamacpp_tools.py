"""llama.cpp's own command-line tools, built from the llama.cpp source inside the llama-cpp-python sdist.

`ensure_tools()` returns {tool: path} for llama-quantize, llama-imatrix and llama-perplexity,
building them once under ~/.cache/lowbit/llama.cpp-tools/<version> (or $LOWBIT_CACHE). The sdist
is the one lowbit's environment pins (the same ggml the Python binding uses), downloaded by pip
from PyPI when it is not in pip's cache. Portable flags, as for the binding: a native build
would use instructions the sandbox's CPU advertises but does not allow ("Illegal instruction").

    python bench/peers/llamacpp_tools.py        # build (about 5 minutes on 2 cores) and print paths
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, as pinned in pyproject.toml's dev extra
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CMAKE_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_BMI2=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release")


def tools_root() -> Path:
    base = Path(os.environ["LOWBIT_CACHE"]) if os.environ.get("LOWBIT_CACHE") else Path.home() / ".cache/lowbit"
    return base / "llama.cpp-tools" / VERSION


def _run(cmd: list[str], log, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {log.name}")


def _source(work: Path, log) -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist, unpacked under `work`."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={VERSION}", "-d", str(work)], log)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def ensure_tools() -> dict[str, Path]:
    root = tools_root()
    paths = {t: root / "bin" / t for t in TOOLS}
    marker = root / "tools.json"
    if marker.exists() and all(p.exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-") as tmp, open(root / "build.log", "a") as log:
        work = Path(tmp)
        src = _source(work, log)
        build = work / "build"
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log)
        _run(["cmake", "--build", str(build), "--config", "Release", "-j", jobs, "--target", *TOOLS], log)
        (root / "bin").mkdir(exist_ok=True)
        for tool, dest in paths.items():
            shutil.copy2(build / "bin" / tool, dest)
    marker.write_text(json.dumps({"llama-cpp-python": VERSION, "cmake": list(CMAKE_FLAGS)}, indent=1))
    return paths


# ---------------------------------------------------------------------------- running the tools

THREADS = "2"
_NUMBER = r"(-?[0-9.]+(?:e-?[0-9]+)?)"
KLD_FIELDS = {  # what llama-perplexity --kl-divergence prints -> our key
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUMBER}",
    "kld": rf"Mean\s+KLD:\s*{_NUMBER}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUMBER}",
    "same_top_pct": rf"Same top p:\s*{_NUMBER}",
}


def _tool(name: str, args: list[str], log: Path) -> str:
    cmd = [str(ensure_tools()[name]), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def quantize(src: Path, out: Path, mix: str, imatrix: Path | None = None, tensor_types: Path | None = None) -> None:
    """llama-quantize [--imatrix FILE] [--tensor-type-file FILE] SRC OUT MIX."""
    extra = (["--imatrix", str(imatrix)] if imatrix else []) + \
        (["--tensor-type-file", str(tensor_types)] if tensor_types else [])
    _tool("llama-quantize", [*extra, str(src), str(out), mix, THREADS], out.with_suffix(".log"))


def imatrix(model: Path, text: Path, out: Path, ctx: int, chunks: int) -> None:
    """llama-imatrix over the first `chunks` windows of `ctx` tokens of `text`."""
    _tool("llama-imatrix", ["-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
                            "--chunks", str(chunks), "-t", THREADS], out.with_suffix(".log"))


def save_base_logits(model: Path, text: Path, base: Path, ctx: int, chunks: int) -> float:
    """llama-perplexity --kl-divergence-base: store the reference's log-probs; returns its perplexity."""
    out = _tool("llama-perplexity", ["-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                                     "-t", THREADS, "--kl-divergence-base", str(base)], base.with_suffix(".log"))
    return float(re.search(rf"Final estimate: PPL = {_NUMBER}", out).group(1))


def kl_divergence(model: Path, base: Path, ctx: int, chunks: int) -> dict[str, float]:
    """llama-perplexity --kl-divergence against the stored base: ppl, KLD (mean, p99), same top-1 %."""
    out = _tool("llama-perplexity", ["-m", str(model), "-c", str(ctx), "--chunks", str(chunks), "-t", THREADS,
                                     "--kl-divergence-base", str(base), "--kl-divergence"],
                model.with_suffix(".kld.log"))
    found = {key: re.search(pattern, out) for key, pattern in KLD_FIELDS.items()}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"llama-perplexity printed no {', '.join(missing)} for {model}")
    return {k: float(m.group(1)) for k, m in found.items()}


if __name__ == "__main__":
    for name, path in ensure_tools().items():
        print(f"{name}: {path}")


def logits(path: Path, ids: list[int], threads: int = 2):
    """llama.cpp's (llama-cpp-python's) logits, float64 [len(ids), vocab], for the tokens `ids` of the GGUF at `path`."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(512, len(ids)), n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    out = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    del llm
    return out


def kl(ref, other) -> tuple[float, float]:
    """Mean and max over positions of KL(softmax(ref) || softmax(other)), natural log."""
    import torch

    p, q = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    per = (p.exp() * (p - q)).sum(-1)
    return float(per.mean()), float(per.max())

