"""quantize()'s first steps on the float model: the rotation (QuaRot's seeded matrices, SpinQuant's
trained ones, or a saved plan) fused in, and the simulated KV quantizer installed."""
from __future__ import annotations

from tqdm.auto import tqdm

from .errors import LowbitError
from .log import logger
from .nn.kv_attention import install_kv_quant
from .rotations.fuse import check_rotatable
from .rotations.plan import rotate, rotation_matrices


def rotate_and_install_kv(loaded, config, samples, progress: bool) -> tuple:
    """Apply config.rotation and config.kv to loaded.model in place; returns (the matrices fused or
    None, SpinQuant's SpinResult or None). LowbitError with the reason when the family refuses."""
    matrices, spin = None, None
    if config.rotation is not None:
        try:
            check_rotatable(loaded.spec)
            matrices = rotation_matrices(config.rotation, loaded.dims.hidden, loaded.dims.head_dim)
            if config.rotation.spin is not None:
                spin = _spin(loaded, config, samples, matrices, progress)
                matrices = {"R1": spin.R1, **({"R2": spin.R2} if spin.R2 is not None else {})}
            rotate(loaded.model, loaded.spec, loaded.dims, config.rotation, matrices)
        except ValueError as e:
            raise LowbitError(str(e)) from None
        logger.info("rotated: %s", config.rotation.to_dict())
    if config.kv is not None:     # installed first: later layers calibrate on the quantized cache's outputs
        try:
            install_kv_quant(loaded.model, loaded.spec, config.kv)
        except ValueError as e:
            raise LowbitError(str(e)) from None
    return matrices, spin


def _spin(loaded, config, samples, matrices: dict, progress: bool):
    """SpinQuant's training of R1/R2 from `matrices`, through the planned default weight, activation and
    KV formats (rotations.spinquant)."""
    from .rotations.spinquant import learn_rotations

    spec, spin = loaded.spec, config.rotation.spin
    act = config.act_plan.default if config.act_plan is not None else None
    prepare = (lambda m: install_kv_quant(m, spec, config.kv)) if config.kv is not None else None
    bar = tqdm(total=spin.steps, desc="spinquant", unit="step", disable=not progress, leave=False)

    def report(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    try:
        result = learn_rotations(loaded.model, spec, loaded.dims, samples, matrices["R1"], matrices.get("R2"),
                                 config.format_plan.default, act, spin, prepare, report)
    finally:
        bar.close()
    logger.info("spinquant: %d steps in %.0f s, loss %.3f -> %.3f%s", len(result.losses), result.seconds,
                result.losses[0], result.losses[-1], " (time limit)" if result.stopped_early else "")
    return result

