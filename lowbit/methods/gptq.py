"""GPTQ (Frantar et al., 2022): column-by-column quantization with OBS error feedback.

Names follow the paper: W [out, in] the weight, H = Σ xᵀx [in, in] the (unnormalised)
Hessian of the layer-wise squared error, U the upper Cholesky factor of the damped H⁻¹.
Each column is rounded to the format's grid and its error, scaled by 1/U_jj, is spread
over the not-yet-quantized columns (U_j,j+1: ); updates are applied lazily per block.

Group parameters (scales / zero-points of each group of input columns) follow the format's
own rule (fmt.quantize) applied to the group's weights:
  * natural order: when quantization reaches the group's first column, from the weights as
    updated by the error feedback so far (the standard approach);
  * act_order with static_groups (default): all groups up front from W;
  * act_order without static_groups: when the first column of the group (in processing
    order) is reached, from the group's current, error-updated weights.
Groups are always the format's natural-order groups, so the result is a plain QTensor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lowbit.formats import FP8Format, Format, IntFormat, MXFP4Format, NFFormat, QTensor
from lowbit.formats.fp8 import FP8_DTYPES, FP8_MAX
from lowbit.formats.mx import E2M1_MAGNITUDES, E8M0_BIAS, e2m1_round
from lowbit.formats.sparse import SparseOutliers
from lowbit.formats.normal_float import nf_levels
from lowbit.methods.rtn import mse_clip

CLIP_MODES = ("none", "mse")
DAMP_RETRIES = 6  # Cholesky failures: damping is multiplied by 10 up to this many times
GATHER_ROWS = 512  # upper_inverse_cholesky copies H this many rows at a time


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ options.

    block_size: columns per lazy-update block, >= 1.
    damp: λ = damp · mean(diag H) is added to diag H, >= 0 (raised tenfold while the
        Cholesky factorisation fails).
    act_order: process columns by descending diag(H) (groups stay in natural order).
    static_groups: with act_order, compute every group's scales up front from W (True) or
        when the group is first reached (False). Without act_order it changes nothing.
    clip: "none" or "mse": each group's scale from mse_clip of the group's weights
        (the RTN clip search) at the moment the group's parameters are computed.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = True
    clip: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GptqConfig.block_size must be an int >= 1, got {self.block_size!r}")
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float))
                or not 0 <= self.damp < math.inf):
            raise ValueError(f"GptqConfig.damp must be a finite number >= 0, got {self.damp!r}")
        for name in ("act_order", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GptqConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.clip not in CLIP_MODES:
            raise ValueError(f"GptqConfig.clip must be one of {CLIP_MODES}, got {self.clip!r}")

    def options(self) -> dict:
        """The keyword options of gptq / gptq_shared / gptq_outliers."""
        return dict(block_size=self.block_size, damp=self.damp, act_order=self.act_order,
                    static_groups=self.static_groups, clip=self.clip)


@dataclass(frozen=True)
class GptqStats:
    """proxy_loss = tr(E H Eᵀ) with E = W - W_q; rtn_proxy_loss the same for fmt.quantize(W)."""

    proxy_loss: float
    rtn_proxy_loss: float
    seconds: float
    damp: float                      # the damping factor finally used


PROXY_COLUMNS = 2048     # proxy_loss reads H this many columns at a time (no float32 copy of a wide H)


def proxy_loss(W: Tensor, W_q: Tensor, H: Tensor) -> float:
    """tr(E H Eᵀ) = Σ_tokens ‖x Eᵀ‖², E = W - W_q [out, in], H [in, in]; float32 products, float64 sum."""
    E = W.float() - W_q.float()
    total = 0.0
    for a in range(0, E.shape[1], PROXY_COLUMNS):       # tr(E H Eᵀ) = Σ_cols (E H[:, cols]) ⊙ E[:, cols]
        cols = slice(a, a + PROXY_COLUMNS)
        total += float((E @ H[:, cols].float()).mul_(E[:, cols]).sum(dtype=torch.float64))
    return total


def all_finite(T: Tensor, rows: int = 1024) -> bool:
    """Whether T has no NaN/Inf, checked a block of rows at a time (isfinite's temporaries for a whole
    [11008, 11008] float64 H would be a second 0.9 GiB)."""
    return all(bool(torch.isfinite(T[a:a + rows]).all()) for a in range(0, max(T.shape[0], 1), rows))


# --- one column against fixed group parameters ---------------------------------------------
ColumnQuantizer = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]


def column_quantizer(fmt: Format) -> ColumnQuantizer:
    """quant(w [out], scale [R], zero [R] | None) -> (codes [out] uint8, w_q [out] float32).

    scale / zero: one group's stored parameters as float32 (R = out, or 1 per tensor). The
    codes are exactly those fmt.quantize gives the same values under the same parameters,
    and w_q equals fmt.dequantize of them.
    """
    if isinstance(fmt, IntFormat):
        def quant_int(w, scale, zero):
            u = fmt._encode(w, scale, zero)  # elementwise, so [out] against [R] broadcasts
            return u.to(torch.uint8), fmt._decode_(u, scale, zero)
        return quant_int
    if isinstance(fmt, NFFormat):
        levels = nf_levels(fmt.bits)
        mids = ((levels[1:] + levels[:-1]) / 2).tolist()

        def quant_nf(w, scale, zero):
            x = w / scale
            idx = torch.zeros_like(x)
            for mid in mids:
                idx.add_(torch.gt(x, mid))  # nearest level = midpoints below x (ties go down)
            idx = idx.long()
            return idx.to(torch.uint8), levels[idx] * scale
        return quant_nf
    if isinstance(fmt, FP8Format):
        fp8_max, dtype = FP8_MAX[fmt.kind], FP8_DTYPES[fmt.kind]

        def quant_fp8(w, scale, zero):
            v = (w / scale).clamp_(-fp8_max, fp8_max).to(dtype)
            return v.view(torch.uint8), v.float() * scale
        return quant_fp8
    if isinstance(fmt, MXFP4Format):
        magnitudes = torch.tensor(E2M1_MAGNITUDES)

        def quant_mx(w, scale, zero):
            idx = e2m1_round(w.abs() / scale)
            negative = (w < 0) & (idx > 0)  # zero is stored with sign 0
            mags = magnitudes[idx.long()]
            codes = idx.to(torch.uint8) | (negative.to(torch.uint8) << 3)
            return codes, torch.where(negative, -mags, mags) * scale
        return quant_mx
    raise ValueError(f"gptq has no column quantizer for format family {fmt.family!r}")


def _float_params(fmt: Format, scales: Tensor, zeros: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Stored scales / zeros [R, k] -> float32 values the column quantizer takes."""
    if isinstance(fmt, MXFP4Format):  # E8M0: biased power-of-two exponent
        s = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - E8M0_BIAS)
    else:
        s = scales.float()
    return s, None if zeros is None else zeros.float()


# --- the solver -------------------------------------------------------------------------------
def lower_triangular_inverse(L: Tensor, base: int = 192) -> Tensor:
    """L⁻¹ [n, n] of a lower-triangular L [n, n] (zeros above the diagonal, as a Cholesky factor has
    them) with a nonzero diagonal, by halves, in L's own
    storage (L is overwritten and returned: no second [n, n] buffer):
    L = [[A, 0], [B, C]] has L⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]. Matrix products do most of
    the work, about half that of a triangular solve against the identity."""
    n = L.shape[0]
    if n <= base:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False))
        return L
    k = n // 2
    A_inv, C_inv = lower_triangular_inverse(L[:k, :k], base), lower_triangular_inverse(L[k:, k:], base)
    L[k:, :k] = -(C_inv @ L[k:, :k]) @ A_inv             # B's block: read before it is written
    return L


def reverse_(M: Tensor, chunk: int = 1 << 22) -> Tensor:
    """M [n, n] dense (row- or column-major, as LAPACK returns factors) -> M.flip(0, 1) in M's own storage:
    the flat array reversed, a chunk from each end at a time (no [n, n] temporary)."""
    # [n·n]: flipping both axes maps offset i·s0 + j·s1 to its mirror from the end, in either order
    v = M.view(-1) if M.is_contiguous() else M.T.view(-1)
    N = v.numel()
    for a in range(0, N // 2, chunk):
        c = min(chunk, N // 2 - a)
        front = v[a:a + c].clone()
        v[a:a + c] = v[N - a - c:N - a].flip(0)
        v[N - a - c:N - a] = front.flip(0)
    return M


def upper_inverse_cholesky(H: Tensor, damp: float, mean_diag: float | None = None, dead: Tensor | None = None,
                           perm: Tensor | None = None) -> tuple[Tensor, float]:
    """H [in, in] -> (U upper [in, in] float32 with UᵀU = (H' + λI)⁻¹, damp), H' = H with H_jj = 1 where
    dead [in] (bool), rows and columns taken in the order perm [in] (None: as they are);
    λ = damp · mean_diag, by default the mean of H's diagonal. H is not modified and never copied in
    float64: the work is float32, with at most two [in, in] buffers and two quarter-size blocks alive
    beside H (at 11008 inputs, a 7B model's down_proj, each float64 copy would be 0.9 GiB)."""
    if mean_diag is None:
        mean_diag = float(H.diagonal().double().mean())
    n = H.shape[0]
    order = (torch.arange(n) if perm is None else perm).flip(0)    # [in]: processing order, reversed (J)
    for _ in range(DAMP_RETRIES + 1):
        # With J the order reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is
        # upper triangular with a positive diagonal: the factor wanted, from one Cholesky and one
        # triangular inverse instead of Cholesky, full inverse and Cholesky again
        Hd = torch.empty(n, n, dtype=torch.float32)      # J H' J in processing order, float32
        for a in range(0, n, GATHER_ROWS):                # a block of rows at a time: no [n, n] temporary
            Hd[a:a + GATHER_ROWS] = H[order[a:a + GATHER_ROWS]][:, order]
        if dead is not None:
            Hd.diagonal()[dead[order]] = 1.0
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            U = reverse_(lower_triangular_inverse(L))    # L⁻¹ in L's storage, then J L⁻¹ J in the same
            if all_finite(U):
                return U, damp
        damp = max(damp * 10, 1e-6)
    raise ValueError(f"gptq: H is not positive definite even with damp {damp:g}")


def checked_inputs(W: Tensor, H: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor, float]:
    """Validate W [out, in] and H [in, in] -> (W float32, diag [in] float64 of H with H_jj = 1 on dead
    columns, dead [in] bool, that diagonal's mean). H itself is not copied (upper_inverse_cholesky
    takes dead and applies the same fix to its float32 copy)."""
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D float tensor [out, in], got {getattr(W, 'shape', W)!r}")
    n = W.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for W {tuple(W.shape)}, got {tuple(H.shape)}")
    if not (all_finite(W) and all_finite(H)):
        raise ValueError(f"{who}: W and H must be finite, got NaN or inf values")
    diag = H.detach().diagonal().double().clone()       # [in]
    dead = diag == 0
    diag[dead] = 1.0
    return W.detach().float(), diag, dead, float(diag.mean())


def gptq(W: Tensor, H: Tensor, fmt: Format, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = True, clip: str = "none") -> tuple[QTensor, GptqStats]:
    """Quantize W [out, in] with the Hessian H [in, in] = Σ xᵀx; returns (QTensor, GptqStats).

    Dead columns (H_jj == 0: the input channel was always 0) get H_jj = 1 and W[:, j] = 0,
    so their codes encode 0. Pure: no hooks, I/O or device moves; W and H are not modified.
    """
    start = time.perf_counter()
    q, damp, _ = _gptq_codes(W, H, fmt, block_size, damp, act_order, static_groups, clip)
    return q, _stats(W, q, H, time.perf_counter() - start, damp)


def _stats(W: Tensor, q: QTensor, H: Tensor, seconds: float, damp: float) -> GptqStats:
    """GPTQ's output error on H beside that of plain RTN of the same weight."""
    W0, fmt = W.detach().float(), q.fmt
    return GptqStats(proxy_loss(W0, fmt.dequantize(q), H), proxy_loss(W0, fmt.dequantize(fmt.quantize(W0)), H),
                     seconds, damp)


def _gptq_codes(W: Tensor, H: Tensor, fmt: Format, block_size: int, damp: float, act_order: bool,
                static_groups: bool, clip: str, keep: Tensor | None = None) -> tuple[QTensor, float, Tensor | None]:
    """gptq's solve without its statistics: (QTensor, the damping finally used, the kept weights).

    keep: bool [out, in] weights held in float16 instead of rounded (dense-and-sparse): their error
    is 0, the group parameters are computed with them set to 0; returns them [out, in] (0 elsewhere)
    as GPTQ had updated them when their column was reached."""
    GptqConfig(block_size, damp, act_order, static_groups, clip)  # validates the options
    W0, diag, dead, mean_diag = checked_inputs(W, H, "gptq")
    out, n = W0.shape
    Wk = W0.clone()
    Wk[:, dead] = 0.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n)
    U, damp = upper_inverse_cholesky(H.detach(), damp, mean_diag, dead, perm if act_order else None)
    Wt = Wk.T[perm].contiguous()  # [in, out]: row p = the column processed p-th (rows are contiguous)
    Kt = None if keep is None else keep.T[perm].contiguous()  # [in, out]: the keep mask in processing order
    kept = None if keep is None else torch.zeros_like(Wt)

    # groups: natural-order groups of the format; gid[p] = group of the column processed p-th
    s_shape = fmt.scale_shape((out, n))
    n_groups = s_shape[1]
    gsize = fmt.group_size if fmt.group_size > 0 else n
    gid = (perm // gsize).tolist()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    members = [inv[g * gsize:(g + 1) * gsize] for g in range(n_groups)]  # processing positions per group

    def params(Wc: Tensor, Kc: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Weights [out, w] of one group (or all groups) -> stored scales, zeros [R, groups]; kept
        weights (Kc) do not count towards the grid."""
        if Kc is not None:
            Wc = Wc.masked_fill(Kc, 0.0)
        q = fmt.quantize(Wc, mse_clip(Wc, fmt) if clip == "mse" else None)
        return q.scales, q.zeros

    scales = torch.empty(s_shape, dtype=fmt.scale_dtype)
    zeros = torch.empty(s_shape, dtype=torch.uint8) if fmt.has_zeros else None
    fparams: list = [None] * n_groups  # float32 (scale [R], zero [R] | None) of each group once known
    if act_order and static_groups:
        scales, zeros = params(Wk, keep)
        fs, fz = _float_params(fmt, scales, zeros)
        fparams = [(fs[:, g], None if fz is None else fz[:, g]) for g in range(n_groups)]

    quant = column_quantizer(fmt)
    codes = torch.empty(n, out, dtype=torch.uint8)  # row p: codes of the column processed p-th
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2].clone()  # [b, out] the block, updated column by column
        Err1 = torch.zeros_like(W1)  # [b, out] scaled errors (w - q) / U_jj, for the lazy update
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal().tolist()  # U_jj as Python floats: no 0-d tensor per column
        for i in range(i2 - i1):
            g = gid[i1 + i]
            if fparams[g] is None:  # the group's first column: its current weights give the parameters
                pos = members[g]  # none of them processed yet, so all >= i1 + i
                inside, beyond = pos[pos < i2] - i1, pos[pos >= i2]
                pending = U[i1:i1 + i, beyond].T @ Err1[:i]  # [k, out] lazy update not yet applied
                Wc = torch.cat([W1[inside], Wt[beyond] - pending]).T  # [w, out] -> [out, w]
                Kc = None if Kt is None else torch.cat([Kt[i1 + inside], Kt[beyond]]).T
                s, z = params(Wc, Kc)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
                fs, fz = _float_params(fmt, s, z)
                fparams[g] = (fs[:, 0], None if fz is None else fz[:, 0])
            w = W1[i]
            c, w_q = quant(w, *fparams[g])
            if Kt is not None and bool(Kt[i1 + i].any()):     # kept weights: float16, no error to spread
                m = Kt[i1 + i]
                kept[i1 + i] = torch.where(m, w.half().float(), 0.0)
                w_q = torch.where(m, kept[i1 + i], w_q)
            err = torch.sub(w, w_q, out=Err1[i]).div_(d[i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)  # OBS update of the rest of the block
            codes[i1 + i] = c
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy update of the later blocks

    q = QTensor(codes[inv].T.contiguous(), scales, zeros, (out, n), fmt)  # [in, out] -> [out, in]
    return q, damp, None if kept is None else kept[inv].T.contiguous()


def gptq_shared(Ws: list[Tensor], H: Tensor, fmt: Format, *, block_size: int = 128, damp: float = 0.01,
                act_order: bool = False, static_groups: bool = True,
                clip: str = "none") -> list[tuple[QTensor, GptqStats]]:
    """GPTQ of several weights [out_i, in] that read the same input (one H [in, in]), in one solve.

    GPTQ treats rows independently (each row's error feedback uses only that row), so stacking
    the weights row-wise gives each weight its own result with a third (q/k/v) or half (gate/up)
    of the column steps. Formats with one scale per tensor couple the rows: those are solved
    one by one. Returns [(QTensor, GptqStats)] in the order of Ws.
    """
    options = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups, clip=clip)
    n = Ws[0].shape[-1]
    if len(Ws) == 1 or fmt.scale_shape((1, n))[0] != 1 or fmt.scale_shape((2, n))[0] != 2:
        return [gptq(W, H, fmt, **options) for W in Ws]
    start = time.perf_counter()
    q, damp, _ = _gptq_codes(torch.cat([W.detach().float() for W in Ws]), H, fmt, **options)  # [Σ out_i, in]
    seconds = time.perf_counter() - start
    results, r0 = [], 0
    for W in Ws:
        r1 = r0 + W.shape[0]
        part = QTensor(q.codes[r0:r1].contiguous(), q.scales[r0:r1].contiguous(),
                       None if q.zeros is None else q.zeros[r0:r1].contiguous(), (r1 - r0, n), fmt)
        results.append((part, _stats(W, part, H, seconds * (r1 - r0) / q.shape[0], damp)))
        r0 = r1
    return results


def gptq_outliers(Ws: list[Tensor], H: Tensor, fmt: Format, share: float, *, layout: str = "entries",
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
                  clip: str = "none") -> list[tuple[QTensor, GptqStats, SparseOutliers]]:
    """Dense-and-sparse GPTQ of weights [out_i, in] sharing H: in each weight the `share` of weights of
    largest OBS saliency (methods.outliers) is kept in float16, GPTQ rounds the rest around them.
    Returns [(dense QTensor, GptqStats of dense + sparse, SparseOutliers)] in the order of Ws."""
    from lowbit.methods.outliers import choose_outliers

    options = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups, clip=clip)
    results = []
    for W in Ws:                     # one weight at a time: its kept weights and group grids are its own
        start = time.perf_counter()
        keep = choose_outliers(W, H, fmt, share, damp, layout)
        q, used, kept = _gptq_codes(W, H, fmt, keep=keep, **options)
        sparse = SparseOutliers.from_mask(kept, keep, layout)
        W_dq = sparse.apply(fmt.dequantize(q))
        W0 = W.detach().float()
        stats = GptqStats(proxy_loss(W0, W_dq, H), proxy_loss(W0, fmt.dequantize(fmt.quantize(W0)), H),
                          time.perf_counter() - start, used)
        results.append((q, stats, sparse))
    return results
