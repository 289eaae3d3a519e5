"""Calibration across processes with torch.distributed (gloo on CPUs, nccl on GPUs).

Each rank walks its contiguous share of the calibration samples through every layer; before each
solve the statistics are summed over the ranks (`all_reduce`: Hessians, sums and token counts added,
maxima taken), so every rank solves the same statistics and, the solve being deterministic,
writes the same quantized layer without a broadcast; the ranks then carry their own samples on
through it. Rank 0 writes the output.

Against one process the only difference is the order of the Hessian's float64 sum: one process
adds the samples' float32 products one after another, N ranks add their shares and then the
shares. tests/calibration/test_distributed.py checks the result against the single-process run.

Launch: `lowbit quantize … --workers N` runs `python -m torch.distributed.run --nproc-per-node N
-m lowbit quantize …` on this machine; across machines run torchrun yourself on each, e.g.
  torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
           --rdzv-endpoint HOST:29500 -m lowbit quantize MODEL --method gptq --calib PATH --out DIR
and LOWBIT_DIST_BACKEND=nccl on GPUs (the default is gloo; under nccl the CPU statistics are reduced on
each rank's GPU: not yet run here).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .stats import InputStats

BACKEND_ENV = "LOWBIT_DIST_BACKEND"


@dataclass(frozen=True)
class Workers:
    """This process's place among the calibration processes."""

    rank: int
    world: int

    def share(self, n: int) -> slice:
        """The contiguous slice of n samples this rank walks (the first n % world ranks take one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def from_environment() -> Workers | None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=os.environ.get(BACKEND_ENV, "gloo"))
    return Workers(dist.get_rank(), dist.get_world_size())


def close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_stats(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    """Sum (max for absmax) every rank's statistics in place; `stats` maps linears to possibly shared
    InputStats objects (a group's linears share one), each reduced once. Kept rows cannot be summed:
    LowbitError-free ValueError for them (callers refuse "rows" before the walk)."""
    import torch.distributed as dist

    seen: set[int] = set()
    for st in stats.values():
        if id(st) in seen:
            continue
        seen.add(id(st))
        if st.kept_rows:
            raise ValueError("kept calibration rows cannot be reduced across processes")
        for name in ("hessian", "abs_sum", "sq_sum", "power_sums"):
            t = getattr(st, name)
            if t is not None:
                _all_reduce(t, dist.ReduceOp.SUM)
        if st.absmax is not None:
            _all_reduce(st.absmax, dist.ReduceOp.MAX)
        tokens = torch.tensor([st.tokens], dtype=torch.int64)
        _all_reduce(tokens, dist.ReduceOp.SUM)
        st.tokens = int(tokens)
    return stats


def _all_reduce(t: torch.Tensor, op) -> None:
    """all_reduce of a CPU tensor in place. The walk keeps its statistics on the CPU; nccl reduces GPU
    tensors only, so under nccl each goes to this rank's GPU (LOCAL_RANK) and back. The nccl path has
    not run here (no GPU on this project's machines); gloo's is tested."""
    import torch.distributed as dist

    if dist.get_backend() != "nccl":
        dist.all_reduce(t, op=op)
        return
    on_gpu = t.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    dist.all_reduce(on_gpu, op=op)
    t.copy_(on_gpu.cpu())
