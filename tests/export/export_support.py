"""Shared pieces of the export tests: quantized tiny directories, independent decoders, the peer runner.

The decoders here follow the targets' documented conventions and share no code with
lowbit.export (they read words bit by bit with int64 arithmetic), so a packing mistake in
lowbit cannot cancel out.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lowbit.export.lowbit_dir import save_quantized
from lowbit.formats import make_format
from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear
from lowbit.quantize import QuantizeConfig, quantize

PEER_SCRIPT = Path(__file__).with_name("peer_run.py")


def quantized_dir(src: Path, out: Path, bits: int, group: int, symmetric: bool, scale_rule: str = "absmax",
                  **config) -> Path:
    """RTN-quantize the model at `src` into a lowbit directory `out`."""
    loaded = load(str(src))
    fmt = make_format("int", bits=bits, group_size=group, symmetric=symmetric, scale_rule=scale_rule)
    quantize(loaded, QuantizeConfig(fmt=fmt, **config), progress=False)
    return save_quantized(loaded, {"method": "rtn"}, out)


def negative_scale_share(path: Path) -> float:
    """Share of the negative group scales over every QuantLinear of the lowbit directory at `path`."""
    scales = [m.scales.flatten() for m in load(str(path)).model.modules() if isinstance(m, QuantLinear)]
    return (torch.cat(scales) < 0).float().mean().item()


def lowbit_weights(path: Path) -> dict[str, torch.Tensor]:
    """name -> W_dq [out, in] float32 of every QuantLinear of the lowbit directory at `path`."""
    model = load(str(path)).model
    return {n: m.W_dq for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def read_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes [rows, n] from int32 words [rows, n_words]: code i = bits [i·b, (i+1)·b) of the row's
    little-endian stream of 32-bit words (a code may straddle two words)."""
    w = words.to(torch.int64) & 0xFFFFFFFF                         # the unsigned bit pattern
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)         # a zero word for straddling reads
    start = torch.arange(n, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    low = w[:, word] >> offset
    high = w[:, word + 1] << (32 - offset)
    return (low | high) & ((1 << bits) - 1)


def decode_gptq(tensors: dict, name: str, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """GPTQ v1: W[:, i] = scales[g_idx[i]] · (code[i] − (qzeros[g_idx[i]] + 1)), as float32 [out, in]."""
    out, in_features = shape
    codes = read_codes(tensors[f"{name}.qweight"].t(), bits, in_features)      # [out, in]
    zeros = read_codes(tensors[f"{name}.qzeros"], bits, out) + 1                # [G, out], v1: stored z − 1
    g_idx = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()                                  # [G, out]
    return (codes.float() - zeros.t().float()[:, g_idx]) * scales.t()[:, g_idx]


def run_peer(python: str | Path, engine: str, checkpoint: Path, request: dict, tmp: Path,
             env: dict | None = None, timeout: int = 1200) -> dict:
    """Run peer_run.py (lowbit made unimportable there) and return what it saved."""
    request_file, result_file = tmp / f"{engine}_request.pt", tmp / f"{engine}_result.pt"
    torch.save(request, request_file)
    proc = subprocess.run([str(python), "-I", str(PEER_SCRIPT), engine, str(checkpoint), str(request_file),
                           str(result_file)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{engine} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return torch.load(result_file)


def main_python() -> str:
    return sys.executable
