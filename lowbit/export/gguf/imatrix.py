"""Importance matrices for the GGUF quantizers: per input column of each linear, the mean of x^2
over calibration tokens (what llama-imatrix collects), keyed by GGUF tensor name.

`compute_imatrix` runs the float model over calibration windows with lowbit's capture hooks;
`read_imatrix` reads llama.cpp's GGUF imatrix file (`<tensor>.in_sum2` / `<tensor>.counts`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import LowbitError
from ...log import logger
from .names import family_for, gguf_name

CALIB_SAMPLES = 32   # windows drawn from the --calib text
CALIB_SEQ_LEN = 512  # tokens per window (at most the model's context)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 [row_length]} from a llama.cpp GGUF imatrix file (dense models)."""
    from ...models.gguf_check import open_gguf

    reader = open_gguf(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None or counts.size != 1 or counts.reshape(-1)[0] <= 0:
            raise LowbitError(f"imatrix {path}: {base} needs one positive count (dense models only)")
        out[base] = sums.reshape(-1) / counts.reshape(-1)[0]
    if not out:
        raise LowbitError(f"imatrix {path}: no <tensor>.in_sum2 entries (not a GGUF imatrix file?)")
    return out


@torch.no_grad()
def compute_imatrix(loaded, samples: torch.Tensor) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean x^2 per input column} of every decoder linear over `samples` [n, seq_len]."""
    from ...calibration.capture import capture_inputs

    family = family_for(loaded.model.config.model_type)
    spec = loaded.spec
    names = [f"{spec.layers}.{i}.{lin}" for i in range(loaded.dims.n_layers) for lin in spec.linears]
    with capture_inputs(loaded.model, names, {"sq_mean"}) as stats:
        for row in samples:  # one window at a time: bounded activations, no cross-window attention
            loaded.model(row[None, :], use_cache=False)
    # q/k rows are permuted in the GGUF, their input columns are not: the imatrix maps as is
    out = {gguf_name(f"{name}.weight", family)[0]: s.sq_mean.numpy() for name, s in stats.items()}
    logger.info("imatrix from %d x %d calibration tokens, %d tensors", *samples.shape, len(out))
    return out


def imatrix_from_text(loaded, text) -> dict[str, np.ndarray]:
    """compute_imatrix over CALIB_SAMPLES windows of CALIB_SEQ_LEN tokens of `text` (a data.text.Text)."""
    from ...data.calibration import CalibConfig
    from ...quantize import calibration_samples

    seq_len = min(CALIB_SEQ_LEN, getattr(loaded.model.config, "max_position_embeddings", CALIB_SEQ_LEN))
    return compute_imatrix(loaded, calibration_samples(loaded, text, CalibConfig(samples=CALIB_SAMPLES,
                                                                                 seq_len=seq_len)))
