"""GPTQ on a GGUF block grid: llama.cpp's formats with OBS error compensation.

W [out, in] is cut into the type's blocks along the input dimension (32 weights for the legacy
types, 256-weight super-blocks for the K-quants). Block by block, in natural column order:

  1. the block's scales (and mins) come from lowbit's GGUF quantizer run on the block's
     *current* weights — already updated by the error feedback of the earlier blocks — with the
     importance vector (imatrix, defaulting to diag H) weighting its search; they stay fixed;
  2. its columns are rounded one by one onto that fixed grid (value = step * code + offset,
     read off ggml's dequantizer), each column's error, scaled by 1/U_jj, spread over the
     not-yet-quantized columns with U the upper Cholesky factor of the damped H⁻¹ (GPTQ);
  3. the codes are written into the block's bytes; the errors of the block are applied lazily
     to the later blocks.

The result is the tensor's GGUF bytes, readable by llama.cpp like any other.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from lowbit.formats.gguf import dequantize_gguf, gguf_type, quantize_gguf
from lowbit.formats.gguf.registry import code_grid
from lowbit.methods.gptq import GptqStats, checked_inputs, proxy_loss, upper_inverse_cholesky


def gptq_gguf(W: Tensor, H: Tensor, type_name: str, imatrix: Tensor | np.ndarray | None = None,
              damp: float = 0.01) -> tuple[np.ndarray, GptqStats]:
    """W [out, in], H [in, in] = Σ xᵀx -> (uint8 [out, in / block * bytes_per_block], GptqStats).

    imatrix [in]: weights of the scale search (default diag(H) / max(diag H), the same ranking).
    Dead columns (H_jj == 0) get H_jj = 1 and are quantized as zeros. Pure: W and H are not modified.
    """
    start = time.perf_counter()
    t = gguf_type(type_name)
    if t.set_codes is None:
        raise ValueError(f"gptq_gguf: {type_name} is not a uniform grid; GPTQ needs one")
    W0, diag, dead, mean_diag = checked_inputs(W, H, "gptq_gguf")
    out, n = W0.shape
    B = t.block_size
    if n % B:
        raise ValueError(f"gptq_gguf: {type_name} needs rows that are a multiple of {B}, got {n}")
    imp = (diag / diag.max()).float() if imatrix is None else torch.as_tensor(imatrix).float()
    U, damp = upper_inverse_cholesky(H.detach(), damp, mean_diag, dead)
    Wt = W0.clone()
    Wt[:, dead] = 0.0
    Wt = Wt.T.contiguous()  # [in, out]: row j = column j of W (rows are contiguous)

    n_blocks = n // B
    data = np.empty((out, n_blocks, t.bytes_per_block), dtype=np.uint8)  # row r: its blocks in order
    for b in range(n_blocks):
        i1, i2 = b * B, (b + 1) * B
        W1 = Wt[i1:i2].clone()  # [B, out] this block, updated column by column
        blocks = quantize_gguf(W1.T.contiguous(), type_name, imp[i1:i2])  # [out, bytes]: one block per row
        step, offset = (torch.from_numpy(a).T for a in code_grid(blocks, type_name))  # [out, B] -> [B, out]
        usable = step != 0  # a block of zeros has step 0: every code decodes to the offset
        safe_step = torch.where(usable, step, torch.ones_like(step))
        codes = torch.empty(B, out, dtype=torch.uint8)
        Err1 = torch.zeros_like(W1)  # [B, out] scaled errors (w - q) / U_jj
        U1 = U[i1:i2, i1:i2]
        for i in range(B):
            w = W1[i]
            c = torch.where(usable[i], torch.round((w - offset[i]) / safe_step[i]), 0.0).clamp_(0, t.code_max)
            w_q = step[i] * c + offset[i]
            err = (w - w_q).div_(U1[i, i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)  # OBS update of the rest of the block
            Err1[i] = err
            codes[i] = c.to(torch.uint8)
        data[:, b] = t.set_codes(blocks, codes.T.contiguous().numpy())
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy update of the later blocks

    data = data.reshape(out, n_blocks * t.bytes_per_block)  # [out, blocks, bytes] -> GGUF row layout
    loss = proxy_loss(W0, dequantize_gguf(data, type_name, (out, n)), H)
    rtn = dequantize_gguf(quantize_gguf(W0, type_name, imp), type_name, (out, n))
    return data, GptqStats(loss, proxy_loss(W0, rtn, H), time.perf_counter() - start, damp)
