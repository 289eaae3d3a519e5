"""Importance matrices for the GGUF quantizers: per input column of each linear, the mean of x^2
over calibration tokens (what llama-imatrix collects), keyed by GGUF tensor name.

`calibrate` runs the float model over calibration windows with lowbit's capture hooks (and, for
`--method gptq`, also accumulates each linear's Hessian); `write_imatrix` saves the imatrix in
llama.cpp's GGUF imatrix format and `read_imatrix` reads one (`<tensor>.in_sum2` / `<tensor>.counts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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


@dataclass(frozen=True)
class GGUFCalibration:
    """What one calibration pass over the float model gives the GGUF quantizers, per GGUF tensor name.

    imatrix:  mean x^2 per input column, float32 [row_length] (llama-imatrix's quantity);
    tokens:   how many token vectors it averages (llama.cpp's `counts`);
    hessians: H = sum x^T x, float64 [row_length, row_length], for GPTQ (None when not asked for),
              each window's first token counted sink_weight times.
    Inputs are the float model's own (not a partly quantized model's), so every mix reuses one pass.
    """

    imatrix: dict[str, np.ndarray]
    tokens: int
    hessians: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def calibrate(loaded, samples: torch.Tensor, hessians: bool = False, sink_weight: float | None = None) -> GGUFCalibration:
    """Statistics of every decoder linear's inputs over `samples` [n, seq_len], keyed by GGUF tensor name.

    sink_weight: each window's first token (the attention sink) counts this many times in the
    Hessians (default lowbit.quantize.SINK_WEIGHT, as for every calibrated method); the imatrix
    stays llama-imatrix's plain mean."""
    from ...calibration.capture import capture_inputs
    from ...quantize import SINK_WEIGHT

    sink_weight = SINK_WEIGHT if sink_weight is None else float(sink_weight)

    family = family_for(loaded.model.config.model_type)
    spec = loaded.spec
    # linears that share an input (q/k/v, gate/up) share one capture: {linear path: path captured}
    source = {f"{spec.layers}.{i}.{lin}": f"{spec.layers}.{i}.{g.linears[0]}"
              for i in range(loaded.dims.n_layers) for g in spec.groups for lin in g.linears}
    wanted = {"sq_mean", "hessian"} if hessians else {"sq_mean"}
    with capture_inputs(loaded.model, sorted(set(source.values())), wanted) as stats:
        for row in tqdm(samples, desc="calibration", unit="window", leave=False):
            # one window at a time: bounded activations; logits of the last position only (the head is not needed)
            loaded.model(row[None, :], use_cache=False, logits_to_keep=1)
    # q/k rows are permuted in the GGUF, their input columns are not: the statistics map as they are
    if hessians and sink_weight != 1.0:
        # a position-0 hidden state depends on its token alone: one-token passes give the sink's inputs
        with capture_inputs(loaded.model, sorted(set(source.values())), {"hessian"}) as sink:
            loaded.model(samples[:, :1], use_cache=False, logits_to_keep=1)
        for src, st in stats.items():
            st.hessian.add_(sink[src].hessian, alpha=sink_weight - 1.0)
    captured = {gguf_name(f"{name}.weight", family)[0]: stats[src] for name, src in source.items()}
    imatrix = {name: s.sq_mean.numpy() for name, s in captured.items()}
    tokens = next(iter(captured.values())).tokens
    logger.info("calibration: %d x %d tokens, %d tensors%s", *samples.shape, len(imatrix),
                ", with Hessians" if hessians else "")
    return GGUFCalibration(imatrix, tokens, {n: s.hessian for n, s in captured.items()} if hessians else None)


def compute_imatrix(loaded, samples: torch.Tensor) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean x^2 per input column} of every decoder linear over `samples` [n, seq_len]."""
    return calibrate(loaded, samples).imatrix


def calibration_windows(loaded, text) -> torch.Tensor:
    """CALIB_SAMPLES windows [n, seq_len] of CALIB_SEQ_LEN tokens (at most the model's context) of
    `text` (a data.text.Text), seeded as every calibrated method's."""
    from ...data.calibration import CalibConfig
    from ...quantize import calibration_samples

    seq_len = min(CALIB_SEQ_LEN, getattr(loaded.model.config, "max_position_embeddings", CALIB_SEQ_LEN))
    return calibration_samples(loaded, text, CalibConfig(samples=CALIB_SAMPLES, seq_len=seq_len))


def calibrate_on_text(loaded, text, hessians: bool = False) -> GGUFCalibration:
    """`calibrate` over `calibration_windows` of `text`."""
    return calibrate(loaded, calibration_windows(loaded, text), hessians)


def write_imatrix(path: Path, calibration: GGUFCalibration, dataset: str) -> Path:
    """Save the imatrix in llama.cpp's GGUF imatrix format (what llama-quantize --imatrix reads):
    general.type "imatrix", imatrix.datasets / chunk_count / chunk_size, and per tensor
    `<name>.in_sum2` (sum of x^2, float32 [1, row_length]) and `<name>.counts` (tokens, [1, 1])."""
    import os
    import tempfile

    from gguf import GGUFWriter

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    writer = GGUFWriter(tmp, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", CALIB_SAMPLES)
    writer.add_uint32("imatrix.chunk_size", calibration.tokens // CALIB_SAMPLES)
    for name in sorted(calibration.imatrix):
        sums = calibration.imatrix[name].astype(np.float64) * calibration.tokens
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[calibration.tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path
