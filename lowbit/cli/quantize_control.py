"""`lowbit quantize`'s run control: where a calibrated run checkpoints (and whether --resume may use it),
the peak memory predicted before the run, and --workers launching torchrun."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LowbitError
from ..log import logger
from ..quantize import QuantizeConfig


def resume_dir(args: argparse.Namespace, config: QuantizeConfig) -> Path | None:
    """Where a calibrated run checkpoints its layers (None for RTN: nothing to resume); refuses --resume
    without a walk and a fresh run over an interrupted one's checkpoint."""
    from ..calibration.resume import STATE, checkpoint_dir

    root = checkpoint_dir(Path(args.out))
    if not config.calibrated or config.inputs == "float":
        if args.resume:
            raise LowbitError(f"--resume continues a calibrated walk (--calib); --method {config.method} "
                              + ("with --inputs float writes the layers at the end" if config.calibrated
                                 else "has none"))
        return None
    if args.resume and args.save_plan:
        raise LowbitError("--save-plan records every layer's AWQ scales, which a resumed run does not hold for the "
                          "checkpointed layers: drop --save-plan or run without --resume")
    if not args.resume and (root / STATE).exists() and not args.overwrite:
        raise LowbitError(f"an interrupted run's checkpoint is at {root}: --resume continues it, --overwrite "
                          "starts over")
    return root


def launch(args: argparse.Namespace, config: QuantizeConfig) -> int:
    """--workers N: the same command without --workers under torchrun, N processes on this machine, one
    thread each of this machine's cores; the exit status of the launch."""
    import os
    import socket
    import subprocess
    import sys

    from .common import without_flag

    if not config.calibrated:
        raise LowbitError(f"--workers splits the calibration samples: --method {config.method} has none")
    if args.workers > args.samples:
        raise LowbitError(f"--workers {args.workers} is more than the {args.samples} calibration samples (--samples)")
    if args.resume or config.inputs == "float" or (config.rotation is not None and config.rotation.spin_steps):
        raise LowbitError("--workers runs the layer walk only: not with --resume, --inputs float or SpinQuant")
    with socket.socket() as sock:                      # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.workers),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "lowbit",
               *without_flag(args.argv, "--workers")]
    logger.info("launching %d calibration processes (gloo, %d thread(s) each)", args.workers, threads)
    done = subprocess.run(command, env=env)
    return 0 if done.returncode == 0 else 2


def check_memory(loaded, config: QuantizeConfig, samples, offload):
    """Log the predicted peak memory; refuse, naming the flags that would fit, when it exceeds what the
    machine has (available now plus what this process already holds)."""
    from .. import quantize as q
    from ..calibration.memory import GIB, estimate_quantize_memory, fitting_flags

    walk = q.choose_walk(config, loaded.dims, samples, Path(offload) if offload else None) if config.calibrated else None
    hessians = bool({"gptq", "awq", "imatrix"} & set(config.steps))
    window = getattr(loaded.model.config, "sliding_window", None) is not None
    seq_len = samples.shape[1] if samples is not None else 0

    def estimate(n, w, off):
        return estimate_quantize_memory(loaded.dims, n, seq_len, w, off, hessians, window, config.quantize_head,
                                        lazy=loaded.weights is not None)

    n = samples.shape[0] if samples is not None else 0
    predicted = estimate(n, walk, bool(offload))
    budget = q.memory_budget()
    logger.info("predicted peak memory: %s; this machine has %.2f GiB for it", predicted.describe(), budget / GIB)
    if predicted.total > budget:
        flags = fitting_flags(estimate, budget, n, walk, bool(offload))
        raise LowbitError(f"this run needs about {predicted.total / GIB:.1f} GiB at its peak and {budget / GIB:.1f} GiB "
                          "is available" + (f": try {' or '.join(flags)}" if flags else
                                            " and no calibration setting fits: use a machine with more memory"))
    return predicted
